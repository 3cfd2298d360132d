"""fusedopt.Lion: the Lion optimizer with every step fused."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fusedopt import functional
from fusedopt.optim import _lean
from fusedopt.optim._base import FusedOptimizer, group_tensors, params_with_grads, to_float


class Lion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    For each param with a grad g (negated if maximize):

        p = p * (1 - lr * weight_decay) - lr * sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g

    with sign(0) = 0, as lion-pytorch (torch.sign).

    Args: params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, and keyword-only
    maximize=False, capturable=False (every step is capturable: it never reads a device value on
    the host), max_grad_norm=None (the global grad-norm clip of fusedopt.Adam),
    backend="auto" | "triton" | "cpp" | "cuda" | "reference".
    Lean states, as fusedopt.Adam's (fusedopt.optim._lean; per group): state_dtype (None,
    torch.float32, torch.bfloat16, torch.float16 or torch.uint8: an 8-bit blockwise exp_avg),
    and for bf16 / fp16 params at most one of master_weights (True or "compact"),
    kahan_summation, stochastic_rounding.
    State per param: "exp_avg" (the param's dtype and layout), as lion-pytorch; lean groups add
    "step" (a float32 scalar tensor: stochastic rounding's random bits hash it) and the lean
    options' tensors. full_precision_state_dict() exports fp32 exp_avgs and no extras.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool | str = False,
        kahan_summation: bool = False,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ) -> None:
        _lean.check_options(state_dtype, master_weights, kahan_summation, stochastic_rounding)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=(to_float(betas[0]), to_float(betas[1])),
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            state_dtype=state_dtype,
            master_weights=master_weights,
            kahan_summation=kahan_summation,
            stochastic_rounding=stochastic_rounding,
            backend=backend,
        )
        super().__init__(params, defaults, max_grad_norm)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    exp_avgs: list[Tensor]) -> bool:
        """Appends the group's params that have grads and their exp_avg (created on first use) to
        the lists; returns whether any is complex (torch.compile runs this eagerly)."""
        has_complex = False
        for p, grad in params_with_grads(group, "Lion does not support sparse gradients"):
            has_complex |= p.is_complex()
            state = self.state[p]
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
        return has_complex

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = self._evaluate(closure)
        amp = self._amp_args()
        for group in self.param_groups:
            if _lean.is_lean(group):
                self._lean_step(group, amp)
                continue
            lists: list[list[Tensor]] = [[], [], []]
            has_complex = self._init_group(group, *lists)
            beta1, beta2 = group["betas"]
            for device_lists in group_tensors(lists, 3, has_complex).values():
                functional.lion(*device_lists, lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], maximize=group["maximize"],
                                backend=group["backend"], **amp)
        return loss

    def _lean_step(self, group: dict[str, Any], amp: dict[str, Tensor | None]) -> None:
        """One step of a group with lean options: one lion_lean call per (device, param dtype,
        moment dtype, param_mode); params whose states are as torch keeps them take lion."""
        batches = self._lean_batches(group, ("exp_avg",), "Lion does not support sparse gradients")
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2,
                     weight_decay=group["weight_decay"], maximize=group["maximize"],
                     backend=group["backend"], **amp)
        for key, lists in batches.items():
            if _lean.is_as_torch(key):
                params, grads, exp_avgs, _, _, steps = lists
                functional.lion(params, grads, exp_avgs, **hyper)
                self._count_step(steps, amp)
            else:
                functional.lion_lean(*lists, param_mode=key[3], **hyper)
