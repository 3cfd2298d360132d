"""What every benchmark report records and how it is written: the machine, the versions, the commit,
the date and the command, then JSON + Markdown (and charts) under bench/results/<machine>/."""

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
        git = dict(text=True, capture_output=True, cwd=RESULTS.parent)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        # Changes to tracked files outside the results mean the code run is not the commit's.
        if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                      "--", ".", ":!bench/results"], **git).stdout.strip():
            commit += " with uncommitted changes"
        commit = commit or None
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


def machine_slug(device: str) -> str:
    """The folder name of this machine's results: e.g. amd-epyc-2c-avx512_bf16, nvidia-h200."""
    if device == "cuda":
        name = torch.cuda.get_device_name().lower().replace("nvidia ", "nvidia-")
    else:
        flags = _cpu_flags()
        widest = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags),
                      "generic")
        name = f"{_cpu_model()} {os.cpu_count()}c {widest}".lower()
    return "-".join("".join(c if c.isalnum() or c == "_" else " " for c in name).split())


def results_dir(device: str) -> Path:
    return RESULTS / machine_slug(device)


def header(m: dict[str, object]) -> list[str]:
    """The Markdown lines that open every report."""
    return [f"Machine: {m['device']}; torch {m['torch']}, triton {m['triton']}, "
            f"Python {m['python']}, {m['threads']} threads; commit {m['commit']}; {m['date']}.",
            f"Command: `{m['command']}`", ""]


def write(stem: str | Path, report: dict[str, object], table: str) -> None:
    """Prints the table and writes STEM.json and STEM.md (a relative stem: under bench/results/)."""
    print(table)
    stem = RESULTS / stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_name(stem.name + ".md").write_text(table + "\n")
    print(f"wrote {stem}.json and .md")


def pyplot():
    """matplotlib.pyplot, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> Path:
    """Writes the figure as a PNG cropped to what it draws (long labels stay whole); frees it."""
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    return path


def ratio_chart(path: Path, title: str, bars: list[tuple[str, float, bool]], baseline: str) -> Path:
    """A horizontal bar chart of time / baseline's time, one bar per (label, ratio, is_fusedopt);
    fusedopt's bars coloured, the peers' grey, a line at 1."""
    import matplotlib.ticker

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(11, 0.28 * len(bars) + 1.4))
    labels = [label for label, _, _ in bars][::-1]
    ratios = [ratio for _, ratio, _ in bars][::-1]
    colors = ["C0" if ours else "0.65" for _, _, ours in bars][::-1]
    drawn = axis.barh(labels, ratios, color=colors)
    axis.bar_label(drawn, fmt="%.2f", padding=3, fontsize=7)
    axis.axvline(1.0, color="k", linewidth=0.8)
    # Linear from 0 unless the ratios span more than 20x; log then, so that small bars show.
    if max(ratios) / min(ratios) > 20:
        axis.set_xscale("log")
        low, high = min(ratios) / 1.5, max(ratios) * 1.5
        axis.set_xlim(low, high)
        axis.set_xticks([t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if low <= t <= high])
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        scale = "log scale; "
    else:
        axis.set_xlim(0, max(ratios) * 1.12)
        scale = ""
    axis.set_xlabel(f"time / {baseline} ({scale}< 1 is faster)")
    axis.tick_params(axis="y", labelsize=7)
    axis.set_title(title, fontsize=9)
    return save(figure, path)
