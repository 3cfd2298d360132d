"""fusedopt.Adam / AdamW against torch.optim.Adam / AdamW: numbers, state, checkpoints, errors."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import (
    STEPS,
    TOLERANCES,
    assert_same_state,
    assert_state_dict_moves,
    cpu_backend_params,
    make_grads,
    make_params,
    assert_same_snapshots,
    run_side_by_side,
    run_with_grad_scaler,
    skip_unsupported,
)

import fusedopt

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
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def resolve_lr(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    lr = kwargs.get("lr", 1e-2)
    kwargs["lr"] = torch.tensor(1e-2, dtype=torch.float32) if lr == "tensor" else lr
    return kwargs


def run_pair(optimizer_cls, case_kwargs, fused_only, backend, dtype):
    kwargs = resolve_lr(case_kwargs)
    # fp64 with an fp32 tensor lr: torch's for-loop rounds lr / bias_correction1 to fp32; its
    # fused step, like ours, takes the fp32 lr's value exactly and computes in fp64.
    oracle = ({"fused": True} if dtype == torch.float64 and case_kwargs.get("lr") == "tensor"
              else {"foreach": False})
    return run_side_by_side(
        lambda ps: getattr(fusedopt, optimizer_cls)(ps, **kwargs, **fused_only, backend=backend),
        lambda ps: getattr(torch.optim, optimizer_cls)(ps, **kwargs, **oracle),
        dtype,
    )


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
    for p in params:
        assert ours.state[p]["step"].dtype == torch.float32


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


@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_moves_between_torch_and_fusedopt(direction):
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    pair = (lambda ps, **kw: torch.optim.AdamW(ps, **{**kwargs, **kw}),
            lambda ps, **kw: fusedopt.AdamW(ps, **{**kwargs, **kw}))
    assert_state_dict_moves(*(pair if direction == "torch_to_fusedopt" else pair[::-1]),
                            state_keys=("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    torch_keys = set(torch.optim.AdamW([torch.zeros(1)]).state_dict()["param_groups"][0])
    ours = set(fusedopt.AdamW([torch.zeros(1)]).state_dict()["param_groups"][0])
    # decoupled_weight_decay: torch's too in 2.13 and 2.14, not in 2.6.
    assert ours == torch_keys | {"decoupled_weight_decay", "backend", "state_dtype",
                                 "master_weights", "kahan_summation", "stochastic_rounding"}


def test_grad_scaler_unscales_and_skips_like_torch_fused():
    """GradScaler hands grad_scale / found_inf to the step: grads are unscaled inside it, a step
    with an inf grad changes nothing (params, state, step), and the scale backs off."""
    ours = run_with_grad_scaler(lambda ps: fusedopt.AdamW(ps, lr=1e-2), state_key="step")
    theirs = run_with_grad_scaler(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
                                  state_key="step")
    assert_same_snapshots(ours, theirs)
    assert ours[0][2][-1].item() == ours[0][1][-1].item() == 2  # the inf step did not count


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
    with pytest.raises(RuntimeError, match="runs adam on cuda tensors, but these are on cpu"):
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
