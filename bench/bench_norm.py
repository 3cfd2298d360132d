"""LayerNorm and RMSNorm, forward and forward+backward: fusedopt against torch eager and
torch.compile (and Liger-Kernel on CUDA when installed), all in one run on the same inputs.

Shapes (rows, hidden): (8192, 1024), (8192, 4096), (2048, 16384); fp32 and bf16; weight (and bias
for LayerNorm) trained. Bytes model: forward moves 2 x element bytes per element (read x, write
y), backward 3 x (read x, dy; write dx). The floor is measured in the same run, in the same
process: an op that allocates outputs of the same sizes and moves the same bytes, a copy of x for
the forward and x + dy after it for the backward, so "% of floor" counts both the bandwidth and
the cost of fresh, page-faulting output memory. On CPU the floor is fusedopt.stream_sum, which
writes its output as the norm kernels write theirs (streaming stores when the output is large and
its memory resident); on CUDA, x.clone() and torch.add.

Each measurement runs twice, in child processes: with glibc's default allocator settings, and
with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), since on
CPU fresh large outputs otherwise cost more than the arithmetic.

    python bench/bench_norm.py [--device cpu|cuda] [--dtypes fp32 bf16] [--rounds 5]
Writes a table to the terminal, and JSON + Markdown under bench/results/<machine>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Callable

import _report
import torch
SHAPES = [(8192, 1024), (8192, 4096), (2048, 16384)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4294967296",
                     "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def norm_fns(kind: str, device: str) -> dict[str, Callable]:
    """provider -> fn(x, weight, bias) -> y."""
    import fusedopt

    if kind == "rms":
        def eager(x, w, b):
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-5)

        def ours(x, w, b):
            return fusedopt.functional.rms_norm(x, (x.shape[-1],), w, 1e-5)
    else:
        def eager(x, w, b):
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

        def ours(x, w, b):
            return fusedopt.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
    fns = {"fusedopt": ours, "torch eager": eager, "torch.compile": torch.compile(eager)}
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

            fns["liger"] = ((lambda x, w, b: liger_rms_norm(x, w, 1e-5)) if kind == "rms" else
                            (lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)))
        except ImportError as error:
            print(f"# liger-kernel not measured: {error}", file=sys.stderr)
    return fns


def floor_fns(x: torch.Tensor, dy: torch.Tensor) -> tuple[Callable, Callable]:
    """(forward floor, forward+backward floor): fresh outputs of x's size, 2 and 2 + 3 element
    bytes moved."""
    import fusedopt  # noqa: F401  (loads the ops)

    if x.device.type == "cpu" and hasattr(torch.ops.fusedopt, "stream_sum"):
        copy = (lambda: torch.ops.fusedopt.stream_sum([x]))
        return copy, lambda: (copy(), torch.ops.fusedopt.stream_sum([x, dy]))
    return x.clone, lambda: (x.clone(), torch.add(x, dy))


def seconds(fn: Callable[[], object], device: str, calls: int = 3) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    import time

    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def measure(device: str, shapes: list[tuple[int, int]], dtypes: list[str], rounds: int
            ) -> dict[str, object]:
    results = {}
    for kind in ("layer", "rms"):
        fns = norm_fns(kind, device)
        for rows, hidden in shapes:
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                x = torch.randn(rows, hidden, device=device, dtype=dtype).requires_grad_()
                w = torch.randn(hidden, device=device, dtype=dtype).requires_grad_()
                b = torch.randn(hidden, device=device, dtype=dtype).requires_grad_()
                dy = torch.randn(rows, hidden, device=device, dtype=dtype)
                element = x.element_size() * x.numel()

                def forward(fn=None):
                    with torch.no_grad():
                        return fn(x, w, b)

                def train(fn=None):
                    x.grad = w.grad = b.grad = None
                    fn(x, w, b).backward(dy)

                cases = {"floor": floor_fns(x.detach(), dy)}
                for name, fn in fns.items():
                    cases[name] = (lambda fn=fn: forward(fn), lambda fn=fn: train(fn))
                samples = {name: ([], []) for name in cases}
                for fwd, bwd in cases.values():  # warm-up, compilation
                    fwd()
                    bwd()
                for _ in range(rounds):
                    for name, (fwd, bwd) in cases.items():
                        samples[name][0].append(seconds(fwd, device))
                        samples[name][1].append(seconds(bwd, device))
                floor = [statistics.median(s) for s in samples["floor"]]
                rows_out = {}
                for name, (fwd_s, bwd_s) in samples.items():
                    if name == "floor":
                        continue
                    fwd_t, train_t = statistics.median(fwd_s), statistics.median(bwd_s)
                    rows_out[name] = {
                        "forward_ms": fwd_t * 1e3, "train_ms": train_t * 1e3,
                        "forward_GBps": 2 * element / fwd_t / 1e9,
                        "train_GBps": 5 * element / train_t / 1e9,
                        "forward_pct_floor": 100 * floor[0] / fwd_t,
                        "train_pct_floor": 100 * floor[1] / train_t,
                    }
                results[f"{kind} {rows}x{hidden} {dtype_name}"] = {
                    "floor_ms": [f * 1e3 for f in floor], "rows": rows_out}
    return results


def markdown(report: dict[str, object]) -> str:
    lines = _report.header(report["machine"])
    for condition, results in report["conditions"].items():
        lines += [f"### {condition}", "",
                  "| norm, shape, dtype | provider | fwd ms | fwd % floor | fwd+bwd ms | "
                  "fwd+bwd GB/s | fwd+bwd % floor | fwd+bwd speed-up vs eager |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for case, result in results.items():
            eager = result["rows"]["torch eager"]["train_ms"]
            floor_fwd, floor_train = result["floor_ms"]
            lines.append(f"| {case} | floor ({report['floor']}) | {floor_fwd:.2f} | 100% | "
                         f"{floor_train:.2f} | | 100% | |")
            for name, row in result["rows"].items():
                lines.append(
                    f"| {case} | {name} | {row['forward_ms']:.2f} | "
                    f"{row['forward_pct_floor']:.0f}% | {row['train_ms']:.2f} | "
                    f"{row['train_GBps']:.1f} | {row['train_pct_floor']:.0f}% | "
                    f"{eager / row['train_ms']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=[f"{r}x{h}" for r, h in SHAPES],
                        help="ROWSxHIDDEN ...")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None,
                        help="results file stem (default: bench/results/<machine>/norm)")
    args = parser.parse_args()
    if args.child:  # one allocator condition, results as JSON on stdout
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        print(json.dumps(measure(args.device, shapes, args.dtypes, args.rounds)))
        return
    conditions = {"default allocator": {},
                  "allocator keeping freed memory (MALLOC_MMAP_THRESHOLD_=4294967296 "
                  "MALLOC_TRIM_THRESHOLD_=68719476736)": KEEP_FREED_MEMORY}
    report: dict[str, object] = {
        "machine": _report.machine(args.device), "conditions": {},
        "floor": ("fusedopt.stream_sum" if args.device == "cpu" else "x.clone, torch.add")}
    for condition, env in conditions.items():
        child = [sys.executable, __file__, "--child", "--device", args.device, "--rounds",
                 str(args.rounds), "--dtypes", *args.dtypes, "--shapes", *args.shapes]
        out = subprocess.run(child, env={**os.environ, **env}, text=True, capture_output=True)
        if out.returncode != 0:
            sys.exit(f"benchmark child failed ({condition}):\n{out.stderr}")
        report["conditions"][condition] = json.loads(out.stdout.strip().splitlines()[-1])
    stem = args.out or _report.results_dir(args.device) / "norm"
    _report.write(stem, report, markdown(report))


if __name__ == "__main__":
    main()
