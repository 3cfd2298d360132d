"""fusedopt.SGD: torch.optim.SGD (momentum, dampening, Nesterov) with every step fused."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fusedopt import functional
from fusedopt.optim import _lean
from fusedopt.optim._base import FusedOptimizer, group_tensors, params_with_grads, to_float


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent with optional momentum, as torch.optim.SGD.

    For each param with a grad g (negated if maximize):

        g = g + weight_decay * p
        buf = g on the first step, else momentum * buf + (1 - dampening) * g   (momentum != 0)
        g = g + momentum * buf  if nesterov  else  buf                          (momentum != 0)
        p = p - lr * g

    Args: those of torch.optim.SGD, same defaults: lr=1e-3, momentum=0, dampening=0,
    weight_decay=0, nesterov=False, and keyword-only maximize=False, foreach=None,
    differentiable=False (True raises, as with torch's fused=True), fused=None (`foreach` and
    `fused` are accepted and change nothing), max_grad_norm=None (the global grad-norm clip of
    fusedopt.Adam), backend="auto" | "triton" | "cpp" | "cuda" | "reference".
    Lean states, as fusedopt.Adam's (fusedopt.optim._lean; per group): state_dtype (None,
    torch.float32, torch.bfloat16, torch.float16 or torch.uint8: an 8-bit blockwise momentum
    buffer), and for bf16 / fp16 params at most one of master_weights (True or "compact"),
    kahan_summation, stochastic_rounding (these apply with momentum 0 too).
    State per param, as torch's: "momentum_buffer" once a step with momentum != 0 has run
    (no state at all with momentum 0); lean groups add "step" (a float32 scalar tensor:
    stochastic rounding's random bits hash it) and the lean options' tensors.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool | str = False,
        kahan_summation: bool = False,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ) -> None:
        _lean.check_options(state_dtype, master_weights, kahan_summation, stochastic_rounding)
        # torch.optim.SGD's checks, messages and exception types.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=to_float(weight_decay),
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            state_dtype=state_dtype,
            master_weights=master_weights,
            kahan_summation=kahan_summation,
            stochastic_rounding=stochastic_rounding,
            backend=backend,
        )
        super().__init__(params, defaults, max_grad_norm)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    momentum_buffers: list[Tensor | None]) -> bool:
        """Appends the group's params that have grads, and with momentum their buffers (None
        before the first step), to the lists, as torch.optim.SGD does; returns whether any is
        complex. torch.compile runs this eagerly; the buffers are made in step(), which it traces,
        so that a first step and the later ones compile to different graphs."""
        has_complex = False
        sparse_error = ("fusedopt.SGD does not support sparse gradients (as torch's fused SGD); "
                        "use torch.optim.SGD for them")
        for p, grad in params_with_grads(group, sparse_error):
            has_complex |= p.is_complex()
            params.append(p)
            grads.append(grad)
            if group["momentum"] != 0:
                momentum_buffers.append(self.state[p].get("momentum_buffer"))
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
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor | None] = []
            has_complex = self._init_group(group, params, grads, momentum_buffers)
            first_steps = [buf is None for buf in momentum_buffers] or None
            for i, buf in enumerate(momentum_buffers):
                if buf is None:
                    # zeros, not empty: a first step skipped by GradScaler leaves a defined buffer
                    buf = torch.zeros_like(params[i], memory_format=torch.preserve_format)
                    momentum_buffers[i] = self.state[params[i]]["momentum_buffer"] = buf
            groups = group_tensors([params, grads, momentum_buffers], 3, has_complex, first_steps)
            for key, lists in groups.items():
                functional.sgd(*lists, lr=group["lr"], momentum=group["momentum"],
                               dampening=group["dampening"], weight_decay=group["weight_decay"],
                               nesterov=group["nesterov"], maximize=group["maximize"],
                               is_first_step=key[2] if first_steps else False,
                               backend=group["backend"], **amp)
        return loss

    def _lean_step(self, group: dict[str, Any], amp: dict[str, Tensor | None]) -> None:
        """One step of a group with lean options: one sgd_lean call per (device, param dtype,
        buffer dtype, param_mode, first step); params whose states are as torch keeps them take
        sgd."""
        has_momentum = group["momentum"] != 0
        keys = ("momentum_buffer",) if has_momentum else ()
        sparse_error = ("fusedopt.SGD does not support sparse gradients (as torch's fused SGD); "
                        "use torch.optim.SGD for them")
        batches = self._lean_batches(group, keys, sparse_error, "momentum_buffer")
        hyper = dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                     weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                     maximize=group["maximize"], backend=group["backend"], **amp)
        for key, lists in batches.items():
            first_step = key[4] and has_momentum
            if _lean.is_as_torch(key):
                params, grads, *buffers = lists[:2 + len(keys)]
                functional.sgd(params, grads, buffers[0] if buffers else [],
                               is_first_step=first_step, **hyper)
                self._count_step(lists[-1], amp)
            else:
                functional.sgd_lean(*(lists if has_momentum else [*lists[:2], [], [], *lists[2:]]),
                                    is_first_step=first_step, param_mode=key[3], **hyper)
