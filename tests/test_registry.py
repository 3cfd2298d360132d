"""The registry (fusedopt._registry): every (algorithm, backend) entry resolves to a function that
runs on the devices and dtypes it names, and backend= errors and fallbacks say why."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import fusedopt
from fusedopt import _registry, functional

ENTRIES = [(algorithm, backend) for algorithm, entry in _registry.REGISTRY.items()
           for backend in entry]


def tiny_step(algorithm: str, dtype: torch.dtype, backend: str) -> None:
    """One call of `algorithm` through the dispatch layer on small CPU tensors of `dtype`."""
    def tensors(count):
        return [[torch.randn(37).to(dtype) + 0.5] for _ in range(count)]

    if algorithm == "adam":
        params, grads, exp_avgs, exp_avg_sqs = tensors(4)
        exp_avg_sqs[0].abs_()
        functional.adam(params, grads, exp_avgs, exp_avg_sqs, [], [torch.tensor(0.0)], lr=1e-3,
                        beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                        maximize=False, decoupled_weight_decay=True, backend=backend)
    elif algorithm == "lion":
        functional.lion(*tensors(3), lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                        maximize=False, backend=backend)
    elif algorithm == "sgd":
        functional.sgd(*tensors(3), lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                       nesterov=False, maximize=False, is_first_step=False, backend=backend)
    elif algorithm == "muon_momentum":
        functional.muon_momentum(*tensors(3), momentum=0.95, nesterov=True, backend=backend)
    elif algorithm == "muon_update":
        functional.muon_update(*tensors(2), lr=1e-3, weight_decay=0.1, adjusted_lr=1e-3,
                               backend=backend)
    elif algorithm == "newton_schulz":  # dtype: the one it computes in
        x = torch.randn(2, 5, 7)
        out = functional.newton_schulz(x, ((3.4445, -4.775, 2.0315),) * 5, 1e-7, dtype,
                                       backend=backend)
        expected = functional.newton_schulz(x.double(), ((3.4445, -4.775, 2.0315),) * 5, 1e-7,
                                            torch.float64, backend="reference")
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, atol=0.1, rtol=0)
    else:
        x = torch.randn(3, 37).to(dtype)
        torch.testing.assert_close(
            functional.rms_norm(x, (37,), backend=backend).double(),
            torch.nn.functional.rms_norm(x.double(), (37,), eps=torch.finfo(dtype).eps),
            atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("algorithm,backend", ENTRIES, ids=[f"{a}-{b}" for a, b in ENTRIES])
def test_every_entry_names_its_devices_and_dtypes_and_resolves(algorithm, backend):
    impl = _registry.REGISTRY[algorithm][backend]
    assert impl.backend == backend and impl.reason
    assert all(isinstance(d, torch.dtype) for d in impl.dtypes)
    assert backend == "reference" or impl.dtypes, "a kernel names the dtypes it computes"
    report = fusedopt.backends(algorithm)[backend]
    assert (report["available"], report["reason"]) == (impl.available, impl.reason)
    if not impl.available:
        assert impl.run is None
        for device in impl.devices:
            with pytest.raises(RuntimeError, match="not available|runs .* on"):
                _registry.resolve(algorithm, backend, torch.device(device), torch.float32)
        return
    assert callable(impl.run)
    device = torch.device(impl.devices[0] if impl.devices else "cpu")
    for dtype in impl.dtypes or (torch.float32, torch.float64):
        assert _registry.resolve(algorithm, backend, device, dtype) is impl
        if device.type == "cpu" and not (backend == "triton" and dtype == torch.bfloat16):
            tiny_step(algorithm, dtype, backend)  # the dtypes it names run
    if impl.dtypes:  # any other dtype runs in the reference
        assert _registry.resolve(algorithm, backend, device, torch.int64).backend == "reference"


def test_auto_prefers_the_first_available_entry_for_the_device():
    for algorithm, entry in _registry.REGISTRY.items():
        want = next(impl for impl in entry.values()
                    if impl.available and (not impl.devices or "cpu" in impl.devices))
        got = _registry.resolve(algorithm, "auto", torch.device("cpu"), torch.float32)
        assert got is (want if want.takes(torch.float32) else entry["reference"])


def test_a_backend_an_algorithm_lacks_raises_saying_so():
    with pytest.raises(RuntimeError, match="norm has no 'cuda' implementation"):
        functional.layer_norm(torch.randn(2, 8), (8,), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.resolve("adam", "numpy", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        fusedopt.backends("adagrad")


def test_a_norm_without_a_kernel_warns_once_and_runs_the_reference(monkeypatch):
    """As a GPU norm does when the extension that defines the op is missing: simulated on CPU by
    marking the C++ entry unavailable."""
    entry = dict(_registry.REGISTRY["norm"])
    entry["cpp"] = dataclasses.replace(entry["cpp"], available=False, run=None,
                                       reason="fusedopt._C did not load (simulated)")
    monkeypatch.setitem(_registry.REGISTRY, "norm", entry)
    _registry._warn_reference_once.cache_clear()
    x = torch.randn(4, 33, dtype=torch.float64).float()
    with pytest.warns(UserWarning, match=r"no fused norm kernel .*simulated"):
        y = functional.rms_norm(x, (33,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.rms_norm(x, (33,))  # once
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (33,)))
    _registry._warn_reference_once.cache_clear()


def test_backends_summary_covers_every_backend():
    report = fusedopt.backends()
    assert set(report) == {*_registry.BACKENDS[1:], "triton_interpreter"}
    for name, entry in report.items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
