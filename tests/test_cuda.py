"""GPU backends (Triton, CUDA C++) against torch.optim (Lion: fusedopt.reference) on CUDA tensors;
skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES
from test_compile import recording
from test_lion import CASES as LION_CASES
from test_sgd import CASES as SGD_CASES

import fusedopt

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible")]


def gpu_backends() -> list:
    available = fusedopt.backends()
    return [pytest.param(name, marks=pytest.mark.skipif(not available[name]["available"],
                                                        reason=available[name]["reason"]))
            for name in ("triton", "cuda")]


SHAPES = [(1,), (3,), (41,), (769,), (4097,), (65537,), (300, 1000), (0,)]
CASES = [{}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.1},
         {"lr": "tensor", "capturable": True}]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gpu_lr(kwargs: dict) -> dict:
    """kwargs with lr="tensor" made a 1-element float32 CUDA tensor, else lr defaulting to 1e-2."""
    lr = kwargs.get("lr", 1e-2)
    return {**kwargs, "lr": torch.tensor(1e-2, device="cuda") if lr == "tensor" else lr}


def run_on_gpu(make_ours, make_theirs, dtype: torch.dtype, oracle_dtype=torch.float64):
    """Seven steps of fusedopt on CUDA params of `dtype` (SHAPES) and of the oracle on copies in
    oracle_dtype, over the same fresh non-zero-mean grads (rounded to `dtype` first)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator).to(dtype))
              for s in SHAPES]
    twins = [torch.nn.Parameter(p.detach().to(oracle_dtype, copy=True)) for p in params]
    ours, theirs = make_ours(params), make_theirs(twins)
    for _ in range(7):
        for p, t in zip(params, twins):
            grad = (torch.randn(p.shape, device="cuda", generator=generator) + 0.5).to(dtype)
            p.grad, t.grad = grad, grad.to(oracle_dtype, copy=True)
        ours.step()
        theirs.step()
    return params, twins, ours, theirs


def assert_gpu_state_matches(params, twins, ours, theirs, dtype: torch.dtype) -> None:
    """Params and every state entry of the oracle (the same keys) within TOLERANCES[dtype]; a
    step counter stays on its param's device and counts as the oracle's."""
    atol, rtol = TOLERANCES[dtype]
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach().double(), t.detach().double(), atol=atol, rtol=rtol)
        assert set(ours.state[p]) == set(theirs.state[t])
        for key, value in theirs.state[t].items():
            if key == "step":
                assert ours.state[p][key].device == p.device
                assert ours.state[p][key].item() == value.item()
            else:
                torch.testing.assert_close(ours.state[p][key].double(), value.double(),
                                           atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(kw) or "defaults")
