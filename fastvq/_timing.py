"""Wall-clock medians for the demos' quick speed comparisons (the benchmarks have their own runner)."""
from __future__ import annotations

import statistics
import time


def median_seconds(fn, runs: int = 5) -> float:
    """Median wall time of fn() over `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
