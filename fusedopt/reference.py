"""The math of every fusedopt algorithm in plain torch: the specification, the test oracle and the
fallback backend. One readable function per algorithm; no tricks.

Each function has the contract of its fused op (see csrc/fusedopt.cpp): it updates its tensors in
place, computes in fp32 (fp64 for fp64 tensors) whatever the storage dtype, and never reads a
device value back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _in_compute_dtype(value: float | Tensor, dtype: torch.dtype, device: torch.device
                      ) -> float | Tensor:
    """A tensor hyperparameter (lr) in the compute dtype on the param's device, so that an fp32
    lr does not round fp64 math (lr * weight_decay); a float as it is."""
    return value.to(device, dtype) if isinstance(value, Tensor) else value


def _store_unless(found_inf: Tensor | None):
    """store(dst, value): dst = value in dst's dtype, except where GradScaler found an inf
    (found_inf != 0), which keeps dst; decided on the device, with no host sync."""
    skip = None if found_inf is None else found_inf.to(torch.bool)

    def store(dst: Tensor, value: Tensor) -> None:
        value = value.to(dst.dtype)
        dst.copy_(value if skip is None else torch.where(skip.to(dst.device), dst, value))

    return store


def _unscaled_grad(grad: Tensor, dtype: torch.dtype, grad_scale: Tensor | None, maximize: bool,
                   store) -> Tensor:
    """The grad in the compute dtype, divided by grad_scale (and stored back so, as GradScaler's
    unscale would), then negated when maximizing."""
    value = grad.to(dtype)
    if grad_scale is not None:
        value = value / grad_scale.to(value.device, dtype)
        store(grad, value)
    return -value if maximize else value


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
) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW (True) step; torch.optim.Adam's update:

        step += 1
        g = grad / grad_scale            (grad is overwritten with this unscaled value)
        g = -g if maximize
        param *= 1 - lr * weight_decay    (AdamW)   |   g += weight_decay * param   (Adam)
        exp_avg = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq); use it below instead (amsgrad)
        param -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

    When found_inf is non-zero nothing changes, not even step or grad.
    """
    store = _store_unless(found_inf)
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        step = state_steps[i].to(torch.float64) + 1
        store(state_steps[i], step)
        grad = _unscaled_grad(grads[i], dtype, grad_scale, maximize, store)
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        p, exp_avg, exp_avg_sq, max_exp_avg_sq = _adam_math(
            param.to(dtype), grad, exp_avgs[i].to(dtype), exp_avg_sqs[i].to(dtype),
            None if max_exp_avg_sq is None else max_exp_avg_sq.to(dtype), step, lr=lr,
            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            decoupled_weight_decay=decoupled_weight_decay)
        store(exp_avgs[i], exp_avg)
        store(exp_avg_sqs[i], exp_avg_sq)
        if amsgrad:
            store(max_exp_avg_sqs[i], max_exp_avg_sq)
        store(param, p)


