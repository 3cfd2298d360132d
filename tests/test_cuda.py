"""GPU backends (Triton, CUDA C++) against torch.optim on CUDA tensors; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(kw) or "defaults")
@pytest.mark.parametrize("optimizer_cls", ["AdamW", "Adam"])
def test_gpu_steps_match_torch(optimizer_cls, kwargs, backend, dtype):
    kwargs = dict(kwargs, weight_decay=kwargs.get("weight_decay", 0.05))
    fused_only = {"capturable": kwargs.pop("capturable")} if "capturable" in kwargs else {}
    if kwargs.get("lr") == "tensor":
        kwargs["lr"] = torch.tensor(1e-2, device="cuda")
    kwargs.setdefault("lr", 1e-2)
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator).to(dtype))
              for s in SHAPES]
    twins = [torch.nn.Parameter(p.detach().double()) for p in params]
    ours = getattr(fusedopt, optimizer_cls)(params, **kwargs, **fused_only, backend=backend)
    theirs = getattr(torch.optim, optimizer_cls)(twins, **kwargs, foreach=False)
    for _ in range(7):
        for p, t in zip(params, twins):
            grad = torch.randn(p.shape, device="cuda", generator=generator) + 0.5
            p.grad, t.grad = grad.to(dtype), grad.to(dtype).double()
        ours.step()
        theirs.step()
    atol, rtol = TOLERANCES[dtype]
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach().double(), t.detach(), atol=atol, rtol=rtol)
        assert ours.state[p]["step"].device == p.device
        for key in theirs.state[t]:
            if key != "step":
                torch.testing.assert_close(ours.state[p][key].double(), theirs.state[t][key],
                                           atol=atol, rtol=rtol)


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
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: state allocation and kernel compilation outside the graph
            ours.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours.step()
    for _ in range(3):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, atol=1e-6, rtol=1e-5)
    assert ours.state[params[0]]["step"].item() == 5
