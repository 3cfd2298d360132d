"""Triton Adam / AdamW step: the fused counterpart of fusedopt.reference.adam (the spec).

One elementwise block update (_adam_update_block) is shared by two kernels:

* _adam_tensor_kernel: one launch per tensor, plain pointer arguments. Runs anywhere Triton runs,
  the interpreter (TRITON_INTERPRET=1) on CPU tensors included.
* _adam_multi_tensor_kernel: one launch for a whole list of tensors. Each program takes one chunk
  of one tensor; it finds the tensor's data through an int64 table of addresses and the chunk
  through a per-program (tensor index, chunk start) table, both in one device tensor (built and
  cached by fusedopt.kernels.multi_tensor, which also holds the helpers all kernels share).

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
def _adam_step_scalars(
    step_ptr,
    lr,
    log2_beta1,
    log2_beta2,
    weight_decay,
    LR_IS_TENSOR: tl.constexpr,
):
    """Per-tensor scalars: step size, sqrt of the second bias correction, decoupled decay factor."""
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    lr_value = load_lr(lr, LR_IS_TENSOR)
    # beta ** step as exp2(step * log2(beta)); log2(beta) comes from the host in double precision,
    # so 1 - beta ** step keeps its relative accuracy even when beta is close to 1.
    bias_correction1 = 1.0 - tl.exp2(step * tl.cast(log2_beta1, tl.float64))
    bias_correction2 = 1.0 - tl.exp2(step * tl.cast(log2_beta2, tl.float64))
    step_size = (lr_value / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    param_decay = (1.0 - lr_value * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    return step_size, bias_correction2_sqrt, param_decay


@triton.jit
def _adam_update_block(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    offsets,
    mask,
    grad_scale_ptr,
    step_size,
    bias_correction2_sqrt,
    param_decay,
    lerp_weight,
    beta2,
    one_minus_beta2,
    weight_decay,
    eps,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """The Adam update of one block of elements (offsets, mask) of one tensor, in place."""
    lerp_weight = tl.cast(lerp_weight, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    eps = tl.cast(eps, tl.float32)

    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    if AMSGRAD:
        max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)

    if HAS_GRAD_SCALE:
        grad = tl.math.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
    unscaled_grad = grad
    if MAXIMIZE:
        grad = -grad
    if DECOUPLED_WEIGHT_DECAY:
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
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    denom = tl.sqrt_rn(second_moment) / bias_correction2_sqrt + eps
    param = param - tl.math.div_rn(step_size * exp_avg, denom)

    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(
            max_exp_avg_sq_ptr + offsets,
            max_exp_avg_sq.to(max_exp_avg_sq_ptr.dtype.element_ty),
            mask=mask,
        )
    if HAS_GRAD_SCALE:
        tl.store(grad_ptr + offsets, unscaled_grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_tensor_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    step_ptr,
    numel,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    lerp_weight,
    beta2,
    one_minus_beta2,
    log2_beta1,
    log2_beta2,
    weight_decay,
    eps,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
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

    step_size, bias_correction2_sqrt, param_decay = _adam_step_scalars(
        step_ptr, lr, log2_beta1, log2_beta2, weight_decay, LR_IS_TENSOR
    )
    _adam_update_block(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        max_exp_avg_sq_ptr,
        offsets,
        mask,
        grad_scale_ptr,
        step_size,
        bias_correction2_sqrt,
        param_decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        weight_decay,
        eps,
        AMSGRAD,
        MAXIMIZE,
        DECOUPLED_WEIGHT_DECAY,
        HAS_GRAD_SCALE,
    )


@triton.jit
def _adam_multi_tensor_kernel(
    tensor_table_ptr,
    block_table_ptr,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    lerp_weight,
    beta2,
    one_minus_beta2,
    log2_beta1,
    log2_beta2,
    weight_decay,
    eps,
    DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    ALIGNED_16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """Many tensors; program i updates one chunk of CHUNK_SIZE elements of one tensor.

    tensor_table_ptr: int64 rows of 7 per tensor: addresses of param, grad, exp_avg, exp_avg_sq,
    max_exp_avg_sq (0 without amsgrad) and step (a float32 scalar), then numel.
    block_table_ptr: int64 rows of 2 per program: tensor index, chunk start (an element offset).
    """
    pid = tl.program_id(0).to(tl.int64)
    row, chunk_start, chunk_end = program_chunk(
        tensor_table_ptr, block_table_ptr, pid, 7, BLOCK_SIZE, CHUNK_SIZE
    )
    param_ptr = table_pointer(row + 0, DTYPE, ALIGNED_16)
    grad_ptr = table_pointer(row + 1, DTYPE, ALIGNED_16)
    exp_avg_ptr = table_pointer(row + 2, DTYPE, ALIGNED_16)
    exp_avg_sq_ptr = table_pointer(row + 3, DTYPE, ALIGNED_16)
    max_exp_avg_sq_ptr = exp_avg_sq_ptr
    if AMSGRAD:
        max_exp_avg_sq_ptr = table_pointer(row + 4, DTYPE, ALIGNED_16)
    step_ptr = table_pointer(row + 5, tl.float32, False)

    # Whole blocks need no bounds mask (so their loads vectorize); only the chunk's tail does.
    full_mask = None
    if HAS_FOUND_INF:
        full_mask = keep_mask(found_inf_ptr, BLOCK_SIZE)

    step_size, bias_correction2_sqrt, param_decay = _adam_step_scalars(
        step_ptr, lr, log2_beta1, log2_beta2, weight_decay, LR_IS_TENSOR
    )
    num_full_blocks = (chunk_end - chunk_start) // BLOCK_SIZE
    for block in range(num_full_blocks):
        offsets = chunk_start + block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        _adam_update_block(
            param_ptr,
            grad_ptr,
            exp_avg_ptr,
            exp_avg_sq_ptr,
            max_exp_avg_sq_ptr,
            offsets,
            full_mask,
            grad_scale_ptr,
            step_size,
            bias_correction2_sqrt,
            param_decay,
            lerp_weight,
            beta2,
            one_minus_beta2,
            weight_decay,
            eps,
            AMSGRAD,
            MAXIMIZE,
            DECOUPLED_WEIGHT_DECAY,
            HAS_GRAD_SCALE,
        )
    tail_start = chunk_start + num_full_blocks * BLOCK_SIZE
    if tail_start < chunk_end:
        offsets = tail_start + tl.arange(0, BLOCK_SIZE)
        tail_mask = offsets < chunk_end
        if HAS_FOUND_INF:
            tail_mask = tail_mask & full_mask
        _adam_update_block(
            param_ptr,
            grad_ptr,
            exp_avg_ptr,
            exp_avg_sq_ptr,
            max_exp_avg_sq_ptr,
            offsets,
            tail_mask,
            grad_scale_ptr,
            step_size,
            bias_correction2_sqrt,
            param_decay,
            lerp_weight,
            beta2,
            one_minus_beta2,
            weight_decay,
            eps,
            AMSGRAD,
            MAXIMIZE,
            DECOUPLED_WEIGHT_DECAY,
            HAS_GRAD_SCALE,
        )


def _check_inputs(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    amsgrad: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    check_lengths("adam", n, {**lists, "state_steps": state_steps})
    if not 0.0 <= beta1 <= 1.0 or not 0.0 <= beta2 <= 1.0:
        raise ValueError(f"adam: betas must be in [0, 1], got ({beta1}, {beta2})")
    if n == 0:
        return
    check_tensor_lists("adam", params, lists)
    device = params[0].device
    for i, step in enumerate(state_steps):
        if step.dtype != torch.float32 or step.numel() != 1 or step.device != device:
            raise ValueError(
                f"adam: state_steps[{i}] must be a 1-element float32 tensor on {device}, got "
                f"{step.dtype} with {step.numel()} elements on {step.device}"
            )
    check_amp_scalars("adam", params, lr, grad_scale, found_inf)


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    multi_tensor: bool | None = None,
) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW (True) step with Triton kernels.

    The math and the contract are fusedopt.reference.adam's, which is the spec: tensors are updated
    in place, every state_steps[i] advances by one, grads are unscaled in place when grad_scale is
    given, and nothing at all changes when found_inf is given and non-zero. No device value is
    read on the host.

    Requirements: params of one dtype (fp32, fp16 or bf16) on one device; grads, exp_avgs,
    exp_avg_sqs (and max_exp_avg_sqs with amsgrad) of the params' dtype, device and shapes, all
    contiguous; state_steps 1-element float32 tensors; lr a float or a 1-element tensor, and
    grad_scale and found_inf 1-element float tensors, on the params' device; betas in [0, 1].

    multi_tensor: None (default) uses the multi-tensor kernel (one launch for all tensors) on CUDA
    tensors and the per-tensor kernel (one launch per tensor) otherwise; True or False forces one.
    """
    _check_inputs(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        lr, beta1, beta2, amsgrad, grad_scale, found_inf,
    )
    if not params:
        return
    scalars = dict(
        lerp_weight=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        log2_beta1=math.log2(beta1) if beta1 > 0 else -math.inf,
        log2_beta2=math.log2(beta2) if beta2 > 0 else -math.inf,
        weight_decay=weight_decay,
        eps=eps,
    )
    flags = dict(
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        DECOUPLED_WEIGHT_DECAY=bool(decoupled_weight_decay),
    )

    launch(_adam_tensor_kernel, _adam_multi_tensor_kernel,
           [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None],
           multi_tensor=multi_tensor, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
           scalars=scalars, flags=flags,
           extra_per_tensor=[state_steps])

    # The kernels used step + 1; now advance the stored steps (not at all when found_inf != 0).
    if found_inf is None:
        torch._foreach_add_(state_steps, 1.0)
    else:
        torch._foreach_add_(state_steps, (found_inf.reshape(()) == 0).to(torch.float32))
