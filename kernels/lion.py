"""Triton Lion step: the fused counterpart of fusedopt.reference.lion (the spec).

One elementwise block update (_lion_update_block) is shared by two kernels:

* _lion_tensor_kernel: one launch per tensor, plain pointer arguments. Runs anywhere Triton runs,
  the interpreter (TRITON_INTERPRET=1) on CPU tensors included.
* _lion_multi_tensor_kernel: one launch for a whole list of tensors, one chunk of one tensor per
  program, driven by the address tables of fusedopt.kernels.multi_tensor.

Everything is computed in fp32 registers whatever the storage dtype. Device values (lr tensor,
grad_scale, found_inf) are only read inside the kernels, never on the host. Lion keeps no step.
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
def _lion_scalars(
    lr,
    weight_decay,
    LR_IS_TENSOR: tl.constexpr,
):
    """Per-tensor scalars: the learning rate and the decoupled decay factor 1 - lr * weight_decay
    (in fp64, rounded once to fp32)."""
    lr_value = load_lr(lr, LR_IS_TENSOR)
    weight_decay = tl.cast(tl.cast(weight_decay, tl.float32), tl.float64)
    param_decay = (1.0 - lr_value * weight_decay).to(tl.float32)
    return lr_value.to(tl.float32), param_decay


@triton.jit
def _lion_update_block(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    offsets,
    mask,
    grad_scale_ptr,
    lr,
    param_decay,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """The Lion update of one block of elements (offsets, mask) of one tensor, in place."""
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)

    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)

    if HAS_GRAD_SCALE:
        grad = tl.math.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
    unscaled_grad = grad
    if MAXIMIZE:
        grad = -grad
    direction = beta1 * exp_avg + one_minus_beta1 * grad
    # torch.sign: +1, -1, and 0 for zeros and NaNs.
    update = tl.where(direction > 0.0, 1.0, 0.0) - tl.where(direction < 0.0, 1.0, 0.0)
    param = param * param_decay
    param = param - lr * update
    exp_avg = beta2 * exp_avg + one_minus_beta2 * grad

    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD_SCALE:
        tl.store(grad_ptr + offsets, unscaled_grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lion_tensor_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    numel,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor; program i updates elements [i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < numel
    if HAS_FOUND_INF:
        mask = mask & keep_mask(found_inf_ptr, BLOCK_SIZE)

    lr_value, param_decay = _lion_scalars(lr, weight_decay, LR_IS_TENSOR)
    _lion_update_block(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        offsets,
        mask,
        grad_scale_ptr,
        lr_value,
        param_decay,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        MAXIMIZE,
        HAS_GRAD_SCALE,
    )


@triton.jit
def _lion_multi_tensor_kernel(
    tensor_table_ptr,
    block_table_ptr,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    weight_decay,
    DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    ALIGNED_16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """Many tensors; program i updates one chunk of CHUNK_SIZE elements of one tensor.

    tensor_table_ptr: int64 rows of 4 per tensor: addresses of param, grad, exp_avg, then numel.
    block_table_ptr: int64 rows of 2 per program: tensor index, chunk start (an element offset).
    """
    pid = tl.program_id(0).to(tl.int64)
    row, chunk_start, chunk_end = program_chunk(
        tensor_table_ptr, block_table_ptr, pid, 4, BLOCK_SIZE, CHUNK_SIZE
    )
    param_ptr = table_pointer(row + 0, DTYPE, ALIGNED_16)
    grad_ptr = table_pointer(row + 1, DTYPE, ALIGNED_16)
    exp_avg_ptr = table_pointer(row + 2, DTYPE, ALIGNED_16)

    # Whole blocks need no bounds mask (so their loads vectorize); only the chunk's tail does.
    full_mask = None
    if HAS_FOUND_INF:
        full_mask = keep_mask(found_inf_ptr, BLOCK_SIZE)

    lr_value, param_decay = _lion_scalars(lr, weight_decay, LR_IS_TENSOR)
    num_full_blocks = (chunk_end - chunk_start) // BLOCK_SIZE
    for block in range(num_full_blocks):
        offsets = chunk_start + block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        _lion_update_block(
            param_ptr,
            grad_ptr,
            exp_avg_ptr,
            offsets,
            full_mask,
            grad_scale_ptr,
            lr_value,
            param_decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            MAXIMIZE,
            HAS_GRAD_SCALE,
        )
    tail_start = chunk_start + num_full_blocks * BLOCK_SIZE
    if tail_start < chunk_end:
        offsets = tail_start + tl.arange(0, BLOCK_SIZE)
        tail_mask = offsets < chunk_end
        if HAS_FOUND_INF:
            tail_mask = tail_mask & full_mask
        _lion_update_block(
            param_ptr,
            grad_ptr,
            exp_avg_ptr,
            offsets,
            tail_mask,
            grad_scale_ptr,
            lr_value,
            param_decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            MAXIMIZE,
            HAS_GRAD_SCALE,
        )


def _check_inputs(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    lists = {"grads": grads, "exp_avgs": exp_avgs}
    check_lengths("lion", len(params), lists)
    if not 0.0 <= beta1 <= 1.0 or not 0.0 <= beta2 <= 1.0:
        raise ValueError(f"lion: betas must be in [0, 1], got ({beta1}, {beta2})")
    check_tensor_lists("lion", params, lists)
    check_amp_scalars("lion", params, lr, grad_scale, found_inf)


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One Lion step with Triton kernels.

    The math and the contract are fusedopt.reference.lion's, which is the spec: tensors are updated
    in place, grads are unscaled in place when grad_scale is given, and nothing at all changes when
    found_inf is given and non-zero. No device value is read on the host.

    Requirements: params of one dtype (fp32, fp16 or bf16) on one device; grads and exp_avgs of the
    params' dtype, device and shapes, all contiguous; lr a float or a 1-element tensor, and
    grad_scale and found_inf 1-element float tensors, on the params' device; betas in [0, 1].

    multi_tensor: None (default) uses the multi-tensor kernel (one launch for all tensors) on CUDA
    tensors and the per-tensor kernel (one launch per tensor) otherwise; True or False forces one.
    """
    _check_inputs(params, grads, exp_avgs, lr, beta1, beta2, grad_scale, found_inf)
    if not params:
        return
    scalars = dict(
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        weight_decay=weight_decay,
    )
    flags = dict(MAXIMIZE=bool(maximize))

    launch(_lion_tensor_kernel, _lion_multi_tensor_kernel, [params, grads, exp_avgs],
           multi_tensor=multi_tensor, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
           scalars=scalars, flags=flags)
