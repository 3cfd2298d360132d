"""Which implementations exist on this machine, and how `backend=` resolves to one of them."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from fusedopt import _ops

BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")


@functools.cache
def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, dict[str, object]]:
    """What is usable here: {name: {"available": bool, "reason": str}}; the reason says why not,
    or what the backend runs on. Probed once, at import (TRITON_INTERPRET must be set before)."""
    return _REPORT


def _probe() -> dict[str, dict[str, object]]:
    ext_error = _ops.LOAD_ERROR and f"the C++ extension fusedopt._C did not load ({_ops.LOAD_ERROR})"
    cuda_gpu = torch.cuda.is_available()
    report: dict[str, tuple[bool, str]] = {}
    if ext_error:
        report["cpp"] = (False, ext_error)
    else:
        report["cpp"] = (_ops.has_kernel("fusedopt::adam_", "CPU"), "C++ CPU kernels")
    if ext_error:
        report["cuda"] = (False, ext_error)
    elif not _ops.has_kernel("fusedopt::adam_", "CUDA"):
        report["cuda"] = (False, "fusedopt._C was built without CUDA sources "
                                 "(torch is a CPU build, or nvcc did not match torch's CUDA)")
    elif not cuda_gpu:
        report["cuda"] = (False, "no CUDA GPU is visible")
    else:
        report["cuda"] = (True, "CUDA C++ kernels")
    triton_error = _triton_error()
    if triton_error:
        report["triton"] = (False, triton_error)
        report["triton_interpreter"] = (False, triton_error)
    else:
        report["triton"] = (cuda_gpu, "Triton kernels on the GPU" if cuda_gpu else
                            "no CUDA GPU is visible")
        report["triton_interpreter"] = (
            _interpreting(),
            "Triton kernels on CPU tensors in Triton's interpreter" if _interpreting() else
            "TRITON_INTERPRET=1 was not set before triton was imported",
        )
    report["reference"] = (True, "plain-torch math (fusedopt.reference), any device")
    return {name: {"available": ok, "reason": why} for name, (ok, why) in report.items()}


_REPORT = _probe()  # a constant that torch.compile can trace through


@functools.cache
def _warn_reference_once(device_type: str) -> None:
    warnings.warn(
        f"fusedopt: no fused kernel is available for {device_type} tensors here, using the "
        "plain-torch reference (slow). fusedopt.backends() says why.",
        stacklevel=4,
    )


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs on tensors of `device`: 'auto' picks the fastest available one; an
    explicit choice that cannot run there raises, saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = backends()
    on_cuda = device.type == "cuda"
    if backend == "auto":
        candidates = ("triton", "cuda") if on_cuda else ("cpp",) if device.type == "cpu" else ()
        for name in candidates:
            if available[name]["available"]:
                return name
        _warn_reference_once(device.type)
        return "reference"
    if backend == "reference":
        return backend
    if backend == "triton":
        key = "triton" if on_cuda else "triton_interpreter"
        if device.type in ("cuda", "cpu") and available[key]["available"]:
            return backend
        why = available[key]["reason"] if device.type in ("cuda", "cpu") else "unsupported device"
        raise RuntimeError(f"fusedopt: backend 'triton' cannot run on {device} tensors: {why}")
    wanted = "cpu" if backend == "cpp" else "cuda"
    if device.type != wanted:
        raise RuntimeError(
            f"fusedopt: backend {backend!r} runs on {wanted} tensors, but these are on {device}"
        )
    if not available[backend]["available"]:
        raise RuntimeError(f"fusedopt: backend {backend!r} is not available: "
                           f"{available[backend]['reason']}")
    return backend
