"""Triton Adam / AdamW step: the fused counterpart of fusedopt.reference.adam (the spec).

One elementwise block update (_adam_update_block) is shared by two kernels:

* _adam_tensor_kernel: one launch per tensor, plain pointer arguments. Runs anywhere Triton runs,
  the interpreter (TRITON_INTERPRET=1) on CPU tensors included.
* _adam_multi_tensor_kernel: one launch for a whole list of tensors. Each program takes one chunk
  of one tensor; it finds the tensor's data through an int64 table of addresses and the chunk
  through a per-program (tensor index, chunk start) table, both in one device tensor.

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
    if LR_IS_TENSOR:
        lr_value = tl.load(lr).to(tl.float64)
    else:
        lr_value = tl.cast(lr, tl.float64)
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
        # Compared after the broadcast: the interpreter mistypes a broadcast scalar comparison.
        mask = mask & (tl.broadcast_to(tl.load(found_inf_ptr), [BLOCK_SIZE]) == 0)

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
def _table_pointer(
    address_ptr,
    DTYPE: tl.constexpr,
    ALIGNED_16: tl.constexpr,
):
    """Loads an int64 data address from a table and makes it a pointer to DTYPE."""
    pointer = tl.load(address_ptr).to(tl.pointer_type(DTYPE))
    if ALIGNED_16:
        # On the pointer itself: the hint does not carry through the int -> pointer cast.
        pointer = tl.multiple_of(pointer, 16)
    return pointer


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
    tensor_index = tl.load(block_table_ptr + 2 * pid)
    chunk_start = tl.multiple_of(tl.load(block_table_ptr + 2 * pid + 1), BLOCK_SIZE)
    row = tensor_table_ptr + 7 * tensor_index
    param_ptr = _table_pointer(row + 0, DTYPE, ALIGNED_16)
    grad_ptr = _table_pointer(row + 1, DTYPE, ALIGNED_16)
    exp_avg_ptr = _table_pointer(row + 2, DTYPE, ALIGNED_16)
    exp_avg_sq_ptr = _table_pointer(row + 3, DTYPE, ALIGNED_16)
    max_exp_avg_sq_ptr = exp_avg_sq_ptr
    if AMSGRAD:
        max_exp_avg_sq_ptr = _table_pointer(row + 4, DTYPE, ALIGNED_16)
    step_ptr = _table_pointer(row + 5, tl.float32, False)
    numel = tl.load(row + 6)
    chunk_end = tl.minimum(chunk_start + CHUNK_SIZE, numel)

    # Whole blocks need no bounds mask (so their loads vectorize); only the chunk's tail does.
    full_mask = None
    if HAS_FOUND_INF:
        full_mask = tl.broadcast_to(tl.load(found_inf_ptr), [BLOCK_SIZE]) == 0

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


# Elements per block (one program of the per-tensor kernel, one loop step of the multi-tensor one)
# by storage dtype, and elements per program of the multi-tensor kernel (a multiple of each).
_BLOCK_SIZES = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}
_CHUNK_SIZE = 65536
_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check_scalar_tensor(name: str, t: Tensor, device: torch.device) -> None:
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"adam: {name} must be a 1-element floating-point tensor")
    if t.device != device:
        raise ValueError(f"adam: {name} is on {t.device} but the params are on {device}")


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
    for name, tensors in {**lists, "state_steps": state_steps}.items():
        if len(tensors) != n:
            raise ValueError(f"adam: {len(tensors)} {name} for {n} params")
    if not 0.0 <= beta1 <= 1.0 or not 0.0 <= beta2 <= 1.0:
        raise ValueError(f"adam: betas must be in [0, 1], got ({beta1}, {beta2})")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _BLOCK_SIZES:
        raise TypeError(f"adam: params of dtype {dtype} are not supported (fp32, fp16, bf16)")
    for i, param in enumerate(params):
        if param.dtype != dtype or param.device != device:
            raise ValueError(
                f"adam: params[{i}] is {param.dtype} on {param.device}, params[0] is {dtype} on "
                f"{device}; all tensors of one call must share one dtype and device"
            )
        if not param.is_contiguous():
            raise ValueError(f"adam: params[{i}] is not contiguous")
        for name, tensors in lists.items():
            t = tensors[i]
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"adam: {name}[{i}] is {t.dtype} on {t.device}, params are {dtype} on {device}"
                )
            if t.shape != param.shape:
                raise ValueError(
                    f"adam: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] has shape "
                    f"{tuple(param.shape)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"adam: {name}[{i}] is not contiguous")
        step = state_steps[i]
        if step.dtype != torch.float32 or step.numel() != 1 or step.device != device:
            raise ValueError(
                f"adam: state_steps[{i}] must be a 1-element float32 tensor on {device}, got "
                f"{step.dtype} with {step.numel()} elements on {step.device}"
            )
    if isinstance(lr, Tensor):
        _check_scalar_tensor("lr", lr, device)
    if grad_scale is not None:
        _check_scalar_tensor("grad_scale", grad_scale, device)
    if found_inf is not None:
        _check_scalar_tensor("found_inf", found_inf, device)


# Device copies of the address tables, keyed by everything they encode (addresses, sizes), so a
# training loop builds and uploads them once, and a CUDA graph captures no host-to-device copy.
_TABLE_CACHE: dict[tuple, tuple[Tensor, Tensor, bool]] = {}
_TABLE_CACHE_SIZE = 16


def _multi_tensor_tables(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad
) -> tuple[Tensor, Tensor, bool] | None:
    """(tensor table: 7 int64 per tensor = 5 data addresses, step address, numel;
    block table: (tensor index, chunk start) per program; all addresses 16-byte aligned)."""
    tensor_rows: list[int] = []
    for i, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        data = [param, grads[i], exp_avgs[i], exp_avg_sqs[i]]
        if amsgrad:
            data.append(max_exp_avg_sqs[i])
        addresses = [t.data_ptr() for t in data]
        if not amsgrad:
            addresses.append(0)
        tensor_rows += [*addresses, state_steps[i].data_ptr(), numel]
    if not tensor_rows:
        return None
    key = (params[0].device, tuple(tensor_rows))
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        return cached
    block_rows: list[int] = []
    aligned = True
    for index in range(len(tensor_rows) // 7):
        row = tensor_rows[7 * index : 7 * index + 7]
        aligned = aligned and all(address % 16 == 0 for address in row[:5])
        for start in range(0, row[6], _CHUNK_SIZE):
            block_rows += [index, start]
    pinned = params[0].device.type == "cuda"
    host = torch.tensor(tensor_rows + block_rows, dtype=torch.int64, pin_memory=pinned)
    tables = host.to(params[0].device, non_blocking=True)
    entry = (tables[: len(tensor_rows)], tables[len(tensor_rows) :], aligned)
    if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = entry
    return entry


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
    device = params[0].device
    dtype = params[0].dtype
    block_size = _BLOCK_SIZES[dtype]
    if multi_tensor is None:
        multi_tensor = device.type == "cuda"
    lr_is_tensor = isinstance(lr, Tensor)
    scalars = dict(
        lr=lr,
        grad_scale_ptr=grad_scale,
        found_inf_ptr=found_inf,
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
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        LR_IS_TENSOR=lr_is_tensor,
        BLOCK_SIZE=block_size,
    )

    if multi_tensor:
        tables = _multi_tensor_tables(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad
        )
        if tables is not None:
            tensor_table, block_table, aligned = tables
            _adam_multi_tensor_kernel[(block_table.shape[0] // 2,)](
                tensor_table,
                block_table,
                **scalars,
                DTYPE=_TRITON_DTYPES[dtype],
                ALIGNED_16=aligned,
                CHUNK_SIZE=_CHUNK_SIZE,
                **flags,
            )
    else:
        for i, param in enumerate(params):
            numel = param.numel()
            if numel == 0:
                continue
            _adam_tensor_kernel[(triton.cdiv(numel, block_size),)](
                param,
                grads[i],
                exp_avgs[i],
                exp_avg_sqs[i],
                max_exp_avg_sqs[i] if amsgrad else None,
                state_steps[i],
                numel,
                **scalars,
                **flags,
            )

    # The kernels used step + 1; now advance the stored steps (not at all when found_inf != 0).
    if found_inf is None:
        torch._foreach_add_(state_steps, 1.0)
    else:
        torch._foreach_add_(state_steps, (found_inf.reshape(()) == 0).to(torch.float32))
