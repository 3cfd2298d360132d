"""Triton SGD step (momentum, dampening, Nesterov): the fused counterpart of
fusedopt.reference.sgd (the spec).

The math only: _sgd_rule (the update of fp32 values), _sgd_step_scalars (the per-tensor scalar),
and _sgd_prepare / _sgd_update, which wrap them in the loads and stores of the shared kernels of
fusedopt.kernels.multi_tensor, one launch per tensor or one for all of them (the calling
convention is described there); then sgd(), the launcher, and sgd_lean() (reference.sgd_lean),
which runs the same rule in fusedopt.kernels.lean's kernel.

Everything is computed in fp32 registers whatever the storage dtype. Device values (lr tensor,
grad_scale, found_inf) are only read inside the kernels, never on the host. Without momentum no
buffer exists; on the first step the buffers are written (with the grad) and never read.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .lean import check_lean_lists, launch_lean
from .multi_tensor import check_inputs, flag_bits, launch, pack_flags

MAXIMIZE, HAS_MOMENTUM, NESTEROV, IS_FIRST_STEP = flag_bits(4)


@triton.jit
def _sgd_prepare(tensors, lr, scalars, FLAGS: tl.constexpr):
    """The per-tensor scalar: _sgd_step_scalars (SGD keeps no step)."""
    return _sgd_step_scalars(0.0, lr, scalars, FLAGS)


@triton.jit
def _sgd_step_scalars(step, lr, scalars, FLAGS: tl.constexpr):
    """The learning rate, rounded to fp32; step is not used."""
    return (lr.to(tl.float32),)


@triton.jit
def _sgd_update(tensors, offsets, mask, param, grad, prepared, scalars, FLAGS: tl.constexpr):
    """The SGD update of one block: the momentum buffer in place; returns the new param."""
    buffer_ptr = tensors[2]  # the momentum buffer
    states = ()
    if HAS_MOMENTUM & FLAGS:
        if IS_FIRST_STEP & FLAGS:  # the rule sets the buffer: it may hold anything
            states = (grad,)
        else:
            states = (tl.load(buffer_ptr + offsets, mask=mask).to(tl.float32),)

    param, states = _sgd_rule(param, grad, states, prepared, scalars, FLAGS)

    if HAS_MOMENTUM & FLAGS:
        tl.store(buffer_ptr + offsets, states[0].to(buffer_ptr.dtype.element_ty), mask=mask)
    return param


@triton.jit
def _sgd_rule(param, grad, states, prepared, scalars, FLAGS: tl.constexpr):
    """SGD's rule in fp32 registers (the plain kernel's and the lean one's): states is
    (momentum_buffer,) with HAS_MOMENTUM (not read on the first step), () without; returns
    (param, states)."""
    (lr,) = prepared
    momentum, one_minus_dampening, weight_decay = scalars
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)

    if MAXIMIZE & FLAGS:
        grad = -grad
    grad = tl.where(weight_decay != 0.0, grad + weight_decay * param, grad)
    new_states = ()
    if HAS_MOMENTUM & FLAGS:
        if IS_FIRST_STEP & FLAGS:
            buffer = grad
        else:
            buffer = momentum * states[0] + one_minus_dampening * grad
        if NESTEROV & FLAGS:
            grad = grad + momentum * buffer
        else:
            grad = buffer
        new_states = (buffer,)
    param = param - lr * grad
    return param, new_states


def sgd(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
    lr: float | Tensor, momentum: float, dampening: float, weight_decay: float,
    nesterov: bool, maximize: bool, is_first_step: bool,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One SGD step with Triton kernels.

    Contract, inputs and multi_tensor: every launcher's (fusedopt.kernels.multi_tensor), for
    the list grads and, when momentum is not 0, momentum_buffers (an empty list otherwise). With
    is_first_step the buffers are set to the (decayed) grad and never read, so they may hold
    anything.
    """
    lists = {"grads": grads}
    if momentum != 0:
        lists["momentum_buffers"] = momentum_buffers
    elif len(momentum_buffers) != 0:
        raise ValueError(
            f"sgd: momentum is 0 but {len(momentum_buffers)} momentum_buffers were given "
            "(pass an empty list)"
        )
    check_inputs("sgd", params, lists, lr, grad_scale, found_inf)
    if not params:
        return
    has_momentum = momentum != 0
    launch(_sgd_prepare, _sgd_update, [params, grads, momentum_buffers if has_momentum else None],
           scalars=_sgd_scalars(momentum, dampening, weight_decay),
           flags=_sgd_flags(momentum, nesterov, maximize, is_first_step), lr=lr,
           grad_scale=grad_scale, found_inf=found_inf, multi_tensor=multi_tensor)


def sgd_lean(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
    momentum_buffer_absmaxes: list[Tensor], param_extras: list[Tensor],
    state_steps: list[Tensor], *, lr: float | Tensor, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool, maximize: bool, is_first_step: bool, param_mode: str,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One SGD step with lean states, with the Triton lean kernel: the contract of
    fusedopt.reference.sgd_lean (the spec; momentum_buffers and their absmaxes empty when
    momentum is 0), the inputs that fusedopt.kernels.lean.check_lean_lists takes; the step
    counts advance by one."""
    if not params:
        return
    has_momentum = momentum != 0
    states = [(momentum_buffers, momentum_buffer_absmaxes, True)] if has_momentum else []
    if not has_momentum and (momentum_buffers or momentum_buffer_absmaxes):
        raise ValueError("sgd_lean: momentum is 0 but momentum_buffers were given (pass empty "
                         "lists)")
    quantized = check_lean_lists(
        "sgd_lean", params, grads,
        {"momentum_buffers": (momentum_buffers, momentum_buffer_absmaxes)} if has_momentum else {},
        param_extras, state_steps, param_mode, lr, grad_scale, found_inf)
    launch_lean(_sgd_step_scalars, _sgd_rule, params, grads, states, param_extras, state_steps,
                param_mode=param_mode, quantized=quantized, load_states=not is_first_step,
                scalars=_sgd_scalars(momentum, dampening, weight_decay),
                flags=_sgd_flags(momentum, nesterov, maximize, is_first_step), lr=lr,
                grad_scale=grad_scale, found_inf=found_inf, multi_tensor=multi_tensor)


def _sgd_scalars(momentum: float, dampening: float, weight_decay: float) -> dict[str, float]:
    """The kernels' scalars, in the order _sgd_rule unpacks them."""
    return {"momentum": momentum, "one_minus_dampening": 1.0 - dampening,
            "weight_decay": weight_decay}


def _sgd_flags(momentum: float, nesterov: bool, maximize: bool, is_first_step: bool) -> int:
    has_momentum = momentum != 0
    return pack_flags(
        (MAXIMIZE, maximize),
        (HAS_MOMENTUM, has_momentum),
        (NESTEROV, nesterov and has_momentum),
        (IS_FIRST_STEP, is_first_step and has_momentum),
    )
