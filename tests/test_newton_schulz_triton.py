"""The Newton-Schulz product kernels (fusedopt.kernels.newton_schulz: gram, gram_polynomial) in
Triton's interpreter, against fp64 torch.

Run with TRITON_INTERPRET=1 in the environment (a pytest run of its own): every test is marked
`interpret` and skipped, with the reason, where triton is missing or the interpreter is off.
Shapes are tiny and include sizes that are not multiples of the block; `small_blocks` swaps the
block table for 16 x 16 tiles so that m = 70 has 5 x 5 tiles (15 upper ones per matrix) and the
K loop several steps, exercising the tile mapping and the mirrored stores.

Tolerances (TOLERANCES) are relative to the error scale of each output element, the same sum of
products taken over absolute values (|x| @ |x|^T; |b| |a| + |c| |a| @ |a|): fp32 accumulates in
fp32 (a few ulp over at most 70 terms), fp16 rounds the result to an 11-bit significand once.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not fusedopt.backends()["triton_interpreter"]["available"],
                       reason=fusedopt.backends()["triton_interpreter"]["reason"]),
]

if fusedopt.backends()["triton_interpreter"]["available"]:
    from fusedopt.kernels import newton_schulz as ns

# |ours - fp64| <= tolerance * (the element's error scale)
TOLERANCES = {torch.float32: 1e-6, torch.float16: 1e-3}
# After 5 Newton-Schulz steps, max |ours - fp64| over X (whose entries are O(1 / sqrt(n))): each
# step's rounding is carried into the next and amplified by up to p'(0) = a = 3.4 for small
# singular values, and baddbmm's own rounding (in the storage dtype) adds to it.
NS_TOLERANCES = {torch.float32: 5e-6, torch.float16: 5e-3}
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skip(
        reason="bf16 arithmetic in Triton's interpreter is not trustworthy")),
]
SIZES = [1, 5, 17, 33, 70]


@pytest.fixture(params=[False, True], ids=["table_blocks", "small_blocks"])
def blocks(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(ns, "BLOCK_CONFIGS", ((None, 16, 64, 1, 1),))


def random(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) + 0.5).to(dtype)


def assert_within(ours, expected, scale, dtype):
    assert ours.dtype == dtype
    assert ours.shape == expected.shape
    error = (ours.double() - expected).abs()
    bound = TOLERANCES[dtype] * scale
    assert bool((error <= bound).all()), f"max error {(error / scale).max().item():.3g} of scale"


def assert_exactly_symmetric(out):
    assert torch.equal(out, out.mT), "the result is not bit for bit symmetric"


def gram_reference(x):
    x = x.double()
    return x @ x.mT, x.abs() @ x.abs().mT


def layout(x, kind):
    """x (batch, m, n) with the same values in another memory layout."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "transposed":  # stored as (batch, n, m): a tall matrix's transposed view
        return x.mT.contiguous().mT
    # every other column of a wider buffer, the batch dimension outermost but permuted in memory
    buffer = torch.full((x.shape[1], x.shape[0], 2 * x.shape[2]), float("nan"), dtype=x.dtype)
    view = buffer.permute(1, 0, 2)[:, :, ::2]
    view.copy_(x)
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("m,n", [(1, 1), (5, 33), (17, 70), (33, 17), (70, 5)],
                         ids=lambda v: str(v))
