"""Shared by the benchmark scripts: the machine description, timing, and peak-memory measurement."""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MIB = 1 << 20


# ----------------------------------------------------------------------------- machine description

def _first_match(path: str, pattern: str) -> str | None:
    try:
        m = re.search(pattern, Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return m.group(1).strip() if m else None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(threads: int) -> dict:
    """What ran the benchmark: enough to tell two result files apart and to judge them."""
    import torch

    flags = (_first_match("/proc/cpuinfo", r"^flags\s*:(.*)$") or "").split()
    mem_kib = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    info = {
        "cpu": _first_match("/proc/cpuinfo", r"^model name\s*:(.*)$") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags],
        "memory_gib": round(int(mem_kib) / MIB, 1) if mem_kib else None,
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other processes on the same cores distort the timings (2-thread OpenMP stalls for whole
        # scheduler slices); the load average at the start says how quiet the machine was.
        "load_average_1_5_15min_at_start": [round(v, 2) for v in os.getloadavg()],
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        # Other work in the tree (an uncommitted kernel) changes what was measured; say so.
        "git_dirty_paths": [line[3:] for line in (_git("status", "--porcelain", "--", "csrc", "fastvq", "kernels") or "").splitlines()],
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    for dist in ("taming-transformers-rom1504", "vector-quantize-pytorch"):
        try:
            from importlib.metadata import version

            info[dist] = version(dist)
        except Exception:  # noqa: BLE001 - absent anchors are recorded as None, not fatal
            info[dist] = None
    return info


# ----------------------------------------------------------------------------- timing

def time_call(fn, *, min_runs: int = 5, slow_runs: int = 3, slow_s: float = 2.0, target_s: float = 1.0,
              max_runs: int = 50) -> dict:
    """One warm-up call, then the median of several timed calls.

    At least `min_runs` runs (more for fast calls, up to about `target_s` seconds in all); calls whose
    warm-up took over `slow_s` seconds get `slow_runs` runs instead.
    """
    t0 = time.perf_counter()
    fn()
    warmup = time.perf_counter() - t0
    runs = slow_runs if warmup > slow_s else max(min_runs, min(max_runs, int(target_s / max(warmup, 1e-9))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs, "warmup_s": warmup, "times_s": times}


# ----------------------------------------------------------------------------- peak memory

PEAK_MEMORY_METHOD = (
    "peak extra resident memory of one call (outputs included), in a fresh process per case, after "
    "warm-up and timing: glibc is set (mallopt M_MMAP_THRESHOLD=64 KiB) to map every large block with "
    "mmap so that freed memory leaves the resident set, malloc_trim(0), the high-water mark is reset "
    "by writing 5 to /proc/self/clear_refs, and the result is VmHWM after the call minus VmRSS before it"
)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kib(field: str) -> int:
    return int(_first_match("/proc/self/status", rf"^{field}:\s+(\d+)"))


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory the call adds (see PEAK_MEMORY_METHOD); None where /proc cannot tell.

    It switches glibc to mmap for large blocks for the rest of the process, which slows allocation:
    time first, then call this.
    """
    try:  # blocks fastvq caches for reuse would not show as new resident memory: count them afresh
        import fastvq

        fastvq.empty_cache()
    except ImportError:
        pass
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except (OSError, TypeError, AttributeError):
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0, peak - before) * 1024


# ----------------------------------------------------------------------------- one case per process

def run_case(script: str, case: dict, threads: int, timeout_s: float) -> dict:
    """Run `script --worker CASE` in a fresh process (clean allocator and peak RSS) and return the
    result it prints, or the case with an "error" saying why there is none."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, script, "--worker", json.dumps(case), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**case, "error": f"exit {proc.returncode}: {tail}"}


def worker_main(case_json: str, run_worker, threads: int) -> int:
    """The --worker side of run_case: measure one case and print it; a failing case is reported,
    so the run goes on."""
    case = json.loads(case_json)
    try:
        result = run_worker(case, threads)
    except Exception as e:  # noqa: BLE001
        result = {**case, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_cases(script: str, todo: list, doc: dict, out, *, threads: int, timeout_s: float, describe, outcome,
              budget_s: float = float("inf"), skip=None, label: str = "") -> dict:
    """Run every case of `todo` in its own process (run_case) and collect the results in doc,
    rewriting `out` after every case so a crash keeps what was measured. No case starts once
    budget_s seconds have passed; skip(case, results so far) may return a skipped result instead.
    Prints one line per case (describe(case), outcome(result)) and the load average at both ends."""
    start = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"{len(todo)} cases{label}, {threads} threads, writing {out}; load average {load:.2f}", flush=True)
    if load > 0.5:
        print(f"warning: the machine is not quiet (load average {load:.2f}); timings will be noisy", flush=True)
    for i, case in enumerate(todo, 1):
        r = skip(case, doc["results"]) if skip is not None else None
        if "skipped" in case:
            r = case
        elif time.perf_counter() - start > budget_s:
            r = {**case, "skipped": f"time budget of {budget_s:.0f} s spent (--budget-s)"}
        elif r is None:
            r = run_case(script, case, threads, timeout_s)
        doc["results"].append(r)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"[{i:>2}/{len(todo)}] {describe(case)} {outcome(r)}", flush=True)
    doc["machine"]["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
    doc["elapsed_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc
