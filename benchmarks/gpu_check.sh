#!/usr/bin/env bash
# The whole check on a CUDA machine in one go: install against the torch already there, run the
# test suite (the Triton kernels on the GPU), then every benchmarks/compare_<op>.py --device cuda
# (the same scripts `make compare` runs on the CPU), then report.py's tables and plots. Meant for a
# lent machine without internet, so every step has a timeout and a failing step is reported, not
# fatal: the later steps still run.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to benchmarks/results
#
# Writes into $OUT: gpu_check.log (everything), tests.txt, and per op <op>_cuda.json, <op>_cuda.txt
# (its progress lines) and <op>_cuda.png, then tables_cuda.md (report.py's tables of those files).
# Total wall time stays under GPU_CHECK_BUDGET_S (default 470 s): the tests get at most
# GPU_CHECK_TESTS_S (default 180 s), each comparison a weighted share of what is left (its
# --budget-s stops new cases 30 s before its share ends).
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

# Seconds a step may take: CAP (default 300), or what is left of the budget.
step_timeout() {
    local left=$(( DEADLINE - $(date +%s) )) cap=${CAP:-300}
    (( left > cap )) && left=$cap
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
if ! CAP=${GPU_CHECK_TESTS_S:-180} run_step "$OUT/tests.txt" python3 -m pytest -q tests -x -k "not ddp"; then
    echo "!!! tests failed or did not finish (see $OUT/tests.txt)" | tee -a "$LOG"
    STATUS=1
fi

# The comparisons, most telling first, each with a weight: its share of the time left is weight /
# (sum of the weights still to run), so what one leaves unused goes to the next. Any other
# compare_<op>.py runs last with weight 1.
ORDER=(quantize:3 window_attention:4 raster_window:2 sampling:2 decode_linear:1)
for script in benchmarks/compare_*.py; do
    op=$(basename "$script" .py); op=${op#compare_}
    [[ " ${ORDER[*]} " == *" $op:"* ]] || ORDER+=("$op:1")
done
for i in "${!ORDER[@]}"; do
    op=${ORDER[$i]%:*}
    weight=${ORDER[$i]#*:}
    rest=0
    for entry in "${ORDER[@]:$i}"; do rest=$(( rest + ${entry#*:} )); done
    step "benchmark: $op"
    share=$(( (DEADLINE - $(date +%s)) * weight / rest ))
    budget=$(( share - 30 ))  # the script starts no case after this; the case under way finishes
    (( budget < 20 )) && budget=20
    if ! CAP=$(( share > 20 ? share : 20 )) run_step "$OUT/${op}_cuda.txt" env TRITON_PRINT_AUTOTUNING=1 \
            python3 "benchmarks/compare_$op.py" --device cuda --out "$OUT/${op}_cuda.json" --budget-s "$budget"; then
        echo "!!! compare_$op.py --device cuda failed or did not finish (partial results stay in $OUT/${op}_cuda.json)" | tee -a "$LOG"
        STATUS=1
    fi
done

step "tables and plots"
if ! run_step "$OUT/tables_cuda.md" python3 benchmarks/report.py --print "$OUT"/*_cuda.json; then
    echo "!!! report.py failed (the JSON files are what counts)" | tee -a "$LOG"
    STATUS=1
fi

step "done (status $STATUS)"
ls -l "$OUT" | tee -a "$LOG"
exit "$STATUS"
