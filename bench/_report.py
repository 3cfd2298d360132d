"""What every benchmark report records and how it is written: the machine, the versions, the commit,
the date and the command, then JSON + Markdown under bench/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _cpu_flags() -> list[str]:
    """The vector extensions the kernels are compiled for, where the CPU has them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return []
    return [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]


def machine(device: str) -> dict[str, object]:
    """The device, versions, threads, commit, date and command of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} cores ({' '.join(_cpu_flags())})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                capture_output=True, cwd=RESULTS.parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "commit": commit,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }


def header(m: dict[str, object]) -> list[str]:
    """The Markdown lines that open every report."""
    return [f"Machine: {m['device']}; torch {m['torch']}, triton {m['triton']}, "
            f"Python {m['python']}, {m['threads']} threads; commit {m['commit']}; {m['date']}.",
            f"Command: `{m['command']}`", ""]


def write(stem: str, report: dict[str, object], table: str) -> None:
    """Prints the table and writes bench/results/STEM.json and STEM.md."""
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(f"wrote {RESULTS / stem}.json and .md")
