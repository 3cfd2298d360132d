"""Triton SGD step (momentum, dampening, Nesterov): the fused counterpart of
fusedopt.reference.sgd (the spec).

One elementwise block update (_sgd_update_block) is shared by two kernels:

* _sgd_tensor_kernel: one launch per tensor, plain pointer arguments. Runs anywhere Triton runs,
  the interpreter (TRITON_INTERPRET=1) on CPU tensors included.
* _sgd_multi_tensor_kernel: one launch for a whole list of tensors, one chunk of one tensor per
  program, driven by the address tables of fusedopt.kernels.multi_tensor.

Everything is computed in fp32 registers whatever the storage dtype. Device values (lr tensor,
grad_scale, found_inf) are only read inside the kernels, never on the host. Without momentum no
buffer exists; on the first step the buffers are written (with the grad) and never read.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import (
    check_amp_scalars,
    check_lengths,
    check_tensor_lists,
    keep_mask,
    launch,
    load_lr,
    program_chunk,
    table_pointer,
)


@triton.jit
def _sgd_update_block(
    param_ptr,
    grad_ptr,
    momentum_buffer_ptr,
    offsets,
    mask,
    grad_scale_ptr,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    IS_FIRST_STEP: tl.constexpr,
):
    """The SGD update of one block of elements (offsets, mask) of one tensor, in place."""
    momentum = tl.cast(momentum, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)

    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_MOMENTUM and not IS_FIRST_STEP:
        buffer = tl.load(momentum_buffer_ptr + offsets, mask=mask).to(tl.float32)

    if HAS_GRAD_SCALE:
        grad = tl.math.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
    unscaled_grad = grad
    if MAXIMIZE:
        grad = -grad
    grad = tl.where(weight_decay != 0.0, grad + weight_decay * param, grad)
    if HAS_MOMENTUM:
        if IS_FIRST_STEP:
            buffer = grad
        else:
            buffer = momentum * buffer + one_minus_dampening * grad
        if NESTEROV:
            grad = grad + momentum * buffer
        else:
            grad = buffer
    param = param - lr * grad

    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
    if HAS_MOMENTUM:
        tl.store(
            momentum_buffer_ptr + offsets,
            buffer.to(momentum_buffer_ptr.dtype.element_ty),
            mask=mask,
        )
    if HAS_GRAD_SCALE:
        tl.store(grad_ptr + offsets, unscaled_grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgd_tensor_kernel(
    param_ptr,
    grad_ptr,
    momentum_buffer_ptr,
    numel,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    momentum,
    one_minus_dampening,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    IS_FIRST_STEP: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor; program i updates elements [i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < numel
    if HAS_FOUND_INF:
        mask = mask & keep_mask(found_inf_ptr, BLOCK_SIZE)

    lr_value = load_lr(lr, LR_IS_TENSOR).to(tl.float32)
    _sgd_update_block(
        param_ptr,
        grad_ptr,
        momentum_buffer_ptr,
        offsets,
        mask,
        grad_scale_ptr,
        lr_value,
        momentum,
        one_minus_dampening,
        weight_decay,
        MAXIMIZE,
        HAS_GRAD_SCALE,
        HAS_MOMENTUM,
        NESTEROV,
        IS_FIRST_STEP,
    )


@triton.jit
def _sgd_multi_tensor_kernel(
    tensor_table_ptr,
    block_table_ptr,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    momentum,
    one_minus_dampening,
    weight_decay,
    DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    IS_FIRST_STEP: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    ALIGNED_16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """Many tensors; program i updates one chunk of CHUNK_SIZE elements of one tensor.

    tensor_table_ptr: int64 rows of 4 per tensor: addresses of param, grad, momentum_buffer (0
    without momentum), then numel.
    block_table_ptr: int64 rows of 2 per program: tensor index, chunk start (an element offset).
    """
    pid = tl.program_id(0).to(tl.int64)
    row, chunk_start, chunk_end = program_chunk(
        tensor_table_ptr, block_table_ptr, pid, 4, BLOCK_SIZE, CHUNK_SIZE
    )
    param_ptr = table_pointer(row + 0, DTYPE, ALIGNED_16)
    grad_ptr = table_pointer(row + 1, DTYPE, ALIGNED_16)
    momentum_buffer_ptr = param_ptr
    if HAS_MOMENTUM:
        momentum_buffer_ptr = table_pointer(row + 2, DTYPE, ALIGNED_16)

    # Whole blocks need no bounds mask (so their loads vectorize); only the chunk's tail does.
    full_mask = None
    if HAS_FOUND_INF:
        full_mask = keep_mask(found_inf_ptr, BLOCK_SIZE)

    lr_value = load_lr(lr, LR_IS_TENSOR).to(tl.float32)
    num_full_blocks = (chunk_end - chunk_start) // BLOCK_SIZE
    for block in range(num_full_blocks):
        offsets = chunk_start + block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        _sgd_update_block(
            param_ptr,
            grad_ptr,
            momentum_buffer_ptr,
            offsets,
            full_mask,
            grad_scale_ptr,
            lr_value,
            momentum,
            one_minus_dampening,
            weight_decay,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            HAS_MOMENTUM,
            NESTEROV,
            IS_FIRST_STEP,
        )
    tail_start = chunk_start + num_full_blocks * BLOCK_SIZE
    if tail_start < chunk_end:
        offsets = tail_start + tl.arange(0, BLOCK_SIZE)
        tail_mask = offsets < chunk_end
        if HAS_FOUND_INF:
            tail_mask = tail_mask & full_mask
        _sgd_update_block(
            param_ptr,
            grad_ptr,
            momentum_buffer_ptr,
            offsets,
            tail_mask,
            grad_scale_ptr,
            lr_value,
            momentum,
            one_minus_dampening,
            weight_decay,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            HAS_MOMENTUM,
            NESTEROV,
            IS_FIRST_STEP,
        )


def _check_inputs(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float | Tensor,
    momentum: float,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    lists = {"grads": grads}
    if momentum != 0:
        lists["momentum_buffers"] = momentum_buffers
    elif len(momentum_buffers) != 0:
        raise ValueError(
            f"sgd: momentum is 0 but {len(momentum_buffers)} momentum_buffers were given "
            "(pass an empty list)"
        )
    check_lengths("sgd", len(params), lists)
    check_tensor_lists("sgd", params, lists)
    check_amp_scalars("sgd", params, lr, grad_scale, found_inf)


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One SGD step with Triton kernels.

    The math and the contract are fusedopt.reference.sgd's, which is the spec: tensors are updated
    in place, grads are unscaled in place when grad_scale is given, and nothing at all changes when
    found_inf is given and non-zero. No device value is read on the host.

    Requirements: params of one dtype (fp32, fp16 or bf16) on one device; grads (and, when momentum
    is not 0, momentum_buffers; an empty list otherwise) of the params' dtype, device and shapes,
    all contiguous; lr a float or a 1-element tensor, and grad_scale and found_inf 1-element float
    tensors, on the params' device. With is_first_step the buffers are set to the (decayed) grad
    and never read, so they may hold anything.

    multi_tensor: None (default) uses the multi-tensor kernel (one launch for all tensors) on CUDA
    tensors and the per-tensor kernel (one launch per tensor) otherwise; True or False forces one.
    """
    _check_inputs(params, grads, momentum_buffers, lr, momentum, grad_scale, found_inf)
    if not params:
        return
    has_momentum = momentum != 0
    scalars = dict(
        momentum=momentum,
        one_minus_dampening=1.0 - dampening,
        weight_decay=weight_decay,
    )
    flags = dict(
        MAXIMIZE=bool(maximize),
        HAS_MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov) and has_momentum,
        IS_FIRST_STEP=bool(is_first_step) and has_momentum,
    )

    launch(_sgd_tensor_kernel, _sgd_multi_tensor_kernel,
           [params, grads, momentum_buffers if has_momentum else None],
           multi_tensor=multi_tensor, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
           scalars=scalars, flags=flags)
