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
        lr_i = _in_compute_dtype(lr, dtype, param.device)
        step = state_steps[i].to(torch.float64) + 1
        store(state_steps[i], step)

        grad = _unscaled_grad(grads[i], dtype, grad_scale, maximize, store)

        p = param.to(dtype)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr_i * weight_decay)
            else:
                grad = grad + weight_decay * p

        exp_avg = exp_avgs[i].to(dtype).lerp(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sqs[i].to(dtype) * beta2 + (1 - beta2) * grad * grad
        store(exp_avgs[i], exp_avg)
        store(exp_avg_sqs[i], exp_avg_sq)
        if amsgrad:
            exp_avg_sq = torch.maximum(max_exp_avg_sqs[i].to(dtype), exp_avg_sq)
            store(max_exp_avg_sqs[i], exp_avg_sq)

        step = step.to(param.device)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step).sqrt()
        step_size = (lr_i / bias_correction1).to(dtype)
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt.to(dtype) + eps
        store(param, p - step_size * exp_avg / denom)


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
        exp_avg = exp_avgs[i].to(dtype)
        update = (beta1 * exp_avg + (1 - beta1) * grad).sign()
        lr_i = _in_compute_dtype(lr, dtype, param.device)
        p = param.to(dtype) * (1 - lr_i * weight_decay)
        store(param, p - lr_i * update)
        store(exp_avgs[i], beta2 * exp_avg + (1 - beta2) * grad)


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
        p = param.to(dtype)
        if weight_decay != 0:
            grad = grad + weight_decay * p
        if momentum != 0:
            if is_first_step:
                buf = grad
            else:
                buf = momentum * momentum_buffers[i].to(dtype) + (1 - dampening) * grad
            store(momentum_buffers[i], buf)
            grad = grad + momentum * buf if nesterov else buf
        store(param, p - _in_compute_dtype(lr, dtype, param.device) * grad)


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
