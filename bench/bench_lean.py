"""Lean states on the 25M-param workload, in one run per algorithm (AdamW, Lion, SGD with
momentum): each mode's step time, the bytes it moves and keeps per param, against the
algorithm's baseline (torch's fused fp32 step; for Lion, which torch lacks, fusedopt's fp32 one)
and bitsandbytes' 8-bit optimizer (AdamW8bit, Lion8bit, SGD8bit; its CPU backend) where it
installs.

AdamW modes (fusedopt.AdamW options; bf16 modes get bf16 params and grads):
  fp32 params: fp32 moments; state_dtype=torch.bfloat16; state_dtype=torch.uint8
  bf16 params: bf16 moments (as torch keeps them); master_weights=True with fp32 or 8-bit
    moments; master_weights="compact" with bf16 or 8-bit moments; kahan_summation and
    stochastic_rounding with bf16 moments.
Lion and SGD modes: fp32 params with fp32, bf16 and 8-bit momentum; bf16 params with the
compact master and 8-bit momentum.

"state" is what the optimizer owns beyond the param and grad: every tensor in its state but
the step counts (moments, scales, masters, corrections). "moved" is the bytes one step reads and
writes per param by the format (say, fp32 params with 8-bit moments: p read+written 8, g 4,
codes read+written 4); GB/s divides that by the step time, and the bandwidth it is compared with
is measured in the same run (bench_optim.bandwidth_probe, 3 fp32 streams read+written, 1 read).
"floor" is the time of one pass over the mode's own streams with next to no arithmetic
(fusedopt.stream_rmw_ on tensors of the same dtypes, measured in the same rounds; CPU only; its
bf16 streams convert as the steps' do, which is integer work on CPUs without AVX512-BF16):
"time / floor" is how far the step is from what this machine's memory allows for its bytes, and
"floor / baseline's" the lowest "time / baseline" it could reach here (streams of 1 or 2 bytes
move at a lower rate than fp32 ones, so it is above the ratio of bytes moved).
With --pairs N, each fusedopt mode also takes N single steps alternating with the baseline's
(which goes first swaps every pair): "paired / baseline" is the median of the N time ratios
and its quartiles, each ratio from two steps a few ms apart, for a machine whose memory speed
drifts between rounds.

    python bench/bench_lean.py [--rounds 5] [--pairs 0] [--device cuda]
Writes a table per algorithm to the terminal, and JSON + Markdown under
bench/results/<machine>/lean.*. On CUDA the fusedopt modes run the Triton kernels, and the
bandwidth probe is torch's in-place add (12 B/elem).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import _report
import torch
from bench_optim import bandwidth_probe, timer, workload_shapes

import fusedopt

U8, I8, BF16, FP32 = torch.uint8, torch.int8, torch.bfloat16, torch.float32
KW = dict(lr=1e-3, weight_decay=1e-2)
LION_KW = dict(lr=1e-4, weight_decay=1e-2)
SGD_KW = dict(lr=1e-3, momentum=0.9)


@dataclass(frozen=True)
class Streams:
    """What one step reads and writes per param, by dtype: the grad (read), the streams read and
    written (the param or its master, moments, corrections), and those only written (a bf16 param
    beside its fp32 master)."""

    grad: torch.dtype
    read_written: tuple[torch.dtype, ...]
    written: tuple[torch.dtype, ...] = ()

    @property
    def moved(self) -> int:
        """Bytes per param."""
        return (self.grad.itemsize + 2 * sum(d.itemsize for d in self.read_written)
                + sum(d.itemsize for d in self.written))


# name: (its Streams, make(params) -> optimizer), the params and grads in Streams.grad's dtype; the
# first mode is the baseline, and a str names the bitsandbytes.optim class of the 8-bit peer
# (measured when it imports and steps on CPU tensors).
ADAMW_MODES = {
    "torch fused fp32": (Streams(FP32, (FP32, FP32, FP32)),
                         lambda ps: torch.optim.AdamW(ps, **KW, fused=True)),
    "fusedopt fp32": (Streams(FP32, (FP32, FP32, FP32)),
                      lambda ps: fusedopt.AdamW(ps, **KW)),
    "fusedopt fp32, bf16 moments": (Streams(FP32, (FP32, BF16, BF16)),
                                    lambda ps: fusedopt.AdamW(ps, **KW, state_dtype=BF16)),
    "fusedopt fp32, 8-bit moments": (Streams(FP32, (FP32, U8, U8)),
                                     lambda ps: fusedopt.AdamW(ps, **KW, state_dtype=U8)),
    "bitsandbytes AdamW8bit fp32": (Streams(FP32, (FP32, U8, U8)), "AdamW8bit"),
    "torch fused bf16": (Streams(BF16, (BF16, BF16, BF16)),
                         lambda ps: torch.optim.AdamW(ps, **KW, fused=True)),
    "fusedopt bf16": (Streams(BF16, (BF16, BF16, BF16)),
                      lambda ps: fusedopt.AdamW(ps, **KW)),
    "fusedopt bf16, fp32 master, fp32 moments": (
        Streams(BF16, (FP32, FP32, FP32), written=(BF16,)),
        lambda ps: fusedopt.AdamW(ps, **KW, master_weights=True, state_dtype=FP32)),
    "fusedopt bf16, fp32 master, 8-bit moments": (
        Streams(BF16, (FP32, U8, U8), written=(BF16,)),
        lambda ps: fusedopt.AdamW(ps, **KW, master_weights=True, state_dtype=U8)),
    "fusedopt bf16, compact master, bf16 moments": (
        Streams(BF16, (BF16, I8, BF16, BF16)),
        lambda ps: fusedopt.AdamW(ps, **KW, master_weights="compact", state_dtype=BF16)),
    "fusedopt bf16, compact master, 8-bit moments": (
        Streams(BF16, (BF16, I8, U8, U8)),
        lambda ps: fusedopt.AdamW(ps, **KW, master_weights="compact", state_dtype=U8)),
    "fusedopt bf16, Kahan, bf16 moments": (
        Streams(BF16, (BF16, BF16, BF16, BF16)),
        lambda ps: fusedopt.AdamW(ps, **KW, kahan_summation=True)),
    "fusedopt bf16, stochastic rounding, bf16 moments": (
        Streams(BF16, (BF16, BF16, BF16)),
        lambda ps: fusedopt.AdamW(ps, **KW, stochastic_rounding=True)),
}


def momentum_modes(make, kw: dict, baseline: dict, peer: str) -> dict:
    """Lion's or SGD's modes: one momentum buffer beside the param (bf16 params with the compact
    master: the param, its correction and the buffer's codes)."""
    return {**baseline,
            "fusedopt fp32": (Streams(FP32, (FP32, FP32)), lambda ps: make(ps, **kw)),
            "fusedopt fp32, bf16 momentum": (Streams(FP32, (FP32, BF16)),
                                             lambda ps: make(ps, **kw, state_dtype=BF16)),
            "fusedopt fp32, 8-bit momentum": (Streams(FP32, (FP32, U8)),
                                              lambda ps: make(ps, **kw, state_dtype=U8)),
            f"bitsandbytes {peer} fp32": (Streams(FP32, (FP32, U8)), peer),
            "fusedopt bf16, compact master, 8-bit momentum": (
                Streams(BF16, (BF16, I8, U8)),
                lambda ps: make(ps, **kw, master_weights="compact", state_dtype=U8))}


# algorithm: (its modes, the keywords of its bitsandbytes peer)
ALGORITHMS = {
    "adamw": (ADAMW_MODES, KW),
    "lion": (momentum_modes(fusedopt.Lion, LION_KW, {}, "Lion8bit"), LION_KW),
    "sgd": (momentum_modes(fusedopt.SGD, SGD_KW, {"torch fused fp32": (
        Streams(FP32, (FP32, FP32)), lambda ps: torch.optim.SGD(ps, **SGD_KW, fused=True))},
        "SGD8bit"), SGD_KW),
}


def bitsandbytes_optimizer(name: str, kw: dict, device: str):
    """make(params) for bitsandbytes.optim.<name>, or None where it does not run here."""
    try:
        import bitsandbytes

        probe = [torch.nn.Parameter(torch.zeros(8192, device=device))]
        probe[0].grad = torch.ones(8192, device=device)
        getattr(bitsandbytes.optim, name)(probe, **kw).step()
    except Exception as error:  # noqa: BLE001 - not installed, or no CPU backend
        print(f"# bitsandbytes {name} not measured: {type(error).__name__}: {error}",
              file=sys.stderr)
        return None
    return lambda ps: getattr(bitsandbytes.optim, name)(ps, **kw)


def make_params(shapes, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-2).to(device, dtype)
        params.append(p)
    return params


def owned_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer's state holds, step counts aside."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for key, value in state.items() if torch.is_tensor(value) and key != "step")


def floor_probes(patterns, numel: int, device: str) -> dict[Streams, object]:
    """For each pattern, fusedopt.stream_rmw_ over fresh tensors of its dtypes: one pass that
    reads and writes what the step does with next to no arithmetic, chunked and threaded as the
    steps are, so its time is the floor that pattern's step could reach here. A stream only
    written counts as read and written (a cache reads a line before writing it back, as the steps
    write). Patterns share their tensors. None on CUDA (the probe op is CPU only)."""
    if device != "cpu" or not fusedopt.backends()["cpp"]["available"]:
        return {}
    pool: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def tensor(dtype: torch.dtype, index: int) -> torch.Tensor:
        if (dtype, index) not in pool:
            pool[dtype, index] = torch.zeros(numel, dtype=dtype)
        return pool[dtype, index]

    probes = {}
    for pattern in dict.fromkeys(patterns):
        outs_dtypes = [*pattern.read_written, *pattern.written]
        outs = [tensor(d, outs_dtypes[:k].count(d)) for k, d in enumerate(outs_dtypes)]
        src = tensor(pattern.grad, outs_dtypes.count(pattern.grad))
        probes[pattern] = lambda outs=outs, src=src: torch.ops.fusedopt.stream_rmw_(outs, src)
    return probes


def paired_ratio(baseline, step, pairs: int, measure) -> dict[str, float]:
    """The median and quartiles of step's time over baseline's in `pairs` alternating single
    steps; which one goes first swaps every pair."""
    ratios = []
    for i in range(pairs):
        if i % 2 == 0:
            base = measure(baseline, 1)
            mine = measure(step, 1)
        else:
            mine = measure(step, 1)
            base = measure(baseline, 1)
        ratios.append(mine / base)
    ratios.sort()
    return {"median": statistics.median(ratios),
            "q1": ratios[round(0.25 * (pairs - 1))], "q3": ratios[round(0.75 * (pairs - 1))]}


def run_algorithm(modes: dict, peer_kw: dict, shapes, rounds: int, device: str, pairs: int = 0
                  ) -> dict[str, object]:
    """One algorithm's table: its modes interleaved round by round with the bandwidth probe and
    each mode's floor probe; then, with pairs, each fusedopt mode alternated with the baseline
    (paired_ratio)."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    makers = {}
    for name, (streams, make) in modes.items():
        if isinstance(make, str):
            make = bitsandbytes_optimizer(make, peer_kw, device)
        if make is not None:
            makers[name] = (streams, make)
    probe_name, probe, probe_bytes = bandwidth_probe(device, numel, 28)
    floors = floor_probes([streams for streams, _ in makers.values()], numel, device)
    measure = timer(device)
    optimizers = {name: make(make_params(shapes, streams.grad, device))
                  for name, (streams, make) in makers.items()}
    for step in [o.step for o in optimizers.values()] + [probe, *floors.values()]:
        step()  # state, first touch
        step()
    samples: dict[object, list[float]] = {key: [] for key in [*optimizers, "bandwidth", *floors]}
    for _ in range(rounds):  # interleaved: every mode sees the same machine conditions
        samples["bandwidth"].append(measure(probe, 5))
        for pattern, floor in floors.items():
            samples[pattern].append(measure(floor, 5))
        for name, opt in optimizers.items():
            samples[name].append(measure(opt.step, 1 if name.startswith("bitsandbytes") else 5))
    bandwidth = probe_bytes / statistics.median(samples["bandwidth"]) / 1e9
    medians = {key: statistics.median(values) for key, values in samples.items() if values}
    baseline_name = next(iter(optimizers))
    baseline = medians[baseline_name]
    baseline_state = owned_bytes(optimizers[baseline_name])
    baseline_floor = medians.get(makers[baseline_name][0])
    peer = next((name for name in optimizers if name.startswith("bitsandbytes")), None)
    paired = {name: paired_ratio(optimizers[baseline_name].step, opt.step, pairs, measure)
              for name, opt in optimizers.items()
              if pairs and name != baseline_name and name.startswith("fusedopt")}
    rows = {}
    for name in optimizers:
        seconds = medians[name]
        streams, _ = makers[name]
        floor = medians.get(streams)
        state = owned_bytes(optimizers[name])
        rows[name] = {
            "param_dtype": str(streams.grad).replace("torch.", ""), "ms": seconds * 1e3,
            "time_vs_baseline": seconds / baseline,
            "time_vs_bitsandbytes_8bit": seconds / medians[peer] if peer else None,
            "state_MB": state / 1e6, "state_vs_baseline": state / baseline_state,
            "state_B_per_param": state / numel, "moved_B_per_param": streams.moved,
            "GBps": streams.moved * numel / seconds / 1e9,
            "pct_bandwidth": 100 * streams.moved * numel / seconds / 1e9 / bandwidth,
            "floor_ms": floor * 1e3 if floor else None,
            "time_vs_floor": seconds / floor if floor else None,
            "floor_vs_baseline_floor": floor / baseline_floor if floor else None,
            "paired_vs_baseline": paired.get(name),
            "ms_samples": [s * 1e3 for s in samples[name]]}
    return {"tensors": len(shapes), "params": numel, "bandwidth_GBps": bandwidth,
            "bandwidth_probe": probe_name, "baseline": baseline_name,
            "bitsandbytes_peer": peer, "pairs": pairs, "rows": rows}


def run(rounds: int, algorithms=tuple(ALGORITHMS), device: str = "cpu", pairs: int = 0
        ) -> dict[str, object]:
    shapes = workload_shapes("large")
    return {"machine": _report.machine(device),
            "results": {f"{name} lean": run_algorithm(*ALGORITHMS[name], shapes, rounds, device,
                                                      pairs)
                        for name in algorithms}}


TITLES = {"adamw lean": "AdamW", "lion lean": "Lion", "sgd lean": "SGD (momentum 0.9)"}


def _cell(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _paired_cell(paired: dict[str, float] | None) -> str:
    if paired is None:
        return ""
    return f"{paired['median']:.2f} ({paired['q1']:.2f}-{paired['q3']:.2f})"


def markdown(report: dict[str, object]) -> str:
    lines = _report.header(report["machine"])
    for key, result in report["results"].items():
        lines += ["", f"**{TITLES[key]}, lean states**: {result['tensors']} tensors, "
                  f"{result['params']:,} params. Measured bandwidth "
                  f"{result['bandwidth_GBps']:.1f} GB/s ({result['bandwidth_probe']}). "
                  f"Baseline: {result['baseline']}.", "",
                  "| mode | params | ms/step | time / baseline | time / bnb 8-bit | "
                  "state MB | state / baseline's | state B/param | moved B/param | GB/s | "
                  "% of bandwidth | floor ms | time / floor | floor / baseline's | "
                  f"paired / baseline ({result['pairs']} pairs) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in result["rows"].items():
            lines.append(
                f"| {name} | {row['param_dtype']} | {row['ms']:.2f} | "
                f"{row['time_vs_baseline']:.2f} | {_cell(row['time_vs_bitsandbytes_8bit'], 3)} | "
                f"{row['state_MB']:.1f} | {row['state_vs_baseline']:.2f} | "
                f"{row['state_B_per_param']:.2f} | {row['moved_B_per_param']} | "
                f"{row['GBps']:.1f} | {row['pct_bandwidth']:.0f}% | "
                f"{_cell(row['floor_ms'], 2)} | {_cell(row['time_vs_floor'], 2)} | "
                f"{_cell(row['floor_vs_baseline_floor'], 2)} | "
                f"{_paired_cell(row['paired_vs_baseline'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=0,
                        help="alternating single steps of each fusedopt mode and the baseline")
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS),
                        default=list(ALGORITHMS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None,
                        help="results file stem (default: bench/results/<machine>/lean)")
    args = parser.parse_args()
    report = run(args.rounds, args.algorithms, args.device, args.pairs)
    text = markdown(report)
    print(text)
    _report.write(args.out or _report.results_dir(args.device) / "lean", report, text)


if __name__ == "__main__":
    main()
