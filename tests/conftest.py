"""Shared test tables: which backends run here, and tolerances per dtype."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fusedopt

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# (atol, rtol) against torch in fp64, after several optimizer steps. Low-precision storage is
# rounded after every step, so its error grows with the step count.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),  # fp64 math: torch's for-loop and ours differ by a few ulps
    torch.float32: (2e-6, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def cpu_backend_params() -> list:
    """Every backend that can run on CPU tensors, each skipped with its reason where it cannot.
    The Triton cases run only in the interpreter's own pytest run (marker `interpret`)."""
    available = fusedopt.backends()
    params = [pytest.param("reference", id="reference")]
    params.append(pytest.param(
        "cpp", id="cpp",
        marks=pytest.mark.skipif(not available["cpp"]["available"],
                                 reason=available["cpp"]["reason"]),
    ))
    params.append(pytest.param(
        "triton", id="triton",
        marks=[pytest.mark.interpret,
               pytest.mark.skipif(not available["triton_interpreter"]["available"],
                                  reason=available["triton_interpreter"]["reason"])],
    ))
    return params


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic in Triton's interpreter is not trustworthy")


STEPS = 7
# Odd sizes, a 2-D shape, a zero-size param; the interpreter gets the same (they are small).
SHAPES = [(1,), (3,), (41,), (769,), (4097,), (7, 13), (0,)]


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


def run_side_by_side(make_ours, make_theirs, dtype: torch.dtype, steps: int = STEPS):
    """Runs fusedopt on `dtype` params and the oracle on fp64 copies over the same grads
    (rounded to `dtype` first); a frozen param is included and must stay untouched."""
    params = [torch.nn.Parameter(p) for p in make_params(dtype)]
    frozen = torch.nn.Parameter(torch.randn(5, dtype=dtype), requires_grad=False)
    frozen_before = frozen.detach().clone()
    twins = [torch.nn.Parameter(p.detach().to(torch.float64, copy=True)) for p in params]
    ours, theirs = make_ours(params + [frozen]), make_theirs(twins)
    for step in range(steps):
        for p, t, g in zip(params, twins, make_grads(params, step)):
            p.grad = g
            t.grad = None if g is None else g.to(torch.float64, copy=True)
        ours.step()
        theirs.step()
    torch.testing.assert_close(frozen, frozen_before, atol=0, rtol=0)
    return params, twins, ours, theirs


def assert_same_state(params, twins, ours, theirs, dtype: torch.dtype) -> None:
    """Params and every state entry of the oracle (same keys), within dtype tolerance."""
    atol, rtol = TOLERANCES[dtype]
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach().to(torch.float64), t.detach(), atol=atol, rtol=rtol)
        ours_state, theirs_state = ours.state[p], theirs.state[t]
        assert set(ours_state) == set(theirs_state)
        for key, value in theirs_state.items():
            if key == "step":
                assert ours_state[key].item() == value.item()
            else:
                assert ours_state[key].dtype == p.dtype
                torch.testing.assert_close(ours_state[key].to(torch.float64),
                                           value.to(torch.float64), atol=atol, rtol=rtol)


def train(optimizer, params, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) + 0.5
        optimizer.step()


def assert_state_dict_moves(make_first, make_second, state_keys) -> None:
    """A checkpoint of make_first's optimizer after 3 steps loads into make_second's (whose own
    lr=1.0 the checkpoint overrides), and both then take the same 3 further steps."""
    first = [torch.nn.Parameter(torch.randn(n)) for n in (5, 129)]
    optimizer = make_first(first)
    train(optimizer, first, 3, seed=1)
    saved = copy.deepcopy(optimizer.state_dict())
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = make_second(second, lr=1.0)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    train(optimizer, first, 3, seed=2)
    train(resumed, second, 3, seed=2)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert set(optimizer.state[a]) == set(resumed.state[b]) == set(state_keys)
        for key in state_keys:
            torch.testing.assert_close(optimizer.state[a][key], resumed.state[b][key],
                                       atol=1e-6, rtol=1e-5)


def run_with_grad_scaler(make, state_key: str, steps: int = 5):
    """Trains with torch.amp.GradScaler, an inf in the grads on step 2. Returns (per-step
    snapshots [params..., grad of param 0, state[param 0][state_key]], final scale)."""
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300)]
    optimizer = make(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    snapshots = []
    for step in range(steps):
        loss = sum((p * torch.linspace(-1, 2, p.numel())).sum() ** 2 for p in params)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if step == 2:
            params[1].grad[3] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        snapshots.append([p.detach().clone() for p in params] +
                         [params[0].grad.clone(), optimizer.state[params[0]][state_key].clone()])
    return snapshots, scaler.get_scale()


def assert_same_snapshots(ours, theirs) -> None:
    """Same scale and the same snapshots; the step with the inf (2) changed no param."""
    assert ours[1] == theirs[1]
    for a_step, b_step in zip(ours[0], theirs[0]):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[0][2][0], ours[0][1][0], atol=0, rtol=0)
