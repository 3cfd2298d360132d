"""Drop-in replacements for torch.optim optimizers."""

from fusedopt.optim.adam import Adam, AdamW
from fusedopt.optim.lion import Lion
from fusedopt.optim.muon import Muon, muon_param_groups
from fusedopt.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "Lion", "Muon", "SGD", "muon_param_groups"]
