"""fusedopt: fused optimizer steps and normalization layers for PyTorch.

Change one import line (torch.optim.AdamW -> fusedopt.AdamW) and keep the same numbers, state and
errors. Importing never fails: fusedopt.backends() says which kernels are usable here and why not.
"""

from fusedopt import functional, nn, reference
from fusedopt._registry import backends
from fusedopt.nn import LayerNorm, RMSNorm
from fusedopt.optim import SGD, Adam, AdamW, Lion, Muon, muon_param_groups

__version__ = "0.1.0"
__all__ = ["SGD", "Adam", "AdamW", "LayerNorm", "Lion", "Muon", "RMSNorm", "backends", "functional",
           "muon_param_groups", "nn", "reference"]
