"""The kernel regression suite (pytest-benchmark): each optimizer step and norm, at one large and
one tiny size, on every backend usable here, plus torch's own twin as a control for the machine's
speed (if the control moved too, the machine did).

    pytest bench --benchmark-autosave                    # store this commit's run
    pytest bench --benchmark-compare --benchmark-compare-fail=median:5%
                                                         # fail on a 5% regression against it
    pytest bench --benchmark-disable                     # each case once, as a test (make test)

Runs are stored under .benchmarks/ (per machine and Python), so compare on the machine that saved.
"""

from __future__ import annotations

import pytest
import torch
from bench_optim import make_params

import fusedopt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# name -> (shapes of the params) per size. Large: memory-bound streams well past the caches;
# tiny: one small tensor, the per-step overhead.
OPTIMIZER_SIZES = {"large": [(1024, 1024)] * 8 + [(1024,)] * 8, "tiny": [(33, 17), (17,)]}
MUON_SIZES = {"large": [(1024, 1024)], "tiny": [(33, 17)]}
NORM_SIZES = {"large": (8192, 1024), "tiny": (3, 37)}
OPTIMIZERS = {
    "adamw": ("adam", lambda ps, b: fusedopt.AdamW(ps, lr=1e-3, weight_decay=1e-2, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True)),
    "sgd": ("sgd", lambda ps, b: fusedopt.SGD(ps, lr=1e-3, momentum=0.9, backend=b),
            lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
    "lion": ("lion", lambda ps, b: fusedopt.Lion(ps, lr=1e-4, weight_decay=1e-2, backend=b),
             None),
    "muon": ("newton_schulz", lambda ps, b: fusedopt.Muon(ps, lr=0.02, backend=b),
             lambda ps: torch.optim.Muon(ps, lr=0.02)),
}


def usable_backends(algorithm: str) -> list[str]:
    return [name for name, impl in fusedopt.backends(algorithm).items()
            if impl["available"] and (not impl["devices"] or DEVICE in impl["devices"])]


def optimizer_cases():
    for name, (algorithm, ours, theirs) in OPTIMIZERS.items():
        sizes = MUON_SIZES if name == "muon" else OPTIMIZER_SIZES
        for size in sizes:
            for backend in usable_backends(algorithm):
                yield pytest.param(name, size, backend, id=f"{name}-{size}-{backend}")
            if theirs is not None:
                yield pytest.param(name, size, "torch", id=f"{name}-{size}-torch")


def synchronized(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("name,size,backend", list(optimizer_cases()))
def test_optimizer_step(benchmark, name, size, backend):
    _, ours, theirs = OPTIMIZERS[name]
    ps = make_params((MUON_SIZES if name == "muon" else OPTIMIZER_SIZES)[size], DEVICE)
    optimizer = theirs(ps) if backend == "torch" else ours(ps, backend)
    optimizer.step()  # state allocated outside the timing
    before = ps[0].detach().clone()
    benchmark(synchronized(optimizer.step))
    assert torch.isfinite(ps[0]).all() and not torch.equal(ps[0], before)


def norm_cases():
    for kind in ("layer_norm", "rms_norm"):
        for size in NORM_SIZES:
            for backend in [*usable_backends("norm"), "torch"]:
                yield pytest.param(kind, size, backend, id=f"{kind}-{size}-{backend}")


@pytest.mark.parametrize("kind,size,backend", list(norm_cases()))
def test_norm_forward_backward(benchmark, kind, size, backend):
    rows, hidden = NORM_SIZES[size]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=generator).to(DEVICE).requires_grad_()
    dy = torch.randn(rows, hidden, generator=generator).to(DEVICE)
    module = {"layer_norm": torch.nn.LayerNorm, "rms_norm": torch.nn.RMSNorm}[kind]
    if backend != "torch":
        module = {"layer_norm": fusedopt.LayerNorm, "rms_norm": fusedopt.RMSNorm}[kind]
    norm = (module(hidden) if backend == "torch" else module(hidden, backend=backend)).to(DEVICE)

    def step():
        x.grad = None
        norm(x).backward(dy)

    benchmark(synchronized(step))
    assert x.grad is not None and torch.isfinite(x.grad).all()
