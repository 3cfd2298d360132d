"""fusedopt.Muon against torch.optim.Muon (numbers, state, errors, checkpoints both ways), its
Newton-Schulz implementations against an fp64 one, and what it adds: N-D weights, batching,
coefficient schedules, whole-model training with AdamW inside."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt import functional, reference
from fusedopt.optim.muon import NS_SCHEDULES, adjusted_lr, default_ns_dtype, ns_schedule
from tests.conftest import cpu_backend_params

torch_muon = getattr(torch.optim, "Muon", None)  # torch >= 2.9
pytestmark = pytest.mark.skipif(torch_muon is None, reason="this torch has no torch.optim.Muon")

BACKENDS = cpu_backend_params()
QUINTIC = NS_SCHEDULES["quintic"] * 5
# Wide, tall, square, one row, odd sizes.
SHAPES = [(5, 7), (13, 3), (16, 16), (1, 9), (33, 20)]
STEPS = 4

# The argument combinations of torch's own tests for Muon (optim_inputs_func_muon), plus the
# switches they leave at their defaults.
CASES = [
    pytest.param({}, id="default"),
    pytest.param({"lr": 0.01}, id="lr"),
    pytest.param({"lr": torch.tensor(0.001)}, id="tensor_lr"),
    pytest.param({"weight_decay": 0.2}, id="weight_decay"),
    pytest.param({"momentum": 0.8}, id="momentum"),
    pytest.param({"ns_steps": 6}, id="ns_steps"),
    pytest.param({"ns_coefficients": (3.4, -4.7, 2.0)}, id="ns_coefficients"),
    pytest.param({"nesterov": False}, id="no_nesterov"),
    pytest.param({"momentum": 0.3}, id="small_momentum"),  # the other lerp formula
    pytest.param({"adjust_lr_fn": "match_rms_adamw", "lr": 0.01}, id="match_rms_adamw"),
    pytest.param({"adjust_lr_fn": "original"}, id="original"),
    pytest.param({"adjust_lr_fn": "spectral_unclamped", "lr": 0.01}, id="spectral_unclamped"),
]


def torch_takes(kwargs: dict) -> bool:
    """Whether this torch's Muon accepts kwargs (torch 2.13 lacks "spectral_unclamped")."""
    try:
        torch_muon([torch.zeros(2, 2, requires_grad=True)], **copy.deepcopy(kwargs))
    except ValueError:
        return False
    return True


def on(backend: str) -> dict:
    """Muon's backend keywords for a test: Triton's interpreter gets an fp32 Newton-Schulz (its
    bf16 arithmetic is not trustworthy: the iteration returns NaN there)."""
    return {"backend": backend, **({"ns_dtype": torch.float32} if backend == "triton" else {})}


def make_params(shapes, dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator, dtype=torch.float64) + 0.3).to(dtype)
            .requires_grad_() for shape in shapes]


def set_grads(params, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator, dtype=torch.float64) + 0.1).to(p.dtype)


def run(optimizer_class, params, steps=STEPS, **kwargs):
    optimizer = optimizer_class(params, **kwargs)
    for step in range(steps):
        set_grads(params, step)
        optimizer.step()
    return optimizer


