"""max_grad_norm: the global grad-norm clip inside the step equals torch.nn.utils.clip_grad_norm_
followed by the step, with and without GradScaler's scaling, on every CPU backend."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import cpu_backend_params

import fusedopt

OPTIMIZERS = {
    "adamw": lambda ps, **kw: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "adam": lambda ps, **kw: fusedopt.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, **kw),
    "sgd": lambda ps, **kw: fusedopt.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, **kw),
    "lion": lambda ps, **kw: fusedopt.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
}
SHAPES = [(13, 7), (301,), (2, 3, 5)]


def make_params(generator: torch.Generator, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in SHAPES]


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_scale", [None, 1024.0], ids=["unscaled", "grad_scaler"])
def test_max_grad_norm_equals_clip_grad_norm_then_step(backend, name, dtype, grad_scale):
    generator = torch.Generator().manual_seed(11)
    ours, theirs = make_params(generator, dtype), None
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    # max_grad_norm 4: the steps' grads (norms ~2 to ~90) are clipped at some steps, not others.
    opt = OPTIMIZERS[name](ours, max_grad_norm=4.0, backend=backend)
    reference = OPTIMIZERS[name](theirs, backend=backend)
    for step in range(4):
        size = (0.1, 3.0, 1.0, 5.0)[step]
        grads = [torch.randn(s, generator=generator, dtype=dtype) * size for s in SHAPES]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g * grad_scale if grad_scale else g.clone()
            q.grad = g.clone()
        if grad_scale:  # as GradScaler.step hands them to an optimizer that unscales itself
            opt.grad_scale = torch.tensor(grad_scale)
            opt.found_inf = torch.tensor(0.0)
        clipped = torch.nn.utils.clip_grad_norm_(theirs, 4.0)
        opt.step()
        reference.step()
        tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(
            atol=1e-12, rtol=1e-11)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, **tolerance)  # left clipped, as torch's
            torch.testing.assert_close(p, q, **tolerance)
    assert clipped > 4.0  # the last step was clipped


def test_max_grad_norm_is_checked_and_optional():
    p = torch.nn.Parameter(torch.randn(3))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="Invalid max_grad_norm"):
            fusedopt.AdamW([p], max_grad_norm=bad)
    assert fusedopt.SGD([p], lr=0.1).max_grad_norm is None


def test_max_grad_norm_survives_deepcopy_pickle_and_load_state_dict():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = fusedopt.AdamW([p], max_grad_norm=0.5)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.max_grad_norm == 0.5
    opt.load_state_dict(fusedopt.AdamW([p]).state_dict())
    assert opt.max_grad_norm == 0.5  # a constructor argument, as torch keeps its own


def test_max_grad_norm_under_torch_compile_matches_eager():
    generator = torch.Generator().manual_seed(5)
    params = [make_params(generator, torch.float32) for _ in range(2)]
    params[1] = [torch.nn.Parameter(p.detach().clone()) for p in params[0]]
    opts = [fusedopt.AdamW(ps, lr=1e-2, max_grad_norm=1.0) for ps in params]
    compiled = torch.compile(opts[1].step)
    for _ in range(3):
        grads = [torch.randn(s, generator=generator) * 3 for s in SHAPES]
        for ps in params:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opts[0].step()
        compiled()
    for p, q in zip(*params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
