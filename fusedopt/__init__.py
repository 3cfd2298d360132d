"""fusedopt: fused optimizer steps and normalization layers for PyTorch.

Change one import line (torch.optim.AdamW -> fusedopt.AdamW) and keep the same numbers, state and
errors. Importing never fails: fusedopt.backends() says which kernels are usable here and why not.
"""

from fusedopt import functional, reference
from fusedopt._backends import backends
from fusedopt.optim import SGD, Adam, AdamW, Lion

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "Lion", "SGD", "backends", "functional", "reference"]
