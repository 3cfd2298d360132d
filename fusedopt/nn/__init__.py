"""Drop-in replacements for torch.nn normalization modules (LayerNorm, RMSNorm: planned)."""

__all__: list[str] = []
