#!/usr/bin/env bash
# The GPU checks, for a lent GPU machine (its own torch and triton, no network), in two calls
# that each fit the device tool's 10-minute limit on one command:
#
#     bash bench/gpu_check.sh tests    # build in place, then the tests marked `cuda` (~6 min)
#     bash bench/gpu_check.sh bench    # the GPU benchmarks, quick settings (~7 min)
#
# `tests` runs tests/test_cuda.py and the lean ops on CUDA tensors; `bench` runs
# `python -m bench --device cuda --quick` and `bench/bench_lean.py --device cuda`, whose reports
# land in bench/results/<the GPU>/. Each stage has its own time limit, so one that hangs leaves
# the others their turn, and where $OUT is set (the device tool) each stage's output and
# reports are copied there as soon as it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
export FUSEDOPT_BUILD_EXT=auto TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

stage() {  # stage SECONDS NAME COMMAND...: COMMAND under a time limit, its output kept in $OUT
    local limit=$1 name=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "${OUT:-/tmp}/${name}.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

copy_reports() {  # the reports written so far, to $OUT
    [[ -n "${OUT:-}" ]] || return 0
    local results
    results=$(python -c "import sys; sys.path.insert(0, 'bench'); import _report; \
print(_report.results_dir('cuda'))")
    for report in optim muon norm lean; do
        [[ -f "$results/$report.md" ]] && cp "$results/$report.md" "$OUT/"
    done
}

build() {  # in place; the CUDA sources compile for sm_90 on the machine's nvcc
    stage 240 build python -m pip install --quiet --no-build-isolation --no-deps -e .
}

case "${1:-}" in
    tests)
        build
        stage 30 backends python -c "import fusedopt, json; \
print(json.dumps(fusedopt.backends(), indent=1))"
        stage 300 cuda-tests python -m pytest tests -q -m cuda -p no:cacheprovider
        ;;
    bench)
        # (A machine given back between the two calls comes back bare: build again.)
        python -c "import fusedopt._C" 2>/dev/null || build
        stage 330 kernel-bench python -m bench --device cuda --quick
        copy_reports
        stage 200 lean-bench python bench/bench_lean.py --device cuda --rounds 3
        copy_reports
        ;;
    *)
        echo "usage: bash bench/gpu_check.sh tests|bench" >&2
        exit 2
        ;;
esac
