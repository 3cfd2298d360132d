"""The shared driver of every fused optimizer step in fusedopt.kernels: two @triton.jit kernels
that run an algorithm's math over its tensors, the multi-tensor address tables, launch(), and the
launchers' input checks.

An algorithm (kernels/adam.py, lion.py, sgd.py) is its math, two @triton.jit functions that the
kernels take as tl.constexpr arguments and call:

    PREPARE(tensors, lr, scalars, FLAGS) -> prepared
        per-tensor values (a tuple), once per program: say, Adam's bias corrections from the
        tensor's step. lr is the learning rate in fp64 (load_lr).
    UPDATE(tensors, offsets, mask, param, grad, prepared, scalars, FLAGS) -> param
        the rule for one block of elements of one tensor: loads and stores its state (offsets;
        mask is None on a whole block of a multi-tensor chunk, so that its loads vectorize) and
        returns the new param, given param and grad in fp32.

The kernels own what every optimizer step does alike (update_block): they load param and grad,
unscale grad when there is a grad_scale, and store the param UPDATE returns and the unscaled grad;
and they skip everything when found_inf is set. The arguments follow one convention, whatever the
algorithm:

* tensors: a tuple of pointers, one per tensor list the algorithm streams (params and grads
  first), then one per extra per-tensor scalar (float32, say Adam's step): the order of launch()'s
  `lists` and `extra_per_tensor`. A list the call does not use keeps its place and is never
  dereferenced (there, the per-tensor kernel gets the param's pointer and the table an address
  of 0).
* scalars: the algorithm's host scalars, a tuple of floats (fp32 arguments) in the order of the
  launcher's `scalars` dict.
* FLAGS: the algorithm's compile-time switches as one constexpr int, a bit each (flag_bits,
  pack_flags), tested as `BIT & FLAGS` (bit first: tl.constexpr has no reflected `&`, and the
  interpreter passes FLAGS as a plain int).

Why an int and a dummy pointer: Triton 3.3 compiles tuples of runtime values (pointers, floats)
but cannot read a constexpr tuple, a tuple with constexpr elements or a constexpr named tuple's
fields (3.6 reads the latter two), and 3.3 and 3.6 both reject a None inside a tuple argument.

The kernels:

* tensor_kernel: one tensor per launch, its pointers as arguments; program i takes block i. Runs
  anywhere Triton runs, the interpreter (TRITON_INTERPRET=1) on CPU tensors included.
* multi_tensor_kernel: a whole list of tensors in one launch. Each program takes one chunk
  (CHUNK_SIZE elements) of one tensor, and finds everything through two int64 tables, built here
  on the host from data_ptr() and numel() only (no device value is read) and cached on the device:

  - the tensor table, one row per non-empty tensor: the addresses of the tensors an algorithm
    streams (one column per tensor list, 0 for a list it does not use), then the addresses of any
    extra per-tensor scalars, then numel;
  - the block table, one (tensor index, chunk start) pair per program.

  Algorithms differ only in how many columns a row has: the kernel is told (NUM_STREAMS,
  ROW_WIDTH) by the host's table (see tables()), never a number of its own.

Every launch passes enable_fp_fusion=False (the contraction policy, docs/numerics.md); the
interpreter accepts the keyword and has nothing to fuse.

The launchers' contract (adam.adam, lion.lion, sgd.sgd; each adds its own): the math is the
same-named function's of fusedopt.reference, which is the spec; tensors are updated in place,
grads are unscaled in place when grad_scale is given, and nothing at all changes when found_inf
is given and non-zero; no device value is read on the host. Inputs: params of one dtype (fp32,
fp16 or bf16) on one device, every other tensor list of the params' dtype, device and shapes, all
contiguous; lr a float or a 1-element tensor, and grad_scale and found_inf 1-element float
tensors, on the params' device. multi_tensor: None (default) launches multi_tensor_kernel on
CUDA tensors and tensor_kernel otherwise; True or False forces one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def table_pointer(
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
def row_pointers(
    row,
    DTYPE: tl.constexpr,
    NUM_STREAMS: tl.constexpr,
    ROW_WIDTH: tl.constexpr,
    ALIGNED_16: tl.constexpr,
):
    """The tensors tuple of a tensor-table row: its NUM_STREAMS data addresses as pointers to
    DTYPE, then its extra per-tensor scalars' as pointers to float32 (the last column is numel)."""
    tensors = ()
    for column in tl.static_range(NUM_STREAMS):
        tensors = tensors + (table_pointer(row + column, DTYPE, ALIGNED_16),)
    for column in tl.static_range(NUM_STREAMS, ROW_WIDTH - 1):
        tensors = tensors + (table_pointer(row + column, tl.float32, False),)
    return tensors


