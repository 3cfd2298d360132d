"""Shared test tables: which backends run here, and tolerances per dtype."""

from __future__ import annotations

import os

import pytest
import torch

import fusedopt

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# (atol, rtol) against torch in fp64, after several optimizer steps. Low-precision storage is
# rounded after every step, so its error grows with the step count.
TOLERANCES = {
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
