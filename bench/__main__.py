"""Every kernel benchmark in one command, from the repo root:

    python -m bench [--device cpu|cuda] [--quick] [--only adamw lion sgd muon norm]

Runs bench/bench_optim.py (AdamW, Lion, SGD), bench/bench_muon.py and bench/bench_norm.py, each in
a process of its own, prints their tables, and writes their JSON and Markdown plus one PNG chart
each (every provider's time over the baseline's) under bench/results/<machine>/. --quick: fewer
rounds and sizes, for a look rather than a record. The training demo is bench/demo.py (make demo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmark scripts import their siblings by name

import _report  # noqa: E402
import torch  # noqa: E402

ELEMENTWISE = ["adamw", "lion", "sgd"]
NAMES = [*ELEMENTWISE, "muon", "norm"]


def commands(device: str, only: list[str], quick: bool, directory: Path) -> dict[str, list[str]]:
    """name -> the benchmark script's command line."""
    rounds = ["--rounds", "3" if quick else "7"]
    found = {}
    elementwise = [name for name in ELEMENTWISE if name in only]
    if elementwise:
        found["optim"] = ["bench_optim.py", "--optimizers", *elementwise, *rounds]
    if "muon" in only:
        workloads = ["--workloads", "1024"] if quick else []
        found["muon"] = ["bench_muon.py", *workloads, *rounds]
    if "norm" in only:
        sizes = ["--shapes", "8192x1024", "--dtypes", "fp32"] if quick else []
        found["norm"] = ["bench_norm.py", *sizes, "--rounds", "3" if quick else "5"]
    return {name: [sys.executable, str(HERE / script), "--device", device, *args,
                   "--out", str(directory / name)]
            for name, (script, *args) in found.items()}


def chart_bars(name: str, report: dict) -> tuple[str, list[tuple[str, float, bool]]]:
    """(the baseline, (label, time / baseline, is fusedopt) per bar) of one benchmark's report."""
    bars = []
    if name == "norm":
        # fwd+bwd against torch eager, in the last allocator condition: the one that keeps freed
        # memory, so that page faults on fresh outputs do not decide the comparison.
        condition = list(report["conditions"])[-1]
        for case, result in report["conditions"][condition].items():
            eager = result["rows"]["torch eager"]["train_ms"]
            bars += [(f"{case} fwd+bwd: {provider}", row["train_ms"] / eager,
                      provider.startswith("fusedopt")) for provider, row in result["rows"].items()]
        return "torch eager (fwd+bwd; glibc keeping freed memory)", bars
    for case, result in report["results"].items():
        for provider, row in result["rows"].items():
            baseline = row.get("baseline", result.get("baseline"))
            bars.append((f"{case}: {provider} (vs {baseline})", row["time_vs_baseline"],
                         provider.startswith("fusedopt")))
    return "the baseline named in each bar", bars


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sizes")
    parser.add_argument("--only", nargs="+", default=NAMES, choices=NAMES, metavar="NAME",
                        help=f"some of {', '.join(NAMES)} (default: all)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    directory = _report.results_dir(args.device)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, command in commands(args.device, args.only, args.quick, directory).items():
        print(f"\n## {name}: python {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
        written.append(chart(name, directory))
    print(f"\ncharts: {', '.join(str(p) for p in written)}")


def chart(name: str, directory: Path) -> Path:
    """directory/NAME.png from directory/NAME.json."""
    report = json.loads((directory / f"{name}.json").read_text())
    baseline, bars = chart_bars(name, report)
    title = f"{name} ({report['machine']['device']}; commit {report['machine']['commit']})"
    return _report.ratio_chart(directory / f"{name}.png", title, bars, baseline)


if __name__ == "__main__":
    main()
