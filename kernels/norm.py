"""Triton LayerNorm / RMSNorm with an optional fused residual add: the fused counterpart of
fusedopt.reference.layer_norm and rms_norm (the spec), behind the ops fusedopt::norm_fwd and
fusedopt::norm_bwd (contract: csrc/fusedopt.cpp).

One kernel family serves both norms; constexpr flags pick RMSNorm or LayerNorm, the residual add,
weight, bias and zero-centered weight (w = 1 + weight). x is a contiguous (rows, N) matrix; every
row is normalized over its N elements.

* _norm_fwd_kernel: when a row fits one block (next_power_of_2(N) <= MAX_BLOCK_N) each program
  normalizes ROWS_PER_PROGRAM rows held in registers. Wider rows get one program each, which
  loops over the row in MAX_BLOCK_N chunks twice: statistics (for LayerNorm, each chunk's mean
  and squared deviations merged into the row's; for RMSNorm a sum of squares), then normalize.
* _norm_bwd_kernel: program (i, j) takes the rows of a fixed contiguous range i and the columns
  of block j; it writes dx for them and one fp32 row of partial dweight / dbias sums (programs x N).
  _column_sum_kernel then adds the partials up in a fixed order (deterministic) and casts them to
  the params' dtypes. Rows wider than one block first get their two row reductions from
  _norm_bwd_row_sums_kernel (one program per row, looping over the row).

With a residual, the normalized input s = x + residual is the value residual_out stores (rounded
to its dtype), so the forward normalizes exactly what the backward later reads back as x.
Statistics and all arithmetic are in fp32 whatever the storage dtype. A row's first element,
row * N, is an int64 offset; offsets within a row are int32. Every launch passes
enable_fp_fusion=False: no product is fused into a sum unless a kernel writes the FMA itself
(docs/numerics.md).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import TRITON_DTYPES


@triton.jit
def _load_normalized_input(
    x_ptr,
    residual_ptr,
    residual_out_ptr,
    row_start,
    cols,
    mask,
    HAS_RESIDUAL: tl.constexpr,
):
    """s = x (+ residual) in fp32, rounded to residual_out's dtype as it is stored there; 0 in
    masked lanes. Elements row_start + cols: an int64 scalar (the row's first element) plus int32
    column offsets."""
    s = tl.load(x_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(residual_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        s = s.to(residual_out_ptr.dtype.element_ty).to(tl.float32)
    return s


@triton.jit
def _load_weight(
    weight_ptr,
    cols,
    col_mask,
    ZERO_CENTERED: tl.constexpr,
):
    """The effective weight in fp32: weight, or 1 + weight when zero-centered."""
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w += 1.0
    return w


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    residual_out_ptr,
    mean_ptr,
    rstd_ptr,
    rows,
    n,
    eps,
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """ONE_BLOCK: program i normalizes rows [i * ROWS_PER_PROGRAM, (i + 1) * ROWS_PER_PROGRAM),
    each in one block of BLOCK_N >= n columns. Otherwise program i normalizes row i, BLOCK_N
    columns at a time, in two passes over the row.

    Writes y, residual_out (HAS_RESIDUAL), mean (LayerNorm) and rstd; mean / rstd are fp32."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        col_mask = cols < n
        if HAS_WEIGHT:
            w = _load_weight(weight_ptr, cols, col_mask, ZERO_CENTERED)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        for i in range(ROWS_PER_PROGRAM):
            row = pid * ROWS_PER_PROGRAM + i
            if row < rows:
                row_start = row * n
                s = _load_normalized_input(
                    x_ptr, residual_ptr, residual_out_ptr, row_start, cols, col_mask, HAS_RESIDUAL
                )
                if HAS_RESIDUAL:
                    tl.store(
                        residual_out_ptr + row_start + cols,
                        s.to(residual_out_ptr.dtype.element_ty),
                        mask=col_mask,
                    )
                if RMS:
                    centered = s
                else:
                    mean = tl.sum(s, axis=0) / n
                    centered = tl.where(col_mask, s - mean, 0.0)
                    tl.store(mean_ptr + row, mean)
                rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / n + eps)
                tl.store(rstd_ptr + row, rstd)
                y = centered * rstd
                if HAS_WEIGHT:
                    y = y * w
                if HAS_BIAS:
                    y = y + b
                tl.store(y_ptr + row_start + cols, y.to(y_ptr.dtype.element_ty), mask=col_mask)
    else:
        row_start = pid * n
        # Pass 1: statistics; residual_out is written here.
        # LayerNorm: the mean and the sum of squared deviations (m2) of each chunk, two-pass in
        # registers, merged into the row's running ones (Chan et al.'s pairwise update).
        sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for start in range(0, n, BLOCK_N):
            chunk_cols = start + cols
            mask = chunk_cols < n
            s = _load_normalized_input(
                x_ptr, residual_ptr, residual_out_ptr, row_start, chunk_cols, mask, HAS_RESIDUAL
            )
            if HAS_RESIDUAL:
                tl.store(
                    residual_out_ptr + row_start + chunk_cols,
                    s.to(residual_out_ptr.dtype.element_ty),
                    mask=mask,
                )
            if RMS:
                sum_sq += s * s
            else:
                chunk_count = tl.minimum(n - start, BLOCK_N).to(tl.float32)
                chunk_mean = tl.sum(s, axis=0) / chunk_count
                deviation = tl.where(mask, s - chunk_mean, 0.0)
                chunk_m2 = tl.sum(deviation * deviation, axis=0)
                new_count = count + chunk_count
                delta = chunk_mean - mean
                mean = mean + delta * (chunk_count / new_count)
                m2 = m2 + chunk_m2 + delta * delta * (count * chunk_count / new_count)
                count = new_count
        if RMS:
            rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n + eps)
        else:
            rstd = tl.rsqrt(m2 / n + eps)
            tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        # Pass 2: normalize. s is recomputed (rounded as stored), not read back from
        # residual_out, which another thread of this program may have written.
        for start in range(0, n, BLOCK_N):
            chunk_cols = start + cols
            mask = chunk_cols < n
            s = _load_normalized_input(
                x_ptr, residual_ptr, residual_out_ptr, row_start, chunk_cols, mask, HAS_RESIDUAL
            )
            y = (s - mean) * rstd
            if HAS_WEIGHT:
                y = y * _load_weight(weight_ptr, chunk_cols, mask, ZERO_CENTERED)
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + chunk_cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + row_start + chunk_cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_terms(
    dy_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    row,
    row_start,
    cols,
    mask,
    RMS: tl.constexpr,
):
    """dy, x_hat (0 in masked lanes) and rstd of columns cols of row `row` (whose first element is
    row_start), in fp32."""
    dy = tl.load(dy_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    if RMS:
        x_hat = x * rstd
    else:
        x_hat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
    return dy, x_hat, rstd


@triton.jit
def _norm_bwd_row_sums_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    row_sums_ptr,
    n,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows wider than one block: program i writes row i's mean(g * x_hat) and mean(g) (g = dy * w;
    the latter 0 for RMSNorm) to row_sums[i, 0:2], looping over the row BLOCK_N columns at a
    time."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    sum_g_x_hat = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        chunk_cols = start + cols
        mask = chunk_cols < n
        g, x_hat, _ = _norm_bwd_terms(
            dy_ptr, x_ptr, mean_ptr, rstd_ptr, row, row * n, chunk_cols, mask, RMS
        )
        if HAS_WEIGHT:
            g = g * _load_weight(weight_ptr, chunk_cols, mask, ZERO_CENTERED)
        sum_g_x_hat += g * x_hat
        if not RMS:
            sum_g += g
    tl.store(row_sums_ptr + 2 * row, tl.sum(sum_g_x_hat, axis=0) / n)
    tl.store(row_sums_ptr + 2 * row + 1, tl.sum(sum_g, axis=0) / n)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr,
    dresidual_out_ptr,
    x_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    row_sums_ptr,
    dx_ptr,
    dweight_partial_ptr,
    dbias_partial_ptr,
    rows,
    n,
    rows_per_program,
    RMS: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (i, j) takes rows [i * rows_per_program, (i + 1) * rows_per_program) and columns
    [j * BLOCK_N, (j + 1) * BLOCK_N). For each row, with x_hat the normalized row and g = dy * w:

        dx = rstd * (g - x_hat * mean(g * x_hat) - mean(g))   (LayerNorm; RMSNorm drops mean(g))
        dx += dresidual_out

    The row means come from the block itself (ONE_BLOCK: BLOCK_N >= n) or from row_sums. The
    program's sums of dy * x_hat and dy over its rows go to row i of the fp32 partials (programs,
    n) of dweight and dbias."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n
    first_row = pid * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, rows)
    if HAS_WEIGHT:
        w = _load_weight(weight_ptr, cols, mask, ZERO_CENTERED)
        dweight_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        dbias_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(first_row, end_row):
        row_start = row * n
        dy, x_hat, rstd = _norm_bwd_terms(
            dy_ptr, x_ptr, mean_ptr, rstd_ptr, row, row_start, cols, mask, RMS
        )
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        if ONE_BLOCK:
            mean_g_x_hat = tl.sum(g * x_hat, axis=0) / n
        else:
            mean_g_x_hat = tl.load(row_sums_ptr + 2 * row)
        if RMS:
            dx = (g - x_hat * mean_g_x_hat) * rstd
        else:
            if ONE_BLOCK:
                mean_g = tl.sum(g, axis=0) / n
            else:
                mean_g = tl.load(row_sums_ptr + 2 * row + 1)
            dx = (g - (x_hat * mean_g_x_hat + mean_g)) * rstd
        if HAS_DRESIDUAL:
            dx += tl.load(dresidual_out_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row_start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dweight_sum += dy * x_hat
        if HAS_BIAS:
            dbias_sum += dy
    if HAS_WEIGHT:
        tl.store(dweight_partial_ptr + pid * n + cols, dweight_sum, mask=mask)
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + pid * n + cols, dbias_sum, mask=mask)


