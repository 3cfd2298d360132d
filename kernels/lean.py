"""The shared driver of the lean-state optimizer steps (adam_lean, lion_lean, sgd_lean,
muon_momentum_lean in fusedopt.kernels): one @triton.jit tile (lean_tile) that decodes a
tensor's states, runs an algorithm's rule on them and encodes them again, in one pass, and the
two kernels that run it; the formats' codecs; the lean launch and its input checks.

The formats are fusedopt.reference's "Lean states" section (the spec): states in a float dtype,
or 8-bit blockwise (uint8 codes, one fp32 absmax per QUANT_BLOCK elements, fourth-root
companding); bf16 / fp16 params kept per param_mode. A tile is ROWS whole quantization blocks,
[ROWS, QUANT_BLOCK], so a block's absmax is one row's max and the codes of a block are encoded
from the new values in the same program.

An algorithm gives its math as two @triton.jit functions (kernels/adam.py, lion.py, sgd.py,
muon.py), the same ones its plain kernel runs:

    PREPARE(step, lr, scalars, FLAGS) -> prepared
        per-tensor values from the tensor's new step (fp64; 0 where the algorithm counts none)
        and lr (fp64).
    RULE(param, grad, states, prepared, scalars, FLAGS) -> (param, states)
        the update of one tile in fp32: states is a tuple of the algorithm's state values (its
        order is the launcher's state lists'), returned updated.

The kernel owns what every lean step does alike: loading the param as param_mode keeps it and
storing it so again, unscaling the grad, decoding and encoding the states, and skipping
everything when found_inf is set. Rounding to bf16 goes through round_to_bf16 (round to nearest
even on the bits), because Triton's interpreter truncates fp32 -> bf16 conversions; on a GPU the
result is the same as the conversion's.

Two kernels run that step: lean_tensor_kernel, one tensor per launch (anywhere Triton runs, the
interpreter included), and lean_multi_tensor_kernel, a whole batch in one launch (the default on
CUDA): multi_tensor.tables' address table, whose columns each hold one dtype (the param's, the
extra's, the states', fp32 scales and steps), with each tensor's index. Every launch passes
enable_fp_fusion=False, the contraction policy of every backend (docs/numerics.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import (
    CHUNK_SIZE,
    check_amp_scalars,
    keep_mask,
    load_lr,
    program_chunk,
    step_arguments,
    table_pointer,
    tables,
)

# param_mode, as the kernel's PARAM_MODE (reference.load_param / store_param); OUTPUT is Muon's
# update: a "param" that is written only.
PARAM_MODES = {"nearest": 0, "master": 1, "compact": 2, "kahan": 3, "stochastic": 4, "output": 5}
NEAREST, MASTER, COMPACT, KAHAN, STOCHASTIC, OUTPUT = (tl.constexpr(v) for v in
                                                      PARAM_MODES.values())
# The extra tensor's dtype of each param_mode that has one (None: the param's own).
EXTRA_DTYPES = {"master": torch.float32, "compact": torch.int8, "kahan": None}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8)
# Elements per absmax scale (reference.QUANT_BLOCK; the tests check that they agree).
QUANT_BLOCK = 256
# Quantization blocks per program: 1024 elements, 8 per thread at 4 warps.
ROWS = 4
# reference.INV_127 and INV_255 as the fp32 constants every backend multiplies by.
INV_127 = tl.constexpr(1.0 / 127)
INV_255 = tl.constexpr(1.0 / 255)
# x + 2^23 - 2^23 rounds an fp32 x in [0, 2^23) to the nearest integer, ties to even (the
# reference's torch.round), on every backend; codes and corrections are well within.
ROUNDING_SHIFT = tl.constexpr(8388608.0)


@triton.jit
def round_to_bf16(value):
    """fp32 values rounded to the nearest bf16 (ties to even), still in fp32; NaN stays NaN."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(value != value, value, bits.to(tl.float32, bitcast=True))


@triton.jit
def to_storage(value, DTYPE: tl.constexpr):
    """fp32 values in DTYPE, rounded to nearest even."""
    if DTYPE == tl.bfloat16:
        value = round_to_bf16(value)
    return value.to(DTYPE)


