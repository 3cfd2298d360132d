"""fusedopt.Adam and fusedopt.AdamW: torch.optim.Adam / AdamW with every step fused."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fusedopt import functional
from fusedopt.optim import _lean
from fusedopt.optim._base import (
    FusedOptimizer,
    group_tensors,
    params_with_grads,
    to_float,
)


class Adam(FusedOptimizer):
    r"""Adam (Kingma & Ba, 2015), or AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay.

    For each param with a grad, with g its gradient and t its step count:

        t += 1;  g = -g if maximize
        p = p * (1 - lr * weight_decay)  if decoupled_weight_decay  else  g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
        v_max = max(v_max, v) and v = v_max  if amsgrad
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args: those of torch.optim.Adam, same defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0, amsgrad=False, and keyword-only foreach=None, maximize=False, capturable=False,
    differentiable=False (True raises, as with torch's fused=True), fused=None,
    decoupled_weight_decay=False. `foreach` and `fused` are accepted and change nothing: every
    step is fused. Every step is also capturable: it never reads a device value on the host.
    backend: "auto" (Triton or CUDA C++ on GPUs, C++ on CPUs), "triton", "cpp", "cuda" or
    "reference" (plain torch). max_grad_norm: clip the grads' global norm (over every param of
    every group) to it inside the step, as torch.nn.utils.clip_grad_norm_ before step() would
    (the grads are left clipped, as that leaves them); None (the default) does not clip.

    Lean states (fusedopt.optim._lean; not with amsgrad; per group):
    state_dtype: None (the param's dtype, as torch), torch.float32, torch.bfloat16, torch.float16
    or torch.uint8 (8-bit blockwise moments; tensors under 4096 elements keep fp32 ones).
    For bf16 / fp16 params, at most one of: master_weights=True (an fp32 master copy in the
    state) or "compact" (bf16 only: an int8 correction, a 24-bit master);
    kahan_summation=True (each update's rounding error carried into the next);
    stochastic_rounding=True (bf16 only: unbiased random rounding, no extra state).

    State per param, as torch's: "step" (float32 scalar tensor on the param's device),
    "exp_avg", "exp_avg_sq" and, with amsgrad, "max_exp_avg_sq" (the param's dtype and layout);
    the lean options add theirs (see fusedopt.optim._lean). full_precision_state_dict() exports
    them as torch.optim.Adam keeps them.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool | str = False,
        kahan_summation: bool = False,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ) -> None:
        _lean.check_options(state_dtype, master_weights, kahan_summation, stochastic_rounding)
        lean = dict(state_dtype=state_dtype, master_weights=master_weights,
                    kahan_summation=kahan_summation, stochastic_rounding=stochastic_rounding)
        if amsgrad and _lean.is_lean(lean):
            raise ValueError("amsgrad is not supported with state_dtype, master_weights, "
                             "kahan_summation or stochastic_rounding")
        # torch.optim.Adam's checks, messages and exception types.
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        defaults = dict(
            lr=lr,
            betas=(to_float(betas[0]), to_float(betas[1])),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            **lean,
            backend=backend,
        )
        super().__init__(params, defaults, max_grad_norm)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor]) -> bool:
        """Appends the group's params that have grads, and their state (created on first use),
        to the lists, as torch.optim.Adam does; returns whether any is complex. torch.compile
        runs this eagerly (it is called _init_group and fills list arguments)."""
        has_complex = False
        sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
        for p, grad in params_with_grads(group, sparse_error):
            has_complex |= p.is_complex()
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._step_tensor(p)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
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
            lists: list[list[Tensor]] = [[], [], [], [], [], []]
            has_complex = self._init_group(group, *lists)
            beta1, beta2 = group["betas"]
            for device_lists in group_tensors(lists, 5, has_complex).values():
                functional.adam(
                    *device_lists,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    amsgrad=group["amsgrad"],
                    maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    backend=group["backend"],
                    **amp,
                )
        return loss

    def _lean_step(self, group: dict[str, Any], amp: dict[str, Tensor | None]) -> None:
        """One step of a group with lean options: one adam_lean call per (device, param dtype,
        moment dtype, param_mode); params whose states are as torch keeps them take adam."""
        if group["amsgrad"]:
            raise ValueError("amsgrad is not supported with state_dtype, master_weights, "
                             "kahan_summation or stochastic_rounding")
        batches = self._lean_batches(
            group, ("exp_avg", "exp_avg_sq"),
            "Adam does not support sparse gradients, please consider SparseAdam instead")
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2,
                     weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"],
                     decoupled_weight_decay=group["decoupled_weight_decay"],
                     backend=group["backend"], **amp)
        for key, lists in batches.items():
            if _lean.is_as_torch(key):
                params, grads, exp_avgs, exp_avg_sqs, _, _, _, steps = lists
                functional.adam(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                                amsgrad=False, **hyper)
            else:
                functional.adam_lean(*lists, param_mode=key[3], **hyper)


class AdamW(Adam):
    """Adam with decoupled weight decay: torch.optim.AdamW's signature and defaults
    (weight_decay=1e-2), plus `backend`. See Adam for the update and the arguments."""

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool | str = False,
        kahan_summation: bool = False,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm,
            state_dtype=state_dtype,
            master_weights=master_weights,
            kahan_summation=kahan_summation,
            stochastic_rounding=stochastic_rounding,
            backend=backend,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
