"""fusedopt.LayerNorm / RMSNorm and the functional forms against torch.nn in fp64: outputs and
every gradient, on every backend that runs here."""

from __future__ import annotations

import re

import pytest
import torch

import fusedopt
from fusedopt import functional

# (atol, rtol) of outputs and grads against torch in fp64.
NORM_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
# (input shape, normalized_shape): odd sizes, 3-D / 4-D inputs, a 2-D normalized_shape, an empty
# batch.
SHAPES = [
    ((7, 1), (1,)),
    ((5, 3), (3,)),
    ((4, 41), (41,)),
    ((3, 2, 769), (769,)),
    ((2, 4097), (4097,)),
    ((2, 3, 5, 8), (8,)),
    ((3, 4, 6), (4, 6)),
    ((0, 16), (16,)),
]


def norm_backends() -> list:
    has_cpp = fusedopt._ops.has_kernel("fusedopt::norm_fwd", "CPU")
    return [pytest.param("reference", id="reference"),
            pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
                not has_cpp, reason="the C++ norm kernels are not built here"))]


def torch_norm(kind, x, shape, weight, bias, eps):
    if kind == "rms":
        return torch.nn.functional.rms_norm(x, shape, weight, eps)
    return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)


def ours_norm(kind, x, shape, weight, bias, eps, backend, **kwargs):
    if kind == "rms":
        return functional.rms_norm(x, shape, weight, eps, backend=backend, **kwargs)
    return functional.layer_norm(x, shape, weight, bias, eps, backend=backend, **kwargs)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def check_against_torch(kind, x, shape, weight, bias, backend, residual=None, **kwargs):
    """Forward and backward of fusedopt (x's dtype) against torch in fp64 on the same values."""
    dtype = x.dtype
    eps = 1e-5
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    ours_inputs = [leaf(t) for t in inputs]
    ref_inputs = [leaf(t.double()) for t in inputs]

    def unpack(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (x, weight, bias, residual)]

    ox, ow, ob, orr = unpack(ours_inputs)
    rx, rw, rb, rr = unpack(ref_inputs)
    out = ours_norm(kind, ox, shape, ow, ob, eps, backend, residual=orr, **kwargs)
    s_ref = rx if rr is None else rx + rr
    if kwargs.get("zero_centered_weight"):
        rw_eff = None if rw is None else 1 + rw
    else:
        rw_eff = rw
    y_ref = torch_norm(kind, s_ref, shape, rw_eff, rb, eps)
    y = out[0] if residual is not None else out
    assert y.dtype == dtype and y.shape == x.shape
    atol, rtol = NORM_TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    grad_y = torch.randn(y.shape, dtype=torch.float64, device=y.device)
    loss, ref_loss = (y.double() * grad_y).sum(), (y_ref * grad_y).sum()
    if residual is not None:
        grad_s = torch.randn(x.shape, dtype=torch.float64, device=x.device)
        torch.testing.assert_close(out[1].double(), s_ref, atol=atol, rtol=rtol)
        loss = loss + (out[1].double() * grad_s).sum()
        ref_loss = ref_loss + (s_ref * grad_s).sum()
    loss.backward()
    ref_loss.backward()
    for ours_t, ref_t in zip(ours_inputs, ref_inputs):
        assert ours_t.grad is not None and ours_t.grad.dtype == ours_t.dtype
        # dweight / dbias sum over rows: scale the tolerance with the row count
        rows = max(1, x.numel() // max(1, ours_t.numel()))
        torch.testing.assert_close(ours_t.grad.double(), ref_t.grad,
                                   atol=atol * (1 + rows ** 0.5), rtol=rtol * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("x_shape,shape", SHAPES, ids=[str(s[0]) for s in SHAPES])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_outputs_and_grads_match_torch(kind, x_shape, shape, backend, dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(x_shape, generator=generator) * 2 + 0.5).to(dtype)
    weight = (torch.randn(shape, generator=generator) + 1).to(dtype)
    bias = None if kind == "rms" else torch.randn(shape, generator=generator).to(dtype)
    check_against_torch(kind, x, shape, weight, bias, backend)


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("options", [
    {"residual": True},
    {"residual": True, "residual_in_fp32": True},
    {"zero_centered_weight": True},
    {"no_weight": True},
], ids=lambda o: ",".join(o))
def test_residual_zero_centered_and_no_weight_match_torch(kind, options, backend):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(13, 300, generator=generator) + 0.3  # 13 rows: groups of 4 and one left over
    weight = None if options.get("no_weight") else torch.randn(300, generator=generator) * 0.1
    bias = None if kind == "rms" or options.get("no_weight") else torch.randn(300)
    residual = torch.randn(13, 300, generator=generator) if options.get("residual") else None
    kwargs = {k: v for k, v in options.items()
              if k in ("residual_in_fp32", "zero_centered_weight")}
    check_against_torch(kind, x, (300,), weight, bias, backend, residual=residual, **kwargs)


@pytest.mark.parametrize("backend", norm_backends())
def test_non_contiguous_input_and_grad(backend):
    base = torch.randn(64, 10) + 0.2
    x = base.t()  # (10, 64), non-contiguous
    weight = torch.randn(64)
    check_against_torch("layer", x, (64,), weight, torch.randn(64), backend)
    check_against_torch("rms", x, (64,), weight, None, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_rows_wider_than_8192_match_torch(kind, residual, backend, dtype):
    """Rows of 12289 elements: wider than the C++ backward's grouped rows (kBackwardRowsMaxN =
    8192; wider rows go one at a time) and summed in several kSumBlock pieces per row."""
    generator = torch.Generator().manual_seed(6)
    n = 12289
    x = (torch.randn(3, n, generator=generator) * 2 + 0.5).to(dtype)
    weight = (torch.randn(n, generator=generator) + 1).to(dtype)
    bias = None if kind == "rms" else torch.randn(n, generator=generator).to(dtype)
    res = torch.randn(3, n, generator=generator).to(dtype) if residual else None
    check_against_torch(kind, x, (n,), weight, bias, backend, residual=res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("n", [769, 4097, 12289])
def test_layer_norm_rows_whose_shifted_sums_cancel_match_torch(n, backend, dtype):
    """The C++ LayerNorm's one-pass statistics shift each row by the mean of its first vector step
    (at most 32 elements). Here those elements sit 10 spreads above the rest of the row, itself 30
    spreads off zero: the shift is far from the mean, the shifted sums cancel ((mean - shift)^2 >
    kMaxShiftedCancellation * var) and every row takes the exact second pass over the row."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, n, generator=generator) + 30
    x[:, :32] += 10
    weight = torch.randn(n, generator=generator) + 1
    bias = torch.randn(n, generator=generator)
    check_against_torch("layer", x.to(dtype), (n,), weight.to(dtype), bias.to(dtype), backend)


@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_modules_load_torch_checkpoints_and_match_torch(module):
    kwargs = {"eps": 1e-5} if module == "RMSNorm" else {}
    theirs = getattr(torch.nn, module)([4, 6], **kwargs)
    with torch.no_grad():
        theirs.weight.normal_()
        if getattr(theirs, "bias", None) is not None:
            theirs.bias.normal_()
    ours = getattr(fusedopt, module)([4, 6], **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)
    fresh_ours, fresh_theirs = getattr(fusedopt, module)(8), getattr(torch.nn, module)(8)
    assert fresh_ours.state_dict().keys() == fresh_theirs.state_dict().keys()
    for a, b in zip(fresh_ours.state_dict().values(), fresh_theirs.state_dict().values()):
        torch.testing.assert_close(a, b)  # same init


def test_module_options_match_torch():
    for ours, theirs in [(fusedopt.LayerNorm(5, elementwise_affine=False),
                          torch.nn.LayerNorm(5, elementwise_affine=False)),
                         (fusedopt.LayerNorm(5, bias=False), torch.nn.LayerNorm(5, bias=False)),
                         (fusedopt.RMSNorm(5), torch.nn.RMSNorm(5)),
                         (fusedopt.LayerNorm(5, dtype=torch.float64),
                          torch.nn.LayerNorm(5, dtype=torch.float64))]:
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        x = torch.randn(4, 5, dtype=next(iter(theirs.state_dict().values()), torch.zeros(1)).dtype)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)

@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_module_with_residual_is_torch_add_then_norm(module):
    """norm(x, residual) returns (torch's norm of x + residual, x + residual), gradients too."""
    generator = torch.Generator().manual_seed(3)
    ours = getattr(fusedopt, module)(37)
    theirs = getattr(torch.nn, module)(37)
    with torch.no_grad():
        ours.weight.normal_(generator=generator)
        theirs.weight.copy_(ours.weight)
    x, residual = (torch.randn(2, 9, 37, generator=generator, requires_grad=True) for _ in "xr")
    y, stream = ours(x, residual)
    their_stream = x + residual
    their_y = theirs(their_stream)
    torch.testing.assert_close(stream, their_stream)
    torch.testing.assert_close(y, their_y, atol=2e-5, rtol=2e-5)
    dy, dstream = torch.randn_like(y), torch.randn_like(y)
    grads = torch.autograd.grad((y, stream), (x, residual, ours.weight), (dy, dstream))
    their_grads = torch.autograd.grad((their_y, their_stream), (x, residual, theirs.weight),
                                      (dy, dstream))
    for a, b in zip(grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_shapes_torch_rejects_raise_torch_errors(kind):
    x = torch.randn(3, 7)
    with pytest.raises(RuntimeError) as theirs:
        torch_norm(kind, x, (5,), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
        ours_norm(kind, x, (5,), None, None, 1e-5, "auto")


needs_cpp_norm = pytest.mark.skipif(not fusedopt._ops.has_kernel("fusedopt::norm_fwd", "CPU"),
                                    reason="the C++ norm kernels are not built here")


@needs_cpp_norm
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_norm_ops(rms, residual):
    x = torch.randn(5, 33, requires_grad=True)
    res = torch.randn(5, 33) if residual else None
    weight = torch.randn(33, requires_grad=True)
    bias = None if rms else torch.randn(33, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedopt.norm_fwd.default,
                          (x, res, weight, bias, 1e-5, rms, False, False))
    y, residual_out, mean, rstd = torch.ops.fusedopt.norm_fwd(
        x.detach(), res, weight.detach(), None if bias is None else bias.detach(), 1e-5, rms,
        False, False)
    torch.library.opcheck(torch.ops.fusedopt.norm_bwd.default,
                          (torch.randn(5, 33), torch.randn(5, 33) if residual else None,
                           residual_out if residual else x.detach(), weight.detach(),
                           None if bias is None else bias.detach(), mean, rstd, rms, False))


@needs_cpp_norm
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_has_no_graph_breaks(compiler):
    """fullgraph=True fails on any graph break; inductor's generated code must call the fused ops
    (forward and backward), not a decomposition of them."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), fusedopt.LayerNorm(33), torch.nn.GELU(),
                                torch.nn.Linear(33, 33), fusedopt.RMSNorm(33))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = leaf(torch.randn(4, 16))
    x_eager = leaf(x)

    def step():
        out = compiled(x)
        out.pow(2).sum().backward()
        return out

    out, code = run_and_get_code(step) if compiler == "inductor" else (step(), [])
    expected = model(x_eager)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_eager.grad, atol=1e-5, rtol=1e-5)
    if compiler == "inductor":
        generated = "\n".join(code)
        assert "fusedopt.norm_fwd" in generated and "fusedopt.norm_bwd" in generated


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("option", ["plain", "residual", "zero_centered"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_double_backward_matches_torch(kind, option, backend):
    """backward(create_graph=True) through a fusedopt norm (fp32) gives grads that differentiate
    again like torch's in fp64 (a gradient penalty on every input)."""
    generator = torch.Generator().manual_seed(3)
    n = 37
    x, weight, bias, res = (torch.randn(size, generator=generator) + 0.3
                            for size in ((5, n), (n,), (n,), (5, n)))
    bias = bias if kind == "layer" else None
    residual = option == "residual"
    res = res if residual else None
    zero_centered = option == "zero_centered"

    def penalized_grads(dtype, fused):
        inputs = [None if t is None else leaf(t.to(dtype)) for t in (x, weight, bias, res)]
        ix, iw, ib, ir = inputs
        if fused:
            out = ours_norm(kind, ix, (n,), iw, ib, 1e-5, backend, residual=ir,
                            zero_centered_weight=zero_centered)
        else:
            s = ix if ir is None else ix + ir
            out = torch_norm(kind, s, (n,), 1 + iw if zero_centered else iw, ib, 1e-5)
            out = (out, s) if ir is not None else out
        y, s = out if residual else (out, None)
        loss = y.pow(3).sum() + (0 if s is None else s.pow(2).sum())
        live = [t for t in inputs if t is not None]
        grads = torch.autograd.grad(loss, live, create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        return [t.grad.double() for t in live]

    for ours, theirs in zip(penalized_grads(torch.float32, True),
                            penalized_grads(torch.float64, False)):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=5e-4)


@needs_cpp_norm
def test_norm_bwd_op_refuses_to_be_differentiated():
    x = torch.randn(3, 8)
    _, _, mean, rstd = torch.ops.fusedopt.norm_fwd(x, None, None, None, 1e-5, False, False, False)
    dy = leaf(torch.randn(3, 8))
    dx, _, _ = torch.ops.fusedopt.norm_bwd(dy, None, x, None, None, mean, rstd, False, False)
    with pytest.raises(RuntimeError, match="norm_bwd is not differentiable"):
        dx.sum().backward()


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_cpu_autocast_matches_torch(kind, backend):
    """CPU autocast has no rule for layer_norm / rms_norm, so a bf16 activation meets fp32
    parameters: the output has the activation's dtype, as torch's module gives it; values and
    all grads against torch in fp64."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(24, 40)
    theirs = torch.nn.RMSNorm(40) if kind == "rms" else torch.nn.LayerNorm(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(torch.randn(7, 24)).detach()
        assert h.dtype == theirs(h).dtype == torch.bfloat16
        weight, bias = torch.randn(40) + 1, (None if kind == "rms" else torch.randn(40))
        check_against_torch(kind, h, (40,), weight, bias, backend)
        check_against_torch(kind, h, (40,), weight, bias, backend, residual=torch.randn(7, 40))


@needs_cpp_norm
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_fp32_autocast_rule_matches_torch(kind, residual):
    """The autocast rule registered for CUDA (torch runs layer_norm / rms_norm in fp32 there),
    registered for CPU for this test: fp32 outputs equal to torch's norm of the inputs cast to
    fp32, after s = x + residual formed in x's dtype as unfused code does; grads match."""
    library = torch.library.Library("fusedopt", "IMPL")
    try:
        fusedopt._ops.register_norm_autocast("cpu", library, {False: True, True: True})
        generator = torch.Generator().manual_seed(5)
        x, res = (torch.randn(6, 50, generator=generator).bfloat16() for _ in range(2))
        weight, bias = torch.randn(50) * 0.5 + 1, torch.randn(50)
        bias = bias if kind == "layer" else None
        res = res if residual else None
        grads = []
        for fused in (True, False):
            inputs = [None if t is None else leaf(t) for t in (x, weight, bias, res)]
            ix, iw, ib, ir = inputs
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if fused:
                    out = ours_norm(kind, ix, (50,), iw, ib, 1e-5, "cpp", residual=ir)
                else:
                    s = ix if ir is None else ix + ir
                    out = torch_norm(kind, s.float(), (50,), iw, ib, 1e-5)
                    out = (out, s) if ir is not None else out
            y, s = out if residual else (out, None)
            assert y.dtype == torch.float32 and (s is None or s.dtype == torch.bfloat16)
            loss = (y * torch.linspace(-1, 1, 50)).sum() + (0 if s is None else s.float().sum())
            loss.backward()
            grads.append([y.detach()] + [t.grad for t in inputs if t is not None])
        for ours, theirs in zip(*grads):
            assert ours.dtype == theirs.dtype
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    finally:
        library._destroy()


triton_interpreter = pytest.mark.skipif(
    not fusedopt.backends()["triton_interpreter"]["available"],
    reason=fusedopt.backends()["triton_interpreter"]["reason"])
TRITON_CASES = [  # (rows, N, rms, with weight, with bias, residual, residual_in_fp32, zero-centered)
    (7, 41, False, True, True, False, False, False),
    (7, 41, True, True, False, True, False, False),
    (1, 769, False, False, False, True, True, False),
    (3, 3, True, True, False, False, False, True),
    (0, 8, False, True, True, False, False, False),
    (2, 4097, False, True, True, True, False, True),
]


@pytest.mark.interpret
@triton_interpreter
@pytest.mark.parametrize("wide", [False, True], ids=["one_block", "multi_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_triton_norm_kernels_match_reference(case, dtype, wide, monkeypatch):
    """The Triton forward and backward in the interpreter against the reference and autograd
    through it; `multi_block` lowers the one-block limit so the wide-row path runs."""
    from fusedopt.kernels import norm as triton_norm

    if wide:
        monkeypatch.setattr(triton_norm, "MAX_BLOCK_N", 16)
    rows, n, rms, has_weight, has_bias, has_residual, residual_in_fp32, zero_centered = case
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(rows, n, generator=generator) + 0.5).to(dtype)
    weight = torch.randn(n, generator=generator).to(dtype) if has_weight else None
    bias = torch.randn(n, generator=generator).to(dtype) if has_bias else None
    residual = torch.randn(rows, n, generator=generator).to(dtype) if has_residual else None
    eps = 1e-5
    y, residual_out, mean, rstd = triton_norm.norm_fwd(
        x, residual, weight, bias, eps, rms, zero_centered, residual_in_fp32)

    leaves = [None if t is None else leaf(t) for t in (x, weight, bias, residual)]
    out = fusedopt.reference._norm(leaves[0], leaves[1], leaves[2], eps, rms=rms,
                                   residual=leaves[3], residual_in_fp32=residual_in_fp32,
                                   zero_centered_weight=zero_centered)
    y_ref, s_ref = out if has_residual else (out, None)
    atol, rtol = NORM_TOLERANCES[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    if has_residual:
        torch.testing.assert_close(residual_out, s_ref.detach(), atol=0, rtol=0)

    dy = torch.randn(rows, n, generator=generator).to(dtype)
    ds = torch.randn(rows, n, generator=generator).to(residual_out.dtype) if has_residual else None
    loss = (y_ref.float() * dy.float()).sum()
    if has_residual:
        loss = loss + (s_ref.float() * ds.float()).sum()
    if rows:
        loss.backward()
    dx, dweight, dbias = triton_norm.norm_bwd(
        dy, ds, residual_out if has_residual else x, weight, bias, mean, rstd, rms,
        zero_centered)
    scale = (1 + rows) ** 0.5
    if rows:
        torch.testing.assert_close(dx.float(), leaves[0].grad.float(), atol=atol * 4,
                                   rtol=rtol * 4)
    for got, t in ((dweight, leaves[1]), (dbias, leaves[2])):
        if t is not None:
            want = t.grad if t.grad is not None else torch.zeros_like(t)
            torch.testing.assert_close(got.float(), want.float(), atol=atol * 4 * scale,
                                       rtol=rtol * 4)


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_fp64_modules_pass_gradcheck_and_gradgradcheck(module, backend):
    """fp64 storage gets fp64 math (never fp32), so torch's finite-difference checks pass."""
    norm = getattr(fusedopt, module)(13, dtype=torch.float64, backend=backend)
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    x = (torch.randn(3, 13, dtype=torch.float64) + 0.5).requires_grad_(True)
    inputs = (x, *norm.parameters())

    def fn(x, *params):
        return torch.func.functional_call(norm, dict(zip(("weight", "bias"), params)), (x,))

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    theirs = getattr(torch.nn, module)(13, dtype=torch.float64)
    theirs.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), theirs(x), atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("residual", [False, True])
def test_fp64_residual_norm_is_fp64(residual, backend):
    x = torch.randn(4, 33, dtype=torch.float64) + 0.2
    res = torch.randn(4, 33, dtype=torch.float64) if residual else None
    weight = torch.randn(33, dtype=torch.float64)
    out = functional.layer_norm(x, (33,), weight, None, residual=res, residual_in_fp32=True,
                                backend=backend)
    y, s = out if residual else (out, x)
    assert s.dtype == torch.float64
    expected = torch.nn.functional.layer_norm(x if res is None else x + res, (33,), weight)
    torch.testing.assert_close(y, expected, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("weight_dtype", [None, torch.float32, torch.complex64])
def test_complex_rms_norm_matches_torch(weight_dtype, backend):
    """torch's rms_norm takes complex input (x * rsqrt(mean(x * x) + eps), no conjugate):
    values and the grads of x and weight, against torch in complex128."""
    x = torch.randn(5, 2, 24, dtype=torch.complex64) + 0.3
    weight = None if weight_dtype is None else torch.randn(24, dtype=weight_dtype)
    ours_x = leaf(x)
    ours_w = None if weight is None else leaf(weight)
    ref_x = leaf(x.to(torch.complex128))
    ref_w = None if weight is None else leaf(weight.to(torch.promote_types(weight.dtype,
                                                                          torch.float64)))
    y = functional.rms_norm(ours_x, (24,), ours_w, backend=backend)
    y_ref = torch.nn.functional.rms_norm(ref_x, (24,), ref_w, eps=torch.finfo(torch.float32).eps)
    assert y.dtype == torch.complex64
    torch.testing.assert_close(y.to(torch.complex128), y_ref, atol=2e-5, rtol=2e-5)
    grad_y = torch.randn(y.shape, dtype=torch.complex128)
    (y.to(torch.complex128) * grad_y).real.sum().backward()
    (y_ref * grad_y).real.sum().backward()
    torch.testing.assert_close(ours_x.grad.to(torch.complex128), ref_x.grad, atol=1e-4,
                               rtol=1e-4)
    if weight is not None:
        assert ours_w.grad.dtype == weight.dtype
        torch.testing.assert_close(ours_w.grad.to(ref_w.dtype), ref_w.grad, atol=1e-4, rtol=1e-4)
    module = fusedopt.RMSNorm(24, dtype=torch.complex64, backend=backend)
    theirs = torch.nn.RMSNorm(24, dtype=torch.complex64)
    torch.testing.assert_close(module(x), theirs(x), atol=2e-5, rtol=2e-5)


def rejected_inputs(kind):
    """(x, normalized_shape, weight, bias) that torch's norm rejects."""
    x = torch.randn(3, 5)
    cases = [
        (x, (), None, None),  # empty normalized_shape
        (x, (4,), None, None),  # does not fit x
        (torch.randn(5), (3, 5), None, None),  # more dims than x
        (x, (5,), torch.randn(1, 5), None),  # weight with an extra dim
        (x, (5,), torch.randn(4), None),  # weight of the wrong size
        (torch.randint(0, 3, (3, 5)), (5,), None, None),  # integers
    ]
    if kind == "layer":
        cases += [
            (x, (5,), torch.randn(5), torch.randn(4)),  # bias of the wrong size
            (x, (5,), torch.randn(5, dtype=torch.float64), None),  # fp32 x, fp64 weight
            (torch.randn(3, 5, dtype=torch.complex64), (5,), None, None),  # complex LayerNorm
        ]
    return cases


@pytest.mark.parametrize("backend", norm_backends())
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_every_input_torch_rejects_raises_torch_error(kind, backend):
    for x, shape, weight, bias in rejected_inputs(kind):
        with pytest.raises(Exception) as theirs:
            torch_norm(kind, x, shape, weight, bias, 1e-5)
        with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
            ours_norm(kind, x, shape, weight, bias, 1e-5, backend)