@triton.jit
def program_chunk(
    tensor_table_ptr,
    block_table_ptr,
    pid,
    ROW_WIDTH: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """Program pid's tensor row (a pointer to its first column) and its chunk [start, end)."""
    tensor_index = tl.load(block_table_ptr + 2 * pid)
    chunk_start = tl.multiple_of(tl.load(block_table_ptr + 2 * pid + 1), BLOCK_SIZE)
    row = tensor_table_ptr + ROW_WIDTH * tensor_index
    numel = tl.load(row + (ROW_WIDTH - 1))
    chunk_end = tl.minimum(chunk_start + CHUNK_SIZE, numel)
    return row, chunk_start, chunk_end


@triton.jit
def keep_mask(
    found_inf_ptr,
    BLOCK_SIZE: tl.constexpr,
):
    """True in every lane unless *found_inf_ptr is non-zero (GradScaler's skipped step)."""
    # Compared after the broadcast: the interpreter mistypes a broadcast scalar comparison.
    return tl.broadcast_to(tl.load(found_inf_ptr), [BLOCK_SIZE]) == 0


@triton.jit
def load_lr(
    lr,
    LR_IS_TENSOR: tl.constexpr,
):
    """The learning rate in fp64: a scalar argument, or read through a pointer to a 1-element
    tensor (so a tensor lr is never read on the host)."""
    if LR_IS_TENSOR:
        lr_value = tl.load(lr).to(tl.float64)
    else:
        lr_value = tl.cast(lr, tl.float64)
    return lr_value


@triton.jit
def update_block(
    tensors,
    offsets,
    mask,
    prepared,
    scalars,
    grad_scale_ptr,
    UPDATE: tl.constexpr,
    FLAGS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """One block (offsets, mask) of one tensor: param and grad in, UPDATE, param (and with a
    grad_scale, the unscaled grad) out, in place."""
    param_ptr = tensors[0]
    grad_ptr = tensors[1]
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = tl.math.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))

    param = UPDATE(tensors, offsets, mask, param, grad, prepared, scalars, FLAGS)

    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD_SCALE:
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tensor_kernel(
    tensors,
    numel,
    scalars,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    PREPARE: tl.constexpr,
    UPDATE: tl.constexpr,
    FLAGS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor; program i updates elements [i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE).

    tensors: a pointer per column of the algorithm's tensor table (see the module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < numel
    if HAS_FOUND_INF:
        mask = mask & keep_mask(found_inf_ptr, BLOCK_SIZE)

    prepared = PREPARE(tensors, load_lr(lr, LR_IS_TENSOR), scalars, FLAGS)
    update_block(tensors, offsets, mask, prepared, scalars, grad_scale_ptr, UPDATE, FLAGS,
                 HAS_GRAD_SCALE)


@triton.jit
def multi_tensor_kernel(
    tensor_table_ptr,
    block_table_ptr,
    scalars,
    lr,
    grad_scale_ptr,
    found_inf_ptr,
    PREPARE: tl.constexpr,
    UPDATE: tl.constexpr,
    FLAGS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    DTYPE: tl.constexpr,
    NUM_STREAMS: tl.constexpr,
    ROW_WIDTH: tl.constexpr,
    ALIGNED_16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
):
    """Many tensors; program i updates one chunk of CHUNK_SIZE elements of one tensor.

    tensor_table_ptr: int64 rows of ROW_WIDTH per tensor: NUM_STREAMS data addresses (of DTYPE
    tensors), ROW_WIDTH - NUM_STREAMS - 1 addresses of float32 per-tensor scalars, then numel.
    block_table_ptr: int64 rows of 2 per program: tensor index, chunk start (an element offset).
    """
    pid = tl.program_id(0).to(tl.int64)
    row, chunk_start, chunk_end = program_chunk(
        tensor_table_ptr, block_table_ptr, pid, ROW_WIDTH, BLOCK_SIZE, CHUNK_SIZE
    )
    tensors = row_pointers(row, DTYPE, NUM_STREAMS, ROW_WIDTH, ALIGNED_16)

    # Whole blocks need no bounds mask (so their loads vectorize); only the chunk's tail does.
    full_mask = None
    if HAS_FOUND_INF:
        full_mask = keep_mask(found_inf_ptr, BLOCK_SIZE)

    prepared = PREPARE(tensors, load_lr(lr, LR_IS_TENSOR), scalars, FLAGS)
    num_full_blocks = (chunk_end - chunk_start) // BLOCK_SIZE
    for block in range(num_full_blocks):
        offsets = chunk_start + block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        update_block(tensors, offsets, full_mask, prepared, scalars, grad_scale_ptr, UPDATE,
                     FLAGS, HAS_GRAD_SCALE)
    tail_start = chunk_start + num_full_blocks * BLOCK_SIZE
    if tail_start < chunk_end:
        offsets = tail_start + tl.arange(0, BLOCK_SIZE)
        tail_mask = offsets < chunk_end
        if HAS_FOUND_INF:
            tail_mask = tail_mask & full_mask
        update_block(tensors, offsets, tail_mask, prepared, scalars, grad_scale_ptr, UPDATE,
                     FLAGS, HAS_GRAD_SCALE)


# Elements per block (one program of tensor_kernel, one loop step of multi_tensor_kernel) by
# storage dtype, and elements per program of multi_tensor_kernel (a multiple of each).
BLOCK_SIZES = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}
CHUNK_SIZE = 65536
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def flag_bits(count: int) -> tuple[tl.constexpr, ...]:
    """count distinct bits of the kernels' FLAGS (1, 2, 4, ...), as the tl.constexpr globals that
    an algorithm's @triton.jit functions test (`BIT & FLAGS`) and its launcher packs."""
    return tuple(tl.constexpr(1 << i) for i in range(count))


