"""One optimizer step, fusedopt against its peers, all in one run on the same inputs.

Workloads: "large" (25M params in 34 tensors: 16 x 1024x1024, 16 x 1024, 2 x 4096x1024) and
"tiny" (2,000 tensors of 128..1151 params). Providers on CPU: fusedopt's C++ kernel; torch.optim's
for-loop, foreach and fused=True; DeepSpeed's CPU Adam when installed. On CUDA: fusedopt's Triton
and CUDA C++ kernels; torch's fused and foreach.

Bytes model: an fp32 AdamW step reads p, g, m, v and writes p, m, v: 28 B/param. The bandwidth it is
compared with is measured in the same run with the same access pattern (fusedopt.stream_rmw_: three
fp32 streams read-modified-written plus one read, 28 B/element; on CUDA, torch's in-place add).

    python bench/bench_optim.py [--device cpu|cuda] [--workloads large tiny] [--rounds 7]
Writes a table to the terminal, and JSON + Markdown under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import fusedopt

BYTES_PER_PARAM = 28  # fp32 AdamW: read p, g, m, v; write p, m, v
RESULTS = Path(__file__).resolve().parent / "results"


def workload_shapes(name: str) -> list[tuple[int, ...]]:
    if name == "large":
        return [(1024, 1024)] * 16 + [(1024,)] * 16 + [(4096, 1024)] * 2
    if name == "tiny":
        return [(128 + (i * 37) % 1024,) for i in range(2000)]
    raise ValueError(f"unknown workload {name!r}")


def providers(device: str) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """name -> constructor of an AdamW-equivalent optimizer over the given params."""
    kwargs = dict(lr=1e-3, weight_decay=1e-2)
    found: dict[str, Callable] = {}
    available = fusedopt.backends()
    if device == "cpu":
        if available["cpp"]["available"]:
            found["fusedopt cpp"] = lambda ps: fusedopt.AdamW(ps, **kwargs, backend="cpp")
    else:
        for backend in ("triton", "cuda"):
            if available[backend]["available"]:
                found[f"fusedopt {backend}"] = (
                    lambda ps, b=backend: fusedopt.AdamW(ps, **kwargs, backend=b))
    found["torch fused"] = lambda ps: torch.optim.AdamW(ps, **kwargs, fused=True)
    found["torch foreach"] = lambda ps: torch.optim.AdamW(ps, **kwargs, foreach=True)
    if device == "cpu":
        found["torch for-loop"] = lambda ps: torch.optim.AdamW(ps, **kwargs, foreach=False)
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            found["deepspeed cpu_adam"] = lambda ps: DeepSpeedCPUAdam(ps, **kwargs,
                                                                      adamw_mode=True)
        except Exception as error:  # noqa: BLE001 - not installed, or its op fails to build
            print(f"# deepspeed cpu_adam not measured: {type(error).__name__}: {error}",
                  file=sys.stderr)
    return found


def make_params(shapes, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
        p.grad = torch.randn(shape, generator=generator).to(device)
        params.append(p)
    return params


def timer(device: str) -> Callable[[Callable[[], None], int], float]:
    """Seconds per call of fn, averaged over `count` back-to-back calls."""
    def cpu(fn, count):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        return (time.perf_counter() - start) / count

    def cuda(fn, count):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(count):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1e3 / count

    return cpu if device == "cpu" else cuda


def bandwidth_probe(device: str, numel: int) -> tuple[str, Callable[[], None], int]:
    """(description, fn, bytes moved per call) with an optimizer step's access pattern."""
    src = torch.randn(numel, device=device)
    if device == "cpu" and fusedopt.backends()["cpp"]["available"]:
        outs = [torch.randn(numel, device=device) for _ in range(3)]
        return ("fusedopt.stream_rmw_: 3 fp32 streams read+written, 1 read (28 B/elem)",
                lambda: torch.ops.fusedopt.stream_rmw_(outs, src), 28 * numel)
    out = torch.randn(numel, device=device)
    return ("torch in-place add: 1 fp32 stream read+written, 1 read (12 B/elem)",
            lambda: out.add_(src), 12 * numel)


def machine(device: str) -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        model = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"{model}, {os.cpu_count()} cores"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                        capture_output=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        info["commit"] = None
    return info


def run(device: str, workloads: list[str], rounds: int) -> dict[str, object]:
    measure = timer(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report: dict[str, object] = {"machine": machine(device), "command": " ".join(sys.argv),
                                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "bytes_per_param": BYTES_PER_PARAM, "workloads": {}}
    for workload in workloads:
        shapes = workload_shapes(workload)
        numel = sum(torch.Size(s).numel() for s in shapes)
        probe_name, probe, probe_bytes = bandwidth_probe(device, numel)
        optimizers = {name: make(make_params(shapes, device))
                      for name, make in providers(device).items()}
        calls = 5 if workload == "large" else 20
        samples: dict[str, list[float]] = {name: [] for name in [*optimizers, "bandwidth"]}
        for name, optimizer in optimizers.items():  # warm-up: state allocation, first touch
            optimizer.step()
            optimizer.step()
        probe()
        sync()
        # Interleaved rounds, so every provider sees the same machine conditions.
        for _ in range(rounds):
            samples["bandwidth"].append(measure(probe, calls))
            for name, optimizer in optimizers.items():
                samples[name].append(measure(optimizer.step, calls))
        bandwidth = probe_bytes / statistics.median(samples["bandwidth"]) / 1e9
        step_bytes = BYTES_PER_PARAM * numel
        rows = {}
        baseline = statistics.median(samples["torch fused"])
        for name in optimizers:
            seconds = statistics.median(samples[name])
            rows[name] = {"ms": seconds * 1e3, "GB/s": step_bytes / seconds / 1e9,
                          "pct_bandwidth": 100 * step_bytes / seconds / 1e9 / bandwidth,
                          "time_vs_torch_fused": seconds / baseline,
                          "ms_samples": [s * 1e3 for s in samples[name]]}
        report["workloads"][workload] = {
            "tensors": len(shapes), "params": numel, "bandwidth_GBps": bandwidth,
            "bandwidth_probe": probe_name, "rows": rows}
        del optimizers
    return report


def markdown(report: dict[str, object]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['device']}; torch {m['torch']}, triton {m['triton']}, "
             f"Python {m['python']}, {m['threads']} threads; commit {m['commit']}; "
             f"{report['date']}.", f"Command: `{report['command']}`", ""]
    for workload, result in report["workloads"].items():
        lines += [f"**{workload}**: {result['tensors']} tensors, {result['params']:,} params, "
                  f"AdamW fp32 at {report['bytes_per_param']} B/param. Measured bandwidth "
                  f"{result['bandwidth_GBps']:.1f} GB/s ({result['bandwidth_probe']}).", "",
                  "| provider | ms/step | GB/s | % of bandwidth | time / torch fused |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in result["rows"].items():
            lines.append(f"| {name} | {row['ms']:.2f} | {row['GB/s']:.1f} | "
                         f"{row['pct_bandwidth']:.0f}% | {row['time_vs_torch_fused']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", nargs="+", default=["large", "tiny"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="results file stem (default: optim-DEVICE)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    report = run(args.device, args.workloads, args.rounds)
    table = markdown(report)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"optim-{args.device}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
