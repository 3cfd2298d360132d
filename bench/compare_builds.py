"""Two builds of fusedopt, timed against each other on the CPU kernels in alternating runs.

For a refactor that must not change speed: each run is a fresh process importing fusedopt from
one tree (PYTHONPATH=TREE; the tree's extension built in place), timing the C++ optimizer steps
(AdamW, Lion, SGD-momentum on 25.2M fp32 params in 34 tensors and on 2,000 small tensors) and the
norms (forward + backward, fp32 and bf16), median of several calls, with glibc keeping freed memory
(so the norms' fresh outputs do not page-fault). Runs alternate between the
trees (A B A B ...) so both see the same machine drift; the report is the median over runs of
each tree and the ratio new / old.

    python bench/compare_builds.py OLD_TREE NEW_TREE [--runs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, time, torch, fusedopt
torch.manual_seed(0)
LARGE = [(1024, 1024)] * 16 + [(1024,)] * 16 + [(4096, 1024)] * 2
TINY = [(128 + (i * 37) % 1024,) for i in range(2000)]

def median_ms(fn, calls):
    fn(); fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter(); fn(); samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)

def optimizer(make, shapes, calls):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    return median_ms(opt.step, calls)

out = {}
for shapes, name, calls in ((LARGE, "large", 15), (TINY, "tiny", 30)):
    out[f"adamw {name}"] = optimizer(lambda ps: fusedopt.AdamW(ps, lr=1e-3, backend="cpp"), shapes, calls)
    out[f"lion {name}"] = optimizer(lambda ps: fusedopt.Lion(ps, lr=1e-4, backend="cpp"), shapes, calls)
    out[f"sgd {name}"] = optimizer(lambda ps: fusedopt.SGD(ps, lr=1e-2, momentum=0.9, backend="cpp"), shapes, calls)
for norm in ("layer", "rms"):
    for rows, hidden in ((8192, 1024), (2048, 16384)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
            module = (fusedopt.LayerNorm if norm == "layer" else fusedopt.RMSNorm)(hidden, dtype=dtype, backend="cpp")
            dy = torch.randn(rows, hidden, dtype=dtype)
            def train():
                x.grad = None
                module(x).backward(dy)
            out[f"{norm} {rows}x{hidden} {str(dtype)[6:]} fwd+bwd"] = median_ms(train, 10)
print(json.dumps(out))
"""


def run(tree: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree),
           "MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                            text=True, cwd="/", check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, float]]] = {args.old: [], args.new: []}
    for _ in range(args.runs):
        for tree in (args.old, args.new):
            samples[tree].append(run(tree))
    print(f"| case | old ms ({args.old}) | new ms ({args.new}) | new / old | per-run new / old, "
          "min to max |")
    print("|---|---:|---:|---:|---:|")
    for case in samples[args.old][0]:
        old = [s[case] for s in samples[args.old]]
        new = [s[case] for s in samples[args.new]]
        per_run = [n / o for n, o in zip(new, old)]
        print(f"| {case} | {statistics.median(old):.2f} | {statistics.median(new):.2f} | "
              f"{statistics.median(new) / statistics.median(old):.3f} | "
              f"{min(per_run):.2f} to {max(per_run):.2f} |")


if __name__ == "__main__":
    main()
