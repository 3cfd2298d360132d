"""One Muon step, fusedopt against torch.optim.Muon, and fusedopt's Newton-Schulz against the
same number of plain matmuls, all in one run on the same inputs.

Workloads (fp32 weights): "1024" (one 1024x1024 matrix), "transformer" (the 2-D weights of a
6-layer, 384-wide transformer: per layer 4 x 384x384, 384x1536 and 1536x384) and, for
--device cuda, "2048", "4096", "8192" (one square matrix each). Providers: fusedopt.Muon per
backend available (its Newton-Schulz dtype: default_ns_dtype, bf16 where this CPU multiplies bf16
natively, fp32 elsewhere) and torch.optim.Muon (bf16 Newton-Schulz everywhere). Muon is
matmul-bound: alongside the steps, fusedopt's Newton-Schulz on the workload's momentum is timed
against 3 * ns_steps plain matmuls per matrix of the iteration's shapes (X X^T, A A, B X) in the
same dtype: what an unblocked, unbatched iteration multiplies.

    python bench/bench_muon.py [--device cpu|cuda] [--workloads 1024 transformer] [--rounds 7]
Also run by bench/bench_optim.py --optimizers muon. Writes a table, JSON and Markdown under
bench/results/<machine>/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import _report
import torch
from bench_optim import timer

import fusedopt
from fusedopt import functional
from fusedopt.optim.muon import default_ns_dtype, ns_schedule

NS_STEPS = 5


def workload_shapes(name: str) -> list[tuple[int, int]]:
    if name == "transformer":
        return [(384, 384)] * 4 * 6 + [(384, 1536), (1536, 384)] * 6
    return [(int(name), int(name))]


def make_params(shapes, device: str) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=generator).to(device)
        params.append(p)
    return params


def providers(device: str) -> dict[str, Callable]:
    kwargs = dict(lr=0.02, weight_decay=0.1)
    found: dict[str, Callable] = {}
    available = fusedopt.backends("newton_schulz")
    for backend in ["cpp"] if device == "cpu" else ["triton"]:
        if available[backend]["available"]:
            found[f"fusedopt {backend}"] = (
                lambda ps, b=backend: fusedopt.Muon(ps, **kwargs, backend=b))
    found["torch.optim.Muon"] = lambda ps: torch.optim.Muon(ps, **kwargs)
    return found


def plain_matmuls(shapes, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """3 * NS_STEPS matmuls per matrix, in dtype, of one unblocked iteration's shapes
    (X X^T, A A, B X for X of (min, max) of its dims), each matrix with operands of its own (as
    many bytes as the iteration touches, not one pair kept in cache)."""
    operands = []
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        operands.append((torch.randn(m, n, device=device).to(dtype),
                         torch.randn(m, m, device=device).to(dtype)))

    def run() -> None:
        for x, a in operands:
            for _ in range(NS_STEPS):
                torch.mm(x, x.T)
                torch.mm(a, a)
                torch.mm(a, x)

    return run


def fusedopt_newton_schulz(shapes, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """fusedopt's Newton-Schulz as Muon.step runs it: one batched call per shape."""
    schedule = ns_schedule("quintic", NS_STEPS)
    by_shape: dict[tuple[int, int], int] = {}
    for shape in shapes:
        by_shape[shape] = by_shape.get(shape, 0) + 1
    stacks = []
    for (rows, cols), count in by_shape.items():  # stacked as Muon.step stacks them
        per_stack = functional.muon_stack_size(count, rows * cols * 4, torch.device(device))
        for start in range(0, count, per_stack):
            stacks.append(torch.randn((min(per_stack, count - start), rows, cols), device=device))

    def run() -> None:
        for stack in stacks:
            functional.newton_schulz(stack, schedule, 1e-7, dtype)

    return run


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_workload(device: str, workload: str, rounds: int) -> dict[str, object]:
    shapes = workload_shapes(workload)
    measure = timer(device)
    ns_dtype = default_ns_dtype(torch.device(device), torch.float32)
    steps = {name: make(make_params(shapes, device)).step
             for name, make in providers(device).items()}
    kernels = {f"fusedopt newton_schulz ({dtype_name(ns_dtype)})":
               fusedopt_newton_schulz(shapes, ns_dtype, device),
               f"plain matmuls ({dtype_name(ns_dtype)})":
               plain_matmuls(shapes, ns_dtype, device)}
    calls = 1 if device == "cpu" else 10
    timed = {**steps, **kernels}
    for fn in timed.values():  # warm-up: state, first touch, GEMM library set-up
        fn()
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):  # interleaved: every provider sees the same machine conditions
        for name, fn in timed.items():
            samples[name].append(measure(fn, calls))
    medians = {name: statistics.median(s) for name, s in samples.items()}
    baseline = {**{name: "torch.optim.Muon" for name in steps},
                **{name: next(n for n in kernels if n.startswith("plain")) for name in kernels}}
    rows = {name: {"ms": medians[name] * 1e3, "time_vs_baseline":
                   medians[name] / medians[baseline[name]], "baseline": baseline[name],
                   "ms_samples": [s * 1e3 for s in samples[name]]} for name in timed}
    return {"matrices": len(shapes), "params": sum(r * c for r, c in shapes),
            "ns_dtype": dtype_name(ns_dtype), "rows": rows}


def run(device: str, workloads: list[str], rounds: int) -> dict[str, object]:
    report: dict[str, object] = {"machine": _report.machine(device), "results": {}}
    for workload in workloads:
        report["results"][f"muon {workload}"] = measure_workload(device, workload, rounds)
    return report


def markdown(report: dict[str, object], with_header: bool = True) -> str:
    lines = _report.header(report["machine"]) if with_header else []
    for name, result in report["results"].items():
        lines += [(f"**{name}**: {result['matrices']} fp32 matrices, {result['params']:,} params; "
                   f"fusedopt's Newton-Schulz in {result['ns_dtype']}, torch's in bf16."), "",
                  "| provider | ms | time / baseline | baseline |", "|---|---:|---:|---|"]
        for provider, row in result["rows"].items():
            lines.append(f"| {provider} | {row['ms']:.2f} | {row['time_vs_baseline']:.2f} | "
                         f"{row['baseline']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None,
                        help="results file stem (default: bench/results/<machine>/muon)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    workloads = args.workloads or (["1024", "transformer"] if args.device == "cpu"
                                   else ["1024", "2048", "4096", "8192", "transformer"])
    report = run(args.device, workloads, args.rounds)
    stem = args.out or _report.results_dir(args.device) / "muon"
    _report.write(stem, report, markdown(report))


if __name__ == "__main__":
    main()
