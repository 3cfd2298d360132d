"""fusedopt.LayerNorm and fusedopt.RMSNorm: torch.nn's modules (same constructor, parameters,
init and state_dict keys, so a torch checkpoint loads unchanged) with a fused forward/backward.

forward(input) is torch's. forward(input, residual) is the pre-norm transformer's add-then-norm
in one pass: it returns (norm(input + residual), input + residual), the second being the new
residual stream."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt import functional


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None), plus keyword `backend` ("auto", "cpp", "triton", "reference")."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias,
                                     self.eps, residual=residual, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None), plus keyword `backend`; eps=None means torch.finfo(input.dtype).eps."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        return functional.rms_norm(input, self.normalized_shape, self.weight, self.eps,
                                   residual=residual, backend=self.backend)