@pytest.mark.parametrize("optimizer_cls", ["AdamW", "Adam"])
def test_gpu_steps_match_torch(optimizer_cls, kwargs, backend, dtype):
    kwargs = gpu_lr(dict(kwargs, weight_decay=kwargs.get("weight_decay", 0.05)))
    fused_only = {"capturable": kwargs.pop("capturable")} if "capturable" in kwargs else {}
    results = run_on_gpu(
        lambda ps: getattr(fusedopt, optimizer_cls)(ps, **kwargs, **fused_only, backend=backend),
        lambda ps: getattr(torch.optim, optimizer_cls)(ps, **kwargs, foreach=False), dtype)
    assert_gpu_state_matches(*results, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("case_id,kwargs", SGD_CASES, ids=[c[0] for c in SGD_CASES])
def test_gpu_sgd_steps_match_torch(case_id, kwargs, backend, dtype):
    """tests/test_sgd.py's cases against torch.optim.SGD in fp64 (a CUDA lr tensor for
    "tensor_lr")."""
    kwargs = gpu_lr(kwargs)
    results = run_on_gpu(lambda ps: fusedopt.SGD(ps, **kwargs, backend=backend),
                         lambda ps: torch.optim.SGD(ps, **kwargs, foreach=False), dtype)
    assert_gpu_state_matches(*results, dtype)


# tests/test_lion.py's cases, plus the options lion-pytorch lacks (there tested on CPU only).
GPU_LION_CASES = [*LION_CASES,
                  ("maximize_tensor_lr", {"maximize": True, "weight_decay": 0.1, "lr": "tensor"})]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("case_id,kwargs", GPU_LION_CASES, ids=[c[0] for c in GPU_LION_CASES])
def test_gpu_lion_steps_match_reference(case_id, kwargs, backend, dtype):
    """Against fusedopt.reference.lion on copies of the same dtype: sign() turns a rounding of
    beta1 * exp_avg + (1 - beta1) * grad across zero into a full lr step, so an fp64 oracle
    (lion-pytorch in fp64, as on CPU) would differ wherever that sum is within rounding of zero,
    which over these sizes is likely; the reference rounds where the kernels do (no FMA on any
    backend, docs/numerics.md), so the signs agree."""
    kwargs = gpu_lr(kwargs)
    results = run_on_gpu(lambda ps: fusedopt.Lion(ps, **kwargs, backend=backend),
                         lambda ps: fusedopt.Lion(ps, **kwargs, backend="reference"), dtype,
                         oracle_dtype=dtype)
    assert_gpu_state_matches(*results, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_grad_scaler_matches_torch_fused(backend):
    results = []
    for make in (lambda ps: fusedopt.AdamW(ps, lr=1e-2, backend=backend),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (7, 3000)]
        optimizer, scaler = make(params), torch.amp.GradScaler("cuda", init_scale=2.0**8)
        for step in range(5):
            optimizer.zero_grad()
            scaler.scale(sum((p * p).sum() for p in params)).backward()
            if step == 2:
                params[1].grad[3] = float("inf")
            scaler.step(optimizer)
            scaler.update()
        results.append([p.detach() for p in params] + [optimizer.state[params[0]]["step"]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def captured_step(ours, eager) -> torch.cuda.CUDAGraph:
    """ours.step() recorded into a CUDA graph, after two warm-up steps of ours and eager on a side
    stream (state allocation and kernel compilation stay outside the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            ours.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours.step()
    return graph


@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_step_captures_in_a_cuda_graph(backend):
    """No host sync inside the step: it records into a CUDA graph and replays like eager steps."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (5, 70000)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    lr = torch.tensor(1e-2, device="cuda")
    ours = fusedopt.AdamW(params, lr=lr, capturable=True, backend=backend)
    eager = fusedopt.AdamW(twins, lr=1e-2, backend=backend)
    graph = captured_step(ours, eager)
    for _ in range(3):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, atol=1e-6, rtol=1e-5)
    assert ours.state[params[0]]["step"].item() == 5


# Lean-state options for the captured step: (id, param dtype, options); the lean kernels are
# Triton's only (there is no CUDA C++ one).
LEAN_CAPTURES = [("plain", torch.float32, {}),
                 ("8bit", torch.float32, {"state_dtype": torch.uint8}),
                 ("bf16-compact-8bit", torch.bfloat16,
                  {"state_dtype": torch.uint8, "master_weights": "compact"}),
                 ("bf16-stochastic", torch.bfloat16, {"stochastic_rounding": True})]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("optimizer_cls", ["AdamW", "Lion"])
@pytest.mark.parametrize("case_id,dtype,options", LEAN_CAPTURES,
                         ids=[c[0] for c in LEAN_CAPTURES])
def test_gpu_captured_step_follows_an_lr_schedule_and_clips(optimizer_cls, backend, case_id,
                                                            dtype, options):
    """A step captured once replays correctly while an LR scheduler changes the device lr
    between replays (filled in place) and new grads of changing norm are copied into the
    captured ones, with max_grad_norm clipping inside the graph: as eager steps with a float lr.
    With lean states too (8-bit moments, compact masters, stochastic rounding, whose random bits
    hash the device step, so each replay draws anew as the eager steps do)."""
    if options and backend != "triton":
        pytest.skip("the lean kernels are Triton's")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda").to(dtype)) for n in (5, 70000)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = getattr(fusedopt, optimizer_cls)
    ours = make(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True,
                max_grad_norm=50.0, backend=backend, **options)
    # bf16 params round their updates: the eager twin reads the same fp32 tensor lr, so that an
    # lr one fp32 ulp apart cannot tip a rounding.
    eager_lr = torch.tensor(1e-2, device="cuda") if dtype == torch.bfloat16 else 1e-2
    eager = make(twins, lr=eager_lr, max_grad_norm=50.0, backend=backend, **options)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8) for opt in (ours, eager)]

    def new_grads(scale: float) -> None:
        for p, t in zip(params, twins):
            grad = torch.randn_like(p) * scale
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)  # the captured graph reads these very tensors
            t.grad = grad

    new_grads(1.0)
    graph = captured_step(ours, eager)
    lrs = []
    for scale in (0.01, 1.0, 3.0, 0.5, 2.0):  # grad norms ~2.6 to ~800: clipped at some steps
        for schedule in schedules:
            schedule.step()
        lrs.append(ours.param_groups[0]["lr"].item())
        assert lrs[-1] == pytest.approx(float(eager.param_groups[0]["lr"]))
        new_grads(scale)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert len(set(lrs)) == len(lrs)  # the schedule moved the lr at every replay
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p.grad, t.grad, atol=1e-6, rtol=1e-5)


needs_gpu_norm = pytest.mark.skipif(
    not fusedopt._ops.has_kernel("fusedopt::norm_fwd", "CUDA"),
    reason="the Triton norm kernels are not registered (they need a GPU and triton)")
GPU_NORM_SHAPES = [((7, 1), (1,)), ((4, 41), (41,)), ((3, 2, 769), (769,)),
                   ((2, 4097), (4097,)), ((3, 4, 6), (4, 6)), ((0, 16), (16,)),
                   ((64, 16384), (16384,)), ((3, 262147), (262147,))]