@triton.jit
def round_half_even(x):
    """x (fp32, in [0, 2^23)) rounded to an integer, ties to even."""
    return (x + ROUNDING_SHIFT) - ROUNDING_SHIFT


@triton.jit
def mix32(x):
    """reference._mix32 on uint32 values (murmur3's finalizer)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def stochastic_round_bf16(value, offsets, step, tensor_index):
    """reference.stochastic_round_bf16: value (fp32) rounded to a bf16 neighbour (in fp32), with
    16 random bits that hash (step, tensor index, element index)."""
    salt = (tensor_index + 1).to(tl.uint32) * 0x9E3779B9
    key = mix32(step.to(tl.int64).to(tl.uint32) + salt)
    noise = mix32((offsets.to(tl.uint32) * 0x9E3779B1) ^ key) & 0xFFFF
    bits = (value.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def load_param(param_ptr, extra_ptr, offsets, mask, PARAM_MODE: tl.constexpr):
    """reference.load_param: the value an update starts from, in fp32."""
    if PARAM_MODE == OUTPUT:
        param = tl.zeros(offsets.shape, tl.float32)
    elif PARAM_MODE == MASTER:
        param = tl.load(extra_ptr + offsets, mask=mask)
    else:
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        if PARAM_MODE == COMPACT:  # reference.compact_master: integers on the bits
            correction = tl.load(extra_ptr + offsets, mask=mask).to(tl.int32)
            param = (param.to(tl.int32, bitcast=True) + correction * 256).to(tl.float32,
                                                                            bitcast=True)
        elif PARAM_MODE == KAHAN:
            param = param + tl.load(extra_ptr + offsets, mask=mask).to(tl.float32)
    return param


@triton.jit
def store_param(param_ptr, extra_ptr, offsets, mask, value, step, tensor_index,
                PARAM_MODE: tl.constexpr):
    """reference.store_param: writes the updated value back as PARAM_MODE keeps it."""
    dtype: tl.constexpr = param_ptr.dtype.element_ty
    if PARAM_MODE == COMPACT:
        rounded = round_to_bf16(value)
        error = value.to(tl.int32, bitcast=True) - rounded.to(tl.int32, bitcast=True)
        correction = tl.minimum(tl.maximum((error + 128) >> 8, -128), 127)
        tl.store(extra_ptr + offsets, correction.to(tl.int8), mask=mask)
        tl.store(param_ptr + offsets, rounded.to(dtype), mask=mask)
    elif PARAM_MODE == KAHAN:
        rounded = to_storage(value, dtype)
        compensation = value - rounded.to(tl.float32)
        tl.store(extra_ptr + offsets, to_storage(compensation, dtype), mask=mask)
        tl.store(param_ptr + offsets, rounded, mask=mask)
    elif PARAM_MODE == STOCHASTIC:
        rounded = stochastic_round_bf16(value, offsets, step, tensor_index)
        tl.store(param_ptr + offsets, rounded.to(dtype), mask=mask)
    else:
        if PARAM_MODE == MASTER:
            tl.store(extra_ptr + offsets, value, mask=mask)
        tl.store(param_ptr + offsets, to_storage(value, dtype), mask=mask)


@triton.jit
def load_state(state_ptr, absmax_ptr, offsets, mask, blocks, block_mask,
               QUANTIZED: tl.constexpr, SIGNED: tl.constexpr):
    """reference.load_state: a state tile in fp32, dequantized when 8-bit (its codes
    companded by the fourth root, scaled by its block's absmax)."""
    value = tl.load(state_ptr + offsets, mask=mask).to(tl.float32)
    if QUANTIZED:
        scale = tl.load(absmax_ptr + blocks, mask=block_mask)[:, None]
        if SIGNED:
            z = (value - 128.0) * INV_127
        else:
            z = value * INV_255
        w = z * z
        value = w * w * scale
        if SIGNED:
            value = tl.where(z < 0.0, -value, value)
    return value


@triton.jit
def store_state(state_ptr, absmax_ptr, offsets, mask, blocks, block_mask, value,
                QUANTIZED: tl.constexpr, SIGNED: tl.constexpr):
    """reference.store_state: a state tile stored in its dtype, or quantized: each row's absmax,
    then each element's code, the nearest fourth-root step of value / absmax."""
    if QUANTIZED:
        magnitude = tl.where(mask, tl.abs(value), 0.0)
        # A NaN makes its block's absmax NaN (torch's amax), so the whole block decodes to NaN,
        # as the reference's does, rather than to a large finite state.
        has_nan = tl.max(tl.where(magnitude != magnitude, 1, 0), axis=1) > 0
        absmax = tl.where(has_nan, float("nan"), tl.max(magnitude, axis=1))
        # (1 / absmax where absmax > 0, else 0; no division by zero is evaluated either way)
        nonzero = absmax > 0.0
        inverse = tl.where(nonzero, tl.math.div_rn(1.0, tl.where(nonzero, absmax, 1.0)), 0.0)
        y = tl.minimum(magnitude * inverse[:, None], 1.0)
        z = tl.sqrt_rn(tl.sqrt_rn(y))
        if SIGNED:
            q = round_half_even(z * 127.0)
            code = tl.where(value < 0.0, 128.0 - q, 128.0 + q)
        else:
            code = round_half_even(z * 255.0)
        tl.store(absmax_ptr + blocks, absmax, mask=block_mask)
        tl.store(state_ptr + offsets, code.to(tl.uint8), mask=mask)
    else:
        tl.store(state_ptr + offsets, to_storage(value, state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lean_tile(
    param_ptr,
    grad_ptr,
    extra_ptr,
    state_ptrs,
    absmax_ptrs,
    blocks,
    end,
    keep,
    step,
    prepared,
    tensor_index,
    scalars,
    grad_scale_ptr,
    RULE: tl.constexpr,
    FLAGS: tl.constexpr,
    PARAM_MODE: tl.constexpr,
    NUM_STATES: tl.constexpr,
    LOAD_STATES: tl.constexpr,
    QUANTIZED: tl.constexpr,
    UNSIGNED_STATES: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
):
    """The quantization blocks `blocks` (a vector of block indices) of one tensor whose
    elements end at `end`, as a [blocks, QUANT_BLOCK] tile: load, decode, RULE, encode, store.
    keep: the found_inf test per block (HAS_FOUND_INF)."""
    offsets = blocks[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
    mask = offsets < end
    block_mask = blocks * QUANT_BLOCK < end
    if HAS_FOUND_INF:
        block_mask = block_mask & keep
        mask = mask & keep[:, None]

    param = load_param(param_ptr, extra_ptr, offsets, mask, PARAM_MODE)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = tl.math.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
        tl.store(grad_ptr + offsets, to_storage(grad, grad_ptr.dtype.element_ty), mask=mask)
    states = ()
    for s in tl.static_range(NUM_STATES):
        if LOAD_STATES:
            value = load_state(state_ptrs[s], absmax_ptrs[s], offsets, mask, blocks, block_mask,
                               QUANTIZED, ((1 << s) & UNSIGNED_STATES) == 0)
        else:
            value = tl.zeros(offsets.shape, tl.float32)
        states = states + (value,)

    param, states = RULE(param, grad, states, prepared, scalars, FLAGS)

    for s in tl.static_range(NUM_STATES):
        store_state(state_ptrs[s], absmax_ptrs[s], offsets, mask, blocks, block_mask, states[s],
                    QUANTIZED, ((1 << s) & UNSIGNED_STATES) == 0)
    store_param(param_ptr, extra_ptr, offsets, mask, param, step, tensor_index, PARAM_MODE)


# tensor_index: not specialized (one compiled variant serves every tensor of a list).
@triton.jit(do_not_specialize=["tensor_index"])
def lean_tensor_kernel(
    param_ptr,
    grad_ptr,
    extra_ptr,
    state_ptrs,
    absmax_ptrs,
    step_ptr,
    numel,
    tensor_index,
    scalars,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    PREPARE: tl.constexpr,
    RULE: tl.constexpr,
    FLAGS: tl.constexpr,
    PARAM_MODE: tl.constexpr,
    NUM_STATES: tl.constexpr,
    LOAD_STATES: tl.constexpr,
    QUANTIZED: tl.constexpr,
    UNSIGNED_STATES: tl.constexpr,
    HAS_STEP: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    ROWS: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
):
    """One tensor; program i takes quantization blocks [i * ROWS, (i + 1) * ROWS).

    state_ptrs, absmax_ptrs: NUM_STATES pointers each (absmax_ptrs repeats state_ptrs when not
    QUANTIZED); UNSIGNED_STATES: bit s set when state s is non-negative (its code unsigned);
    LOAD_STATES False: the states are written only (SGD's first step: the rule sets them)."""
    pid = tl.program_id(0).to(tl.int64)
    keep = None
    if HAS_FOUND_INF:
        keep = keep_mask(found_inf_ptr, ROWS)  # per row
    step = 0.0
    if HAS_STEP:
        step = tl.load(step_ptr).to(tl.float64) + 1.0
    prepared = PREPARE(step, load_lr(lr, LR_IS_TENSOR), scalars, FLAGS)
    lean_tile(param_ptr, grad_ptr, extra_ptr, state_ptrs, absmax_ptrs,
              pid * ROWS + tl.arange(0, ROWS), numel, keep, step, prepared, tensor_index,
              scalars, grad_scale_ptr, RULE, FLAGS, PARAM_MODE, NUM_STATES, LOAD_STATES,
              QUANTIZED, UNSIGNED_STATES, HAS_GRAD_SCALE, HAS_FOUND_INF, QUANT_BLOCK)


@triton.jit
def lean_multi_tensor_kernel(
    tensor_table_ptr,
    block_table_ptr,
    scalars,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    PREPARE: tl.constexpr,
    RULE: tl.constexpr,
    FLAGS: tl.constexpr,
    PARAM_MODE: tl.constexpr,
    NUM_STATES: tl.constexpr,
    LOAD_STATES: tl.constexpr,
    QUANTIZED: tl.constexpr,
    UNSIGNED_STATES: tl.constexpr,
    HAS_STEP: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    EXTRA_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    ROW_WIDTH: tl.constexpr,
    ALIGNED_16: tl.constexpr,
    ROWS: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """Many tensors; program i takes one chunk (CHUNK_SIZE elements, whole blocks) of one
    tensor, ROWS blocks at a time.

    tensor_table_ptr: int64 rows (multi_tensor.tables) of the addresses of the param, grad,
    extra (PARAM_DTYPE, PARAM_DTYPE, EXTRA_DTYPE; 0 where param_mode has none), NUM_STATES
    states (STATE_DTYPE), NUM_STATES absmaxes (float32; 0 unless QUANTIZED) and, with HAS_STEP,
    the step (float32); then the tensor's index in the lists and numel."""
    pid = tl.program_id(0).to(tl.int64)
    row, chunk_start, chunk_end = program_chunk(tensor_table_ptr, block_table_ptr, pid,
                                                ROW_WIDTH, ROWS * QUANT_BLOCK, CHUNK_SIZE)
    param_ptr = table_pointer(row, PARAM_DTYPE, ALIGNED_16)
    grad_ptr = table_pointer(row + 1, PARAM_DTYPE, ALIGNED_16)
    extra_ptr = table_pointer(row + 2, EXTRA_DTYPE, ALIGNED_16)
    state_ptrs = ()
    for s in tl.static_range(NUM_STATES):
        state_ptrs = state_ptrs + (table_pointer(row + 3 + s, STATE_DTYPE, ALIGNED_16),)
    absmax_ptrs = state_ptrs
    if QUANTIZED:
        absmax_ptrs = ()
        for s in tl.static_range(NUM_STATES):
            absmax_ptrs = absmax_ptrs + (
                table_pointer(row + 3 + NUM_STATES + s, tl.float32, ALIGNED_16),)
    tensor_index = tl.load(row + (ROW_WIDTH - 2))

    keep = None
    if HAS_FOUND_INF:
        keep = keep_mask(found_inf_ptr, ROWS)  # per row
    step = 0.0
    if HAS_STEP:
        step_ptr = table_pointer(row + 3 + 2 * NUM_STATES, tl.float32, False)
        step = tl.load(step_ptr).to(tl.float64) + 1.0
    prepared = PREPARE(step, load_lr(lr, LR_IS_TENSOR), scalars, FLAGS)
    first_block = chunk_start // QUANT_BLOCK
    for tile in range(tl.cdiv(chunk_end - chunk_start, ROWS * QUANT_BLOCK)):
        lean_tile(param_ptr, grad_ptr, extra_ptr, state_ptrs, absmax_ptrs,
                  first_block + tile * ROWS + tl.arange(0, ROWS), chunk_end, keep, step,
                  prepared, tensor_index, scalars, grad_scale_ptr, RULE, FLAGS, PARAM_MODE,
                  NUM_STATES, LOAD_STATES, QUANTIZED, UNSIGNED_STATES, HAS_GRAD_SCALE,
                  HAS_FOUND_INF, QUANT_BLOCK)


def check_lean_lists(
    op: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: dict[str, tuple[Sequence[Tensor], Sequence[Tensor]]],
    param_extras: Sequence[Tensor],
    state_steps: Sequence[Tensor] | None,
    param_mode: str,
    lr: float | Tensor = 0.0,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    param_modes: Sequence[str] = ("nearest", "master", "compact", "kahan", "stochastic"),
) -> bool:
    """A lean op's lists, as the C++ lean ops check them: params of one float dtype and device,
    grads like them, every state list ({name: (values, absmaxes)}) of one float dtype or uint8
    with one fp32 absmax per QUANT_BLOCK elements, param_extras as param_mode keeps them, and a
    1-element float32 step per param; all contiguous; lr, grad_scale and found_inf as every
    launcher's (multi_tensor.check_amp_scalars); param_mode one of param_modes (the
    optimizers' five; Muon's momentum takes "output"). Returns whether the states are 8-bit."""
    if param_mode not in param_modes:
        raise ValueError(f"{op}: param_mode must be one of {', '.join(param_modes)}, got "
                         f"{param_mode!r}")
    dtype, device = params[0].dtype, params[0].device
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"{op}: params must be float32, bfloat16 or float16, got {dtype}")

    def check(name: str, tensors: Sequence[Tensor], want: torch.dtype, per_block: bool) -> None:
        if len(tensors) != len(params):
            raise ValueError(f"{op}: expected {len(params)} {name}, got {len(tensors)}")
        for i, (t, p) in enumerate(zip(tensors, params)):
            numel = -(-p.numel() // QUANT_BLOCK) if per_block else p.numel()
            if (t.dtype != want or t.device != device or not t.is_contiguous()
                    or t.numel() != numel or (not per_block and t.shape != p.shape)):
                raise ValueError(
                    f"{op}: {name}[{i}] must be a contiguous {want} tensor of shape "
                    f"{(numel,) if per_block else tuple(p.shape)} on {device}, got {t.dtype} of "
                    f"shape {tuple(t.shape)} on {t.device}")

    check("params", params, dtype, False)
    check("grads", grads, dtype, False)
    quantized = False
    if states:
        name, (values, _) = next(iter(states.items()))
        if len(values) != len(params):
            raise ValueError(f"{op}: expected {len(params)} {name}, got {len(values)}")
        state_dtype = values[0].dtype
        if state_dtype not in STATE_DTYPES:
            raise TypeError(f"{op}: states must be float32, bfloat16, float16 or uint8, got "
                            f"{state_dtype}")
        quantized = state_dtype == torch.uint8
        for name, (values, absmaxes) in states.items():
            check(name, values, state_dtype, False)
            if quantized:
                check(f"{name.removesuffix('s')}_absmaxes", absmaxes, torch.float32, True)
            elif absmaxes:
                raise ValueError(f"{op}: absmaxes are given only with uint8 states")
    if param_mode not in ("nearest", "output") and dtype == torch.float32:
        raise ValueError(f"{op}: param_mode {param_mode} is for bfloat16 / float16 params")
    if param_mode in ("compact", "stochastic") and dtype != torch.bfloat16:
        raise ValueError(f"{op}: param_mode {param_mode} is for bfloat16 params")
    if param_mode in EXTRA_DTYPES:
        check("param_extras", param_extras, EXTRA_DTYPES[param_mode] or dtype, False)
    elif param_extras:
        raise ValueError(f"{op}: param_mode {param_mode} takes no param_extras")
    if state_steps is not None:
        if len(state_steps) != len(params):
            raise ValueError(f"{op}: expected {len(params)} state_steps, got {len(state_steps)}")
        for i, step in enumerate(state_steps):
            if step.dtype != torch.float32 or step.numel() != 1 or step.device != device:
                raise ValueError(f"{op}: state_steps[{i}] must be a 1-element float32 tensor on "
                                 f"{device}, got {step.dtype} with {step.numel()} elements on "
                                 f"{step.device}")
    check_amp_scalars(op, params, lr, grad_scale, found_inf)
    return quantized


# Triton's element type of each dtype a lean table column holds.
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                 torch.float16: tl.float16, torch.uint8: tl.uint8, torch.int8: tl.int8}


def launch_lean(
    prepare: triton.JITFunction,
    rule: triton.JITFunction,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[tuple[Sequence[Tensor], Sequence[Tensor], bool]],
    param_extras: Sequence[Tensor],
    state_steps: Sequence[Tensor] | None,
    *,
    param_mode: str,
    quantized: bool,
    load_states: bool = True,
    lr: float | Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    scalars: dict[str, float],
    flags: int,
    multi_tensor: bool | None = None,
) -> None:
    """One lean step of an algorithm (its prepare and rule).

    states: per state, (values, absmaxes (empty unless quantized), signed), in the order the
    rule's states tuple takes them. state_steps: the step counts (None: the algorithm counts
    none), which advance by one here, not at all when found_inf is non-zero. multi_tensor:
    None (default) launches lean_multi_tensor_kernel once on CUDA tensors, and
    lean_tensor_kernel once per non-empty tensor elsewhere (the interpreter); True or False
    forces one."""
    unsigned_states = sum(1 << s for s, (_, _, signed) in enumerate(states) if not signed)
    common = {
        **step_arguments(scalars, flags, lr, grad_scale, found_inf),
        "PREPARE": prepare,
        "RULE": rule,
        "PARAM_MODE": PARAM_MODES[param_mode],
        "NUM_STATES": len(states),
        "LOAD_STATES": load_states,
        "QUANTIZED": quantized,
        "UNSIGNED_STATES": unsigned_states,
        "HAS_STEP": state_steps is not None,
        "ROWS": ROWS,
        "QUANT_BLOCK": QUANT_BLOCK,
    }
    if multi_tensor is None:
        multi_tensor = params[0].device.type == "cuda"
    if multi_tensor:
        table = tables(
            [params, grads, param_extras or None, *(state[0] for state in states),
             *(state[1] if quantized else None for state in states)],
            extra_per_tensor=[state_steps] if state_steps is not None else [],
            tensor_indices=True)
        if table is not None:
            lean_multi_tensor_kernel[(table.num_programs,)](
                table.tensor_table, table.block_table,
                PARAM_DTYPE=TRITON_DTYPES[params[0].dtype],
                EXTRA_DTYPE=TRITON_DTYPES[param_extras[0].dtype if param_extras
                                          else params[0].dtype],
                STATE_DTYPE=TRITON_DTYPES[states[0][0][0].dtype if states else torch.float32],
                ROW_WIDTH=table.row_width, ALIGNED_16=table.aligned, CHUNK_SIZE=CHUNK_SIZE,
                **common)
    else:
        for i, param in enumerate(params):
            numel = param.numel()
            if numel == 0:
                continue
            values = tuple(state[0][i] for state in states)
            absmaxes = tuple(state[1][i] for state in states) if quantized else values
            lean_tensor_kernel[(triton.cdiv(numel, ROWS * QUANT_BLOCK),)](
                param, grads[i], param_extras[i] if param_extras else param, values, absmaxes,
                state_steps[i] if state_steps is not None else param, numel, i, **common)
    if state_steps:
        advance_steps(state_steps, found_inf)


def advance_steps(state_steps: Sequence[Tensor], found_inf: Tensor | None) -> None:
    """The kernels used step + 1; now the stored steps advance (not when found_inf != 0)."""
    if found_inf is None:
        torch._foreach_add_(state_steps, 1.0)
    else:
        torch._foreach_add_(state_steps, (found_inf.reshape(()) == 0).to(torch.float32))
