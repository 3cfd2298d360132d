"""Triton kernels for the two symmetric products of Muon's Newton-Schulz iteration. On X of shape
(batch, m, n), m <= n (a tall matrix is passed as its transposed view, never copied), one step is

    A = X @ X^T                  gram(X)                      (batch, m, m), symmetric
    B = b * A + c * (A @ A)      gram_polynomial(A, b, c)     (batch, m, m), symmetric
    X = a * X + B @ X            torch.baddbmm (cuBLAS), not here

In plain torch the same math is `x @ x.mT` and `torch.baddbmm(a, a, a, beta=b, alpha=c)`; the
tests compare against those in fp64 (there is no fusedopt.reference function for these products
yet: they are steps inside Muon's update, not an algorithm of their own).

One kernel, _symmetric_matmul_kernel, computes OUT = ALPHA * (L @ R) (+ BETA * C with HAS_C) for
a product known to be symmetric: gram takes L = X and R = X^T (X read through swapped strides),
gram_polynomial L = R = C = A. Only the upper-triangular tiles are computed, about half the work
of a full matmul for large m:

* Tiling: OUT is cut into BLOCK x BLOCK tiles, T = cdiv(m, BLOCK) per side. Grid axis 0 has one
  program per upper tile, T * (T + 1) / 2 of them, and axis 1 one per batch matrix; no program
  is launched for a lower tile. Program t takes tile (i, j), i <= j, of the lower-triangle
  enumeration of (j, i): t = j * (j + 1) / 2 + i, so consecutive programs share tile column j
  (the same panel of R) and mostly the same panels of L.
* Each program accumulates its tile over the K dimension, BLOCK_K at a time, with tl.dot into
  fp32 (operands loaded in their storage dtype), applies the epilogue in fp32 and stores the tile
  in OUT's dtype twice: at (i, j) and transposed at (j, i). On a diagonal tile (i == j) the first
  store keeps the elements on and above the diagonal and the mirrored store writes those above it
  to their places below, so every OUT[q, p] is bit for bit OUT[p, q], whatever order tl.dot
  summed in.
* Every operand has its own (batch, row, column) strides, so transposed views and other
  non-contiguous tensors are read in place. Offsets are int64: batch * m * n may pass 2**31.
* Sizes that are not multiples of the block are masked (loads give 0, stores are skipped).

Precision: tl.dot accumulates in fp32 whatever its input precision. For fp32 operands the
launchers default to input_precision="ieee" (fp32 products, no tensor cores): Newton-Schulz
feeds each step's output into the next, and "tf32" (10-bit mantissas) would make fp32 storage
no more accurate than bf16. input_precision="tf32" is accepted for speed. For fp16 / bf16 the
products are exact in fp32 either way and the tensor cores are used (mma / wgmma). The epilogue
is elementwise, and every launch passes enable_fp_fusion=False, as the optimizer kernels do
(docs/numerics.md): ALPHA * acc and BETA * C round on their own before the add; only the
accumulation inside tl.dot is fused, as it is in any matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import TRITON_DTYPES


@triton.jit
def _upper_tile(
    t,
):
    """(i, j), i <= j, of upper tile t: the lower-triangle enumeration t = j * (j + 1) / 2 + i.
    j comes from a float square root and is corrected by one where that rounded (t large)."""
    j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    i = t - j * (j + 1) // 2
    return i, j


@triton.jit
def _symmetric_matmul_kernel(
    l_ptr,
    r_ptr,
    c_ptr,
    out_ptr,
    m,
    k,
    alpha,
    beta,
    l_stride_batch,
    l_stride_row,
    l_stride_col,
    r_stride_batch,
    r_stride_row,
    r_stride_col,
    c_stride_batch,
    c_stride_row,
    c_stride_col,
    out_stride_batch,
    out_stride_row,
    out_stride_col,
    HAS_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """OUT = ALPHA * (L @ R) (+ BETA * C) for L (batch, m, k), R (batch, k, m), C and OUT
    (batch, m, m), where the product is symmetric: program (t, b) computes upper tile t of matrix
    b and stores it at its place and mirrored. R's element (q, p) is at r_stride_row * q +
    r_stride_col * p, so R = X^T is X with its strides swapped."""
    tile_i, tile_j = _upper_tile(tl.program_id(0))
    batch = tl.program_id(1).to(tl.int64)
    rows = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_mask = rows < m
    col_mask = cols < m

    l_tile = l_ptr + batch * l_stride_batch + rows[:, None] * l_stride_row
    r_tile = r_ptr + batch * r_stride_batch + cols[None, :] * r_stride_col
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        k_index = start + ks
        k_mask = k_index < k
        left = tl.load(
            l_tile + k_index[None, :] * l_stride_col,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        right = tl.load(
            r_tile + k_index[:, None] * r_stride_row,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)

    result = acc * tl.cast(alpha, tl.float32)
    in_bounds = row_mask[:, None] & col_mask[None, :]
    if HAS_C:
        c = tl.load(
            c_ptr + batch * c_stride_batch + rows[:, None] * c_stride_row
            + cols[None, :] * c_stride_col,
            mask=in_bounds,
            other=0.0,
        ).to(tl.float32)
        result = result + c * tl.cast(beta, tl.float32)
    result = result.to(out_ptr.dtype.element_ty)

    out_batch = out_ptr + batch * out_stride_batch
    # On and above the diagonal at (i, j); strictly above it again, transposed, at (j, i). Off the
    # diagonal (i < j) every row is below every column, so both stores write the whole tile.
    tl.store(
        out_batch + rows[:, None] * out_stride_row + cols[None, :] * out_stride_col,
        result,
        mask=in_bounds & (rows[:, None] <= cols[None, :]),
    )
    tl.store(
        out_batch + cols[None, :] * out_stride_row + rows[:, None] * out_stride_col,
        result,
        mask=in_bounds & (rows[:, None] < cols[None, :]),
    )


# (largest m, BLOCK, BLOCK_K bytes, num_warps, num_stages), the first row whose m fits is used.
# BLOCK_K is given in bytes per row of a K step (128 B: 64 bf16 / fp16 or 32 fp32 elements), so
# the shared memory of a stage is the same for every dtype: at 128 x 128 and 3 stages,
# 3 * 2 * 128 * 128 B = 96 KiB of the 227 KiB an sm_90 block may use (what Triton 3.9 allocates
# for a 512 x 1024 bf16 x compiled offline with its 16-aligned strides: 3 cp.async stages feeding
# wgmma; with unaligned strides it does not pipeline and keeps one stage). 128 x 128 tiles with
# 8 warps are the usual Hopper bf16 matmul shape; a small matrix gets smaller tiles so that it
# still has several programs (m = 256: 10 upper tiles of 64) and wastes less on masked lanes.
# 32 is the smallest tile kept: tl.dot needs at least 16 per side, and m <= 32 is launch-bound.
BLOCK_CONFIGS = (
    (32, 32, 128, 4, 2),
    (256, 64, 128, 4, 3),
    (None, 128, 128, 8, 3),
)
# Grid axis 1 (the batch) is limited to 65535 programs by CUDA.
MAX_BATCH = 65535
INPUT_PRECISIONS = ("ieee", "tf32")


def _block_config(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_K, num_warps, num_stages) for an m x m output of dtype."""
    for largest, block, block_k_bytes, num_warps, num_stages in BLOCK_CONFIGS:
        if largest is None or m <= largest:
            return block, block_k_bytes // dtype.itemsize, num_warps, num_stages
    raise AssertionError("the last row of BLOCK_CONFIGS takes every m")