def test_gram_matches_fp64(m, n, batch, kind, dtype, blocks):
    x = layout(random((batch, m, n), dtype, seed=m * 100 + n), kind)
    out = ns.gram(x)
    expected, scale = gram_reference(x)
    assert_within(out, expected, scale, dtype)
    assert_exactly_symmetric(out)
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(5, 17), (33, 70)], ids=str)
def test_gram_reads_a_tall_matrix_through_its_transposed_view(m, n, dtype, blocks):
    """x.mT of a contiguous (batch, n, m) tall matrix: no copy, the same bits as from a copy."""
    tall = random((3, n, m), dtype, seed=7)
    wide = tall.mT
    assert not wide.is_contiguous()
    out = ns.gram(wide)
    assert torch.equal(out, ns.gram(wide.contiguous()))
    expected, scale = gram_reference(wide)
    assert_within(out, expected, scale, dtype)
    assert_exactly_symmetric(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_of_a_2d_matrix_is_2d(dtype):
    x = random((17, 40), dtype, seed=3)
    out = ns.gram(x)
    assert out.shape == (17, 17)
    expected, scale = gram_reference(x)
    assert_within(out, expected, scale, dtype)
    assert_exactly_symmetric(out)


def symmetric(batch, m, dtype, seed):
    """A random symmetric (batch, m, m) matrix of dtype, exactly symmetric, non-zero mean."""
    x = random((batch, m, m), torch.float64, seed)
    return ((x + x.mT) / 2).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("m", SIZES)
def test_gram_polynomial_matches_fp64(m, batch, contiguous, dtype, blocks):
    b, c = NS_COEFFICIENTS[1:]
    a = symmetric(batch, m, dtype, seed=m)
    if not contiguous:
        a = layout(a, "strided")
    out = ns.gram_polynomial(a, b, c)
    a64 = a.double()
    expected = b * a64 + c * (a64 @ a64)
    scale = abs(b) * a64.abs() + abs(c) * (a64.abs() @ a64.abs())
    assert_within(out, expected, scale, dtype)
    assert_exactly_symmetric(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffers_are_written_in_place_whatever_their_strides(dtype):
    """out= (poisoned first) is filled and returned, a transposed out included."""
    x = random((2, 17, 33), dtype, seed=5)
    out = torch.full((2, 17, 17), float("nan"), dtype=dtype)
    assert ns.gram(x, out=out) is out
    assert torch.equal(out, ns.gram(x))
    poly_out = torch.full((2, 17, 17), float("nan"), dtype=dtype).mT
    assert ns.gram_polynomial(out, -4.775, 2.0315, out=poly_out) is poly_out
    assert torch.equal(poly_out, ns.gram_polynomial(out, -4.775, 2.0315))


def test_empty_inputs():
    assert ns.gram(torch.ones(0, 3, 4)).shape == (0, 3, 3)
    assert ns.gram(torch.ones(2, 0, 4)).shape == (2, 0, 0)
    assert torch.equal(ns.gram(torch.ones(3, 0)), torch.zeros(3, 3))  # n = 0: a sum of nothing
    assert ns.gram_polynomial(torch.ones(0, 0), 1.0, 1.0).shape == (0, 0)


def test_launchers_reject_what_they_cannot_compute():
    x = torch.ones(4, 5)
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        ns.gram(torch.ones(5))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        ns.gram(torch.ones(1, 2, 4, 5))
    with pytest.raises(TypeError, match="float64 is not supported"):
        ns.gram(x.double())
    with pytest.raises(TypeError, match="int64 is not supported"):
        ns.gram(torch.ones(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be square"):
        ns.gram_polynomial(x, 1.0, 1.0)
    with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
        ns.gram(x, out=torch.empty(5, 5))
    with pytest.raises(TypeError, match="expected torch.float32"):
        ns.gram(x, out=torch.empty(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="is on meta"):
        ns.gram(x, out=torch.empty(4, 4, device="meta"))
    a = torch.ones(4, 4)
    with pytest.raises(ValueError, match="must not share memory"):
        ns.gram_polynomial(a, 1.0, 1.0, out=a)
    with pytest.raises(ValueError, match="input_precision"):
        ns.gram(x, input_precision="tf32x3")


def newton_schulz_reference(x, steps):
    """Muon's quintic Newton-Schulz in fp64: X / ||X||_F, then steps of
    X <- a X + (b A + c A @ A) X with A = X X^T (x: (batch, m, n), m <= n)."""
    a, b, c = NS_COEFFICIENTS
    x = x.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        gram_x = x @ x.mT
        x = a * x + (b * gram_x + c * gram_x @ gram_x) @ x
    return x


def newton_schulz(x, steps):
    """The same in x's dtype, from gram, gram_polynomial and torch.baddbmm."""
    a, b, c = NS_COEFFICIENTS
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        polynomial = ns.gram_polynomial(ns.gram(x), b, c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_five_newton_schulz_steps_match_fp64(tall, dtype):
    """5 steps on a batch of 3 with m, n not multiples of the block; a tall (40, 17) matrix is
    orthogonalized through its transposed (17, 40) view, as Muon does."""
    g = random((3, 40, 17) if tall else (3, 17, 40), dtype, seed=11)
    x = g.mT if tall else g
    ours = newton_schulz(x, steps=5)
    expected = newton_schulz_reference(x, steps=5)
    assert ours.dtype == dtype
    error = (ours.double() - expected).abs().max().item()
    assert error <= NS_TOLERANCES[dtype], f"max error {error:.3g}"
    # and it did orthogonalize: the singular values are near 1 (within Muon's usual spread)
    singular = torch.linalg.svdvals(expected)
    assert bool(((singular > 0.5) & (singular < 1.5)).all())
