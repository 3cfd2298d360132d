"""Every implementation of every algorithm, as function objects, and how `backend=` picks one.

REGISTRY maps an algorithm ("adam", "lion", "sgd", Muon's three steps "muon_momentum",
"newton_schulz" and "muon_update", "norm") to its implementations in the order
`backend="auto"` prefers them. Each entry names the function that runs it, the device types and
storage dtypes it takes, and whether it can run here (each op probed on its own). The dispatch
layer (fusedopt.functional) calls `resolve(...).run`; fusedopt.backends() reports this table.

Adding an algorithm is one entry here. The table is built once at import, so torch.compile sees
constants (TRITON_INTERPRET must be set before fusedopt is first imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedopt import _ops, reference

BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")

# The storage dtypes the kernels take: fp32 math for these, and fp64 math for fp64 on the CPU
# optimizers. Any other dtype (fp64 elsewhere, for instance) runs in the reference, in its own
# precision.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_OPTIMIZER_DTYPES = (*KERNEL_DTYPES, torch.float64)
ANY_DTYPE = ()  # the reference computes whatever torch computes


@dataclass(frozen=True)
class Implementation:
    backend: str  # one of BACKENDS but "auto"
    run: Callable | None  # the function; None where it cannot be loaded here
    devices: tuple[str, ...]  # device types whose tensors it takes; () = any
    dtypes: tuple[torch.dtype, ...]  # storage dtypes it computes; () = any
    available: bool
    reason: str  # what it runs on, or why it cannot run here
    contiguous_only: bool = False  # strided tensors go to the reference instead

    def takes(self, dtype: torch.dtype) -> bool:
        return not self.dtypes or dtype in self.dtypes


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_CUDA_GPU = torch.cuda.is_available()


def _load_triton_kernels():
    """The Triton launchers, or why they cannot load (importing fusedopt never fails)."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    try:
        from fusedopt.kernels import adam, lion, muon, newton_schulz, sgd
    except Exception as error:  # noqa: BLE001 - a broken triton install must not break import
        return None, f"the Triton kernels did not import ({type(error).__name__}: {error})"
    return {"adam": adam.adam, "adam_lean": adam.adam_lean, "lion": lion.lion,
            "lion_lean": lion.lion_lean, "sgd": sgd.sgd, "sgd_lean": sgd.sgd_lean,
            "muon_momentum": muon.muon_momentum, "muon_momentum_lean": muon.muon_momentum_lean,
            "muon_update": muon.muon_update, "newton_schulz": newton_schulz.newton_schulz}, None


_TRITON_OPTIMIZERS, _TRITON_ERROR = _load_triton_kernels()


def _triton_devices() -> tuple[tuple[str, ...], str | None]:
    """Where Triton kernels run here: CUDA tensors on a GPU, CPU tensors in the interpreter."""
    if _TRITON_ERROR:
        return (), _TRITON_ERROR
    if _interpreting():
        return ("cpu",), None
    if _CUDA_GPU:
        return ("cuda",), None
    return (), "no CUDA GPU is visible (and TRITON_INTERPRET=1 was not set before import)"


def _op_caller(op: str) -> Callable:
    """A fusedopt op as one function: the tensor_lr overload when lr is a tensor."""
    packet = getattr(torch.ops.fusedopt, op)

    def run(*args, **kwargs):
        tensor_lr = isinstance(kwargs.get("lr"), Tensor)
        return (packet.tensor_lr if tensor_lr else packet.default)(*args, **kwargs)

    run.__name__ = run.__qualname__ = f"fusedopt::{op}"
    return run


def _extension_op(op: str, backend: str, dispatch_key: str, dtypes,
                  run: Callable | None = None, contiguous_only: bool = False) -> Implementation:
    """A C++ (dispatch_key CPU) or CUDA C++ op of fusedopt._C, called through `run` if given."""
    device = dispatch_key.lower()
    if _ops.LOAD_ERROR:
        why = f"the C++ extension fusedopt._C did not load ({_ops.LOAD_ERROR})"
    elif not _ops.has_kernel(f"fusedopt::{op}", dispatch_key):
        why = (f"fusedopt._C has no {dispatch_key} kernel for {op} (a stale build, or one without "
               "CUDA sources: torch is a CPU build, or nvcc did not match torch's CUDA)")
    elif device == "cuda" and not _CUDA_GPU:
        why = "no CUDA GPU is visible"
    else:
        return Implementation(backend, run or _op_caller(op), (device,), dtypes, True,
                              f"C++ kernels on {device} tensors", contiguous_only)
    return Implementation(backend, None, (device,), dtypes, False, why)


def _newton_schulz_op(x: Tensor, coefficients, eps: float, dtype: torch.dtype) -> Tensor:
    """The newton_schulz op, whose schema takes the (a, b, c) triples flattened."""
    flat = [float(value) for triple in coefficients for value in triple]
    return torch.ops.fusedopt.newton_schulz(x, flat, eps, dtype)