def _adam_math(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               max_exp_avg_sq: Tensor | None, step: Tensor, *, lr: float | Tensor, beta1: float,
               beta2: float, weight_decay: float, eps: float, decoupled_weight_decay: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Adam's rule on one tensor in its compute dtype (p, grad and the states all in it; grad
    already unscaled and signed; step already advanced, fp64): the new (p, exp_avg, exp_avg_sq,
    max_exp_avg_sq), that last None without amsgrad."""
    dtype = p.dtype
    lr = _in_compute_dtype(lr, dtype, p.device)
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * p
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    second_moment = exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq = second_moment = torch.maximum(max_exp_avg_sq, exp_avg_sq)
    step = step.to(p.device)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step).sqrt()
    step_size = (lr / bias_correction1).to(dtype)
    denom = second_moment.sqrt() / bias_correction2_sqrt.to(dtype) + eps
    return p - step_size * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq


# ---------------------------------------------------------------------------------------------
# Lean states: optimizer states in fewer bytes, and low-precision params kept precise.
#
# A state is stored in its dtype (fp32, bf16, ...), or 8-bit blockwise (uint8 codes): blocks of
# QUANT_BLOCK consecutive elements, each with its absmax a (fp32), and per element the code of
# x / a companded by the fourth root, z = sign(x) |x / a|^(1/4), rounded to 127 steps each side
# (signed states, code = 128 + round(127 z)) or 255 (non-negative states, code = round(255 z)).
# The fourth root spends the 8 bits evenly in relative terms over ~9 decades (the smallest
# non-zero code is 1/127^4 of the absmax): a block's small second moments do not collapse to 0,
# which would turn their updates into m / eps. Near the absmax its steps are finer than a
# float-like code's: one with 3 mantissa bits (sign + 4 exponent bits for exp_avg, 5 for
# exp_avg_sq), which CPUs decode and encode with integer adds alone (~6% less CPU time per code
# changed), was measured on test_8bit_updates_stay_within_five_percent_of_fp64_adamw's problem
# (2026-12-06): mean update errors of 8% (exp_avg's code changed), 11% (exp_avg_sq's) and 15%
# (both) of the update's norm, against 3.6% with the fourth root.
#
# A bf16 / fp16 param is updated in one of five ways (param_mode):
#   "nearest"     as torch does: the new value rounded to nearest (no extra state)
#   "master"      extras[i] is an fp32 master copy; the param is the master rounded to nearest
#   "compact"     bf16 only: extras[i] (int8) holds the rounding error of the bf16 param as a
#                 fraction of half its ulp, in 127 steps: a 24-bit master (FlashOptim's split)
#   "kahan"       extras[i] (the param's dtype) carries each update's rounding error into the
#                 next (Kahan-compensated summation)
#   "stochastic"  bf16 only: rounded up or down at random, with the probability that makes the
#                 rounding unbiased; the random bits hash (step, tensor index, element index)

QUANT_BLOCK = 256
INV_127 = 1.0 / 127  # (rounded to fp32 where used: every backend multiplies by the fp32 value)
INV_255 = 1.0 / 255


def quant_blocks(numel: int) -> int:
    """How many absmax scales a tensor of `numel` elements has as an 8-bit state."""
    return -(-numel // QUANT_BLOCK)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values of an 8-bit blockwise state (codes shaped like its param)."""
    flat = codes.reshape(-1).to(torch.float32)
    z = (flat - 128) * INV_127 if signed else flat * INV_255
    scale = absmax.repeat_interleave(QUANT_BLOCK)[: flat.numel()]
    w = z * z
    x = w * w * scale
    return (torch.copysign(x, z) if signed else x).reshape(codes.shape)


