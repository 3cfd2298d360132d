"""The dispatch layer: one function per algorithm. Each takes tensors that share one device and
dtype, picks an implementation from fusedopt._registry, puts scalar tensors on that device and
calls it. The math of each function is the same-named function in fusedopt.reference."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedopt import _registry


def _on(device: torch.device, t: Tensor | None) -> Tensor | None:
    """A scalar tensor (lr, grad_scale, found_inf) on the params' device, without a host sync."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def _split_contiguous(lists: tuple[list[Tensor], ...]) -> tuple[list, list]:
    """Parallel tensor lists split in two: indices whose tensors are all contiguous, and the rest."""
    tensor_lists = [lst for lst in lists if lst]
    keep = [all(lst[i].is_contiguous() for lst in tensor_lists) for i in range(len(lists[0]))]
    if all(keep):
        return list(lists), [[] for _ in lists]
    pick = [[[t for t, k in zip(lst, keep) if k == wanted] if lst else [] for lst in lists]
            for wanted in (True, False)]
    return pick[0], pick[1]


def _step(algorithm: str, lists: tuple[list[Tensor], ...], backend: str, **kwargs) -> None:
    """Runs one step of `algorithm` (a key of the registry) on the implementation that `backend`
    resolves to for these tensors."""
    if not lists[0]:
        return
    device = lists[0][0].device
    impl = _registry.resolve(algorithm, backend, device, lists[0][0].dtype)
    if isinstance(kwargs.get("lr"), Tensor):
        kwargs["lr"] = _on(device, kwargs["lr"])  # in its own dtype: an fp64 lr stays exact
    for amp_key in ("grad_scale", "found_inf"):
        if amp_key in kwargs:
            kwargs[amp_key] = _on(device, kwargs[amp_key])
    if impl.contiguous_only:  # flat-array kernels; the rare strided rest: the reference
        lists, strided = _split_contiguous(lists)
        if strided[0]:
            _registry.REGISTRY[algorithm]["reference"].run(*strided, **kwargs)
    if lists[0]:
        impl.run(*lists, **kwargs)


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
    backend: str = "auto",
) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW step, in place; see reference.adam.

    Advances every state_steps[i] by one; with grad_scale, leaves the grads unscaled; with a
    non-zero found_inf, changes nothing."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
             state_steps)
    _step("adam", lists, backend, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
          eps=eps, amsgrad=amsgrad, maximize=maximize,
          decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
          found_inf=found_inf)


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
    backend: str = "auto",
) -> None:
    """One Adam / AdamW step with lean states (8-bit or low-precision moments, masters for bf16
    / fp16 params), in place; see reference.adam_lean. The states share one dtype."""
    _step("adam_lean", (params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                        exp_avg_sq_absmaxes, param_extras, state_steps), backend,
          lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=maximize,
          decoupled_weight_decay=decoupled_weight_decay, param_mode=param_mode,
          grad_scale=grad_scale, found_inf=found_inf)


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
    backend: str = "auto",
) -> None:
    """One Lion step, in place; see reference.lion. With grad_scale, leaves the grads unscaled;
    with a non-zero found_inf, changes nothing."""
    _step("lion", (params, grads, exp_avgs), backend, lr=lr, beta1=beta1, beta2=beta2,
          weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
          found_inf=found_inf)


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
    backend: str = "auto",
) -> None:
    """One Lion step with lean states (an 8-bit or low-precision exp_avg, masters for bf16 /
    fp16 params), in place; see reference.lion_lean."""
    _step("lion_lean", (params, grads, exp_avgs, exp_avg_absmaxes, param_extras, state_steps),
          backend, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
          param_mode=param_mode, grad_scale=grad_scale, found_inf=found_inf)


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
    backend: str = "auto",
) -> None:
    """One SGD step, in place; see reference.sgd. momentum_buffers is empty when momentum is 0;
    on is_first_step the buffers are set to the grads. With grad_scale, leaves the grads
    unscaled; with a non-zero found_inf, changes nothing."""
    _step("sgd", (params, grads, momentum_buffers if momentum != 0 else []), backend, lr=lr,
          momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
          maximize=maximize, is_first_step=is_first_step, grad_scale=grad_scale,
          found_inf=found_inf)


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
    backend: str = "auto",
) -> None:
    """One SGD step with lean states (an 8-bit or low-precision momentum buffer, masters for
    bf16 / fp16 params), in place; see reference.sgd_lean."""
    _step("sgd_lean", (params, grads, momentum_buffers, momentum_buffer_absmaxes, param_extras,
                       state_steps), backend, lr=lr, momentum=momentum, dampening=dampening,
          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
          is_first_step=is_first_step, param_mode=param_mode, grad_scale=grad_scale,
          found_inf=found_inf)


