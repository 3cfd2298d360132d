"""One optimizer step, fusedopt against its peers, all in one run on the same inputs.

Optimizers: AdamW, Lion, SGD with momentum (--optimizers; "muon" adds bench/bench_muon.py's
Muon workloads and table to the same report). Workloads: "large" (25M params in 34
tensors: 16 x 1024x1024, 16 x 1024, 2 x 4096x1024) and "tiny" (2,000 tensors of 128..1151
params). Providers on CPU: fusedopt's C++ kernels; torch.optim's fused=True, foreach and for-loop;
DeepSpeed's CPU Adam, lion-pytorch, optimi and pytorch-optimizer when installed. On CUDA: fusedopt's
Triton and CUDA C++ kernels, torch's fused and foreach, and the Lion peers.

Bytes model, fp32: AdamW reads p, g, m, v and writes p, m, v (28 B/param); Lion and SGD-momentum
read p, g, m and write p, m (20 B/param). The bandwidth each is compared with is measured in the
same run with the same access pattern (fusedopt.stream_rmw_: k fp32 streams read-modified-written
plus one read, 4 + 8k B/element; on CUDA, torch's in-place add, 12 B/element).

    python bench/bench_optim.py [--device cpu|cuda] [--optimizers adamw lion sgd]
                                [--workloads large tiny] [--rounds 7]
Writes a table to the terminal, and JSON + Markdown under bench/results/<machine>/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import _report
import torch

import fusedopt


def workload_shapes(name: str) -> list[tuple[int, ...]]:
    if name == "large":
        return [(1024, 1024)] * 16 + [(1024,)] * 16 + [(4096, 1024)] * 2
    if name == "tiny":
        return [(128 + (i * 37) % 1024,) for i in range(2000)]
    raise ValueError(f"unknown workload {name!r}")


def _peer(name: str, make: Callable) -> dict[str, Callable]:
    """{name: make} if the peer's package imports here, else {} (said on stderr)."""
    try:
        make([torch.nn.Parameter(torch.zeros(1))])
    except Exception as error:  # noqa: BLE001 - not installed, or its op fails to build
        print(f"# {name} not measured: {type(error).__name__}: {error}", file=sys.stderr)
        return {}
    return {name: make}


def adamw_providers(device: str) -> dict[str, Callable]:
    kwargs = dict(lr=1e-3, weight_decay=1e-2)
    found: dict[str, Callable] = {}
    for backend in fusedopt_backends(device):
        found[f"fusedopt {backend}"] = (
            lambda ps, b=backend: fusedopt.AdamW(ps, **kwargs, backend=b))
    found["torch fused"] = lambda ps: torch.optim.AdamW(ps, **kwargs, fused=True)
    found["torch foreach"] = lambda ps: torch.optim.AdamW(ps, **kwargs, foreach=True)
    if device == "cpu":
        found["torch for-loop"] = lambda ps: torch.optim.AdamW(ps, **kwargs, foreach=False)

        def deepspeed(ps):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(ps, **kwargs, adamw_mode=True)

        found.update(_peer("deepspeed cpu_adam", deepspeed))
    return found


def lion_providers(device: str) -> dict[str, Callable]:
    kwargs = dict(lr=1e-4, weight_decay=1e-2)
    found: dict[str, Callable] = {}
    for backend in fusedopt_backends(device):
        found[f"fusedopt {backend}"] = lambda ps, b=backend: fusedopt.Lion(ps, **kwargs, backend=b)

    def lion_pytorch(ps):
        from lion_pytorch import Lion

        return Lion(ps, **kwargs)

    def optimi(ps):
        from optimi import Lion

        return Lion(ps, **kwargs)

    def pytorch_optimizer(ps):
        from pytorch_optimizer import Lion

        return Lion(ps, **kwargs, weight_decouple=True)

    found.update(_peer("lion-pytorch", lion_pytorch))
    found.update(_peer("optimi", optimi))
    found.update(_peer("pytorch-optimizer", pytorch_optimizer))
    return found


def sgd_providers(device: str) -> dict[str, Callable]:
    kwargs = dict(lr=1e-3, momentum=0.9, weight_decay=1e-2)
    found: dict[str, Callable] = {}
    for backend in fusedopt_backends(device):
        found[f"fusedopt {backend}"] = lambda ps, b=backend: fusedopt.SGD(ps, **kwargs, backend=b)
    found["torch fused"] = lambda ps: torch.optim.SGD(ps, **kwargs, fused=True)
    found["torch foreach"] = lambda ps: torch.optim.SGD(ps, **kwargs, foreach=True)
    if device == "cpu":
        found["torch for-loop"] = lambda ps: torch.optim.SGD(ps, **kwargs, foreach=False)
    return found


# name -> (providers, fp32 bytes per param, the baseline the time ratio is taken against:
# a provider's name, or "fastest peer" = the fastest provider not from fusedopt).
OPTIMIZERS = {
    "adamw": (adamw_providers, 28, "torch fused"),
    "lion": (lion_providers, 20, "fastest peer"),
    "sgd": (sgd_providers, 20, "torch fused"),
}


