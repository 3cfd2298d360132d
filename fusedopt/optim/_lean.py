"""Lean optimizer states: the options (state_dtype, master_weights, kahan_summation,
stochastic_rounding), what they mean for one param, and the state tensors that keep them.

The formats are fusedopt.reference's "Lean states" section. A param's state holds, besides
torch's keys:
  exp_avg, exp_avg_sq ...   in state_dtype; for uint8, the 8-bit codes (shaped like the param)
                            and "<key>_absmax", one fp32 scale per 256 elements. Tensors under
                            MIN_QUANTIZED_NUMEL elements keep fp32 moments instead.
  master_weight             fp32 master copy (master_weights=True; bf16 / fp16 params)
  master_weight_correction  int8 correction (master_weights="compact"; bf16 params)
  kahan_compensation        the rounding error carried to the next step (kahan_summation)
Options that keep low-precision params precise apply to bf16 / fp16 params only; fp32 and fp64
params are updated as torch updates them.

DTensor params (FSDP2): every state is a DTensor laid out like its param, and the kernels update
each rank's local shards. An 8-bit state's blocks must then stay whole on every shard, so 8-bit
states need rows (param.numel() / param.shape[0]) of whole blocks, and placements that shard
dim 0 or replicate; its absmax is a (rows, blocks per row) DTensor sharded as the param, so
torch.distributed.checkpoint saves and reshards it with the codes. Other DTensor params keep
fp32 states, as small tensors do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedopt import reference

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.uint8)
# Smaller tensors keep fp32 moments under state_dtype=torch.uint8: their scales would cost more
# than the codes save, and small tensors (biases, norms) are the most sensitive.
MIN_QUANTIZED_NUMEL = 4096
# Whether each moment can be negative (its 8-bit code is signed).
SIGNED_MOMENTS = {"exp_avg": True, "exp_avg_sq": False, "momentum_buffer": True}
# The state key of each moment's 8-bit absmaxes.
ABSMAX_KEYS = {key: f"{key}_absmax" for key in SIGNED_MOMENTS}
# The extra state tensor of each param_mode, by state key.
PARAM_EXTRA_KEYS = {"master": "master_weight", "compact": "master_weight_correction",
                    "kahan": "kahan_compensation"}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_options(state_dtype: Any, master_weights: Any, kahan_summation: bool,
                  stochastic_rounding: bool) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype} (expected None, torch.float32, "
                         "torch.bfloat16, torch.float16 or torch.uint8)")
    if master_weights not in (False, True, "compact"):
        raise ValueError(f"Invalid master_weights: {master_weights!r} (expected False, True or "
                         "'compact')")
    if sum((bool(master_weights), bool(kahan_summation), bool(stochastic_rounding))) > 1:
        raise ValueError("master_weights, kahan_summation and stochastic_rounding are "
                         "alternatives: set at most one")


def is_lean(group: dict[str, Any]) -> bool:
    return (group.get("state_dtype") is not None or bool(group.get("master_weights"))
            or bool(group.get("kahan_summation")) or bool(group.get("stochastic_rounding")))


def param_mode(group: dict[str, Any], p: Tensor) -> str:
    """How the step keeps this param (reference.store_param's param_mode)."""
    if p.dtype not in LOW_PRECISION:
        return "nearest"
    master_weights = group["master_weights"]
    if master_weights == "compact" or group["stochastic_rounding"]:
        if p.dtype != torch.bfloat16:
            option = ("master_weights='compact'" if master_weights == "compact"
                      else "stochastic_rounding")
            raise ValueError(f"{option} needs bfloat16 params, got a {p.dtype} param "
                             "(for float16, use master_weights=True or kahan_summation)")
        return "compact" if master_weights == "compact" else "stochastic"
    if master_weights:
        return "master"
    return "kahan" if group["kahan_summation"] else "nearest"


def moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The dtype this param's moments are stored in (uint8: 8-bit blockwise)."""
    state_dtype = group["state_dtype"]
    if state_dtype is None:
        return p.dtype
    if state_dtype == torch.uint8 and (p.numel() < MIN_QUANTIZED_NUMEL
                                       or (is_dtensor(p) and not _shards_whole_blocks(p))):
        return torch.float32
    return state_dtype


def _shards_whole_blocks(p: Tensor) -> bool:
    """Whether every shard of DTensor p holds whole 8-bit blocks: rows of whole blocks, split
    only between rows (dim 0) or not at all."""
    rows = p.shape[0] if p.ndim else 0
    return (rows > 0 and (p.numel() // rows) % reference.QUANT_BLOCK == 0
            and all(isinstance(placement, (Shard, Replicate)) and
                    (not isinstance(placement, Shard) or placement.dim == 0)
                    for placement in p.placements))


def quantize(value: Tensor, signed: bool, like: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of fp32 values shaped like param `like` (reference.quantize_blockwise);
    for a DTensor param, DTensors laid out as it is (the module docstring), quantized shard by
    shard."""
    if not is_dtensor(like):
        return reference.quantize_blockwise(value, signed)
    if not is_dtensor(value):
        raise ValueError("fusedopt: the state of a DTensor param must be a DTensor too (load "
                         "FSDP2 checkpoints with torch.distributed.checkpoint.state_dict's "
                         "set_optimizer_state_dict)")
    codes, absmax = reference.quantize_blockwise(value.to_local(), signed)
    rows, row_blocks = like.shape[0], like.numel() // like.shape[0] // reference.QUANT_BLOCK
    return (like_param(codes, like),
            like_param(absmax.view(-1, row_blocks), like, torch.Size((rows, row_blocks))))


def like_param(local: Tensor, param: Tensor, shape: torch.Size | None = None) -> Tensor:
    """A contiguous local shard as a DTensor laid out as DTensor param (of `shape`, the param's
    by default)."""
    shape = param.shape if shape is None else shape
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=shape,
                              stride=stride)


def moment(state: dict[str, Any], key: str) -> Tensor:
    """A moment's values in fp32 (dequantized when 8-bit), or in its own dtype if wider."""
    value = state[key]
    absmax = state.get(f"{key}_absmax")
    if absmax is None:
        return value.to(torch.promote_types(value.dtype, torch.float32))
    if not is_dtensor(value):
        return reference.dequantize_blockwise(value, absmax, SIGNED_MOMENTS[key])
    return like_param(reference.dequantize_blockwise(value.to_local(), absmax.to_local(),
                                                     SIGNED_MOMENTS[key]), value)


def conform_moment(state: dict[str, Any], key: str, p: Tensor, dtype: torch.dtype) -> None:
    """Creates state[key] (zeros) in `dtype`'s format, or converts it there: say, fp32 moments
    loaded from a torch.optim checkpoint into 8-bit ones."""
    absmax_key = ABSMAX_KEYS[key]
    value = state.get(key)
    if value is None:
        if dtype == torch.uint8:
            zeros = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state[key], state[absmax_key] = quantize(zeros, SIGNED_MOMENTS[key], p)
        else:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return
    quantized = absmax_key in state
    if (dtype == torch.uint8) == quantized and (quantized or value.dtype == dtype):
        return
    value = moment(state, key)
    state.pop(absmax_key, None)
    if dtype == torch.uint8:
        state[key], state[absmax_key] = quantize(value, SIGNED_MOMENTS[key], p)
    else:
        state[key] = value.to(dtype)


def conform_param_extra(state: dict[str, Any], p: Tensor, mode: str) -> Tensor | None:
    """The param's extra tensor for `mode` (created from the param where missing: a master
    starts as the param's value, a correction or a compensation at zero); drops the others."""
    wanted = PARAM_EXTRA_KEYS.get(mode)
    for key in PARAM_EXTRA_KEYS.values():
        if key != wanted and key in state:
            del state[key]
    if wanted is None:
        return None
    extra = state.get(wanted)
    if extra is None:
        if mode == "master":
            extra = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        else:
            dtype = torch.int8 if mode == "compact" else p.dtype
            extra = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state[wanted] = extra
    return extra


def full_precision_state(state: dict[str, Any]) -> dict[str, Any]:
    """One param's state as torch.optim keeps it: moments in fp32 (dequantized), no scales, no
    master or compensation."""
    out = {}
    for key, value in state.items():
        if key.endswith("_absmax") or key in PARAM_EXTRA_KEYS.values():
            continue
        if key in SIGNED_MOMENTS or key == "max_exp_avg_sq":
            value = moment(state, key)
        out[key] = value
    return out


def is_as_torch(batch_key: tuple) -> bool:
    """Whether a batch's states are as torch keeps them (its plain op serves it)."""
    _, param_dtype, dtype, mode = batch_key[:4]
    return mode == "nearest" and dtype == param_dtype