@triton.jit
def _column_sum_kernel(
    partial_ptr,
    out_ptr,
    num_partials,
    n,
    BLOCK_PARTIALS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[c] = sum over r of partial[r, c] for a (num_partials, n) fp32 matrix, in fp32, in a
    fixed order (so run to run identical), cast to out's dtype. Program j sums columns
    [j * BLOCK_N, (j + 1) * BLOCK_N)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    partials = tl.arange(0, BLOCK_PARTIALS)
    total = tl.zeros([BLOCK_PARTIALS, BLOCK_N], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_PARTIALS):
        partial_rows = (start + partials).to(tl.int64)
        offsets = partial_rows[:, None] * n + cols[None, :]
        mask = (partial_rows < num_partials)[:, None] & col_mask[None, :]
        total += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


# Rows whose next_power_of_2(N) is at most MAX_BLOCK_N are held in registers, one block per row;
# wider rows are looped over in chunks of MAX_BLOCK_N. Registers hold fp32 whatever the storage
# dtype, and the backward keeps about five row-sized fp32 values live per row, so the limit is in
# elements, and set where 16 warps still hold a block without spilling.
MAX_BLOCK_N = 8192
# (largest BLOCK_N, num_warps, rows per forward program): about 16 elements per thread, and a few
# rows per program for narrow rows (weight and bias are loaded once per program).
BLOCK_CONFIGS = (
    (256, 1, 4),
    (1024, 2, 2),
    (2048, 4, 1),
    (4096, 8, 1),
    (8192, 16, 1),
    (65536, 32, 1),
)
# Backward: warps per SM that the row-range programs should fill, and the fewest rows a program
# takes (each program writes a row of fp32 partials; fewer rows would make those the main traffic).
BWD_WARPS_PER_SM = 32
BWD_MIN_ROWS_PER_PROGRAM = 4
# Programs of the backward on other devices (the interpreter): a few, so row ranges are exercised.
BWD_PROGRAMS_ELSEWHERE = 3
# _column_sum_kernel: partial rows x columns per step.
SUM_BLOCK_PARTIALS = 16
SUM_BLOCK_N = 128
SUM_NUM_WARPS = 4


def _block_config(block_n: int) -> tuple[int, int]:
    """(num_warps, rows per forward program) for a block of block_n columns."""
    for largest, num_warps, rows_per_program in BLOCK_CONFIGS:
        if block_n <= largest:
            return num_warps, rows_per_program
    raise ValueError(f"norm: no launch configuration for blocks of {block_n} columns")


def _row_blocking(n: int) -> tuple[int, bool]:
    """(BLOCK_N, whether a row fits one block) for rows of n elements."""
    block_n = triton.next_power_of_2(n)
    if block_n <= MAX_BLOCK_N:
        return block_n, True
    return MAX_BLOCK_N, False


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_row_ranges(device: torch.device, rows: int, num_warps: int, col_blocks: int):
    """(programs, rows per program) along the rows for the backward: contiguous ranges, the last
    one possibly shorter, none empty."""
    if device.type == "cuda":
        target = _sm_count(device) * max(1, BWD_WARPS_PER_SM // num_warps) // col_blocks
        rows_per_program = max(triton.cdiv(rows, max(1, target)), BWD_MIN_ROWS_PER_PROGRAM)
    else:
        rows_per_program = triton.cdiv(rows, BWD_PROGRAMS_ELSEWHERE)
    rows_per_program = min(rows_per_program, rows)
    return triton.cdiv(rows, rows_per_program), rows_per_program


def _check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: {name} of dtype {t.dtype} is not supported (fp32, fp16, bf16)")


def _check_like(op: str, name: str, t: Tensor, x: Tensor, shape: tuple[int, ...]) -> None:
    """t: a supported float dtype, on x's device, of `shape`, contiguous."""
    _check_float(op, name, t)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} is not contiguous")


def _check_x(op: str, x: Tensor) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (rows, N), got shape {tuple(x.shape)}")
    _check_like(op, "x", x, x, tuple(x.shape))
    return x.shape[0], x.shape[1]


def _check_stat(op: str, name: str, t: Tensor, x: Tensor, rows: int) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != (rows,) or t.device != x.device:
        raise ValueError(
            f"{op}: {name} must be a float32 tensor of shape ({rows},) on {x.device}, got "
            f"{t.dtype} of shape {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} is not contiguous")


def norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
    zero_centered_weight: bool,
    residual_in_fp32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the rows of x, after adding residual when
    given; fusedopt::norm_fwd (math: fusedopt.reference.layer_norm / rms_norm).

    x: contiguous (rows, N), fp32 / fp16 / bf16; residual: like x (any of those dtypes); weight,
    bias: contiguous (N,), any of those dtypes; all on one device.

    Returns (y, residual_out, mean, rstd): y in x's dtype; residual_out = x + residual, fp32 if
    residual_in_fp32 else x's dtype, the value that is normalized (0 elements without a residual);
    mean (LayerNorm; 0 elements for RMSNorm) and rstd, fp32 (rows,). With N == 0, mean and rstd
    are NaN, as the reference's are."""
    op = "norm_fwd"
    rows, n = _check_x(op, x)
    if residual is not None:
        _check_like(op, "residual", residual, x, (rows, n))
    if weight is not None:
        _check_like(op, "weight", weight, x, (n,))
    if bias is not None:
        _check_like(op, "bias", bias, x, (n,))

    residual_dtype = torch.float32 if residual_in_fp32 else x.dtype
    y = torch.empty_like(x)
    if residual is not None:
        residual_out = torch.empty((rows, n), dtype=residual_dtype, device=x.device)
    else:
        residual_out = x.new_empty((0,), dtype=residual_dtype)
    mean = x.new_empty((0,) if rms else (rows,), dtype=torch.float32)
    rstd = x.new_empty((rows,), dtype=torch.float32)
    if rows == 0:
        return y, residual_out, mean, rstd
    if n == 0:
        mean.fill_(math.nan)
        rstd.fill_(math.nan)
        return y, residual_out, mean, rstd

    block_n, one_block = _row_blocking(n)
    num_warps, rows_per_program = _block_config(block_n)
    if not one_block:
        rows_per_program = 1
    _norm_fwd_kernel[(triton.cdiv(rows, rows_per_program),)](
        x,
        residual,
        weight,
        bias,
        y,
        residual_out if residual is not None else None,
        mean if not rms else None,
        rstd,
        rows,
        n,
        eps,
        RMS=bool(rms),
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ZERO_CENTERED=bool(zero_centered_weight),
        ONE_BLOCK=one_block,
        ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_N=block_n,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return y, residual_out, mean, rstd


def norm_bwd(
    dy: Tensor,
    dresidual_out: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    zero_centered_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of norm_fwd; fusedopt::norm_bwd.

    x: the normalized input (norm_fwd's residual_out when there was a residual), contiguous
    (rows, N); dy (the grad of y) and dresidual_out (the grad reaching residual_out, added to dx):
    like x, any of fp32 / fp16 / bf16; weight, bias: the forward's params (bias only says whether
    dbias is wanted, and its dtype); mean (LayerNorm only) and rstd: norm_fwd's, fp32 (rows,).

    Returns (dx, dweight, dbias): dx in x's dtype; dweight and dbias in their params' dtypes
    (0 elements, of x's dtype, when absent), summed over rows in fp32 in a fixed order."""
    op = "norm_bwd"
    rows, n = _check_x(op, x)
    _check_like(op, "dy", dy, x, (rows, n))
    if dresidual_out is not None:
        _check_like(op, "dresidual_out", dresidual_out, x, (rows, n))
    if weight is not None:
        _check_like(op, "weight", weight, x, (n,))
    if bias is not None:
        _check_like(op, "bias", bias, x, (n,))
    if not rms:
        _check_stat(op, "mean", mean, x, rows)
    _check_stat(op, "rstd", rstd, x, rows)

    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    if rows == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias
    if n == 0:
        return dx, dweight, dbias

    block_n, one_block = _row_blocking(n)
    num_warps, _ = _block_config(block_n)
    col_blocks = 1 if one_block else triton.cdiv(n, block_n)
    flags = {
        "RMS": bool(rms),
        "HAS_WEIGHT": weight is not None,
        "ZERO_CENTERED": bool(zero_centered_weight),
        "BLOCK_N": block_n,
    }
    row_sums = None
    if not one_block:
        row_sums = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
        _norm_bwd_row_sums_kernel[(rows,)](
            dy,
            x,
            weight,
            mean if not rms else None,
            rstd,
            row_sums,
            n,
            **flags,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )

    programs, rows_per_program = _bwd_row_ranges(x.device, rows, num_warps, col_blocks)
    partial_shape = (programs, n)
    dweight_partial = dbias_partial = None
    if weight is not None:
        dweight_partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device)
    if bias is not None:
        dbias_partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device)
    _norm_bwd_kernel[(programs, col_blocks)](
        dy,
        dresidual_out,
        x,
        weight,
        mean if not rms else None,
        rstd,
        row_sums,
        dx,
        dweight_partial,
        dbias_partial,
        rows,
        n,
        rows_per_program,
        HAS_DRESIDUAL=dresidual_out is not None,
        HAS_BIAS=bias is not None,
        ONE_BLOCK=one_block,
        **flags,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    for partial, out in ((dweight_partial, dweight), (dbias_partial, dbias)):
        if partial is not None:
            _column_sum_kernel[(triton.cdiv(n, SUM_BLOCK_N),)](
                partial,
                out,
                programs,
                n,
                BLOCK_PARTIALS=SUM_BLOCK_PARTIALS,
                BLOCK_N=SUM_BLOCK_N,
                num_warps=SUM_NUM_WARPS,
                enable_fp_fusion=False,
            )
    return dx, dweight, dbias
