"""The registered ops: schemas, fake kernels and the CPU kernels agree (torch.library.opcheck),
and the op's own contract (step advance, found_inf skip, grad unscale) holds for each backend."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from conftest import cpu_backend_params
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

import fusedopt
from fusedopt import functional, reference

needs_ext = pytest.mark.skipif(not fusedopt.backends()["cpp"]["available"],
                               reason=fusedopt.backends()["cpp"]["reason"])


def adam_inputs(amsgrad: bool, sizes=(1, 41, 4097)):
    generator = torch.Generator().manual_seed(7)
    lists = [[torch.randn(n, generator=generator) + (1.0 if k == 3 else 0.0)
              for n in sizes] for k in range(4)]
    lists[3] = [t.abs() for t in lists[3]]  # exp_avg_sq is non-negative
    max_exp_avg_sqs = [t.clone() + 0.1 for t in lists[3]] if amsgrad else []
    steps = [torch.tensor(float(s)) for s in range(len(sizes))]
    return (*lists, max_exp_avg_sqs, steps)


HYPER = dict(beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, maximize=False,
             decoupled_weight_decay=True)


@needs_ext
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("overload", ["default", "tensor_lr"])
@pytest.mark.parametrize("amp", [False, True])
def test_opcheck_adam(amsgrad, overload, amp):
    op = getattr(torch.ops.fusedopt.adam_, overload)
    lr = torch.tensor(1e-2) if overload == "tensor_lr" else 1e-2
    extra = {"grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(0.0)} if amp else {}
    torch.library.opcheck(op, adam_inputs(amsgrad), dict(lr=lr, amsgrad=amsgrad, **HYPER, **extra))


@needs_ext
def test_opcheck_stream_rmw():
    outs = [torch.randn(1000) for _ in range(3)]
    torch.library.opcheck(torch.ops.fusedopt.stream_rmw_.default, (outs, torch.randn(1000)))


@needs_ext
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stream_rmw_adds_src_to_every_out(src_dtype):
    """Float outs get src added (in fp32, rounded to the out's dtype), 1-byte outs (a lean step's
    codes) get one added, wrapping: a probe of any mix of an optimizer's streams."""
    src = torch.randn(70001).to(src_dtype)
    dtypes = [torch.float32, torch.bfloat16, torch.uint8, torch.float32, torch.int8]
    outs = [torch.randn(70001).to(d) if d.is_floating_point else
            torch.randint(-128 if d == torch.int8 else 0, 128 if d == torch.int8 else 256,
                          (70001,), dtype=d) for d in dtypes]
    expected = [(o.float() + src.float()).to(o.dtype) if o.is_floating_point() else o + 1
                for o in outs]
    torch.library.opcheck(torch.ops.fusedopt.stream_rmw_.default,
                          ([o.clone() for o in outs], src))
    torch.ops.fusedopt.stream_rmw_(outs, src)
    for o, e in zip(outs, expected):
        assert torch.equal(o, e), o.dtype
    with pytest.raises(RuntimeError, match="every out must be a contiguous float32, bfloat16"):
        torch.ops.fusedopt.stream_rmw_([torch.zeros(70001, dtype=torch.float16)], src)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_stream_sum_returns_a_fresh_sum(dtype):
    inputs = [torch.randn(3, 70001).to(dtype) for _ in range(3)]
    torch.library.opcheck(torch.ops.fusedopt.stream_sum.default, (inputs,))
    for count in (1, 3):
        out = torch.ops.fusedopt.stream_sum(inputs[:count])
        expected = sum(t.float() for t in inputs[:count]).to(dtype)
        assert out.dtype == dtype and out.data_ptr() != inputs[0].data_ptr()
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert torch.ops.fusedopt.stream_sum([torch.empty(0, 5)]).shape == (0, 5)
    with pytest.raises(RuntimeError, match="one shape and one dtype"):
        torch.ops.fusedopt.stream_sum([inputs[0], inputs[1][:, 1:]])


STREAMED_OUTPUTS_CHECK = """
import torch, fusedopt
for n in (4103, 4096):  # rows that start unaligned (dx not streamed) and aligned (streamed)
    x = torch.randn(4099, n) + 0.5
    dy, dres, w, b = torch.randn_like(x), torch.randn_like(x), torch.randn(n), torch.randn(n)
    for _ in range(2):  # the second time round, the freed outputs come back resident: streamed
        out = torch.ops.fusedopt.stream_sum([x, dy])
        assert torch.equal(out, x + dy)
        y, _, mean, rstd = torch.ops.fusedopt.norm_fwd(x, None, w, b, 1e-5, False, False, False)
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (n,), w, b))
        dx, dw, _ = torch.ops.fusedopt.norm_bwd(dy, dres, x, w, b, mean, rstd, False, False)
        x_leaf, w_leaf = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.nn.functional.layer_norm(x_leaf, (n,), w_leaf, b).backward(dy)
        torch.testing.assert_close(dx, x_leaf.grad + dres, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dw, w_leaf.grad, atol=1e-2, rtol=1e-4)
        del out, y, dx
"""