def pack_flags(*switches: tuple[tl.constexpr, bool]) -> int:
    """The FLAGS constexpr of the kernels from (bit, on) pairs: the OR of the bits that are on."""
    flags = 0
    for bit, on in switches:
        if on:
            flags |= bit.value
    return flags


class Tables(NamedTuple):
    """Device tables for one multi-tensor launch (see the module docstring)."""

    tensor_table: Tensor
    block_table: Tensor
    num_programs: int
    num_streams: int  # data columns of a row (the kernel's NUM_STREAMS)
    row_width: int  # columns of a row, numel included (the kernel's ROW_WIDTH)
    aligned: bool  # every data address is a multiple of 16 bytes


# Device copies of the tables, keyed by everything they encode (layout, addresses, sizes), so a
# training loop builds and uploads them once, and a CUDA graph captures no host-to-device copy.
_TABLE_CACHE: dict[tuple, Tables] = {}
_TABLE_CACHE_SIZE = 16


def tables(
    lists: Sequence[Sequence[Tensor] | None],
    *,
    extra_per_tensor: Sequence[Sequence[Tensor]] = (),
    tensor_indices: bool = False,
) -> Tables | None:
    """The address tables of one multi-tensor launch, or None when every tensor is empty.

    lists: the tensor lists the kernel streams, params first (its numel is the row's numel); a
    None list is a column of zeros (a list the kernel does not use this call).
    extra_per_tensor: lists of per-tensor float32 scalars (say, Adam's steps) whose addresses
    follow the data addresses in each row; they are not counted in the alignment check.
    tensor_indices: each row also holds its tensor's index in the lists (the lean kernel's
    stochastic-rounding key), which empty tensors' missing rows make differ from the row's.

    A row is then: len(lists) data addresses, len(extra_per_tensor) addresses, the tensor index
    (with tensor_indices), numel. Empty tensors get no row. The result is cached on (device,
    layout, every row).
    """
    params = lists[0]
    columns = [*lists, *extra_per_tensor]
    num_data = len(lists)
    row_width = len(columns) + 1 + int(tensor_indices)
    tensor_rows: list[int] = []
    for i, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        tensor_rows += [0 if column is None else column[i].data_ptr() for column in columns]
        if tensor_indices:
            tensor_rows.append(i)
        tensor_rows.append(numel)
    if not tensor_rows:
        return None
    device = params[0].device
    key = (device, num_data, row_width, tuple(tensor_rows))
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        return cached
    block_rows: list[int] = []
    aligned = True
    for index in range(len(tensor_rows) // row_width):
        row = tensor_rows[row_width * index : row_width * (index + 1)]
        aligned = aligned and all(address % 16 == 0 for address in row[:num_data])
        for start in range(0, row[-1], CHUNK_SIZE):
            block_rows += [index, start]
    pinned = device.type == "cuda"
    host = torch.tensor(tensor_rows + block_rows, dtype=torch.int64, pin_memory=pinned)
    table = host.to(device, non_blocking=True)
    entry = Tables(
        tensor_table=table[: len(tensor_rows)],
        block_table=table[len(tensor_rows) :],
        num_programs=len(block_rows) // 2,
        num_streams=num_data,
        row_width=row_width,
        aligned=aligned,
    )
    if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = entry
    return entry


def launch(
    prepare: triton.JITFunction,
    update: triton.JITFunction,
    lists: list[Sequence[Tensor] | None],
    *,
    multi_tensor: bool | None,
    lr: float | Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    scalars: dict[str, float],
    flags: int,
    extra_per_tensor: Sequence[Sequence[Tensor]] = (),
) -> None:
    """One step of an algorithm: its @triton.jit math, prepare and update (the kernels' PREPARE
    and UPDATE), run over parallel tensor lists (None: a list this call does not use) and lists
    of extra per-tensor float32 scalars.

    scalars: {name: float}, passed as the tuple of its values in this order; flags: pack_flags'
    int. lr, grad_scale_ptr, found_inf_ptr and the constexprs LR_IS_TENSOR, HAS_GRAD_SCALE,
    HAS_FOUND_INF and BLOCK_SIZE are derived here. Multi-tensor (default on CUDA): one launch of
    multi_tensor_kernel over tables(lists, extra_per_tensor), whose layout gives NUM_STREAMS and
    ROW_WIDTH. Per-tensor (elsewhere, and in the interpreter): tensor_kernel once per non-empty
    tensor, over cdiv(numel, BLOCK_SIZE) programs; an unused list's place holds the param."""
    params = lists[0]
    common = {
        **step_arguments(scalars, flags, lr, grad_scale, found_inf),
        "PREPARE": prepare,
        "UPDATE": update,
        "BLOCK_SIZE": BLOCK_SIZES[params[0].dtype],
    }
    if multi_tensor is None:
        multi_tensor = params[0].device.type == "cuda"
    if multi_tensor:
        table = tables(lists, extra_per_tensor=extra_per_tensor)
        if table is not None:
            multi_tensor_kernel[(table.num_programs,)](
                table.tensor_table,
                table.block_table,
                DTYPE=TRITON_DTYPES[params[0].dtype],
                NUM_STREAMS=table.num_streams,
                ROW_WIDTH=table.row_width,
                ALIGNED_16=table.aligned,
                CHUNK_SIZE=CHUNK_SIZE,
                **common,
            )
        return
    for i, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        tensors = [param if lst is None else lst[i] for lst in lists]
        tensors += [extra[i] for extra in extra_per_tensor]
        tensor_kernel[(triton.cdiv(numel, common["BLOCK_SIZE"]),)](
            tuple(tensors), numel, **common
        )


def step_arguments(scalars: dict[str, float], flags: int, lr: float | Tensor,
                   grad_scale: Tensor | None, found_inf: Tensor | None) -> dict[str, object]:
    """The launch arguments every optimizer kernel (these and kernels/lean.py's) takes alike:
    scalars as the tuple of its values, FLAGS, lr, the AMP pointers and the constexprs derived
    from them, and the contraction policy (enable_fp_fusion=False, docs/numerics.md)."""
    return {
        "scalars": tuple(scalars.values()),
        "FLAGS": flags,
        "lr": lr,
        "grad_scale_ptr": grad_scale,
        "found_inf_ptr": found_inf,
        "HAS_GRAD_SCALE": grad_scale is not None,
        "HAS_FOUND_INF": found_inf is not None,
        "LR_IS_TENSOR": isinstance(lr, Tensor),
        "enable_fp_fusion": False,
    }


def check_scalar_tensor(op: str, name: str, t: Tensor, device: torch.device) -> None:
    """A 1-element floating-point tensor on `device` (lr, grad_scale, found_inf)."""
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a 1-element floating-point tensor")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the params are on {device}")


