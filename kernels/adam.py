"""Triton Adam / AdamW step: the fused counterpart of fusedopt.reference.adam (the spec), and of
reference.adam_lean with lean states.

The math only: _adam_rule (the update of fp32 values), _adam_step_scalars (a tensor's scalars,
from its step), and _adam_prepare / _adam_update, which wrap them in the loads and stores of the
shared kernels of fusedopt.kernels.multi_tensor, one launch per tensor or one for all of them
(the calling convention is described there); then adam(), the launcher, and adam_lean(), which
runs the same rule in fusedopt.kernels.lean's kernel.

Everything is computed in fp32 registers whatever the storage dtype; the bias corrections are
computed per tensor from that tensor's own step, in fp64 scalars. Device values (step, lr tensor,
grad_scale, found_inf) are only read inside the kernels, never on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lean import advance_steps, check_lean_lists, launch_lean
from .multi_tensor import check_betas, check_inputs, check_lengths, flag_bits, launch, pack_flags

AMSGRAD, MAXIMIZE, DECOUPLED_WEIGHT_DECAY = flag_bits(3)


@triton.jit
def _adam_prepare(tensors, lr, scalars, FLAGS: tl.constexpr):
    """Per-tensor scalars from the tensor's step (tensors[5]): _adam_step_scalars."""
    return _adam_step_scalars(tl.load(tensors[5]).to(tl.float64) + 1.0, lr, scalars, FLAGS)


