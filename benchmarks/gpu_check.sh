#!/usr/bin/env bash
# The whole check on a CUDA machine in one go: install against the torch already there, run the
# test suite, run the GPU benchmarks. Meant for a lent machine without internet, so every step has
# a timeout and a failing step is reported, not fatal: the later steps still run.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to benchmarks/results
#
# Writes into $OUT: gpu_check.log (everything), tests.txt, gpu_quantize.txt, quantize_gpu.json,
# gpu_window_attention.txt, window_attention_gpu.json, gpu_sampling.txt, sampling_cuda.json.
# Total wall time stays under GPU_CHECK_BUDGET_S (default 470 s): each step gets at most 300 s and
# never more than what is left.
set -u
set -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export OUT
LOG="$OUT/gpu_check.log"
: > "$LOG"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-470} ))
STATUS=0

step() { echo "=== $* [$(date -u +%H:%M:%S)]" | tee -a "$LOG"; }

# Seconds a step may take: 300, or what is left of the budget.
step_timeout() {
    local left=$(( DEADLINE - $(date +%s) ))
    (( left > 300 )) && left=300
    (( left < 10 )) && left=10
    echo "$left"
}

# Run a command under a timeout with its output on stdout and in the log (and in file $1 unless
# it is "-"); return its status, 124 when it timed out.
run_step() {
    local copy="$1"; shift
    local t rc; t=$(step_timeout)
    if [ "$copy" = "-" ]; then
        timeout "$t" "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
    else
        timeout "$t" "$@" 2>&1 | tee "$copy"
        rc=${PIPESTATUS[0]}
        cat "$copy" >> "$LOG"
    fi
    [ "$rc" = "124" ] && echo "!!! timed out after ${t}s: $*" | tee -a "$LOG"
    return "$rc"
}

# A system python may be marked externally managed (PEP 668); this machine is disposable. There is
# no internet: fail at once instead of retrying downloads.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { run_step - python3 -m pip install --retries 0 --timeout 5 "$@"; }

step "machine"
run_step - nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
run_step - python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

step "install (builds fastvq._C against the installed torch)"
pip_install --no-build-isolation --no-deps -e . || STATUS=1
if ! timeout 60 python3 -c "import fastvq._C, fastvq.kernels.quantize" >/dev/null 2>&1; then
    # An old setuptools installs in legacy develop mode, which ignores package_dir: build in place
    # and give this (throwaway) copy of the tree the fastvq.kernels the install would have mapped.
    echo "--- fastvq not importable after install; building in place" | tee -a "$LOG"
    run_step - python3 setup.py build_ext --inplace || STATUS=1
    [ -e fastvq/kernels ] || ln -s ../kernels fastvq/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # for scripts, whose own folder shadows the cwd
fi
if ! timeout 60 python3 -c "import pytest, pytest_benchmark" >/dev/null 2>&1; then
    pip_install pytest pytest-benchmark || echo "--- pytest / pytest-benchmark unavailable; continuing" | tee -a "$LOG"
fi
run_step - python3 -c "import fastvq, fastvq.kernels.quantize; print(fastvq.__file__); [print(' ', s) for s in fastvq.available_backends().values()]" || STATUS=1

step "tests"
if ! run_step "$OUT/tests.txt" python3 -m pytest -q tests -x -k "not ddp"; then
    echo "!!! tests failed or did not finish (see $OUT/tests.txt)" | tee -a "$LOG"
    STATUS=1
fi

step "benchmark: nearest_code"
# The benchmark stops starting new cases at its own budget, well inside the step's timeout.
BENCH_BUDGET=$(( $(step_timeout) - 60 ))
(( BENCH_BUDGET < 30 )) && BENCH_BUDGET=30
if ! run_step "$OUT/gpu_quantize.txt" env TRITON_PRINT_AUTOTUNING=1 python3 benchmarks/gpu_quantize.py --out "$OUT" --budget-s "$BENCH_BUDGET"; then
    echo "!!! gpu_quantize.py failed or did not finish (partial results stay in $OUT/quantize_gpu.json)" | tee -a "$LOG"
    STATUS=1
fi

step "benchmark: window_attention"
# Cases run most telling first (T = 16384), so a budget cut keeps them; FlexAttention compiles per T and mode.
BENCH_BUDGET=$(( $(step_timeout) - 60 ))
(( BENCH_BUDGET < 30 )) && BENCH_BUDGET=30
if ! run_step "$OUT/gpu_window_attention.txt" python3 benchmarks/gpu_window_attention.py --out "$OUT" --budget-s "$BENCH_BUDGET"; then
    echo "!!! gpu_window_attention.py failed or did not finish (partial results stay in $OUT/window_attention_gpu.json)" | tee -a "$LOG"
    STATUS=1
fi

step "benchmark: cached sampling"
# fastvq.sample_with_past against taming's sample_with_past, 256 new tokens at batch 1 and 16 (one
# fresh process per case, CUDA start-up included). Shares the 470 s budget above: raise
# GPU_CHECK_BUDGET_S only if the device lease allows it.
BENCH_BUDGET=$(( $(step_timeout) - 60 ))
(( BENCH_BUDGET < 30 )) && BENCH_BUDGET=30
if ! run_step "$OUT/gpu_sampling.txt" python3 benchmarks/bench_sampling_loop.py --device cuda --lengths 256 \
        --batches 1 16 --impls fastvq taming_past --memory-lengths --out "$OUT/sampling_cuda.json" \
        --budget-s "$BENCH_BUDGET" --timeout "$(step_timeout)"; then
    echo "!!! bench_sampling_loop.py --device cuda failed or did not finish (partial results stay in $OUT/sampling_cuda.json)" | tee -a "$LOG"
    STATUS=1
fi

step "done (status $STATUS)"
ls -l "$OUT" | tee -a "$LOG"
exit "$STATUS"
