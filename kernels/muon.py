"""Triton kernels of Muon's elementwise halves, around the Newton-Schulz iteration
(kernels/newton_schulz.py): the fused counterparts of fusedopt.reference.muon_momentum and
muon_update (the spec).

The math only: the PREPARE / UPDATE pairs that the shared kernels of
fusedopt.kernels.multi_tensor run (the calling convention is described there), then the
launchers. In the driver's terms, muon_momentum's "param" stream is the momentum buffer (read
and written) and its third list the update (written only); muon_update's "grad" stream is the
orthogonalized update. The momentum's math is _momentum_rule, which muon_momentum_lean also runs
in fusedopt.kernels.lean's kernel (reference.muon_momentum_lean: lean buffers, the update in the
param's place, written only). Math in fp32 registers whatever the storage dtype.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl
from torch import Tensor

from .lean import check_lean_lists, launch_lean
from .multi_tensor import check_inputs, flag_bits, launch, pack_flags

(NESTEROV,) = flag_bits(1)


@triton.jit
def _lerp(start, end, weight, one_minus_weight):
    """torch.lerp(start, end, weight), with torch's two formulas for small and large weights."""
    return tl.where(weight < 0.5, start + weight * (end - start),
                    end - (end - start) * one_minus_weight)


@triton.jit
def _no_prepare(tensors, lr, scalars, FLAGS: tl.constexpr):
    """Muon's elementwise steps need no per-tensor scalar."""
    return (lr.to(tl.float32),)


@triton.jit
def _momentum_update(tensors, offsets, mask, buffer, grad, prepared, scalars,
                     FLAGS: tl.constexpr):
    """_momentum_rule on one block: stores the update; returns buf, which the driver stores in
    the first stream."""
    update_ptr = tensors[2]
    update, states = _momentum_rule(buffer, grad, (buffer,), prepared, scalars, FLAGS)
    tl.store(update_ptr + offsets, update.to(update_ptr.dtype.element_ty), mask=mask)
    return states[0]


@triton.jit
def _momentum_rule(param, grad, states, prepared, scalars, FLAGS: tl.constexpr):
    """Muon's momentum in fp32 registers (the plain kernel's and the lean one's): states is
    (buf,); buf = lerp(buf, g, 1 - momentum); returns (the update, (buf,)): buf, or with
    Nesterov lerp(g, buf, momentum). param is not used (the update is written only)."""
    to_grad, to_grad_rest, to_buffer, to_buffer_rest = scalars
    buffer = _lerp(states[0], grad, tl.cast(to_grad, tl.float32),
                   tl.cast(to_grad_rest, tl.float32))
    update = buffer
    if NESTEROV & FLAGS:
        update = _lerp(grad, buffer, tl.cast(to_buffer, tl.float32),
                       tl.cast(to_buffer_rest, tl.float32))
    return update, (buffer,)


@triton.jit
def _apply_update(tensors, offsets, mask, param, ortho, prepared, scalars, FLAGS: tl.constexpr):
    """Returns param * (1 - lr * weight_decay) - adjusted_lr * ortho."""
    decay, adjusted_lr = scalars
    return param * tl.cast(decay, tl.float32) - tl.cast(adjusted_lr, tl.float32) * ortho


def muon_momentum(updates: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
                  momentum: float, nesterov: bool, multi_tensor: bool | None = None) -> None:
    """Muon's momentum step with Triton kernels: every launcher's contract
    (fusedopt.kernels.multi_tensor), for the buffers in the params' place, and grads and updates
    of their dtype and shapes; updates are written only."""
    check_inputs("muon_momentum", momentum_buffers, {"grads": grads, "updates": updates}, 0.0,
                 None, None)
    if not momentum_buffers:
        return
    launch(_no_prepare, _momentum_update, [momentum_buffers, grads, updates],
           scalars=_momentum_scalars(momentum), flags=pack_flags((NESTEROV, nesterov)), lr=0.0,
           grad_scale=None, found_inf=None, multi_tensor=multi_tensor)


def muon_momentum_lean(updates: list[Tensor], grads: list[Tensor],
                       momentum_buffers: list[Tensor], momentum_buffer_absmaxes: list[Tensor], *,
                       momentum: float, nesterov: bool,
                       multi_tensor: bool | None = None) -> None:
    """Muon's momentum step with lean buffers, with the Triton lean kernel: the contract of
    fusedopt.reference.muon_momentum_lean (the spec); updates (written only, in the place of
    params) and grads of one float dtype, buffers as fusedopt.kernels.lean.check_lean_lists
    takes states."""
    if not updates:
        return
    quantized = check_lean_lists(
        "muon_momentum_lean", updates, grads,
        {"momentum_buffers": (momentum_buffers, momentum_buffer_absmaxes)}, [], None, "output",
        param_modes=("output",))
    launch_lean(_no_prepare, _momentum_rule, updates, grads,
                [(momentum_buffers, momentum_buffer_absmaxes, True)], [], None,
                param_mode="output", quantized=quantized, scalars=_momentum_scalars(momentum),
                flags=pack_flags((NESTEROV, nesterov)), lr=0.0, grad_scale=None, found_inf=None,
                multi_tensor=multi_tensor)


def _momentum_scalars(momentum: float) -> dict[str, float]:
    """Each lerp weight and its complement as torch forms them (1 - weight in fp32), in the
    order _momentum_rule unpacks them."""
    weight = 1.0 - momentum
    return {"to_grad": weight, "to_grad_rest": float(1 - _fp32(weight)),
            "to_buffer": momentum, "to_buffer_rest": float(1 - _fp32(momentum))}


def muon_update(params: list[Tensor], orthogonalized: list[Tensor], *, lr: float,
                weight_decay: float, adjusted_lr: float,
                multi_tensor: bool | None = None) -> None:
    """Muon's weight decay and update with Triton kernels: every launcher's contract, for
    orthogonalized updates shaped like the params (cast to the params' dtype here when the
    Newton-Schulz dtype differs)."""
    orthogonalized = [o if o.dtype == p.dtype else o.to(p.dtype)
                      for p, o in zip(params, orthogonalized)]
    check_inputs("muon_update", params, {"orthogonalized": orthogonalized}, lr, None, None)
    if not params:
        return
    scalars = {"decay": 1.0 - lr * weight_decay, "adjusted_lr": adjusted_lr}
    launch(_no_prepare, _apply_update, [params, orthogonalized], scalars=scalars, flags=0,
           lr=lr, grad_scale=None, found_inf=None, multi_tensor=multi_tensor)


def _fp32(value: float) -> float:
    """value rounded to fp32, as a kernel receives a float argument."""
    return struct.unpack("f", struct.pack("f", value))[0]
