"""Triton Lion step: the fused counterpart of fusedopt.reference.lion (the spec), and of
reference.lion_lean with lean states.

The math only: _lion_rule (the update of fp32 values), _lion_step_scalars (the per-tensor
scalars), and _lion_prepare / _lion_update, which wrap them in the loads and stores of the shared
kernels of fusedopt.kernels.multi_tensor, one launch per tensor or one for all of them (the
calling convention is described there); then lion(), the launcher, and lion_lean(), which runs
the same rule in fusedopt.kernels.lean's kernel.

Everything is computed in fp32 registers whatever the storage dtype. Device values (lr tensor,
grad_scale, found_inf) are only read inside the kernels, never on the host. Lion keeps no step.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .lean import check_lean_lists, launch_lean
from .multi_tensor import check_betas, check_inputs, flag_bits, launch, pack_flags

(MAXIMIZE,) = flag_bits(1)


@triton.jit
def _lion_prepare(tensors, lr, scalars, FLAGS: tl.constexpr):
    """Per-tensor scalars: _lion_step_scalars (Lion keeps no step)."""
    return _lion_step_scalars(0.0, lr, scalars, FLAGS)


@triton.jit
def _lion_step_scalars(step, lr, scalars, FLAGS: tl.constexpr):
    """The learning rate and the decoupled decay factor 1 - lr * weight_decay (in fp64, rounded
    once to fp32); step is not used."""
    _, _, _, _, weight_decay = scalars
    weight_decay = tl.cast(tl.cast(weight_decay, tl.float32), tl.float64)
    param_decay = (1.0 - lr * weight_decay).to(tl.float32)
    return lr.to(tl.float32), param_decay


@triton.jit
def _lion_update(tensors, offsets, mask, param, grad, prepared, scalars, FLAGS: tl.constexpr):
    """The Lion update of one block: exp_avg in place; returns the new param."""
    exp_avg_ptr = tensors[2]
    states = (tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32),)
    param, states = _lion_rule(param, grad, states, prepared, scalars, FLAGS)
    tl.store(exp_avg_ptr + offsets, states[0].to(exp_avg_ptr.dtype.element_ty), mask=mask)
    return param


@triton.jit
def _lion_rule(param, grad, states, prepared, scalars, FLAGS: tl.constexpr):
    """Lion's rule in fp32 registers (the plain kernel's and the lean one's): states is
    (exp_avg,); returns (param, states)."""
    exp_avg = states[0]
    lr, param_decay = prepared
    beta1, one_minus_beta1, beta2, one_minus_beta2, _ = scalars
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)

    if MAXIMIZE & FLAGS:
        grad = -grad
    direction = beta1 * exp_avg + one_minus_beta1 * grad
    # torch.sign: +1, -1, and 0 for zeros and NaNs.
    update = tl.where(direction > 0.0, 1.0, 0.0) - tl.where(direction < 0.0, 1.0, 0.0)
    param = param * param_decay
    param = param - lr * update
    exp_avg = beta2 * exp_avg + one_minus_beta2 * grad
    return param, (exp_avg,)


def lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *,
    lr: float | Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One Lion step with Triton kernels.

    Contract, inputs and multi_tensor: every launcher's (fusedopt.kernels.multi_tensor), for
    the lists grads and exp_avgs; betas are in [0, 1].
    """
    lists = {"grads": grads, "exp_avgs": exp_avgs}
    check_inputs("lion", params, lists, lr, grad_scale, found_inf)
    check_betas("lion", beta1, beta2)
    if not params:
        return
    launch(_lion_prepare, _lion_update, [params, grads, exp_avgs],
           scalars=_lion_scalars(beta1, beta2, weight_decay),
           flags=pack_flags((MAXIMIZE, maximize)), lr=lr,
           grad_scale=grad_scale, found_inf=found_inf, multi_tensor=multi_tensor)


def lion_lean(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_absmaxes: list[Tensor], param_extras: list[Tensor], state_steps: list[Tensor], *,
    lr: float | Tensor, beta1: float, beta2: float, weight_decay: float, maximize: bool,
    param_mode: str, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One Lion step with lean states, with the Triton lean kernel: the contract of
    fusedopt.reference.lion_lean (the spec), the inputs that
    fusedopt.kernels.lean.check_lean_lists takes; the step counts advance by one."""
    if not params:
        return
    quantized = check_lean_lists("lion_lean", params, grads,
                                 {"exp_avgs": (exp_avgs, exp_avg_absmaxes)}, param_extras,
                                 state_steps, param_mode, lr, grad_scale, found_inf)
    check_betas("lion_lean", beta1, beta2)
    launch_lean(_lion_step_scalars, _lion_rule, params, grads,
                [(exp_avgs, exp_avg_absmaxes, True)], param_extras, state_steps,
                param_mode=param_mode, quantized=quantized,
                scalars=_lion_scalars(beta1, beta2, weight_decay),
                flags=pack_flags((MAXIMIZE, maximize)), lr=lr, grad_scale=grad_scale,
                found_inf=found_inf, multi_tensor=multi_tensor)


def _lion_scalars(beta1: float, beta2: float, weight_decay: float) -> dict[str, float]:
    """The kernels' scalars, in the order _lion_step_scalars and _lion_rule unpack them."""
    return {
        "beta1": beta1,
        "one_minus_beta1": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "weight_decay": weight_decay,
    }
