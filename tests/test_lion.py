"""fusedopt.Lion against lion-pytorch (the published implementation) and fusedopt.reference."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    assert_same_snapshots,
    assert_same_state,
    assert_state_dict_moves,
    cpu_backend_params,
    make_grads,
    make_params,
    run_side_by_side,
    run_with_grad_scaler,
    skip_unsupported,
)

import fusedopt

try:
    import lion_pytorch
except ImportError:  # only the comparisons with it need it; CASES is imported by test_cuda.py
    lion_pytorch = None
needs_lion_pytorch = pytest.mark.skipif(
    lion_pytorch is None, reason="lion-pytorch is a test dependency and is not installed")

CASES = [
    ("defaults", {}),
    ("weight_decay", {"weight_decay": 0.5}),
    ("betas", {"betas": (0.5, 0.9), "weight_decay": 0.1}),
    ("beta1_zero", {"betas": (0.0, 0.99)}),
]


@needs_lion_pytorch
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("case_id,kwargs", CASES, ids=[c[0] for c in CASES])
def test_steps_match_lion_pytorch(case_id, kwargs, backend, dtype):
    """fp64 / fp32 against lion-pytorch in fp64 over 20 steps."""
    kwargs = {"lr": 1e-2, **kwargs}
    params, twins, ours, theirs = run_side_by_side(
        lambda ps: fusedopt.Lion(ps, **kwargs, backend=backend),
        lambda ps: lion_pytorch.Lion(ps, **kwargs), dtype, steps=20)
    assert_same_state(params, twins, ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [p for p in cpu_backend_params() if p.id != "reference"])
def test_low_precision_matches_reference(backend, dtype):
    """bf16 / fp16 storage over 20 steps: sign() turns one rounding of exp_avg near zero into a
    full lr step, so an fp64 oracle is no guide. The reference computes in fp32 and rounds where
    the kernels do, and no backend contracts a product into a sum (docs/numerics.md), so every
    element stays within a few ulp of the reference's: no flipped sign anywhere."""
    skip_unsupported(backend, dtype)
    params = [torch.nn.Parameter(p) for p in make_params(dtype)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = fusedopt.Lion(params, lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = fusedopt.Lion(twins, lr=1e-2, weight_decay=0.1, backend="reference")
    for step in range(20):
        for p, t, g in zip(params, twins, make_grads(params, step)):
            p.grad, t.grad = g, None if g is None else g.clone()
        ours.step()
        theirs.step()
    eps = torch.finfo(dtype).eps  # relative spacing: rtol=2 * eps is 2 to 4 ulp
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, atol=0, rtol=2 * eps)
        torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[t]["exp_avg"],
                                   atol=0, rtol=2 * eps)


class NegatedGrads:
    """lion-pytorch stepping on -grad: maximizing f is minimizing -f (it has no maximize)."""

    def __init__(self, optimizer) -> None:
        self.optimizer, self.state = optimizer, optimizer.state

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.neg_()
        self.optimizer.step()


@needs_lion_pytorch
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_maximize_and_tensor_lr_match_lion_pytorch_on_negated_grads(backend, dtype):
    """maximize=True with a tensor lr against lion-pytorch (float lr) fed -grad, in fp64."""
    params, twins, ours, theirs = run_side_by_side(
        lambda ps: fusedopt.Lion(ps, lr=torch.tensor(1e-2, dtype=dtype), weight_decay=0.1,
                                 maximize=True, backend=backend),
        lambda ps: NegatedGrads(lion_pytorch.Lion(ps, lr=1e-2, weight_decay=0.1)),
        dtype, steps=20)
    assert_same_state(params, twins, ours, theirs, dtype)


@needs_lion_pytorch
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_sign_of_zero_is_zero_like_lion_pytorch(backend):
    """A zero grad with zero momentum moves nothing; a zero update mixed with non-zero ones."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    twin = torch.nn.Parameter(param.detach().clone())
    ours = fusedopt.Lion([param], lr=0.1, backend=backend)
    theirs = lion_pytorch.Lion([twin], lr=0.1)
    for grad in (torch.tensor([0.0, 1.0, -1.0, 0.0]), torch.tensor([0.0, -1.0, 0.0, 0.0])):
        param.grad, twin.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(param, twin, atol=0, rtol=0)
    assert param[0].item() == 1.0 and param[3].item() == 0.5


@needs_lion_pytorch
@pytest.mark.parametrize("direction", ["lion_pytorch_to_fusedopt", "fusedopt_to_lion_pytorch"])
def test_state_dict_moves_between_lion_pytorch_and_fusedopt(direction):
    pair = (lambda ps, lr=1e-2: lion_pytorch.Lion(ps, lr=lr, weight_decay=0.1),
            lambda ps, lr=1e-2: fusedopt.Lion(ps, lr=lr, weight_decay=0.1))
    assert_state_dict_moves(*(pair if direction.startswith("lion") else pair[::-1]),
                            state_keys=("exp_avg",))


@needs_lion_pytorch
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_grad_scaler_unscales_and_skips_like_lion_pytorch(backend):
    """Under torch.amp.GradScaler: fusedopt unscales inside its step (grad_scale / found_inf),
    lion-pytorch gets the grads the scaler unscaled; same params, grads, state and scale."""
    ours = run_with_grad_scaler(lambda ps: fusedopt.Lion(ps, lr=1e-2, backend=backend),
                                state_key="exp_avg")
    theirs = run_with_grad_scaler(lambda ps: lion_pytorch.Lion(ps, lr=1e-2), state_key="exp_avg")
    # On the skipped step (2) the fused step leaves the grads as they came, scaled (as torch's
    # fused=True does), while GradScaler.unscale_ unscales them for an unfused optimizer.
    theirs[0][2][2] = theirs[0][2][2] * 2.0**8
    assert_same_snapshots(ours, theirs)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"lr": float("nan")}, "Invalid learning rate: nan"),
    ({"betas": (1.5, 0.99)}, "Invalid beta parameter at index 0: 1.5"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ({"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
    ({"lr": torch.tensor([1.0, 2.0])}, "Tensor lr must be 1-element"),
    ({"backend": "numpy"}, "backend must be one of"),
], ids=lambda v: str(v)[:30])
def test_bad_arguments_raise_torch_style_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fusedopt.Lion([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_sparse_grads_raise():
    param = torch.nn.Parameter(torch.randn(4))
    param.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="Lion does not support sparse gradients"):
        fusedopt.Lion([param]).step()