@needs_gpu_norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("x_shape,shape", GPU_NORM_SHAPES, ids=[str(s[0]) for s in GPU_NORM_SHAPES])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gpu_norms_match_torch(kind, x_shape, shape, dtype):
    """The Triton norms (one block and the wide-row path) through the functional API, against
    torch in fp64: outputs and every grad, with and without a fused residual."""
    from test_norm import check_against_torch

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(x_shape, generator=generator, device="cuda") * 2 + 0.5).to(dtype)
    weight = (torch.randn(shape, generator=generator, device="cuda") + 1).to(dtype)
    bias = None if kind == "rms" else torch.randn(shape, device="cuda").to(dtype)
    check_against_torch(kind, x, shape, weight, bias, "auto")
    check_against_torch(kind, x, shape, weight, bias, "auto", residual=torch.randn_like(x),
                        residual_in_fp32=True)


@needs_gpu_norm
@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_gpu_modules_under_autocast_match_torch(module):
    """CUDA autocast runs torch's norms in fp32: same output dtype, values and grads."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, device="cuda")
    theirs = getattr(torch.nn, module)(96, device="cuda")
    ours = getattr(fusedopt, module)(96, device="cuda")
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(33, 64, device="cuda")
    results = []
    for norm in (ours, theirs):
        linear.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = norm(linear(x))
        y.pow(2).sum().backward()
        results.append((y, norm.weight.grad, linear.weight.grad))
    # y and the norm's weight grad are fp32 from the same bf16 activations; the linear's grad
    # passes through bf16 matmuls.
    for a, b, tolerance in zip(*results, (1e-4, 1e-4, 2e-2)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


@needs_gpu_norm
def test_gpu_compiled_model_with_norms_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), fusedopt.LayerNorm(256),
                                torch.nn.GELU(), torch.nn.Linear(256, 256),
                                fusedopt.RMSNorm(256)).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(64, 16, device="cuda")
    torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


# (id, param dtype, fusedopt.AdamW options) for the compiled GPU step.
COMPILED_STEPS = [("plain", torch.float32, {}),
                  ("bf16-compact-8bit", torch.bfloat16,
                   {"state_dtype": torch.uint8, "master_weights": "compact"})]


@pytest.mark.parametrize("case_id,dtype,options", COMPILED_STEPS,
                         ids=[c[0] for c in COMPILED_STEPS])
def test_gpu_compiled_step_matches_eager(case_id, dtype, options):
    """torch.compile(optimizer.step) (inductor) on CUDA tensors, the Triton kernels inside the
    graph: the eager params after 5 steps with a scheduled tensor lr, lean states included."""
    results, graphs = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(),
                                    torch.nn.Linear(96, 3)).to("cuda", dtype)
        optimizer = fusedopt.AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"),
                                   backend="triton", **options)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=5)
        step = optimizer.step
        if compiled:
            backend, graphs = recording("inductor")
            step = torch.compile(optimizer.step, backend=backend)
        generator = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            optimizer.zero_grad()
            x = torch.randn(4, 64, device="cuda", generator=generator, dtype=dtype)
            model(x).float().square().sum().backward()
            step()
            scheduler.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert any("triton_kernel_wrapper" in target for target in targets), targets


MUON_SHAPES = [(5, 7), (13, 3), (64, 64), (300, 1000), (1000, 300), (2, 3, 3, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_muon_matches_torch_muon(dtype):
    """fusedopt.Muon's Triton path (symmetric NS kernels, elementwise stages on the shared
    driver) against torch.optim.Muon's bf16 step on CUDA, 2-D params; the 4-D conv kernel against
    fusedopt's own reference."""
    from fusedopt.optim.muon import adjusted_lr

    generator = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator).to(dtype))
              for s in MUON_SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    matrices = [(p, t) for p, t in zip(params, twins) if p.ndim == 2]
    ours = fusedopt.Muon(params, lr=0.02, backend="triton")
    theirs = torch.optim.Muon([t for _, t in matrices], lr=0.02)
    reference = fusedopt.Muon([t for t in twins if t.ndim != 2], lr=0.02, backend="reference",
                              ns_dtype=torch.bfloat16)
    for _ in range(4):
        for p, t in zip(params, twins):
            grad = (torch.randn(p.shape, device="cuda", generator=generator) + 0.1).to(dtype)
            p.grad, t.grad = grad, grad.clone()
        ours.step()
        theirs.step()
        reference.step()
    for p, t in zip(params, twins):
        tolerance = 0.1 * 1.5 * 4 * adjusted_lr(0.02, None, p.shape)
        if dtype == torch.bfloat16:
            tolerance += 4 * 2**-8 * t.detach().abs().max().item()
        assert (p.detach().double() - t.detach().double()).abs().max().item() <= tolerance
