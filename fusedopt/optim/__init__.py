"""Drop-in replacements for torch.optim optimizers."""

from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.lion import Lion
from fusedopt.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "Lion", "SGD"]