def _triton_optimizer(algorithm: str, contiguous_only: bool = True) -> Implementation:
    devices, why = _triton_devices()
    run = _TRITON_OPTIMIZERS[algorithm] if why is None else None
    where = "CPU tensors in Triton's interpreter" if devices == ("cpu",) else "CUDA tensors"
    return Implementation("triton", run, devices or ("cuda",), KERNEL_DTYPES, why is None,
                          why or f"Triton kernels on {where}", contiguous_only=contiguous_only)


def _reference(run: Callable) -> Implementation:
    return Implementation("reference", run, (), ANY_DTYPE, True,
                          "plain-torch math (fusedopt.reference), any device and dtype")


def _fused_norm(x, residual, weight, bias, eps, rms, zero_centered_weight, residual_in_fp32):
    """The norm op (C++ on CPU tensors; on CUDA tensors the Triton kernels that _ops registers for
    it): (y, residual_out) of contiguous (rows, n) inputs."""
    contiguous = (lambda t: None if t is None else t.contiguous())
    y, residual_out, _, _ = torch.ops.fusedopt.norm_fwd(
        contiguous(x), contiguous(residual), contiguous(weight), contiguous(bias), eps, rms,
        zero_centered_weight, residual_in_fp32)
    return y, residual_out


def _reference_norm(x, residual, weight, bias, eps, rms, zero_centered_weight, residual_in_fp32):
    out = reference._norm(x, weight, bias, eps, rms=rms, residual=residual,
                          residual_in_fp32=residual_in_fp32,
                          zero_centered_weight=zero_centered_weight)
    return out if residual is not None else (out, None)


def _norm_op(backend: str, dispatch_key: str) -> Implementation:
    device = dispatch_key.lower()
    kind = "C++ kernels" if backend == "cpp" else "Triton kernels"
    if _ops.LOAD_ERROR:
        why = f"the C++ extension fusedopt._C (which defines the norm op) did not load " \
              f"({_ops.LOAD_ERROR})"
    elif device == "cuda" and not _CUDA_GPU:
        why = "no CUDA GPU is visible"
    elif device == "cuda" and _TRITON_ERROR:
        why = _TRITON_ERROR
    elif not _ops.has_kernel("fusedopt::norm_fwd", dispatch_key):
        why = f"fusedopt._C has no {dispatch_key} kernel for norm_fwd (a stale build)"
    else:
        return Implementation(backend, _fused_norm, (device,), KERNEL_DTYPES, True,
                              f"{kind} on {device} tensors")
    return Implementation(backend, None, (device,), KERNEL_DTYPES, False, why)


def _entries(*implementations: Implementation) -> dict[str, Implementation]:
    return {impl.backend: impl for impl in implementations}


# Per algorithm, its implementations in the order backend="auto" tries them.
REGISTRY: dict[str, dict[str, Implementation]] = {
    "adam": _entries(_triton_optimizer("adam"),
                     _extension_op("adam_", "cuda", "CUDA", KERNEL_DTYPES),
                     _extension_op("adam_", "cpp", "CPU", CPU_OPTIMIZER_DTYPES),
                     _reference(reference.adam)),
    # Adam with lean states (8-bit / low-precision moments, masters): Triton on GPUs, C++ on
    # CPUs (no CUDA C++ kernel yet).
    "adam_lean": _entries(_triton_optimizer("adam_lean"),
                          _extension_op("adam_lean_", "cpp", "CPU", KERNEL_DTYPES,
                                        contiguous_only=True),
                          _reference(reference.adam_lean)),
    "lion": _entries(_triton_optimizer("lion"),
                     _extension_op("lion_", "cuda", "CUDA", KERNEL_DTYPES),
                     _extension_op("lion_", "cpp", "CPU", CPU_OPTIMIZER_DTYPES),
                     _reference(reference.lion)),
    "lion_lean": _entries(_triton_optimizer("lion_lean"),
                          _extension_op("lion_lean_", "cpp", "CPU", KERNEL_DTYPES,
                                        contiguous_only=True),
                          _reference(reference.lion_lean)),
    "sgd": _entries(_triton_optimizer("sgd"),
                    _extension_op("sgd_", "cuda", "CUDA", KERNEL_DTYPES),
                    _extension_op("sgd_", "cpp", "CPU", CPU_OPTIMIZER_DTYPES),
                    _reference(reference.sgd)),
    "sgd_lean": _entries(_triton_optimizer("sgd_lean"),
                         _extension_op("sgd_lean_", "cpp", "CPU", KERNEL_DTYPES,
                                       contiguous_only=True),
                         _reference(reference.sgd_lean)),
    # Muon: its elementwise halves (in the params' dtype) and, between them, the Newton-Schulz
    # iteration (keyed by the dtype it computes in: bf16, fp32, and fp64 on CPU).
    "muon_momentum": _entries(_triton_optimizer("muon_momentum"),
                              _extension_op("muon_momentum_", "cpp", "CPU", CPU_OPTIMIZER_DTYPES),
                              _reference(reference.muon_momentum)),
    "muon_momentum_lean": _entries(_triton_optimizer("muon_momentum_lean"),
                                   _extension_op("muon_momentum_lean_", "cpp", "CPU",
                                                 KERNEL_DTYPES, contiguous_only=True),
                                   _reference(reference.muon_momentum_lean)),
    "newton_schulz": _entries(_triton_optimizer("newton_schulz", contiguous_only=False),
                              _extension_op("newton_schulz", "cpp", "CPU",
                                            (torch.float32, torch.bfloat16, torch.float64),
                                            run=_newton_schulz_op),
                              _reference(reference.newton_schulz)),
    "muon_update": _entries(_triton_optimizer("muon_update"),
                            # (it streams params flat, with no copy-back path)
                            _extension_op("muon_update_", "cpp", "CPU", CPU_OPTIMIZER_DTYPES,
                                          contiguous_only=True),
                            _reference(reference.muon_update)),
    # LayerNorm and RMSNorm: one op (norm_fwd / norm_bwd) switched by `rms`. Its CUDA kernels are
    # Triton's; there is no CUDA C++ norm.
    "norm": _entries(_norm_op("triton", "CUDA"), _norm_op("cpp", "CPU"),
                     _reference(_reference_norm)),
}