def check_lengths(op: str, n: int, lists: dict[str, Sequence[Tensor]]) -> None:
    """Every list of `lists` ({name: tensors}) has one entry per param (n params)."""
    for name, tensors in lists.items():
        if len(tensors) != n:
            raise ValueError(f"{op}: {len(tensors)} {name} for {n} params")


def check_tensor_lists(
    op: str, params: Sequence[Tensor], lists: dict[str, Sequence[Tensor]]
) -> None:
    """params and every list of `lists` ({name: tensors}): one tensor per param, all of one
    supported dtype and one device, each of its param's shape, all contiguous."""
    n = len(params)
    check_lengths(op, n, lists)
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in BLOCK_SIZES:
        raise TypeError(f"{op}: params of dtype {dtype} are not supported (fp32, fp16, bf16)")
    for i, param in enumerate(params):
        if param.dtype != dtype or param.device != device:
            raise ValueError(
                f"{op}: params[{i}] is {param.dtype} on {param.device}, params[0] is {dtype} on "
                f"{device}; all tensors of one call must share one dtype and device"
            )
        if not param.is_contiguous():
            raise ValueError(f"{op}: params[{i}] is not contiguous")
        for name, tensors in lists.items():
            t = tensors[i]
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"{op}: {name}[{i}] is {t.dtype} on {t.device}, params are {dtype} on {device}"
                )
            if t.shape != param.shape:
                raise ValueError(
                    f"{op}: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] has shape "
                    f"{tuple(param.shape)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] is not contiguous")


def check_betas(op: str, beta1: float, beta2: float) -> None:
    """Both betas in [0, 1]."""
    if not 0.0 <= beta1 <= 1.0 or not 0.0 <= beta2 <= 1.0:
        raise ValueError(f"{op}: betas must be in [0, 1], got ({beta1}, {beta2})")


def check_amp_scalars(
    op: str,
    params: Sequence[Tensor],
    lr: float | Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """lr (when a tensor), grad_scale and found_inf: 1-element float tensors on the params'
    device."""
    if not params:
        return
    device = params[0].device
    if isinstance(lr, Tensor):
        check_scalar_tensor(op, "lr", lr, device)
    if grad_scale is not None:
        check_scalar_tensor(op, "grad_scale", grad_scale, device)
    if found_inf is not None:
        check_scalar_tensor(op, "found_inf", found_inf, device)


def check_inputs(
    op: str,
    params: Sequence[Tensor],
    lists: dict[str, Sequence[Tensor]],
    lr: float | Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """What every optimizer launcher checks: its tensor lists ({name: tensors}) as
    check_tensor_lists does, then lr, grad_scale and found_inf as check_amp_scalars does."""
    check_tensor_lists(op, params, lists)
    check_amp_scalars(op, params, lr, grad_scale, found_inf)