def fusedopt_backends(device: str) -> list[str]:
    available = fusedopt.backends()
    names = ["cpp"] if device == "cpu" else ["triton", "cuda"]
    return [name for name in names if available[name]["available"]]


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


def bandwidth_probe(device: str, numel: int, bytes_per_param: int
                    ) -> tuple[str, Callable[[], None], int]:
    """(description, fn, bytes moved per call) with an optimizer step's access pattern:
    bytes_per_param = 4 (one stream read) + 8 per stream read and written."""
    src = torch.randn(numel, device=device)
    if device == "cpu" and fusedopt.backends()["cpp"]["available"]:
        streams = (bytes_per_param - 4) // 8
        outs = [torch.randn(numel, device=device) for _ in range(streams)]
        return (f"fusedopt.stream_rmw_: {streams} fp32 streams read+written, 1 read "
                f"({4 + 8 * streams} B/elem)",
                lambda: torch.ops.fusedopt.stream_rmw_(outs, src), (4 + 8 * streams) * numel)
    out = torch.randn(numel, device=device)
    return ("torch in-place add: 1 fp32 stream read+written, 1 read (12 B/elem)",
            lambda: out.add_(src), 12 * numel)


def measure_workload(device: str, optimizer: str, workload: str, rounds: int
                     ) -> dict[str, object]:
    make_providers, bytes_per_param, baseline_name = OPTIMIZERS[optimizer]
    measure = timer(device)
    shapes = workload_shapes(workload)
    numel = sum(torch.Size(s).numel() for s in shapes)
    probe_name, probe, probe_bytes = bandwidth_probe(device, numel, bytes_per_param)
    optimizers = {name: make(make_params(shapes, device))
                  for name, make in make_providers(device).items()}
    calls = 5 if workload == "large" else 20
    samples: dict[str, list[float]] = {name: [] for name in [*optimizers, "bandwidth"]}
    for step in [o.step for o in optimizers.values()] + [probe]:  # warm-up: state, first touch
        step()
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    # Interleaved rounds, so every provider sees the same machine conditions.
    for _ in range(rounds):
        samples["bandwidth"].append(measure(probe, calls))
        for name, opt in optimizers.items():
            samples[name].append(measure(opt.step, calls))
    bandwidth = probe_bytes / statistics.median(samples["bandwidth"]) / 1e9
    medians = {name: statistics.median(samples[name]) for name in optimizers}
    if baseline_name == "fastest peer":
        peers = [name for name in medians if not name.startswith("fusedopt")]
        baseline_name = min(peers, key=medians.__getitem__)
    step_bytes = bytes_per_param * numel
    rows = {}
    for name, seconds in medians.items():
        rows[name] = {"ms": seconds * 1e3, "GB/s": step_bytes / seconds / 1e9,
                      "pct_bandwidth": 100 * step_bytes / seconds / 1e9 / bandwidth,
                      "time_vs_baseline": seconds / medians[baseline_name],
                      "ms_samples": [s * 1e3 for s in samples[name]]}
    return {"tensors": len(shapes), "params": numel, "bytes_per_param": bytes_per_param,
            "bandwidth_GBps": bandwidth, "bandwidth_probe": probe_name,
            "baseline": baseline_name, "rows": rows}


def run(device: str, optimizers: list[str], workloads: list[str], rounds: int
        ) -> dict[str, object]:
    report: dict[str, object] = {"machine": _report.machine(device), "results": {}}
    for optimizer in optimizers:
        for workload in workloads:
            report["results"][f"{optimizer} {workload}"] = measure_workload(
                device, optimizer, workload, rounds)
    return report


def markdown(report: dict[str, object]) -> str:
    lines = _report.header(report["machine"])
    for name, result in report["results"].items():
        optimizer, workload = name.split()
        lines += [f"**{optimizer} {workload}**: {result['tensors']} tensors, "
                  f"{result['params']:,} params, fp32 at {result['bytes_per_param']} B/param. "
                  f"Measured bandwidth {result['bandwidth_GBps']:.1f} GB/s "
                  f"({result['bandwidth_probe']}).", "",
                  f"| provider | ms/step | GB/s | % of bandwidth | time / {result['baseline']} |",
                  "|---|---:|---:|---:|---:|"]
        for provider, row in result["rows"].items():
            lines.append(f"| {provider} | {row['ms']:.2f} | {row['GB/s']:.1f} | "
                         f"{row['pct_bandwidth']:.0f}% | {row['time_vs_baseline']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=[*OPTIMIZERS, "muon"],
                        help="muon: bench/bench_muon.py's workloads, in the same report")
    parser.add_argument("--workloads", nargs="+", default=["large", "tiny"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None,
                        help="results file stem (default: bench/results/<machine>/optim)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    elementwise = [name for name in args.optimizers if name != "muon"]
    report = run(args.device, elementwise, args.workloads, args.rounds)
    text = markdown(report)
    if "muon" in args.optimizers:  # matmul-bound: its own workloads and table
        import bench_muon

        muon = bench_muon.run(args.device, ["1024", "transformer"], args.rounds)
        report["results"].update(muon["results"])
        text += "\n" + bench_muon.markdown(muon, with_header=False)
    _report.write(args.out or _report.results_dir(args.device) / "optim", report, text)


if __name__ == "__main__":
    main()