def muon_momentum(
    updates: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    momentum_buffer_absmaxes: list[Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """Muon's momentum step, in place; see reference.muon_momentum. updates (written only) are
    shaped and typed like the grads. Lean buffers (another dtype than the grads', or uint8 with
    momentum_buffer_absmaxes) take muon_momentum_lean."""
    if momentum_buffer_absmaxes or (grads and momentum_buffers[0].dtype != grads[0].dtype):
        muon_momentum_lean(updates, grads, momentum_buffers, momentum_buffer_absmaxes or [],
                           momentum=momentum, nesterov=nesterov, backend=backend)
        return
    _step("muon_momentum", (updates, grads, momentum_buffers), backend, momentum=momentum,
          nesterov=nesterov)


def muon_momentum_lean(
    updates: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    momentum_buffer_absmaxes: list[Tensor],
    *,
    momentum: float,
    nesterov: bool,
    backend: str = "auto",
) -> None:
    """Muon's momentum step with lean buffers (another float dtype than the grads', or 8-bit
    with their absmaxes), in place; see reference.muon_momentum_lean."""
    _step("muon_momentum_lean", (updates, grads, momentum_buffers, momentum_buffer_absmaxes),
          backend, momentum=momentum, nesterov=nesterov)


def newton_schulz(
    x: Tensor,
    coefficients: tuple[tuple[float, float, float], ...],
    eps: float,
    dtype: torch.dtype,
    *,
    backend: str = "auto",
) -> Tensor:
    """The approximately orthogonal factor of each matrix of x (batch, rows, cols), in dtype;
    see reference.newton_schulz."""
    impl = _registry.resolve("newton_schulz", backend, x.device, dtype)
    return impl.run(x, tuple(coefficients), eps, dtype)


def muon_update(
    params: list[Tensor],
    orthogonalized: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    adjusted_lr: float,
    backend: str = "auto",
) -> None:
    """Muon's weight decay and update, in place; see reference.muon_update. orthogonalized[i] is
    contiguous and shaped like params[i]."""
    _step("muon_update", (params, orthogonalized), backend, lr=lr, weight_decay=weight_decay,
          adjusted_lr=adjusted_lr)


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
    momentum_buffer_absmaxes: list[Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """One Muon step of params that share one shape, dtype and device, in place; see
    reference.muon. Their updates are stacked, so that one batched Newton-Schulz iteration
    orthogonalizes them all (an N-D param as its (shape[0], -1) matrix). Lean buffers (another
    dtype than the grads', or uint8 with momentum_buffer_absmaxes) take muon_momentum_lean."""
    if not params:
        return
    shape = params[0].shape
    rows = shape[0]
    cols = params[0].numel() // max(rows, 1)
    per_stack = muon_stack_size(len(params), rows * cols * grads[0].element_size(),
                                params[0].device)
    for start in range(0, len(params), per_stack):
        chunk = slice(start, start + per_stack)
        stack = torch.empty((len(params[chunk]), rows, cols), dtype=grads[0].dtype,
                            device=grads[0].device)
        muon_momentum([u.view(shape) for u in stack.unbind(0)], grads[chunk],
                      momentum_buffers[chunk], momentum=momentum, nesterov=nesterov,
                      momentum_buffer_absmaxes=(momentum_buffer_absmaxes or [])[chunk],
                      backend=backend)
        orthogonalized = newton_schulz(stack, coefficients, eps, ns_dtype, backend=backend)
        muon_update(params[chunk], [o.view(shape) for o in orthogonalized.unbind(0)], lr=lr,
                    weight_decay=weight_decay, adjusted_lr=adjusted_lr, backend=backend)


# Below glibc's largest dynamic mmap threshold (32 MiB), so that freed stacks stay in its heap.
_MUON_STACK_BYTES = 8 << 20


def muon_stack_size(count: int, matrix_bytes: int, device: torch.device) -> int:
    """How many of `count` updates of matrix_bytes each muon() stacks into one Newton-Schulz call.
    On CPUs, stacks of at most _MUON_STACK_BYTES: buffers that size are reused by the allocator
    from step to step, where larger ones (and the op's temporaries of their size) are mapped
    afresh and page-faulted in on every step; and a multiple of the thread count where that
    leaves more than one, since the CPU op runs whole matrices per thread and the remainder one at
    a time on all threads. Elsewhere, all of them."""
    if device.type != "cpu":
        return count
    fit = max(1, _MUON_STACK_BYTES // max(1, matrix_bytes))
    threads = torch.get_num_threads()
    return fit // threads * threads if fit >= threads else fit


def _norm(
    x: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    rms: bool,
    residual: Tensor | None,
    residual_in_fp32: bool,
    zero_centered_weight: bool,
    backend: str,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm / RMSNorm over the trailing `normalized_shape` dims, flattened into one."""
    normalized_shape = tuple(normalized_shape)
    _check_as_torch(x, normalized_shape, weight, bias, eps, rms)
    if residual is not None and residual.shape != x.shape:
        raise RuntimeError(f"fusedopt: residual of size {list(residual.shape)} does not match "
                           f"the input of size {list(x.shape)}")
    n = math.prod(normalized_shape)
    flat = (lambda t: None if t is None else t.reshape(-1, n))
    params = (lambda t: None if t is None else t.reshape(n))
    # Any tensor of a dtype the kernels do not take (fp64, complex): the reference, in its dtype.
    # A loop, not next(generator, default): torch 2.6's dynamo cannot trace that (fullgraph).
    dtype = x.dtype
    for t in (weight, bias, residual):
        if t is not None and t.dtype not in _registry.KERNEL_DTYPES:
            dtype = t.dtype
            break
    impl = _registry.resolve("norm", backend, x.device, dtype)
    y, residual_out = impl.run(flat(x), flat(residual), params(weight), params(bias), eps, rms,
                               zero_centered_weight, residual_in_fp32)
    y = y.reshape(x.shape)
    return y if residual is None else (y, residual_out.reshape(x.shape))


def _check_as_torch(x, normalized_shape, weight, bias, eps, rms) -> None:
    """Raises torch's own exception for an input torch's norm rejects: a normalized_shape that is
    empty or does not fit x, weight or bias; a dtype torch has no kernel for (integers; complex
    LayerNorm); LayerNorm params whose dtype neither matches x nor is fp32 for bf16 / fp16 x."""
    dims = len(normalized_shape)
    fits = (dims > 0 and x.dim() >= dims and tuple(x.shape[x.dim() - dims:]) == normalized_shape
            and all(t is None or tuple(t.shape) == normalized_shape for t in (weight, bias)))
    supported = x.is_floating_point() or (rms and x.is_complex())
    if not rms:
        reduced = x.dtype in (torch.bfloat16, torch.float16)
        supported = supported and all(t is None or t.dtype == x.dtype
                                      or (reduced and t.dtype == torch.float32)
                                      for t in (weight, bias))
    if fits and supported:
        return
    if rms:
        torch.nn.functional.rms_norm(x, list(normalized_shape), weight, eps)
    else:
        torch.nn.functional.layer_norm(x, list(normalized_shape), weight, bias, eps)
    if not fits:  # torch accepted it (it does not on any version seen); do not guess
        raise RuntimeError(f"fusedopt: normalized_shape {list(normalized_shape)} does not fit an "
                           f"input of size {list(x.shape)} (or its weight or bias)")


def layer_norm(
    x: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """torch.nn.functional.layer_norm, fused; see reference.layer_norm. With a residual, returns
    (layer_norm(x + residual), x + residual) from one pass."""
    return _norm(x, normalized_shape, weight, bias, eps, rms=False, residual=residual,
                 residual_in_fp32=residual_in_fp32, zero_centered_weight=zero_centered_weight,
                 backend=backend)


def rms_norm(
    x: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    residual: Tensor | None = None,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """torch.nn.functional.rms_norm, fused; see reference.rms_norm. eps=None means
    torch.finfo(x.dtype).eps, as torch. With a residual, returns (rms_norm(x + residual),
    x + residual) from one pass."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _norm(x, normalized_shape, weight, None, eps, rms=True, residual=residual,
                 residual_in_fp32=residual_in_fp32, zero_centered_weight=zero_centered_weight,
                 backend=backend)