def bf16_ns_tolerance(kwargs: dict, shape, steps: int) -> float:
    """How far two correct bf16 Newton-Schulz runs may put a param apart after `steps` steps:
    each step moves it by adjusted_lr * O with |O| below ~1.5, and bf16's 8-bit mantissa leaves
    O's entries a few percent apart (measured: at most ~4% of the largest; 10% allowed)."""
    lr = float(kwargs.get("lr", 1e-3))
    return 0.1 * 1.5 * steps * adjusted_lr(lr, kwargs.get("adjust_lr_fn"), torch.Size(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", CASES)
def test_matches_torch_muon_over_several_steps(kwargs, backend):
    if not torch_takes(kwargs):
        pytest.skip(f"torch {torch.__version__}'s Muon does not take {kwargs}")
    ours = make_params(SHAPES)
    theirs = make_params(SHAPES)
    ours_opt = run(fusedopt.Muon, ours, **on(backend), **copy.deepcopy(kwargs))
    theirs_opt = run(torch_muon, theirs, **copy.deepcopy(kwargs))
    for p, q, shape in zip(ours, theirs, SHAPES):
        tolerance = bf16_ns_tolerance(kwargs, shape, STEPS)
        assert (p - q).abs().max().item() <= tolerance, shape
        # The momentum buffers take no Newton-Schulz: fp32 arithmetic, ulps apart.
        torch.testing.assert_close(ours_opt.state[p]["momentum_buffer"],
                                   theirs_opt.state[q]["momentum_buffer"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_newton_schulz_is_the_reference_update(backend):
    """With ns_dtype=fp32 every backend takes the reference's steps, to fp32 rounding."""
    ours = make_params(SHAPES)
    expected = make_params(SHAPES)
    run(fusedopt.Muon, ours, backend=backend, ns_dtype=torch.float32, lr=0.02)
    run(fusedopt.Muon, expected, backend="reference", ns_dtype=torch.float64, lr=0.02)
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4)


def ns_fp64(x: torch.Tensor, coefficients) -> torch.Tensor:
    """Newton-Schulz written out in fp64, matrix by matrix: the yardstick."""
    out = []
    for m in x.double():
        tall = m.shape[0] > m.shape[1]
        m = m.T if tall else m
        m = m / m.norm().clamp(min=1e-7)
        for a, b, c in coefficients:
            gram = m @ m.T
            m = a * m + (b * gram + c * gram @ gram) @ m
        out.append(m.T if tall else m)
    return torch.stack(out)


# Odd sizes, wide and tall, batches; the last three large enough that the C++ iteration splits
# its symmetric products (an odd row count: halves of 256 and 257 rows). On a multi-core CPU the
# batches run whole matrices per thread (splitting at smaller sizes there: (2, 260, 600) and the
# odd-rowed (3, 301, 560), whose third matrix runs alone on all threads).
NS_SHAPES = [(1, 5, 7), (3, 17, 40), (2, 40, 17), (1, 300, 300), (2, 260, 600), (1, 1, 9),
             (3, 301, 560), (1, 513, 520), (1, 700, 460)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("shape", NS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_newton_schulz_matches_fp64(shape, dtype, backend):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the interpreter runs fp32 here (bf16 arithmetic in it is not trustworthy; "
                    "the Triton kernels take no fp64)")
    if backend == "triton" and shape[1] * shape[2] > 20000:
        pytest.skip("too slow in Triton's interpreter")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.2
    expected = ns_fp64(x, QUINTIC)
    got = functional.newton_schulz(x, QUINTIC, 1e-7, dtype, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    # Entries of an orthogonal factor are O(1 / sqrt(cols)); the error is a dtype's rounding,
    # grown over 15 products (bf16: a few percent of the largest entry; at most 5.2% measured, the
    # reference's at 3x301x560).
    atol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 0.06}[dtype]
    scale = expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() <= atol * scale


def quintic_map(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    for _ in range(steps):
        s = 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5
    return s


@pytest.mark.parametrize("backend", BACKENDS)
def test_singular_values_lie_in_the_band_of_the_coefficients(backend):
    """NS maps each singular value s of X / ||X||_F through the scalar polynomial; for inputs
    with s in [lo, hi], the output's lie in the band that map takes [lo, hi] to."""
    n, rows = 24, 16
    generator = torch.Generator().manual_seed(7)
    q1, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=generator))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    s = torch.linspace(1.0, 10.0, rows, dtype=torch.float64)
    x = (q1 @ torch.diag(s) @ q2[:rows]).unsqueeze(0)
    normalized = s / s.norm()
    grid = torch.linspace(normalized.min().item(), normalized.max().item(), 10001,
                          dtype=torch.float64)
    band = quintic_map(grid)
    dtype = torch.float32 if backend == "triton" else torch.bfloat16
    out = functional.newton_schulz(x.float(), QUINTIC, 1e-7, dtype, backend=backend)
    sv = torch.linalg.svdvals(out[0].double())
    # bf16 rounding moves them: by at most 0.041 over 40 random orthogonal factors (measured).
    slack = 0.06 if dtype == torch.bfloat16 else 1e-4
    assert band.min().item() - slack <= sv.min().item()
    assert sv.max().item() <= band.max().item() + slack
    # and each singular value is its own image under the map
    torch.testing.assert_close(sv.sort().values, quintic_map(normalized).sort().values,
                               atol=slack, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_kernel_takes_exactly_the_update_of_its_flattened_matrix(backend):
    conv = make_params([(6, 3, 3, 3)])[0]
    flat = conv.detach().reshape(6, 27).clone().requires_grad_()
    conv_opt = fusedopt.Muon([conv], **on(backend), lr=0.02)
    flat_opt = fusedopt.Muon([flat], **on(backend), lr=0.02)
    for step in range(3):
        set_grads([conv], step)
        flat.grad = conv.grad.reshape(6, 27).clone()
        conv_opt.step()
        flat_opt.step()
    assert torch.equal(conv.detach().reshape(6, 27), flat.detach())
    assert torch.equal(conv_opt.state[conv]["momentum_buffer"].reshape(6, 27),
                       flat_opt.state[flat]["momentum_buffer"])
    # The shape factor is that of the (6, 27) matrix: sqrt(max(1, 6 / 27)) = 1, not sqrt(6 / 3).
    assert adjusted_lr(1.0, None, conv.shape) == adjusted_lr(1.0, None, flat.shape) == 1.0
    assert adjusted_lr(1.0, "spectral_unclamped", conv.shape) == math.sqrt(6 / 27)
    assert adjusted_lr(1.0, "match_rms_adamw", conv.shape) == 0.2 * math.sqrt(27)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_one_at_a_time(backend):
    shapes = [(12, 20)] * 3 + [(20, 12)] * 2
    together = make_params(shapes)
    apart = make_params(shapes)
    together_opt = fusedopt.Muon(together, **on(backend))
    apart_opts = [fusedopt.Muon([p], **on(backend)) for p in apart]
    for step in range(STEPS):
        set_grads(together, step)
        for p, q in zip(apart, together):
            p.grad = q.grad.clone()
        together_opt.step()
        for opt in apart_opts:
            opt.step()
    for p, q in zip(together, apart):
        # A GEMM library may sum a batch of matrices in another order than one alone: at most
        # a bf16 ulp of an update element (|O| < 1.5) per step.
        atol = STEPS * adjusted_lr(1e-3, None, p.shape) * 1.5 * 2**-8
        torch.testing.assert_close(p, q, atol=atol, rtol=0)


def test_schedules_by_name_by_list_and_repeated():
    polar = NS_SCHEDULES["polar_express"]
    assert ns_schedule("polar_express", 5) == polar
    assert ns_schedule(list(polar), 7) == polar + (polar[-1],) * 2
    assert ns_schedule((3.4445, -4.775, 2.0315), 3) == ((3.4445, -4.775, 2.0315),) * 3
    with pytest.raises(ValueError, match="Number of steps must be less than 100"):
        ns_schedule("quintic", 100)
    with pytest.raises(ValueError, match="exactly 3 values"):
        ns_schedule((1.0, 2.0), 5)
    with pytest.raises(ValueError, match="Unknown Newton-Schulz schedule"):
        ns_schedule("cubic", 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_polar_express_orthogonalizes_better_than_the_quintic(backend):
    x = torch.randn(1, 32, 48, generator=torch.Generator().manual_seed(5))
    dtype = torch.float32
    deviation = {}
    for name in ("quintic", "polar_express"):
        out = functional.newton_schulz(x, ns_schedule(name, 5), 1e-7, dtype, backend=backend)
        deviation[name] = (torch.linalg.svdvals(out[0].double()) - 1).abs().max().item()
        expected = ns_fp64(x, ns_schedule(name, 5))
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0)
    assert deviation["polar_express"] < deviation["quintic"]


def test_default_ns_dtype_follows_the_machine():
    from fusedopt.optim.muon import _cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert default_ns_dtype(cpu, torch.float32) == (
        torch.bfloat16 if _cpu_has_native_bf16() else torch.float32)
    assert default_ns_dtype(torch.device("cuda"), torch.float32) == torch.bfloat16
    assert default_ns_dtype(cpu, torch.float64) == torch.float64


def test_checkpoints_move_both_ways_with_torch_muon():
    ours = make_params(SHAPES)
    theirs = make_params(SHAPES)
    ours_opt = run(fusedopt.Muon, ours, ns_dtype=torch.bfloat16)
    theirs_opt = run(torch_muon, theirs)
    # fusedopt -> torch: torch continues from our state; torch -> fusedopt likewise.
    into_torch = torch_muon([p.detach().clone().requires_grad_() for p in ours])
    into_torch.load_state_dict(ours_opt.state_dict())
    into_ours = fusedopt.Muon([p.detach().clone().requires_grad_() for p in theirs])
    into_ours.load_state_dict(theirs_opt.state_dict())
    for loaded, source in ((into_torch, ours_opt), (into_ours, theirs_opt)):
        for p, q in zip(loaded.param_groups[0]["params"], source.param_groups[0]["params"]):
            assert torch.equal(loaded.state[p]["momentum_buffer"], source.state[q]["momentum_buffer"])
    assert into_ours.param_groups[0]["use_muon"] is None  # our keys filled in on load
    for opt in (into_torch, into_ours):
        set_grads(opt.param_groups[0]["params"], STEPS)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_errors(backend):
    param = torch.rand(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="Adjust learning rate function arbitrary is not supported"):
        fusedopt.Muon([param], adjust_lr_fn="arbitrary")
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1"):
        fusedopt.Muon([param], lr=-1)
    with pytest.raises(ValueError, match="momentum should be >= 0 but is: -0.5"):
        fusedopt.Muon([param], momentum=-0.5)
    with pytest.raises(ValueError, match="weight decay should be >= 0 but is: -0.1"):
        fusedopt.Muon([param], weight_decay=-0.1)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        fusedopt.Muon([param], lr=torch.tensor([0.1, 0.2]))
    complex_param = torch.rand(2, 3, dtype=torch.complex64, requires_grad=True)
    complex_param.grad = torch.rand_like(complex_param)
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        fusedopt.Muon([complex_param], backend=backend).step()
    sparse = torch.rand(4, 3, requires_grad=True)
    sparse.grad = torch.rand(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="Muon does not support sparse gradients"):
        fusedopt.Muon([sparse], backend=backend).step()
    with pytest.raises(ValueError, match="Number of steps must be less than 100"):
        param.grad = torch.rand_like(param)
        fusedopt.Muon([param], ns_steps=100, backend=backend).step()
    bias = torch.rand(3, requires_grad=True)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        fusedopt.Muon([{"params": [bias], "use_muon": True}])
    optimizer = fusedopt.Muon([param])
    with pytest.raises(ValueError, match="2 or more dimensions"):
        optimizer.add_param_group({"params": [bias], "use_muon": True})
    assert len(optimizer.param_groups) == 1  # the bad group was not kept


class TinyTransformer(nn.Module):
    """A 2-layer character transformer: embeddings, attention, MLP, norms, a head."""

    def __init__(self, vocab=29, width=32, layers=2, context=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = fusedopt.RMSNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def lm_batch(step: int, vocab=29, context=16):
    generator = torch.Generator().manual_seed(step % 4)  # a few batches, seen again: loss falls
    tokens = torch.randint(0, vocab, (8, context + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def lm_steps(model, optimizer, steps):
    losses = []
    for step in steps:
        inputs, targets = lm_batch(step)
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("grouping", ["whole_model", "param_groups"])
def test_whole_model_training_and_state_dict_round_trip(grouping, tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    make = (lambda m: fusedopt.Muon(m.parameters(), lr=0.02)) if grouping == "whole_model" else (
        lambda m: fusedopt.Muon(fusedopt.muon_param_groups(m, adamw_lr=1e-2), lr=0.02))
    optimizer = make(model)
    losses = lm_steps(model, optimizer, range(30))
    assert losses[-1] < 0.7 * losses[0]
    # Both kinds of state: matrices keep a momentum buffer, vectors (and in param_groups,
    # embeddings and the head) AdamW's.
    kinds = {tuple(sorted(s)) for s in optimizer.state.values()}
    assert kinds == {("momentum_buffer",), ("exp_avg", "exp_avg_sq", "step")}
    if grouping == "param_groups":
        assert "exp_avg" in optimizer.state[model.embed.weight]
        assert "exp_avg" in optimizer.state[model.head.weight]

    # Save, load into a fresh model and optimizer, and continue: the same as not stopping.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = TinyTransformer()
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(saved["optim"])
    continued = lm_steps(model, optimizer, range(30, 33))
    assert lm_steps(resumed_model, resumed, range(30, 33)) == continued
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_muon_param_groups_for_a_transformer_and_a_convnet():
    model = TinyTransformer()
    muon, adamw = fusedopt.muon_param_groups(model, adamw_lr=1e-3, adamw_weight_decay=0.0)
    assert muon["use_muon"] is True and adamw["use_muon"] is False
    assert adamw["lr"] == 1e-3 and adamw["weight_decay"] == 0.0
    ids = {id(p) for p in muon["params"]}
    assert all(p.ndim >= 2 for p in muon["params"])
    for p in (model.embed.weight, model.position.weight, model.head.weight, model.head.bias,
              model.norm.weight):
        assert id(p) not in ids
    assert id(model.blocks[0].linear1.weight) in ids
    assert len(muon["params"]) + len(adamw["params"]) == len(list(model.parameters()))

    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    muon, adamw = fusedopt.muon_param_groups(convnet)
    assert [p.shape for p in muon["params"]] == [(8, 3, 3, 3), (8, 8, 3, 3)]
    assert id(convnet[-1].weight) in {id(p) for p in adamw["params"]}
    optimizer = fusedopt.Muon([muon, adamw], lr=0.02)
    images = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        optimizer.zero_grad()
        convnet(images).square().mean().backward()
        optimizer.step()
    assert set(optimizer.state[convnet[0].weight]) == {"momentum_buffer"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_other_param_dtypes(dtype):
    """fp64 params orthogonalize in fp64 by default (the reference to fp64 rounding); bf16
    params train with the update stored once, rounded."""
    ours = make_params(SHAPES, dtype)
    expected = make_params(SHAPES, dtype)
    run(fusedopt.Muon, ours, lr=0.02)
    run(fusedopt.Muon, expected, lr=0.02, backend="reference",
        ns_dtype=torch.float64 if dtype == torch.float64 else torch.bfloat16)
    for p, q, shape in zip(ours, expected, SHAPES):
        if dtype == torch.float64:
            torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
        else:  # bf16 params: a bf16 ulp of the param, plus NS differences
            atol = bf16_ns_tolerance({"lr": 0.02}, shape, STEPS) + 2 * 2**-8 * q.abs().max().item()
            assert (p.double() - q.double()).abs().max().item() <= atol


def test_zero_size_and_strided_params():
    torch.manual_seed(0)
    params = [torch.zeros(0, 5, requires_grad=True),
              torch.randn(7, 4).T.contiguous().T.requires_grad_()]  # a transposed layout
    assert not params[1].is_contiguous()
    expected = [p.detach().clone().requires_grad_() for p in params]
    run(fusedopt.Muon, params, ns_dtype=torch.float32)
    run(fusedopt.Muon, expected, ns_dtype=torch.float32, backend="reference")
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_reference_muon_is_torch_muon_math():
    """The spec itself: reference.muon in bf16 NS on one matrix is torch.optim.Muon's step."""
    p = make_params([(6, 10)])[0]
    q = p.detach().clone().requires_grad_()
    set_grads([p], 0)
    q.grad = p.grad.clone()
    buf = torch.zeros_like(p)
    with torch.no_grad():
        reference.muon([p], [p.grad], [buf], lr=0.01, weight_decay=0.1, momentum=0.95,
                       nesterov=True, coefficients=QUINTIC, eps=1e-7,
                       adjusted_lr=adjusted_lr(0.01, None, p.shape), ns_dtype=torch.bfloat16)
    torch_muon([q], lr=0.01).step()
    assert (p - q).abs().max().item() <= bf16_ns_tolerance({"lr": 0.01}, p.shape, 1)
    assert math.isfinite(p.sum().item())


def test_compiled_step_equals_eager():
    """torch.compile(optimizer.step), as torch's tutorial compiles a step: the eager numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    compiled = fusedopt.Muon(model.parameters(), lr=0.02)
    eager = fusedopt.Muon(twin.parameters(), lr=0.02)
    step = torch.compile(compiled.step)
    x = torch.randn(8, 16)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(x).square().mean().backward()
        step()
        eager.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
