"""Drop-in replacements for torch.nn normalization modules."""

from fusedopt.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