def quantize_blockwise(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of fp32 values x: the inverse of dequantize_blockwise, rounded to nearest
    (ties to even)."""
    flat = x.reshape(-1).to(torch.float32)
    blocks = quant_blocks(flat.numel())
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * QUANT_BLOCK - flat.numel()))
    absmax = padded.reshape(blocks, QUANT_BLOCK).amax(dim=1)
    inverse = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))
    y = torch.clamp(flat.abs() * inverse.repeat_interleave(QUANT_BLOCK)[: flat.numel()], max=1)
    z = y.sqrt().sqrt()
    if signed:
        q = torch.round(z * 127)
        codes = torch.where(flat < 0, 128 - q, 128 + q)
    else:
        codes = torch.round(z * 255)
    return codes.to(torch.uint8).reshape(x.shape), absmax


# A compact master (param_mode "compact", a 24-bit master) is a bf16 param plus an int8
# correction c: its fp32 bits are the param's plus 256 c, i.e. c counts steps of 2^8 fp32 ulps,
# 1/256 of the param's bf16 ulp. Integers on the bits, so every backend decodes and encodes it
# with adds and shifts, exactly.
def compact_master(p: Tensor, correction: Tensor) -> Tensor:
    """The fp32 value of a bf16 param and its int8 correction (param_mode "compact")."""
    bits = p.to(torch.float32).view(torch.int32) + correction.to(torch.int32) * 256
    return bits.view(torch.float32)


def split_compact_master(value: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 param, int8 correction) of fp32 values: the param rounded to nearest (ties to even),
    and the bits it leaves out (2^15 fp32 ulps at most, either way) in steps of 2^8, rounded half
    up: the master is within 128 ulps of the value, or 256 where those bits are within 128 ulps
    of +2^15 and the correction saturates at 127."""
    p = value.to(torch.bfloat16)
    error = value.to(torch.float32).view(torch.int32) - p.to(torch.float32).view(torch.int32)
    return p, torch.clamp((error + 128) >> 8, -128, 127).to(torch.int8)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (murmur3's finalizer) of int64 tensors holding uint32 values."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & mask
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & mask
    return x ^ (x >> 16)


def stochastic_round_bf16(value: Tensor, step: Tensor, tensor_index: int) -> Tensor:
    """fp32 values rounded to bf16 up or down at random, unbiased: 16 random bits are added to
    the 16 bits that bf16 drops, and the sum truncated. The bits of element i hash (step,
    tensor_index, i), so that a step is reproducible and a captured step draws anew each replay."""
    mask = 0xFFFFFFFF
    key = _mix32((step.to(torch.int64) + 0x9E3779B9 * (tensor_index + 1)) & mask)
    index = torch.arange(value.numel(), device=value.device, dtype=torch.int64)
    noise = _mix32(((index * 0x9E3779B1) & mask) ^ key.to(value.device)) & 0xFFFF
    bits = value.reshape(-1).contiguous().view(torch.int32).to(torch.int64) & mask
    rounded = ((bits + noise) & 0xFFFF0000).to(torch.int32)
    return rounded.view(torch.float32).to(torch.bfloat16).reshape(value.shape)


def load_param(param: Tensor, extra: Tensor | None, param_mode: str) -> Tensor:
    """The value an update starts from, in fp32 (fp64 for fp64 params)."""
    if param_mode == "master":
        return extra.to(torch.float32)
    if param_mode == "compact":
        return compact_master(param, extra)
    if param_mode == "kahan":
        return param.to(torch.float32) + extra.to(torch.float32)
    return param.to(_compute_dtype(param))


def store_param(param: Tensor, extra: Tensor | None, value: Tensor, param_mode: str, store,
                step: Tensor, tensor_index: int) -> None:
    """Writes the updated value back as param_mode keeps it (see the section's comment)."""
    if param_mode == "master":
        store(extra, value)
        store(param, value)
    elif param_mode == "compact":
        p, correction = split_compact_master(value)
        store(extra, correction)
        store(param, p)
    elif param_mode == "kahan":
        p = value.to(param.dtype)
        store(extra, value - p.to(torch.float32))
        store(param, p)
    elif param_mode == "stochastic":
        store(param, stochastic_round_bf16(value, step, tensor_index))
    else:
        store(param, value)


def load_state(state: Tensor, absmax: Tensor | None, signed: bool, dtype: torch.dtype) -> Tensor:
    """A state in the compute dtype: dequantized when 8-bit (absmax given)."""
    if absmax is None:
        return state.to(dtype)
    return dequantize_blockwise(state, absmax, signed).to(dtype)


def store_state(state: Tensor, absmax: Tensor | None, value: Tensor, signed: bool,
                store) -> None:
    if absmax is None:
        store(state, value)
    else:
        codes, new_absmax = quantize_blockwise(value, signed)
        store(state, codes)
        store(absmax, new_absmax.view(absmax.shape))  # (a DTensor shard's absmax is 2-D)


def _lean_params(params: list[Tensor], grads: list[Tensor], param_extras: list[Tensor],
                 state_steps: list[Tensor], grad_scale: Tensor | None, maximize: bool, store):
    """What every lean step does first, per param: advance its step (stored unless found_inf),
    and unscale its grad. Yields (i, the compute dtype, the new step, the grad, the param's
    extra tensor or None)."""
    for i, param in enumerate(params):
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        step = state_steps[i].to(torch.float64) + 1
        store(state_steps[i], step)
        grad = _unscaled_grad(grads[i], dtype, grad_scale, maximize, store)
        yield i, dtype, step, grad, (param_extras[i] if param_extras else None)


def adam_lean(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_absmaxes: list[Tensor],
    exp_avg_sq_absmaxes: list[Tensor],
    param_extras: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    param_mode: str,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Adam / AdamW step (adam's rule, without amsgrad) with lean states: exp_avgs and
    exp_avg_sqs in any float dtype, or 8-bit blockwise (uint8) with their absmax lists (empty
    otherwise); the params updated per param_mode, param_extras its extra tensor per param
    (empty for "nearest" and "stochastic"). The update uses the states at full precision; they
    are rounded (quantized) only as they are stored. When found_inf is non-zero nothing
    changes."""
    store = _store_unless(found_inf)
    quantized = bool(exp_avg_absmaxes)
    for i, dtype, step, grad, extra in _lean_params(params, grads, param_extras, state_steps,
                                                    grad_scale, maximize, store):
        param = params[i]
        m_absmax = exp_avg_absmaxes[i] if quantized else None
        v_absmax = exp_avg_sq_absmaxes[i] if quantized else None
        p, exp_avg, exp_avg_sq, _ = _adam_math(
            load_param(param, extra, param_mode), grad,
            load_state(exp_avgs[i], m_absmax, True, dtype),
            load_state(exp_avg_sqs[i], v_absmax, False, dtype), None, step, lr=lr,
            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            decoupled_weight_decay=decoupled_weight_decay)
        store_state(exp_avgs[i], m_absmax, exp_avg, True, store)
        store_state(exp_avg_sqs[i], v_absmax, exp_avg_sq, False, store)
        store_param(param, extra, p, param_mode, store, step, i)


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
) -> None:
    """One Lion step (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

        g = grad / grad_scale            (grad is overwritten with this unscaled value)
        g = -g if maximize
        param *= 1 - lr * weight_decay
        param -= lr * sign(beta1 * exp_avg + (1 - beta1) * g)      (sign(0) = 0)
        exp_avg = beta2 * exp_avg + (1 - beta2) * g

    When found_inf is non-zero nothing changes, not even grad.
    """
    store = _store_unless(found_inf)
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        grad = _unscaled_grad(grads[i], dtype, grad_scale, maximize, store)
        p, exp_avg = _lion_math(param.to(dtype), grad, exp_avgs[i].to(dtype), lr, beta1=beta1,
                                beta2=beta2, weight_decay=weight_decay)
        store(param, p)
        store(exp_avgs[i], exp_avg)


def _lion_math(p: Tensor, grad: Tensor, exp_avg: Tensor, lr: float | Tensor, *, beta1: float,
               beta2: float, weight_decay: float) -> tuple[Tensor, Tensor]:
    """Lion's update of one param (in its compute dtype): (new p, new exp_avg)."""
    update = (beta1 * exp_avg + (1 - beta1) * grad).sign()
    lr_i = _in_compute_dtype(lr, p.dtype, p.device)
    p = p * (1 - lr_i * weight_decay)
    return p - lr_i * update, beta2 * exp_avg + (1 - beta2) * grad


def lion_lean(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_absmaxes: list[Tensor],
    param_extras: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    param_mode: str,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Lion step (lion's rule) with lean states, as adam_lean keeps them: exp_avgs in any
    float dtype, or 8-bit blockwise (uint8, signed code) with their absmaxes (empty otherwise);
    the params updated per param_mode, param_extras its extra tensor per param. state_steps
    count the steps (Lion's rule has no step; stochastic rounding's random bits hash it). When
    found_inf is non-zero nothing changes."""
    store = _store_unless(found_inf)
    quantized = bool(exp_avg_absmaxes)
    for i, dtype, step, grad, extra in _lean_params(params, grads, param_extras, state_steps,
                                                    grad_scale, maximize, store):
        param = params[i]
        absmax = exp_avg_absmaxes[i] if quantized else None
        p, exp_avg = _lion_math(load_param(param, extra, param_mode), grad,
                                load_state(exp_avgs[i], absmax, True, dtype), lr, beta1=beta1,
                                beta2=beta2, weight_decay=weight_decay)
        store_state(exp_avgs[i], absmax, exp_avg, True, store)
        store_param(param, extra, p, param_mode, store, step, i)


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
) -> None:
    """One SGD step, torch.optim.SGD's update:

        g = grad / grad_scale            (grad is overwritten with this unscaled value)
        g = -g if maximize
        g += weight_decay * param
        if momentum != 0:
            buf = g  if is_first_step  else  momentum * buf + (1 - dampening) * g
            g = g + momentum * buf  if nesterov  else  buf
        param -= lr * g

    momentum_buffers is empty when momentum == 0. When found_inf is non-zero nothing changes.
    """
    store = _store_unless(found_inf)
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        grad = _unscaled_grad(grads[i], dtype, grad_scale, maximize, store)
        buf = momentum_buffers[i].to(dtype) if momentum != 0 and not is_first_step else None
        p, buf = _sgd_math(param.to(dtype), grad, buf, lr, momentum=momentum,
                           dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        if momentum != 0:
            store(momentum_buffers[i], buf)
        store(param, p)


def _sgd_math(p: Tensor, grad: Tensor, buf: Tensor | None, lr: float | Tensor, *,
              momentum: float, dampening: float, weight_decay: float,
              nesterov: bool) -> tuple[Tensor, Tensor | None]:
    """SGD's update of one param (in its compute dtype): (new p, new buffer). buf is None on
    the first step (it becomes the grad) and without momentum (it stays None)."""
    if weight_decay != 0:
        grad = grad + weight_decay * p
    if momentum != 0:
        buf = grad if buf is None else momentum * buf + (1 - dampening) * grad
        grad = grad + momentum * buf if nesterov else buf
    return p - _in_compute_dtype(lr, p.dtype, p.device) * grad, buf


def sgd_lean(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    momentum_buffer_absmaxes: list[Tensor],
    param_extras: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    param_mode: str,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One SGD step (sgd's rule) with lean states, as adam_lean keeps them: momentum_buffers
    (empty when momentum is 0) in any float dtype, or 8-bit blockwise (uint8, signed code) with
    their absmaxes (empty otherwise); the params updated per param_mode, param_extras its extra
    tensor per param. state_steps count the steps (stochastic rounding's random bits hash them).
    When found_inf is non-zero nothing changes."""
    store = _store_unless(found_inf)
    quantized = bool(momentum_buffer_absmaxes)
    for i, dtype, step, grad, extra in _lean_params(params, grads, param_extras, state_steps,
                                                    grad_scale, maximize, store):
        param = params[i]
        absmax = momentum_buffer_absmaxes[i] if quantized else None
        buf = None
        if momentum != 0 and not is_first_step:
            buf = load_state(momentum_buffers[i], absmax, True, dtype)
        p, buf = _sgd_math(load_param(param, extra, param_mode), grad, buf, lr,
                           momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov)
        if momentum != 0:
            store_state(momentum_buffers[i], absmax, buf, True, store)
        store_param(param, extra, p, param_mode, store, step, i)


def newton_schulz(
    x: Tensor,
    coefficients: tuple[tuple[float, float, float], ...],
    eps: float,
    dtype: torch.dtype,
) -> Tensor:
    """The approximately orthogonal factor of each matrix in x (..., rows, cols), in `dtype`,
    by len(coefficients) Newton-Schulz iterations, as torch.optim.Muon computes it:

        X = x / max(||x||_F, eps)          (per matrix, rounded to dtype; X^T when rows > cols)
        for (a, b, c) in coefficients:
            A = X @ X^T;  B = b * A + c * A @ A;  X = a * X + B @ X
        return X (transposed back)

    Each product rounds to `dtype` (bf16 in torch: matmuls accumulate in fp32, store bf16)."""
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    norm = torch.linalg.vector_norm(x.to(_compute_dtype(x)), dim=(-2, -1), keepdim=True)
    ortho = (x.to(norm.dtype) / norm.clamp(min=eps)).to(dtype)
    for a, b, c in coefficients:
        gram = ortho @ ortho.mT
        gram_update = b * gram + c * (gram @ gram)
        ortho = a * ortho + gram_update @ ortho
    return ortho.mT if transposed else ortho


def muon_momentum(
    updates: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    momentum: float,
    nesterov: bool,
) -> None:
    """The elementwise first half of a Muon step (torch.optim.Muon's), into `updates` (shaped
    and typed like the grads):

        buf = lerp(buf, g, 1 - momentum)
        update = lerp(g, buf, momentum)  if nesterov  else  buf
    """
    for update, grad, buf in zip(updates, grads, momentum_buffers):
        dtype = _compute_dtype(grad)
        g = grad.to(dtype)
        new_buf = buf.to(dtype).lerp(g, 1 - momentum)
        buf.copy_(new_buf)
        update.copy_(g.lerp(new_buf, momentum) if nesterov else new_buf)


def muon_momentum_lean(
    updates: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    momentum_buffer_absmaxes: list[Tensor],
    *,
    momentum: float,
    nesterov: bool,
) -> None:
    """muon_momentum with lean buffers, as adam_lean keeps its states: momentum_buffers in any
    float dtype, or 8-bit blockwise (uint8, signed code) with their absmaxes (empty otherwise).
    The rule runs in fp32 on the buffer's full-precision value; the buffer is rounded
    (quantized) only as it is stored."""
    store = _store_unless(None)
    quantized = bool(momentum_buffer_absmaxes)
    for i, (update, grad, buf) in enumerate(zip(updates, grads, momentum_buffers)):
        absmax = momentum_buffer_absmaxes[i] if quantized else None
        g = grad.to(torch.float32)
        new_buf = load_state(buf, absmax, True, torch.float32).lerp(g, 1 - momentum)
        store_state(buf, absmax, new_buf, True, store)
        update.copy_(g.lerp(new_buf, momentum) if nesterov else new_buf)


def muon_update(
    params: list[Tensor],
    orthogonalized: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    adjusted_lr: float,
) -> None:
    """The elementwise second half of a Muon step: decoupled weight decay, then the
    orthogonalized update (any float dtype, shaped like the param) at the shape-adjusted lr:

        param = param * (1 - lr * weight_decay) - adjusted_lr * orthogonalized
    """
    for param, ortho in zip(params, orthogonalized):
        dtype = _compute_dtype(param)
        p = param.to(dtype) * (1 - lr * weight_decay)
        param.copy_(p - adjusted_lr * ortho.to(dtype))


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    coefficients: tuple[tuple[float, float, float], ...],
    eps: float,
    adjusted_lr: float,
    ns_dtype: torch.dtype,
) -> None:
    """One Muon step (Jordan et al. 2024) of params that share one shape, torch.optim.Muon's
    update. An N-D param is orthogonalized as its (shape[0], -1) matrix:

        muon_momentum -> O = newton_schulz(update as (rows, -1), coefficients, eps, ns_dtype)
        -> muon_update(param, O reshaped)
    """
    updates = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
    muon_momentum(updates, grads, momentum_buffers, momentum=momentum, nesterov=nesterov)
    orthogonalized = [newton_schulz(u.reshape(u.shape[0], -1), coefficients, eps, ns_dtype)
                      .reshape(u.shape) for u in updates]
    muon_update(params, orthogonalized, lr=lr, weight_decay=weight_decay,
                adjusted_lr=adjusted_lr)


def _norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    rms: bool,
    residual: Tensor | None,
    residual_in_fp32: bool,
    zero_centered_weight: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm / RMSNorm over the last dimension, differentiable by autograd. Computes in fp32
    for fp32 / bf16 / fp16 storage, in fp64 for fp64 and in complex arithmetic for complex x
    (RMSNorm as torch's: s * rsqrt(mean(s * s) + eps), no conjugate)."""
    out_dtype = x.dtype
    residual_out = None
    if residual is not None:
        # What is normalized is s as stored (rounded to its dtype), so that the backward pass,
        # which recomputes from the stored s, differentiates exactly the forward.
        dtype = torch.promote_types(_compute_dtype(x), residual.dtype)
        kept = torch.promote_types(out_dtype, torch.float32) if residual_in_fp32 else out_dtype
        residual_out = (x.to(dtype) + residual.to(dtype)).to(kept)
        x = residual_out
    x_hat, _ = _normalize(x, eps, rms)
    y = x_hat
    if weight is not None:
        y = y * _effective_weight(weight, zero_centered_weight, y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(out_dtype)
    return y if residual_out is None else (y, residual_out)


def _normalize(x: Tensor, eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    """(x_hat, rstd) of each row of x, in x's compute dtype (fp32, fp64 or complex)."""
    h = x.to(_compute_dtype(x))
    if rms:
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return h * rstd, rstd
    mean = h.mean(-1, keepdim=True)
    rstd = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
    return (h - mean) * rstd, rstd


def _effective_weight(weight: Tensor, zero_centered_weight: bool, dtype: torch.dtype) -> Tensor:
    weight = weight.to(dtype)
    return 1 + weight if zero_centered_weight else weight


def _norm_backward(
    dy: Tensor,
    s: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    rms: bool,
    zero_centered_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(ds, dweight, dbias) of _norm without a residual, by the closed-form gradient in the
    compute dtype of s (real dtypes only; in the dtypes of s, weight and bias). Plain torch ops, so these grads can be differentiated
    again. With g = dy * w:
        LayerNorm: ds = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        RMSNorm:   ds = rstd * (g - x_hat * mean(g * x_hat))"""
    x_hat, rstd = _normalize(s, eps, rms)
    dy = dy.to(x_hat.dtype)
    g = dy if weight is None else dy * _effective_weight(weight, zero_centered_weight, dy.dtype)
    ds = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
    if not rms:
        ds = ds - g.mean(-1, keepdim=True)
    ds = (ds * rstd).to(s.dtype)
    rows = tuple(range(dy.dim() - 1))
    dweight = None if weight is None else (dy * x_hat).sum(rows).to(weight.dtype)
    dbias = None if bias is None else dy.sum(rows).to(bias.dtype)
    return ds, dweight, dbias


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    residual: Tensor | None = None,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dimension of x (flatten normalized_shape into it first):

        s = x + residual                  (when a residual is given; returned too)
        y = (s - mean(s)) / sqrt(var(s) + eps) * w + b       (w = 1 + weight if zero-centered)

    Statistics in fp32 (fp64 for fp64 x); y in x's dtype; s in fp32 if residual_in_fp32 (fp64
    stays fp64), else x's dtype."""
    return _norm(x, weight, bias, eps, rms=False, residual=residual,
                 residual_in_fp32=residual_in_fp32, zero_centered_weight=zero_centered_weight)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    *,
    residual: Tensor | None = None,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dimension of x: y = s / sqrt(mean(s^2) + eps) * w, with s and w as
    in layer_norm."""
    return _norm(x, weight, None, eps, rms=True, residual=residual,
                 residual_in_fp32=residual_in_fp32, zero_centered_weight=zero_centered_weight)