@needs_ext
def test_outputs_past_the_streaming_size_are_right_when_streamed():
    """Outputs over 64 MiB are written with streaming stores when their memory is resident: with
    glibc keeping freed memory, the second round's outputs are; checked in a child process, since
    the allocator settings only take effect at process start."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4294967296",
           "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    subprocess.run([sys.executable, "-c", STREAMED_OUTPUTS_CHECK], env=env, check=True)


PREFETCH_CHECK = """
import sys, torch, fusedopt
generator = torch.Generator().manual_seed(0)
shapes = [(1000, 37), (4099,), (3, 5)]  # tails shorter than a vector step, and a tiny tensor
params = [torch.randn(s, generator=generator) for s in shapes]
grads = [torch.randn(s, generator=generator) for s in shapes]
outs = []
for make in (lambda ps: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="cpp"),
             lambda ps: fusedopt.SGD(ps, lr=1e-2, momentum=0.9, backend="cpp"),
             lambda ps: fusedopt.Lion(ps, lr=1e-3, backend="cpp")):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = make(ps)
    for _ in range(3):
        opt.step()
    outs += [p.detach() for p in ps]
torch.save(outs, sys.argv[1])
"""


@needs_ext
def test_software_prefetch_changes_no_result(tmp_path):
    """FUSEDOPT_CPU_PREFETCH (read when the extension loads, so in child processes) moves only
    cache lines: the steps are bit for bit the same with it off and on."""
    results = []
    for distance in ("0", "512"):
        path = tmp_path / f"prefetch-{distance}.pt"
        env = {**os.environ, "FUSEDOPT_CPU_PREFETCH": distance}
        subprocess.run([sys.executable, "-c", PREFETCH_CHECK, str(path)], env=env, check=True)
        results.append(torch.load(path))
    assert len(results[0]) == 9
    for off, on in zip(*results):
        assert torch.equal(off, on)


def independent_step(algorithm: str, lists, hyper: dict, lr: float, grad_scale: float) -> None:
    """The same step by code that shares nothing with fusedopt: torch.optim's own functions (for
    Lion, lion-pytorch's), after unscaling the grads in place, as the step's contract says."""
    torch._foreach_div_(lists[1], grad_scale)
    hyper = {k: v for k, v in hyper.items() if k != "is_first_step"}
    if algorithm == "adam":
        if "decoupled_weight_decay" in inspect.signature(torch_adam).parameters:
            torch_adam(*lists, foreach=False, lr=lr, **hyper)
        else:  # torch 2.6: AdamW's decay is its own function there
            from torch.optim.adamw import adamw
            decoupled = hyper.pop("decoupled_weight_decay")
            (adamw if decoupled else torch_adam)(*lists, foreach=False, lr=lr, **hyper)
    elif algorithm == "sgd":
        torch_sgd(*lists, foreach=False, lr=lr, **hyper)
    else:
        lion_pytorch = pytest.importorskip("lion_pytorch")
        assert not hyper["maximize"]
        for p, g, m in zip(*lists):
            lion_pytorch.lion_pytorch.update_fn(p, g, m, lr, hyper["weight_decay"],
                                                hyper["beta1"], hyper["beta2"])


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_adam_contract_steps_unscale_and_skip(backend, found):
    """Against torch.optim.adam on the same inputs: steps advance by one, grads are left
    unscaled; with found_inf set, nothing at all changes."""
    ours = adam_inputs(amsgrad=True)
    theirs = tuple([t.clone() for t in lst] for lst in ours)
    before = tuple([t.clone() for t in lst] for lst in ours)
    amp = dict(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(found))
    functional.adam(*ours, lr=1e-2, amsgrad=True, **HYPER, **amp, backend=backend)
    if not found:
        independent_step("adam", theirs, dict(amsgrad=True, **HYPER), lr=1e-2, grad_scale=8.0)
    for got_list, want_list, old_list in zip(ours, theirs, before):
        for got, want, old in zip(got_list, want_list, old_list):
            torch.testing.assert_close(got, old if found else want, atol=1e-6, rtol=1e-5)
    if not found:
        assert [s.item() for s in ours[5]] == [1.0, 2.0, 3.0]
        torch.testing.assert_close(ours[1][0], before[1][0] / 8.0)


@needs_ext
def test_cpp_op_checks_its_inputs():
    params, grads, exp_avgs, exp_avg_sqs, _, steps = adam_inputs(amsgrad=False)
    kwargs = dict(lr=1e-2, amsgrad=False, **HYPER)
    with pytest.raises(RuntimeError, match="expected 3 grads"):
        torch.ops.fusedopt.adam_(params, grads[:2], exp_avgs, exp_avg_sqs, [], steps, **kwargs)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fusedopt.adam_(params, [g.double() for g in grads], exp_avgs, exp_avg_sqs, [],
                                 steps, **kwargs)
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs given without amsgrad"):
        torch.ops.fusedopt.adam_(params, grads, exp_avgs, exp_avg_sqs, exp_avg_sqs, steps,
                                 **kwargs)


def lion_sgd_inputs(algorithm: str, sizes=(1, 41, 4097)):
    generator = torch.Generator().manual_seed(8)
    return tuple([torch.randn(n, generator=generator) + 0.3 for n in sizes] for _ in range(3))


LION = dict(beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
SGD = dict(momentum=0.9, dampening=0.1, weight_decay=0.1, nesterov=False, maximize=True,
           is_first_step=False)
OTHER_ALGORITHMS = [("lion", LION), ("sgd", SGD)]


@needs_ext
@pytest.mark.parametrize("overload", ["default", "tensor_lr"])
@pytest.mark.parametrize("algorithm,hyper", OTHER_ALGORITHMS, ids=["lion", "sgd"])
def test_opcheck_lion_and_sgd(algorithm, hyper, overload):
    op = getattr(getattr(torch.ops.fusedopt, f"{algorithm}_"), overload)
    lr = torch.tensor(1e-2) if overload == "tensor_lr" else 1e-2
    amp = {"grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(0.0)}
    torch.library.opcheck(op, lion_sgd_inputs(algorithm), dict(lr=lr, **hyper, **amp))


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("algorithm,hyper", OTHER_ALGORITHMS, ids=["lion", "sgd"])
def test_lion_sgd_contract_unscale_and_skip(algorithm, hyper, found, backend):
    """Against torch.optim.sgd / lion-pytorch: grads are left unscaled; with found_inf set,
    nothing at all changes."""
    ours = lion_sgd_inputs(algorithm)
    theirs = tuple([t.clone() for t in lst] for lst in ours)
    before = tuple([t.clone() for t in lst] for lst in ours)
    amp = dict(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(found))
    getattr(functional, algorithm)(*ours, lr=1e-2, **hyper, **amp, backend=backend)
    if not found:
        independent_step(algorithm, theirs, hyper, lr=1e-2, grad_scale=8.0)
    for got_list, want_list, old_list in zip(ours, theirs, before):
        for got, want, old in zip(got_list, want_list, old_list):
            torch.testing.assert_close(got, old if found else want, atol=1e-6, rtol=1e-5)
    if not found:
        torch.testing.assert_close(ours[1][0], before[1][0] / 8.0)


def multi_tensor_case(algorithm: str, dtype: torch.dtype):
    """(tensor lists in dtype, hyperparameters) with a chunk boundary (65537) and a zero size."""
    sizes = (3, 65537, 0, 41)
    if algorithm == "adam":
        lists = adam_inputs(amsgrad=True, sizes=sizes)
        return tuple([t.to(dtype) if k < 5 else t for t in lst] for k, lst in enumerate(lists)), \
            dict(amsgrad=True, **HYPER)
    lists = tuple([t.to(dtype) for t in lst] for lst in lion_sgd_inputs(algorithm, sizes))
    return lists, dict(OTHER_ALGORITHMS)[algorithm]


@pytest.mark.interpret
@pytest.mark.skipif(not fusedopt.backends()["triton_interpreter"]["available"],
                    reason=fusedopt.backends()["triton_interpreter"]["reason"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("algorithm", ["adam", "lion", "sgd"])
def test_triton_multi_tensor_path_matches_reference(algorithm, dtype):
    """The GPU path (one launch over address tables), run in the interpreter."""
    import importlib

    kernel = getattr(importlib.import_module(f"fusedopt.kernels.{algorithm}"), algorithm)
    ours, hyper = multi_tensor_case(algorithm, dtype)
    ref = tuple([t.clone() for t in lst] for lst in ours)
    amp = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    kernel(*ours, lr=1e-2, **hyper, **amp, multi_tensor=True)
    getattr(reference, algorithm)(*ref, lr=1e-2, **hyper, **amp)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for got_list, want_list in zip(ours, ref):
        for got, want in zip(got_list, want_list):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@needs_ext
@pytest.mark.parametrize("algorithm", ["adam", "lion", "sgd"])
def test_cpp_ops_compute_fp64_in_fp64(algorithm):
    """fp64 storage runs the C++ kernel in fp64 registers: equal to the fp64 reference to a few
    ulps (fp32 math would be off by ~1e-8), over a chunk boundary and a zero-size tensor."""
    ours, hyper = multi_tensor_case(algorithm, torch.float64)
    ref = tuple([t.clone() for t in lst] for lst in ours)
    amp = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    getattr(torch.ops.fusedopt, f"{algorithm}_")(*ours, lr=1e-2, **hyper, **amp)
    getattr(reference, algorithm)(*ref, lr=1e-2, **hyper, **amp)
    for got_list, want_list in zip(ours, ref):
        for got, want in zip(got_list, want_list):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-14)
