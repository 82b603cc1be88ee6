"""The timing harness: every figure fastvq reports comes from here.

`benchmarks/compare_<op>.py` (through benchmarks/common.py), `fastvq bench`, the demo's kernel
timings and the k-means demo's throughput all call these two functions, so a number in the README,
in a demo report and on a terminal means the same thing:

  time_call(fn, device=...)    warm-up call(s), then the median of several timed calls (wall clock
                               on CPU; CUDA events on a GPU, each call waited for)
  peak_memory(fn, device=...)  the peak extra memory of one more call, outputs included
  median_seconds(fn, runs=5)   time_call with a fixed number of calls: the demos' quick figures

Time first, then measure memory: on CPU, peak_memory switches glibc to mmap for large blocks for the
rest of the process, which slows allocation.
"""
from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from pathlib import Path

import torch

PEAK_MEMORY_METHOD = {
    "cpu": "peak extra resident memory of one call (outputs included), after warm-up and timing: glibc is set "
           "(mallopt M_MMAP_THRESHOLD=64 KiB) to map every large block with mmap so that freed memory leaves "
           "the resident set, malloc_trim(0), fastvq.empty_cache(), the high-water mark is reset by writing 5 "
           "to /proc/self/clear_refs, and the result is VmHWM after the call minus VmRSS before it",
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
}


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def time_call(fn, *, device="cpu", warmup: int | None = None, min_runs: int = 5, max_runs: int = 50,
              target_s: float = 1.0, slow_s: float = 2.0, slow_runs: int = 3, warmup_s: float = 0.0) -> dict:
    """Median time of fn() over several calls, after `warmup` untimed calls (default 1 on CPU, 3 on
    CUDA, where the first calls also compile, autotune and fill the allocator's cache), and more
    until `warmup_s` seconds have passed: a call whose outputs are tens of MB runs slower for its
    first half second or so (fresh pages from the system) than once the process has settled.

    The last warm-up call sets the number of timed calls: enough for about `target_s` seconds in
    all, at least `min_runs` and at most `max_runs`; `slow_runs` when it took over `slow_s` seconds.
    On a CUDA device each call is timed with CUDA events and waited for. Returns median_s, min_s,
    runs, times_s, first_call_s (the first warm-up: compilation and autotuning included) and
    warmup_s (the last warm-up).
    """
    cuda = _is_cuda(device)
    warmup = (3 if cuda else 1) if warmup is None else warmup
    if warmup < 1 or min_runs < 1 or max_runs < min_runs or slow_runs < 1:
        raise ValueError(f"need warmup >= 1 and 1 <= min_runs <= max_runs and slow_runs >= 1, got warmup={warmup}, "
                         f"min_runs={min_runs}, max_runs={max_runs}, slow_runs={slow_runs}")
    warmups = []
    while len(warmups) < warmup or (sum(warmups) < warmup_s and len(warmups) < 1000):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        warmups.append(time.perf_counter() - t0)
    last = warmups[-1]
    runs = slow_runs if last > slow_s else max(min_runs, min(max_runs, int(target_s / max(last, 1e-9))))
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs, "times_s": times,
            "first_call_s": warmups[0], "warmup_s": last, "warmup_calls": len(warmups)}


def median_seconds(fn, *, runs: int = 5, device="cpu") -> float:
    """time_call's median with exactly `runs` timed calls after one warm-up."""
    return time_call(fn, device=device, min_runs=runs, max_runs=runs)["median_s"]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    if m is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(m.group(1))


def peak_memory(fn, *, device="cpu") -> int | None:
    """Peak extra memory in bytes of one call of fn (PEAK_MEMORY_METHOD[device type]); None where the
    operating system cannot tell (no /proc, no glibc)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    from . import empty_cache

    empty_cache()  # blocks fastvq keeps for reuse would not show as new resident memory: count them afresh
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except (OSError, AttributeError):
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0, peak - before) * 1024
