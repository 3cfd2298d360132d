"""A fusedopt optimizer step compiled as torch's tutorial compiles torch.optim's ("Compiling the
optimizer with torch.compile"): the same numbers as eager, the fused op inside the graph, and no
more graphs than torch's own optimizer gets (a tensor lr under an LR scheduler recompiles
nothing)."""

from __future__ import annotations

import pytest
import torch

import fusedopt

# name: (fusedopt factory, torch.optim twin or None), both with a tensor lr.
OPTIMIZERS = {
    "AdamW": (lambda ps: fusedopt.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1)),
    "Adam-amsgrad": (lambda ps: fusedopt.Adam(ps, lr=torch.tensor(1e-2), amsgrad=True),
                     lambda ps: torch.optim.Adam(ps, lr=torch.tensor(1e-2), amsgrad=True)),
    "SGD-nesterov": (lambda ps: fusedopt.SGD(ps, lr=torch.tensor(1e-2), momentum=0.9,
                                             nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=torch.tensor(1e-2), momentum=0.9,
                                                nesterov=True)),
    "Lion": (lambda ps: fusedopt.Lion(ps, lr=torch.tensor(1e-3), weight_decay=0.1), None),
}
STEPS = 5


def recording(backend: str):
    """A torch.compile backend that keeps every graph it is given, then compiles with `backend`."""
    graphs = []

    def compile_graph(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return compile_graph, graphs


def train(make_optimizer, dtype, compiler=None):
    """STEPS steps of a small model with a LinearLR-scheduled tensor lr; returns the params and
    the graphs compiled (none when eager)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
    model.to(dtype)
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=STEPS)
    graphs = []
    step = optimizer.step
    if compiler is not None:
        backend, graphs = recording(compiler)
        step = torch.compile(optimizer.step, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(torch.randn(4, 8, generator=generator, dtype=dtype)).square().sum().backward()
        step()
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()], graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_matches_eager_in_as_few_graphs_as_torch(name, compiler, dtype):
    torch._dynamo.reset()
    ours, theirs = OPTIMIZERS[name]
    eager, _ = train(ours, dtype)
    compiled, graphs = train(ours, dtype, compiler)
    # The fused op sits in the graph as one call: bit for bit. Without the C++ extension the
    # reference runs, whose torch ops inductor fuses and may contract (FMA): a few ulps.
    fused = fusedopt.backends()["cpp"]["available"]
    tolerance = 0 if fused else 1e-6 if dtype == torch.float32 else 1e-14
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    # One graph per state layout, as torch: SGD's first step (buffers set from the grads) and
    # the later ones compile apart; the schedule's changing lr compiles nothing new.
    expected = 1
    if theirs is not None:
        torch._dynamo.reset()
        expected = len(train(theirs, dtype, "aot_eager")[1])
    assert len(graphs) == expected
    if fused:
        targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
        assert any(target.startswith("fusedopt.") for target in targets), targets


# name: fusedopt factory with lean states (8-bit where tensors reach 4,096 elements), for bf16
# params; Muon keeps its float lr (torch.optim.Muon reads it on the host).
LEAN_OPTIMIZERS = {
    "AdamW-compact-8bit": lambda ps: fusedopt.AdamW(ps, lr=torch.tensor(1e-2),
                                                    state_dtype=torch.uint8,
                                                    master_weights="compact"),
    "Lion-8bit-kahan": lambda ps: fusedopt.Lion(ps, lr=torch.tensor(1e-3), state_dtype=torch.uint8,
                                                kahan_summation=True),
    "SGD-8bit-master": lambda ps: fusedopt.SGD(ps, lr=torch.tensor(1e-2), momentum=0.9,
                                               state_dtype=torch.uint8, master_weights=True),
    "Muon-8bit": lambda ps: fusedopt.Muon(ps, lr=0.005, state_dtype=torch.uint8),
}


def train_lean(make_optimizer, compiler=None):
    """STEPS steps of a bf16 model whose first weight is 8-bit sized; returns the params, the
    optimizer state and the graphs compiled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 3))
    model.to(torch.bfloat16)
    optimizer = make_optimizer(model.parameters())
    graphs, step = [], optimizer.step
    if compiler is not None:
        backend, graphs = recording(compiler)
        step = torch.compile(optimizer.step, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        x = torch.randn(4, 64, generator=generator, dtype=torch.bfloat16)
        model(x).float().square().sum().backward()
        step()
    state = [optimizer.state[p] for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], state, graphs


@pytest.mark.parametrize("name", list(LEAN_OPTIMIZERS))
def test_compiled_lean_step_matches_eager(name):
    """Lean states under torch.compile: the same params and states as eager (bit for bit with
    the C++ ops, which sit in the graph), the 8-bit codes included."""
    torch._dynamo.reset()
    eager, eager_state, _ = train_lean(LEAN_OPTIMIZERS[name])
    compiled, compiled_state, graphs = train_lean(LEAN_OPTIMIZERS[name], "aot_eager")
    fused = fusedopt.backends()["cpp"]["available"]
    tolerance = 0 if fused else 1e-6
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    assert any(value.dtype == torch.uint8 for value in eager_state[0].values())
    if fused:
        for ours, theirs in zip(compiled_state, eager_state):
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert torch.equal(ours[key], theirs[key]), key
        targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
        assert any("lean" in target for target in targets), targets
