#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine (its own torch and triton, no network):
# build in place, the tests marked `cuda` (tests/test_cuda.py, the lean ops on CUDA tensors),
# then the GPU benchmarks (python -m bench --device cuda, bench_lean --device cuda). Each stage
# has its own time limit, so one that hangs still leaves the others their turn. Reports go to
# bench/results/<the GPU>/ and, when $OUT is set (the device tool), are copied there (Markdown
# and JSON; the tool brings back at most 8 files).
#
#     bash bench/gpu_check.sh [--quick]      # --quick: fewer rounds and sizes (~4 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
export FUSEDOPT_BUILD_EXT=auto TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

stage() {  # stage SECONDS NAME COMMAND...: runs COMMAND under a time limit, says how it ended
    local limit=$1 name=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@"
    echo "== $name: exit $?"
}

stage 300 build python -m pip install --quiet --no-build-isolation --no-deps -e .
stage 30 backends python -c "import fusedopt, json; print(json.dumps(fusedopt.backends(), indent=1))"
stage 300 "cuda tests" python -m pytest tests -q -m cuda -x -p no:cacheprovider
stage 300 "kernel benchmarks" python -m bench --device cuda "${quick[@]}" --only adamw lion sgd muon norm
stage 180 "lean benchmark" python bench/bench_lean.py --device cuda \
    --rounds "$([[ ${#quick[@]} -gt 0 ]] && echo 3 || echo 7)"

if [[ -n "${OUT:-}" ]]; then
    results=$(python -c "import sys; sys.path.insert(0, 'bench'); import _report; \
print(_report.results_dir('cuda'))")
    cp "$results"/optim.md "$results"/muon.md "$results"/norm.md "$results"/lean.md \
        "$results"/optim.json "$results"/muon.json "$results"/norm.json "$results"/lean.json \
        "$OUT"/ 2>/dev/null
    ls -l "$OUT"
fi
