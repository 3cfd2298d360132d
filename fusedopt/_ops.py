"""Loads the C++ extension, which registers the fusedopt ops (schemas in csrc/fusedopt.cpp), and
gives each op its fake implementation, so torch.compile and torch.library.opcheck can trace them.
The optimizer ops mutate their inputs and return nothing, so their fakes compute nothing; the norm
ops also get their autograd formula here, torch's autocast rule, and on GPUs their Triton
kernels."""

from __future__ import annotations

import importlib.util

import torch

LOAD_ERROR: str | None = None
try:
    from fusedopt import _C  # noqa: F401  (loading it registers the ops)
except ImportError as error:  # the extension was not built here; the reference backend remains
    LOAD_ERROR = f"{type(error).__name__}: {error}"

LOADED = LOAD_ERROR is None


def defined(op: str) -> bool:
    """Whether the loaded extension defines fusedopt::op (a stale build may lack newer ops)."""
    return LOADED and hasattr(torch.ops.fusedopt, op)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered an implementation of `op` for this dispatch key."""
    return defined(op.split("::")[-1]) and torch._C._dispatch_has_kernel_for_dispatch_key(
        op, dispatch_key)


# The optimizer ops: each mutates its tensor lists in place and returns nothing, for a float lr
# (the default overload) and a tensor lr (.tensor_lr); so does each fake.
OPTIMIZER_OPS = ("adam_", "adam_lean_", "lion_", "lion_lean_", "sgd_", "sgd_lean_")


def _mutates_only(*args, **kwargs) -> None:
    return None


for _op in OPTIMIZER_OPS:
    if defined(_op):
        torch.library.register_fake(f"fusedopt::{_op}", _mutates_only)
        torch.library.register_fake(f"fusedopt::{_op}.tensor_lr", _mutates_only)

# Muon's elementwise ops mutate only, with one overload each; its Newton-Schulz op returns a new
# matrix batch in the requested dtype.
for _op in ("muon_momentum_", "muon_momentum_lean_", "muon_update_"):
    if defined(_op):
        torch.library.register_fake(f"fusedopt::{_op}", _mutates_only)

if defined("newton_schulz"):

    @torch.library.register_fake("fusedopt::newton_schulz")
    def _newton_schulz_fake(x, coefficients, eps, dtype):
        return x.new_empty(x.shape, dtype=dtype)


if defined("norm_fwd"):

    @torch.library.register_fake("fusedopt::norm_fwd")
    def _norm_fwd_fake(x, residual, weight, bias, eps, rms, zero_centered_weight,
                       residual_in_fp32):
        rows = x.shape[0]
        residual_dtype = torch.float32 if residual_in_fp32 else x.dtype
        residual_out = (x.new_empty(x.shape, dtype=residual_dtype) if residual is not None
                        else x.new_empty(0))
        mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
        return x.new_empty(x.shape), residual_out, mean, x.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("fusedopt::norm_bwd")
    def _norm_bwd_fake(dy, dresidual_out, x, weight, bias, mean, rstd, rms,
                       zero_centered_weight):
        def like(t):
            return x.new_empty(0) if t is None else torch.empty_like(t)

        return torch.empty_like(x), like(weight), like(bias)

    def _norm_setup_context(ctx, inputs, output):
        x, residual, weight, bias, eps, rms, zero_centered_weight, residual_in_fp32 = inputs
        _, residual_out, mean, rstd = output
        normalized_input = residual_out if residual is not None else x
        ctx.save_for_backward(normalized_input, weight, bias, mean, rstd)
        ctx.flags = (eps, rms, zero_centered_weight)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)

    def _norm_backward(ctx, dy, dresidual_out, dmean, drstd):
        normalized_input, weight, bias, mean, rstd = ctx.saved_tensors
        eps, rms, zero_centered_weight = ctx.flags
        x_dtype, residual_dtype = ctx.dtypes
        if residual_dtype is None:
            dresidual_out = None
        if torch.is_grad_enabled():  # backward(create_graph=True): the grads get a graph too
            dx, dweight, dbias = _norm_bwd_differentiable(
                dy, dresidual_out, normalized_input, weight, bias, eps, rms, zero_centered_weight)
        else:
            dx, dweight, dbias = torch.ops.fusedopt.norm_bwd(
                dy.contiguous(), dresidual_out, normalized_input, weight, bias, mean, rstd, rms,
                zero_centered_weight)
        # s = x + residual: both receive ds, each in its own dtype.
        dresidual = None if residual_dtype is None or dx is None else dx.to(residual_dtype)
        return (None if dx is None else dx.to(x_dtype), dresidual,
                None if weight is None else dweight,
                None if bias is None else dbias, None, None, None, None)

    torch.library.register_autograd("fusedopt::norm_fwd", _norm_backward,
                                    setup_context=_norm_setup_context)

    def _norm_bwd_differentiable(dy, dresidual_out, s, weight, bias, eps, rms,
                                 zero_centered_weight):
        """norm_bwd's results from differentiable torch ops (reference._norm_backward), so that
        they can be differentiated again (double backward, as for gradient penalties)."""
        from fusedopt import reference

        ds, dweight, dbias = reference._norm_backward(
            dy, s, weight, bias, eps, rms=rms, zero_centered_weight=zero_centered_weight)
        return (ds if dresidual_out is None else ds + dresidual_out), dweight, dbias

    def _norm_bwd_backward(ctx, ddx, ddweight, ddbias):
        raise RuntimeError(
            "fusedopt::norm_bwd is not differentiable. To differentiate a fusedopt norm twice, "
            "call backward or torch.autograd.grad with create_graph=True: the norm's backward then "
            "recomputes with differentiable torch ops.")

    torch.library.register_autograd("fusedopt::norm_bwd", _norm_bwd_backward)

    def register_norm_autocast(device_type: str, lib: torch.library.Library,
                               fp32_under_autocast: dict[bool, bool]) -> None:
        """Gives norm_fwd the autocast behaviour torch gives layer_norm / rms_norm on this device
        type. fp32_under_autocast[rms] says whether torch casts that norm to fp32 (ATen puts both
        on its fp32 list for CUDA; CPU autocast leaves them alone). With a residual, s = x +
        residual is formed first in the dtype it has without autocast, as in unfused code, and
        its norm then runs in fp32."""
        key = "Autocast" + {"cpu": "CPU", "cuda": "CUDA"}[device_type]
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def norm_fwd_autocast(keyset, x, residual, weight, bias, eps, rms, zero_centered_weight,
                              residual_in_fp32):
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                if not fp32_under_autocast[rms]:
                    return torch.ops.fusedopt.norm_fwd(x, residual, weight, bias, eps, rms,
                                                       zero_centered_weight, residual_in_fp32)
                residual_out = x.new_empty(0)
                if residual is not None:
                    residual_out = (x.float() + residual.float()).to(
                        torch.float32 if residual_in_fp32 else x.dtype)
                    x = residual_out
                y, _, mean, rstd = torch.ops.fusedopt.norm_fwd(
                    x.float(), None, None if weight is None else weight.float(),
                    None if bias is None else bias.float(), eps, rms, zero_centered_weight, False)
                return y, residual_out, mean, rstd

        lib.impl("norm_fwd", norm_fwd_autocast, key, with_keyset=True)

    _AUTOCAST_LIB = torch.library.Library("fusedopt", "IMPL")
    register_norm_autocast("cuda", _AUTOCAST_LIB, {
        rms: torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")
        for rms, op in ((False, "aten::layer_norm"), (True, "aten::rms_norm"))})

    # On GPUs the norm ops run the Triton kernels (there are no CUDA C++ norm kernels).
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        from fusedopt.kernels import norm as _triton_norm

        torch.library.register_kernel("fusedopt::norm_fwd", "cuda", _triton_norm.norm_fwd)
        torch.library.register_kernel("fusedopt::norm_bwd", "cuda", _triton_norm.norm_bwd)

if defined("stream_rmw_"):

    @torch.library.register_fake("fusedopt::stream_rmw_")
    def _stream_rmw_fake(outs, src):
        return None


if defined("stream_sum"):

    @torch.library.register_fake("fusedopt::stream_sum")
    def _stream_sum_fake(inputs):
        return torch.empty_like(inputs[0], memory_format=torch.contiguous_format)
