"""Triton SGD step (momentum, dampening, Nesterov): the fused counterpart of
fusedopt.reference.sgd (the spec).

The math only: _sgd_prepare (the per-tensor scalar) and _sgd_update (the rule for one block of
elements), run by the shared kernels of fusedopt.kernels.multi_tensor, one launch per tensor or
one for all of them (the calling convention is described there); then sgd(), the launcher.

Everything is computed in fp32 registers whatever the storage dtype. Device values (lr tensor,
grad_scale, found_inf) are only read inside the kernels, never on the host. Without momentum no
buffer exists; on the first step the buffers are written (with the grad) and never read.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import check_inputs, flag_bits, launch, pack_flags

MAXIMIZE, HAS_MOMENTUM, NESTEROV, IS_FIRST_STEP = flag_bits(4)


@triton.jit
def _sgd_prepare(tensors, lr, scalars, FLAGS: tl.constexpr):
    """The per-tensor scalar: the learning rate, rounded to fp32."""
    return (lr.to(tl.float32),)


@triton.jit
def _sgd_update(tensors, offsets, mask, param, grad, prepared, scalars, FLAGS: tl.constexpr):
    """The SGD update of one block: the momentum buffer in place; returns the new param."""
    buffer_ptr = tensors[2]  # the momentum buffer
    (lr,) = prepared
    momentum, one_minus_dampening, weight_decay = scalars
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    if (HAS_MOMENTUM & FLAGS) and not (IS_FIRST_STEP & FLAGS):
        buffer = tl.load(buffer_ptr + offsets, mask=mask).to(tl.float32)

    if MAXIMIZE & FLAGS:
        grad = -grad
    grad = tl.where(weight_decay != 0.0, grad + weight_decay * param, grad)
    if HAS_MOMENTUM & FLAGS:
        if IS_FIRST_STEP & FLAGS:
            buffer = grad
        else:
            buffer = momentum * buffer + one_minus_dampening * grad
        if NESTEROV & FLAGS:
            grad = grad + momentum * buffer
        else:
            grad = buffer
    param = param - lr * grad

    if HAS_MOMENTUM & FLAGS:
        tl.store(buffer_ptr + offsets, buffer.to(buffer_ptr.dtype.element_ty), mask=mask)
    return param


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
    scalars = {  # in the order _sgd_update reads them
        "momentum": momentum,
        "one_minus_dampening": 1.0 - dampening,
        "weight_decay": weight_decay,
    }
    flags = pack_flags(
        (MAXIMIZE, maximize),
        (HAS_MOMENTUM, has_momentum),
        (NESTEROV, nesterov and has_momentum),
        (IS_FIRST_STEP, is_first_step and has_momentum),
    )
    launch(_sgd_prepare, _sgd_update, [params, grads, momentum_buffers if has_momentum else None],
           scalars=scalars, flags=flags, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
           multi_tensor=multi_tensor)