@triton.jit
def _adam_step_scalars(step, lr, scalars, FLAGS: tl.constexpr):
    """Per-tensor scalars of the new step (fp64): step size, sqrt of the second bias correction,
    decoupled decay factor."""
    _, _, _, log2_beta1, log2_beta2, weight_decay, _ = scalars
    # beta ** step as exp2(step * log2(beta)), with log2(beta) taken on the host (in double, then
    # passed as an fp32 argument): 1 - beta ** step keeps its relative accuracy even when beta is
    # close to 1.
    bias_correction1 = 1.0 - tl.exp2(step * tl.cast(log2_beta1, tl.float64))
    bias_correction2 = 1.0 - tl.exp2(step * tl.cast(log2_beta2, tl.float64))
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    param_decay = (1.0 - lr * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    return step_size, bias_correction2_sqrt, param_decay


@triton.jit
def _adam_update(tensors, offsets, mask, param, grad, prepared, scalars, FLAGS: tl.constexpr):
    """The Adam update of one block: exp_avg, exp_avg_sq (and max_exp_avg_sq) in place; returns
    the new param."""
    _, _, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, _ = tensors
    states = (tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32),
              tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32))
    if AMSGRAD & FLAGS:
        states = states + (tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32),)

    param, states = _adam_rule(param, grad, states, prepared, scalars, FLAGS)

    tl.store(exp_avg_ptr + offsets, states[0].to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, states[1].to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD & FLAGS:
        tl.store(max_exp_avg_sq_ptr + offsets,
                 states[2].to(max_exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    return param


@triton.jit
def _adam_rule(param, grad, states, prepared, scalars, FLAGS: tl.constexpr):
    """Adam's rule in fp32 registers (the plain kernel's and the lean one's): states is
    (exp_avg, exp_avg_sq), then max_exp_avg_sq with AMSGRAD; returns (param, states)."""
    exp_avg = states[0]
    exp_avg_sq = states[1]
    step_size, bias_correction2_sqrt, param_decay = prepared
    lerp_weight, beta2, one_minus_beta2, _, _, weight_decay, eps = scalars
    lerp_weight = tl.cast(lerp_weight, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    eps = tl.cast(eps, tl.float32)

    if MAXIMIZE & FLAGS:
        grad = -grad
    if DECOUPLED_WEIGHT_DECAY & FLAGS:
        param = param * param_decay
    else:
        grad = tl.where(weight_decay != 0.0, grad + weight_decay * param, grad)
    # torch.lerp(exp_avg, grad, lerp_weight), with torch's two formulas for small and large weights.
    exp_avg = tl.where(
        lerp_weight < 0.5,
        exp_avg + lerp_weight * (grad - exp_avg),
        grad - (grad - exp_avg) * (1.0 - lerp_weight),
    )
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    second_moment = exp_avg_sq
    new_states = (exp_avg, exp_avg_sq)
    if AMSGRAD & FLAGS:
        max_exp_avg_sq = tl.maximum(states[2], exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
        new_states = new_states + (max_exp_avg_sq,)
    denom = tl.math.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    param = param - tl.math.div_rn(step_size * exp_avg, denom)
    return param, new_states


def adam(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *,
    lr: float | Tensor, beta1: float, beta2: float, weight_decay: float, eps: float,
    amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW (True) step with Triton kernels.

    Contract, inputs and multi_tensor: every launcher's (fusedopt.kernels.multi_tensor), for
    the lists grads, exp_avgs, exp_avg_sqs and, with amsgrad, max_exp_avg_sqs (ignored without).
    Besides, every state_steps[i], a 1-element float32 tensor on the params' device, advances by
    one (not at all when found_inf is non-zero); betas are in [0, 1].
    """
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    check_lengths("adam", len(params), {"state_steps": state_steps})
    check_inputs("adam", params, lists, lr, grad_scale, found_inf)
    check_betas("adam", beta1, beta2)
    if not params:
        return
    for i, step in enumerate(state_steps):
        if step.dtype != torch.float32 or step.numel() != 1 or step.device != params[0].device:
            raise ValueError(
                f"adam: state_steps[{i}] must be a 1-element float32 tensor on "
                f"{params[0].device}, got {step.dtype} with {step.numel()} elements on "
                f"{step.device}"
            )

    launch(_adam_prepare, _adam_update,
           [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None],
           extra_per_tensor=[state_steps],
           scalars=_adam_scalars(beta1, beta2, weight_decay, eps),
           flags=_adam_flags(amsgrad, maximize, decoupled_weight_decay), lr=lr,
           grad_scale=grad_scale, found_inf=found_inf, multi_tensor=multi_tensor)
    advance_steps(state_steps, found_inf)


def adam_lean(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], exp_avg_absmaxes: list[Tensor],
    exp_avg_sq_absmaxes: list[Tensor], param_extras: list[Tensor], state_steps: list[Tensor],
    *, lr: float | Tensor, beta1: float, beta2: float, weight_decay: float, eps: float,
    maximize: bool, decoupled_weight_decay: bool, param_mode: str,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One Adam / AdamW step (no amsgrad) with lean states, with the Triton lean kernel: the
    contract of fusedopt.reference.adam_lean (the spec), the inputs that
    fusedopt.kernels.lean.check_lean_lists takes; the steps advance as adam()'s."""
    if not params:
        return
    quantized = check_lean_lists(
        "adam_lean", params, grads,
        {"exp_avgs": (exp_avgs, exp_avg_absmaxes), "exp_avg_sqs": (exp_avg_sqs,
                                                                    exp_avg_sq_absmaxes)},
        param_extras, state_steps, param_mode, lr, grad_scale, found_inf)
    check_betas("adam_lean", beta1, beta2)
    launch_lean(_adam_step_scalars, _adam_rule, params, grads,
                [(exp_avgs, exp_avg_absmaxes, True), (exp_avg_sqs, exp_avg_sq_absmaxes, False)],
                param_extras, state_steps, param_mode=param_mode, quantized=quantized,
                scalars=_adam_scalars(beta1, beta2, weight_decay, eps),
                flags=_adam_flags(False, maximize, decoupled_weight_decay), lr=lr,
                grad_scale=grad_scale, found_inf=found_inf, multi_tensor=multi_tensor)


def _adam_scalars(beta1: float, beta2: float, weight_decay: float, eps: float
                  ) -> dict[str, float]:
    """The kernels' scalars, in the order _adam_step_scalars and _adam_rule unpack them."""
    return {
        "lerp_weight": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "log2_beta1": math.log2(beta1) if beta1 > 0 else -math.inf,
        "log2_beta2": math.log2(beta2) if beta2 > 0 else -math.inf,
        "weight_decay": weight_decay,
        "eps": eps,
    }


def _adam_flags(amsgrad: bool, maximize: bool, decoupled_weight_decay: bool) -> int:
    return pack_flags(
        (AMSGRAD, amsgrad),
        (MAXIMIZE, maximize),
        (DECOUPLED_WEIGHT_DECAY, decoupled_weight_decay),
    )