def _as_batched(op: str, name: str, t: Tensor) -> Tensor:
    """t as a (batch, rows, cols) view (a 2-D t gets a batch of 1), after the dtype check."""
    if t.dim() not in (2, 3):
        raise ValueError(
            f"{op}: {name} must be 2-D (m, n) or 3-D (batch, m, n), got shape {tuple(t.shape)}"
        )
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: {name} of dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.shape[0] > MAX_BATCH:
        raise ValueError(f"{op}: a batch of {t.shape[0]} matrices is more than {MAX_BATCH}")
    return t


def _input_precision(op: str, input_precision: str | None) -> str:
    if input_precision is None:
        return "ieee"
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(
            f"{op}: input_precision must be one of {INPUT_PRECISIONS} or None, got "
            f"{input_precision!r}"
        )
    return input_precision


def _output(op: str, source: Tensor, m: int, out: Tensor | None) -> Tensor:
    """out checked against the (batch, m, m) result of source (source's dtype and device, the
    source's own number of dims), or a new contiguous tensor."""
    shape = (*source.shape[:-2], m, m)
    if out is None:
        return source.new_empty(shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {shape}")
    if out.dtype != source.dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype}, expected {source.dtype}")
    if out.device != source.device:
        raise ValueError(f"{op}: out is on {out.device} but the input is on {source.device}")
    if out.numel() and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        raise ValueError(f"{op}: out must not share memory with the input (it is read while out "
                         "is written)")
    return out


