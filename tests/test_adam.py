"""fusedopt.Adam / AdamW against torch.optim.Adam / AdamW: numbers, state, checkpoints, errors."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import TOLERANCES, cpu_backend_params, skip_unsupported

import fusedopt

STEPS = 7
# Odd sizes, a 2-D shape, a zero-size param; the interpreter gets the same (they are small).
SHAPES = [(1,), (3,), (41,), (769,), (4097,), (7, 13), (0,)]

# One row per option combination: (id, kwargs for both optimizers, kwargs for fusedopt only).
CASES = [
    ("defaults", {}, {}),
    ("weight_decay", {"weight_decay": 0.1}, {}),
    ("amsgrad", {"amsgrad": True}, {}),
    ("maximize", {"maximize": True}, {}),
    ("tensor_lr", {"lr": "tensor"}, {}),
    ("capturable", {}, {"capturable": True}),  # torch's for-loop rejects CPU capturable
    ("all_options", {"weight_decay": 0.05, "amsgrad": True, "maximize": True}, {}),
    ("betas_eps", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.2}, {}),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            for shape in SHAPES]


def make_grads(params, step: int) -> list[torch.Tensor | None]:
    """Fresh random non-zero-mean grads; param 2 gets no grad on steps 2 and 5."""
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [(torch.randn(p.shape, generator=generator, dtype=torch.float64) + 0.5).to(p.dtype)
             for p in params]
    if step in (2, 5):
        grads[2] = None
    return grads


def resolve_lr(kwargs: dict, dtype=torch.float64) -> dict:
    kwargs = dict(kwargs)
    lr = kwargs.get("lr", 1e-2)
    kwargs["lr"] = torch.tensor(1e-2, dtype=torch.float32) if lr == "tensor" else lr
    return kwargs


def run_pair(optimizer_cls, case_kwargs, fused_only, backend, dtype):
    """Runs fusedopt on `dtype` params and torch (for-loop) on fp64 copies over the same grads;
    a frozen param is included and must stay untouched."""
    params = [torch.nn.Parameter(p) for p in make_params(dtype)]
    frozen = torch.nn.Parameter(torch.randn(5, dtype=dtype), requires_grad=False)
    frozen_before = frozen.detach().clone()
    reference = [torch.nn.Parameter(p.detach().to(torch.float64)) for p in params]
    kwargs = resolve_lr(case_kwargs)
    ours = getattr(fusedopt, optimizer_cls)(params + [frozen], **kwargs, **fused_only,
                                            backend=backend)
    theirs = getattr(torch.optim, optimizer_cls)(reference, **kwargs, foreach=False)
    for step in range(STEPS):
        for p, r, g in zip(params, reference, make_grads(params, step)):
            p.grad = g
            r.grad = None if g is None else g.to(torch.float64)
        ours.step()
        theirs.step()
    torch.testing.assert_close(frozen, frozen_before, atol=0, rtol=0)
    return params, reference, ours, theirs


def assert_same_state(params, reference, ours, theirs, dtype):
    atol, rtol = TOLERANCES[dtype]
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach().to(torch.float64), r.detach(), atol=atol, rtol=rtol)
        ours_state, theirs_state = ours.state[p], theirs.state[r]
        assert set(ours_state) == set(theirs_state)
        for key, value in theirs_state.items():
            if key == "step":
                assert ours_state[key].item() == value.item()
                assert ours_state[key].dtype == torch.float32
            else:
                assert ours_state[key].dtype == p.dtype
                torch.testing.assert_close(ours_state[key].to(torch.float64), value,
                                           atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("case_id,kwargs,fused_only", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("optimizer_cls", ["AdamW", "Adam"])
def test_steps_match_torch(optimizer_cls, case_id, kwargs, fused_only, backend, dtype):
    skip_unsupported(backend, dtype)
    if optimizer_cls == "Adam" and case_id != "betas_eps" and "weight_decay" not in kwargs:
        kwargs = {**kwargs, "weight_decay": 0.1}  # Adam differs from AdamW only with weight decay
    params, reference, ours, theirs = run_pair(optimizer_cls, kwargs, fused_only, backend, dtype)
    assert_same_state(params, reference, ours, theirs, dtype)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_low_precision_matches_torch_fused(backend):
    """bf16 / fp16 storage: same fp32 math and rounding as torch's fused step, so much tighter
    agreement than with the fp64 oracle."""
    for dtype in (torch.float16,) if backend == "triton" else (torch.bfloat16, torch.float16):
        params = [torch.nn.Parameter(p) for p in make_params(dtype)]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ours = fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
        theirs = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, fused=True)
        for step in range(STEPS):
            for p, t, g in zip(params, twins, make_grads(params, step)):
                p.grad, t.grad = g, None if g is None else g.clone()
            ours.step()
            theirs.step()
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        for p, t in zip(params, twins):
            torch.testing.assert_close(p.detach().float(), t.detach().float(), atol=2 * ulp,
                                       rtol=2 * ulp)


def test_complex_params_match_torch():
    param = torch.nn.Parameter(torch.randn(33, dtype=torch.complex64))
    twin = torch.nn.Parameter(param.detach().to(torch.complex128))
    ours = fusedopt.AdamW([param], lr=1e-2, amsgrad=True)
    theirs = torch.optim.AdamW([twin], lr=1e-2, amsgrad=True, foreach=False)
    for _ in range(STEPS):
        grad = torch.randn(33, dtype=torch.complex128) + 0.5
        param.grad, twin.grad = grad.to(torch.complex64), grad
        ours.step()
        theirs.step()
    torch.testing.assert_close(param.detach().to(torch.complex128), twin.detach(), atol=2e-6,
                               rtol=2e-5)
    assert ours.state[param]["exp_avg"].dtype == torch.complex64


def test_mixed_dtypes_and_layouts_in_one_group():
    """fp32 and bf16 params share a group; a transposed param and a non-dense param too."""
    torch.manual_seed(3)
    base = torch.randn(6, 10)
    params = [torch.nn.Parameter(torch.randn(17)),
              torch.nn.Parameter(torch.randn(9).to(torch.bfloat16)),
              torch.nn.Parameter(torch.randn(10, 6).t()),  # dense, transposed strides
              torch.nn.Parameter(base[:, ::2])]  # not dense: updated through a copy
    twins = [torch.nn.Parameter(p.detach().to(torch.float64)) for p in params]
    ours = fusedopt.AdamW(params, lr=1e-2)
    theirs = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    for _ in range(STEPS):
        for p, t in zip(params, twins):
            grad = torch.randn(p.shape, dtype=torch.float64) + 0.5
            p.grad, t.grad = grad.to(p.dtype), grad.to(p.dtype).to(torch.float64)
        ours.step()
        theirs.step()
    for p, t in zip(params, twins):
        atol, rtol = TOLERANCES[p.dtype]
        torch.testing.assert_close(p.detach().to(torch.float64), t.detach(), atol=atol, rtol=rtol)
    assert ours.state[params[2]]["exp_avg"].stride() == params[2].stride()


def train(optimizer, params, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) + 0.5
        optimizer.step()


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_moves_between_torch_and_fusedopt(direction):
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    first = [torch.nn.Parameter(torch.randn(n)) for n in (5, 129)]
    make_first, make_second = (torch.optim.AdamW, fusedopt.AdamW)
    if direction == "fusedopt_to_torch":
        make_first, make_second = make_second, make_first
    optimizer = make_first(first, **kwargs)
    train(optimizer, first, 3, seed=1)
    saved = copy.deepcopy(optimizer.state_dict())

    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = make_second(second, lr=1.0)  # the checkpoint's hyperparameters win
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 1e-2
    train(optimizer, first, 3, seed=2)
    train(resumed, second, 3, seed=2)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[a][key], resumed.state[b][key],
                                       atol=1e-6, rtol=1e-5)
    torch_keys = set(torch.optim.AdamW(first).state_dict()["param_groups"][0])
    assert set(fusedopt.AdamW(first).state_dict()["param_groups"][0]) == torch_keys | {"backend"}


def test_grad_scaler_unscales_and_skips_like_torch_fused():
    """GradScaler hands grad_scale / found_inf to the step: grads are unscaled inside it, a step
    with an inf grad changes nothing (params, state, step), and the scale backs off."""
    torch.manual_seed(4)
    results = []
    for make in (lambda ps: fusedopt.AdamW(ps, lr=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)):
        torch.manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300)]
        optimizer = make(params)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        snapshots = []
        for step in range(5):
            loss = sum((p * torch.linspace(-1, 2, p.numel())).sum() ** 2 for p in params)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            if step == 2:
                params[1].grad[3] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            snapshots.append([p.detach().clone() for p in params] +
                             [params[0].grad.clone(), optimizer.state[params[0]]["step"].clone()])
        results.append((snapshots, scaler.get_scale()))
    (ours, our_scale), (theirs, their_scale) = results
    assert our_scale == their_scale
    for a_step, b_step in zip(ours, theirs):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ours[2][-1].item() == ours[1][-1].item() == 2  # the inf step did not count
    torch.testing.assert_close(ours[2][0], ours[1][0], atol=0, rtol=0)


BAD_ARGUMENTS = [
    {"lr": -1.0},
    {"lr": float("nan")},
    {"eps": -1e-8},
    {"betas": (1.0, 0.999)},
    {"betas": (0.9, -0.1)},
    {"weight_decay": -0.1},
    {"betas": (torch.tensor(0.9), 0.999)},
    {"lr": torch.tensor([1e-3, 1e-3])},
    {"fused": True, "foreach": True},
    {"fused": True, "differentiable": True},
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=lambda kw: ",".join(kw))
@pytest.mark.parametrize("optimizer_cls", ["Adam", "AdamW"])
def test_bad_arguments_raise_torch_errors(optimizer_cls, kwargs):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, optimizer_cls)(params, **kwargs)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value))):
        getattr(fusedopt, optimizer_cls)(params, **kwargs)


def test_empty_params_and_sparse_grads_raise_torch_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        fusedopt.AdamW([])
    param = torch.nn.Parameter(torch.randn(4))
    param.grad = torch.randn(4).to_sparse()
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match=re.escape("Adam does not support sparse gradients")):
        fusedopt.AdamW([param]).step()
    torch.testing.assert_close(param.detach(), before, atol=0, rtol=0)


def test_differentiable_raises_and_unknown_backend_raises():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(RuntimeError, match="does not support `differentiable`"):
        fusedopt.Adam(params, differentiable=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedopt.Adam(params, backend="numpy")


def test_unavailable_backend_raises_with_reason():
    param = torch.nn.Parameter(torch.randn(3))
    param.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="runs on cuda tensors"):
        fusedopt.AdamW([param], backend="cuda").step()


def test_param_groups_closure_hooks_scheduler_and_deepcopy_behave_like_torch():
    def build(make):
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        optimizer = make([{"params": model[0].parameters(), "lr": 3e-2, "weight_decay": 0.0},
                          {"params": model[2].weight, "amsgrad": True}], lr=1e-2)
        optimizer.add_param_group({"params": model[2].bias, "lr": 5e-3, "betas": (0.5, 0.9)})
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        calls = []
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
        return model, optimizer, scheduler, calls

    x, y = torch.randn(8, 6), torch.randn(8, 1)
    runs = []
    for make in (fusedopt.AdamW, torch.optim.AdamW):
        model, optimizer, scheduler, calls = build(make)
        losses = []
        for _ in range(STEPS):
            def closure():
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(optimizer.step(closure).item())
            scheduler.step()
        runs.append((model, optimizer, losses, calls))
    (model, optimizer, losses, calls), (twin, _, their_losses, their_calls) = runs
    assert calls == their_calls == ["pre", "post"] * STEPS
    assert losses == pytest.approx(their_losses, rel=1e-5)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    duplicate = copy.deepcopy(optimizer)
    assert duplicate.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert math.isclose(optimizer.param_groups[0]["lr"], 3e-2 * 0.5 ** (STEPS // 2))


def test_backends_reports_every_backend_with_a_reason():
    report = fusedopt.backends()
    assert set(report) == {"cpp", "cuda", "triton", "triton_interpreter", "reference"}
    for entry in report.values():
        assert isinstance(entry["available"], bool) and entry["reason"]
    assert report["reference"]["available"]
