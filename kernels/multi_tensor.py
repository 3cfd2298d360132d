"""What every fused optimizer step in fusedopt.kernels shares: the multi-tensor address tables,
the @triton.jit helpers that read them, and the launchers' input checks.

A multi-tensor kernel updates a whole list of tensors in one launch. Each program takes one chunk
(CHUNK_SIZE elements) of one tensor, and finds everything through two int64 tables, built here on
the host from data_ptr() and numel() only (no device value is read) and cached on the device:

* the tensor table, one row per non-empty tensor: the addresses of the tensors an algorithm
  streams (one column per tensor list, 0 for a list it does not use), then the addresses of any
  extra per-tensor scalars (Adam's step), then numel;
* the block table, one (tensor index, chunk start) pair per program.

Algorithms differ only in how many columns a row has; see tables().
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


# Elements per block (one program of a per-tensor kernel, one loop step of a multi-tensor one) by
# storage dtype, and elements per program of a multi-tensor kernel (a multiple of each).
BLOCK_SIZES = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}
CHUNK_SIZE = 65536
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class Tables(NamedTuple):
    """Device tables for one multi-tensor launch (see the module docstring)."""

    tensor_table: Tensor
    block_table: Tensor
    num_programs: int
    aligned: bool  # every data address is a multiple of 16 bytes


# Device copies of the tables, keyed by everything they encode (layout, addresses, sizes), so a
# training loop builds and uploads them once, and a CUDA graph captures no host-to-device copy.
_TABLE_CACHE: dict[tuple, Tables] = {}
_TABLE_CACHE_SIZE = 16


def tables(
    lists: Sequence[Sequence[Tensor] | None],
    *,
    extra_per_tensor: Sequence[Sequence[Tensor]] = (),
) -> Tables | None:
    """The address tables of one multi-tensor launch, or None when every tensor is empty.

    lists: the tensor lists the kernel streams, params first (its numel is the row's numel); a
    None list is a column of zeros (a list the kernel does not use this call).
    extra_per_tensor: lists of per-tensor scalars (say, Adam's steps) whose addresses follow the
    data addresses in each row; they are not counted in the alignment check.

    A row is then: len(lists) data addresses, len(extra_per_tensor) addresses, numel. Empty
    tensors get no row. The result is cached on (device, layout, every row).
    """
    params = lists[0]
    columns = [*lists, *extra_per_tensor]
    num_data = len(lists)
    row_width = len(columns) + 1
    tensor_rows: list[int] = []
    for i, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        tensor_rows += [0 if column is None else column[i].data_ptr() for column in columns]
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
        aligned=aligned,
    )
    if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = entry
    return entry


def launch(
    tensor_kernel,
    multi_tensor_kernel,
    lists: list[Sequence[Tensor] | None],
    *,
    multi_tensor: bool | None,
    lr: float | Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    scalars: dict,
    flags: dict,
    extra_per_tensor: Sequence[Sequence[Tensor]] = (),
) -> None:
    """Launches an algorithm's kernels over parallel tensor lists (None: a list this call does
    not use). Every kernel also takes lr, grad_scale_ptr, found_inf_ptr and the flags LR_IS_TENSOR,
    HAS_GRAD_SCALE, HAS_FOUND_INF and BLOCK_SIZE, which are derived here. Multi-tensor (default
    on CUDA): one launch of multi_tensor_kernel(tensor_table, block_table, **scalars, DTYPE,
    ALIGNED_16, CHUNK_SIZE, **flags). Per-tensor (elsewhere, and in the interpreter):
    tensor_kernel(tensor of each list, extra tensors, numel, **scalars, **flags) once per
    non-empty tensor, over cdiv(numel, BLOCK_SIZE) programs."""
    params = lists[0]
    scalars = dict(scalars, lr=lr, grad_scale_ptr=grad_scale, found_inf_ptr=found_inf)
    flags = dict(flags, LR_IS_TENSOR=isinstance(lr, Tensor), HAS_GRAD_SCALE=grad_scale is not None,
                 HAS_FOUND_INF=found_inf is not None, BLOCK_SIZE=BLOCK_SIZES[params[0].dtype])
    if multi_tensor is None:
        multi_tensor = params[0].device.type == "cuda"
    if multi_tensor:
        table = tables(lists, extra_per_tensor=extra_per_tensor)
        if table is not None:
            multi_tensor_kernel[(table.num_programs,)](
                table.tensor_table,
                table.block_table,
                **scalars,
                DTYPE=TRITON_DTYPES[params[0].dtype],
                ALIGNED_16=table.aligned,
                CHUNK_SIZE=CHUNK_SIZE,
                **flags,
            )
        return
    for i, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        tensors = [None if lst is None else lst[i] for lst in lists]
        tensors += [extra[i] for extra in extra_per_tensor]
        tensor_kernel[(triton.cdiv(numel, flags["BLOCK_SIZE"]),)](
            *tensors, numel, **scalars, **flags
        )


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