def _launch(
    left: Tensor,
    right: Tensor,
    c: Tensor | None,
    out: Tensor,
    alpha: float,
    beta: float,
    input_precision: str,
) -> None:
    """out = alpha * (left @ right) (+ beta * c), all (batch, ., .) views, the product symmetric."""
    batch, m, k = left.shape
    if batch == 0 or m == 0:
        return
    block, block_k, num_warps, num_stages = _block_config(m, left.dtype)
    tiles = triton.cdiv(m, block)
    c_strides = c.stride() if c is not None else (0, 0, 0)
    _symmetric_matmul_kernel[(tiles * (tiles + 1) // 2, batch)](
        left,
        right,
        c,
        out,
        m,
        k,
        alpha,
        beta,
        *left.stride(),
        *right.stride(),
        *c_strides,
        *out.stride(),
        HAS_C=c is not None,
        INPUT_PRECISION=input_precision,
        BLOCK=block,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        enable_fp_fusion=False,
    )


def gram(x: Tensor, *, out: Tensor | None = None, input_precision: str | None = None) -> Tensor:
    """x @ x^T for x of shape (batch, m, n) or (m, n), any strides (a tall matrix's transposed
    view is read in place): (batch, m, m) / (m, m) in x's dtype, exactly symmetric.

    x: fp32, fp16 or bf16, a CUDA tensor (a CPU one under TRITON_INTERPRET=1). Products
    accumulate in fp32. out: optional, of the result's shape, dtype and device, any strides,
    sharing no memory with x. input_precision: for fp32 x, "ieee" (default, fp32 products) or
    "tf32" (tensor cores, 10-bit mantissas); fp16 / bf16 products are exact either way."""
    op = "gram"
    x3 = _as_batched(op, "x", x)
    precision = _input_precision(op, input_precision)
    result = _output(op, x, x.shape[-2], out)
    _launch(x3, x3.mT, None, _as_batched(op, "out", result), 1.0, 0.0, precision)
    return result


def gram_polynomial(
    a: Tensor,
    b: float,
    c: float,
    *,
    out: Tensor | None = None,
    input_precision: str | None = None,
) -> Tensor:
    """b * a + c * (a @ a) for a symmetric a of shape (batch, m, m) or (m, m), any strides: the
    result has a's shape and dtype and is exactly symmetric. Only a's symmetry is assumed, not
    checked: the result's upper triangle is computed from a's rows and columns and mirrored.

    a: fp32, fp16 or bf16, a CUDA tensor (a CPU one under TRITON_INTERPRET=1). b, c: Python
    floats, rounded to fp32 in the kernel. Products accumulate in fp32 and the epilogue is
    fp32: (c * acc) + (b * a), each product rounded on its own. out and input_precision: as for
    gram."""
    op = "gram_polynomial"
    a3 = _as_batched(op, "a", a)
    if a3.shape[1] != a3.shape[2]:
        raise ValueError(f"{op}: a must be square, got shape {tuple(a.shape)}")
    precision = _input_precision(op, input_precision)
    result = _output(op, a, a.shape[-1], out)
    _launch(a3, a3, a3, _as_batched(op, "out", result), float(c), float(b), precision)
    return result


def newton_schulz(x: Tensor, coefficients: tuple[tuple[float, float, float], ...], eps: float,
                  dtype: torch.dtype) -> Tensor:
    """fusedopt.reference.newton_schulz with the symmetric products above and the third one a
    cuBLAS GEMM (torch.baddbmm): x (batch, rows, cols) of any float dtype, normalized by its
    Frobenius norm (at least eps) in fp32 (fp64 for fp64 x), iterated in dtype (fp32, fp16 or bf16); returns
    (batch, rows, cols) in dtype. A tall x is iterated as its transpose (a view), and its last
    product is written in the tall layout (X^T = a X^T + X^T B, B symmetric): no copy."""
    transposed = x.shape[-2] > x.shape[-1]
    wide = x.mT if transposed else x
    wide = wide.to(torch.promote_types(wide.dtype, torch.float32))  # fp32 (fp64 stays)
    norm = torch.linalg.vector_norm(wide, dim=(-2, -1), keepdim=True)
    ortho = (wide / norm.clamp(min=eps)).to(dtype, memory_format=torch.contiguous_format)
    gram_matrix = ortho.new_empty(ortho.shape[:-1] + ortho.shape[-2:-1])
    gram_update = torch.empty_like(gram_matrix)
    for step, (a, b, c) in enumerate(coefficients):
        gram(ortho, out=gram_matrix)
        gram_polynomial(gram_matrix, b, c, out=gram_update)
        if transposed and step == len(coefficients) - 1:
            return torch.baddbmm(ortho.mT, ortho.mT, gram_update, beta=a)
        ortho = torch.baddbmm(ortho, gram_update, ortho, beta=a)
    return ortho.mT.contiguous() if transposed else ortho