@functools.cache
def _warn_reference_once(algorithm: str, device_type: str, reasons: str) -> None:
    warnings.warn(
        f"fusedopt: no fused {algorithm} kernel runs on {device_type} tensors here ({reasons}); "
        "using the plain-torch reference (slow). fusedopt.backends() says more.",
        stacklevel=5,
    )


def resolve(algorithm: str, backend: str, device: torch.device,
            dtype: torch.dtype) -> Implementation:
    """The implementation of `algorithm` that runs on `dtype` tensors of `device`.

    "auto": the first available one that takes the device (warning once per algorithm and device
    type when only the reference is left). An explicit backend that cannot run there raises,
    saying why. Either way, a dtype the chosen kernel does not take (fp64 on a GPU) runs in the
    reference, in that dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    implementations = REGISTRY[algorithm]
    if backend == "auto":
        for impl in implementations.values():
            if impl.available and device.type in impl.devices:
                break
        else:
            reasons = "; ".join(f"{impl.backend}: {impl.reason}"
                                for impl in implementations.values()
                                if impl.backend != "reference" and device.type in impl.devices)
            _warn_reference_once(algorithm, device.type, reasons or "none is built for it")
            impl = implementations["reference"]
    else:
        impl = implementations.get(backend)
        if impl is None:
            raise RuntimeError(f"fusedopt: {algorithm} has no {backend!r} implementation "
                               f"(it has {', '.join(implementations)})")
        if impl.devices and device.type not in impl.devices:
            raise RuntimeError(f"fusedopt: backend {backend!r} runs {algorithm} on "
                               f"{' or '.join(impl.devices)} tensors, but these are on {device}"
                               + ("" if impl.available else f" ({impl.reason})"))
        if not impl.available:
            raise RuntimeError(f"fusedopt: backend {backend!r} is not available for "
                               f"{algorithm}: {impl.reason}")
    return impl if impl.takes(dtype) else implementations["reference"]


def _summary() -> dict[str, dict[str, object]]:
    """Per backend: available when it runs at least one algorithm here; the reason says what it
    runs on, and names the algorithms it cannot run, with why."""
    report = {}
    for backend in BACKENDS[1:]:
        impls = {name: entry[backend] for name, entry in REGISTRY.items() if backend in entry}
        ready = [impl for impl in impls.values() if impl.available]
        missing = {name: impl.reason for name, impl in impls.items() if not impl.available}
        reason = (ready or list(impls.values()))[0].reason
        if ready and missing:
            reason += "; not " + "; not ".join(f"{name} ({why})" for name, why in missing.items())
        report[backend] = {"available": bool(ready), "reason": reason}
    # "triton" means CUDA tensors; Triton's interpreter, which runs the kernels on CPU tensors,
    # is reported apart.
    interpreter = {"available": False, "reason": _TRITON_ERROR or
                   "TRITON_INTERPRET=1 was not set before fusedopt was imported"}
    if _interpreting():
        interpreter, report["triton"] = report["triton"], {
            "available": False, "reason": "TRITON_INTERPRET=1: Triton runs on CPU tensors here"}
    report["triton_interpreter"] = interpreter
    return report


_SUMMARY = _summary()


def backends(algorithm: str | None = None) -> dict[str, dict[str, object]]:
    """What is usable here.

    backends(): {backend: {"available": bool, "reason": str}} for "triton", "cpp", "cuda",
    "reference" and "triton_interpreter" (Triton on CPU tensors, when TRITON_INTERPRET=1 was set
    before import); a backend is available when all of its algorithms are.
    backends("adam"): that algorithm's implementations, {backend: {"available", "reason",
    "devices", "dtypes"}}, in the order backend="auto" tries them."""
    if algorithm is None:
        return _SUMMARY
    if algorithm not in REGISTRY:
        raise ValueError(f"algorithm must be one of {tuple(REGISTRY)}, got {algorithm!r}")
    return {impl.backend: {"available": impl.available, "reason": impl.reason,
                           "devices": impl.devices, "dtypes": impl.dtypes}
            for impl in REGISTRY[algorithm].values()}
