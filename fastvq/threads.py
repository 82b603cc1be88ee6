"""FairThreads: torch's intra-op thread count, giving way to other processes on a busy machine.

torch cuts each intra-op region (a convolution, a matmul, most of fastvq's large kernels) into one
equal share per thread and waits for the last share. Beside other processes that want the cores,
a share whose thread is off its core stalls the whole region until the scheduler gives it a core
back. On 2 cores beside two busy-loop processes a VQGAN training step on torch's 2 threads took 3.3
to 7 times its quiet time; on 1 thread 2.75 times (a fair share of the machine costs 2 to 3 times).
Fewer threads than the cores the others leave free never wait for a descheduled share.

FairThreads, called once per training or sampling step, counts at most every `period_s` the tasks
running on this process's cores that are not its own (/proc/loadavg's runnable count less this
process's running threads, scaled to the CPUs this process may run on), and sets torch's thread
count to the cores they leave: at least 1, at most the count it started with. It gives way only to
load that lasts (the fewest other tasks seen over the last `history` counts), so a passing task does
not halve a step, and takes the threads back as soon as the load is gone. On a quiet machine it
never changes anything; off Linux (no /proc) neither.

    fair = fastvq.FairThreads()
    with fair:                      # restores torch's thread count on the way out
        for batch in data:
            fair()                  # ~40 us every period_s, a time check otherwise
            train_step(batch)

`fastvq train-vqgan` and `train-gpt` do this with --fair-threads. It is not their default: a
convolution's backward sums in a different order on another thread count, so the weights a run
ends with would depend on the machine's load, and an interrupted run resumed would no longer equal
the uninterrupted one bit for bit.
"""
from __future__ import annotations

import collections
import os
import time

import torch

def _own_running_threads() -> int:
    own = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended between the listing and the read
            continue
        if stat[stat.rindex(")") + 2] == "R":  # the state follows the parenthesised name
            own += 1
    return own


def other_running_tasks() -> float | None:
    """Tasks running (or ready to) on this process's CPUs that are not its threads, now; None where
    the system does not say (no /proc). The machine-wide count is scaled by the share of the
    machine's CPUs this process may use (a process pinned to 2 of 64 cores sees 1/32 of it)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = _own_running_threads()
        mine, online = len(os.sched_getaffinity(0)), os.cpu_count() or 1
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0, running - own) * min(1.0, mine / online)


class FairThreads:
    """Call once per step: torch.set_num_threads(cores the other running tasks leave, within
    [1, max_threads]). See the module docstring."""

    def __init__(self, max_threads: int | None = None, period_s: float = 0.25, history: int = 3,
                 enabled: bool = True):
        if max_threads is not None and (isinstance(max_threads, bool) or not isinstance(max_threads, int)
                                        or max_threads < 1):
            raise ValueError(f"FairThreads: max_threads must be an integer >= 1 or None, got {max_threads!r}")
        if not (isinstance(period_s, (int, float)) and period_s >= 0):
            raise ValueError(f"FairThreads: period_s must be a number >= 0, got {period_s!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"FairThreads: history must be an integer >= 1, got {history!r}")
        self.start_threads = torch.get_num_threads()
        self.max_threads = max_threads or self.start_threads
        self.period_s, self.enabled = float(period_s), bool(enabled)
        self.threads = torch.get_num_threads()
        self.changes = 0  # how often the count changed (a run's log can say it gave way)
        self._seen: collections.deque = collections.deque(maxlen=history)
        self._next = 0.0

    def cores(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    def want(self, others: float) -> int:
        """The thread count for `others` lasting other tasks."""
        return max(1, min(self.max_threads, self.cores() - round(others)))

    def __call__(self) -> int:
        """Re-count if period_s has passed, set torch's threads if the count changes; returns it."""
        if not self.enabled:
            return self.threads
        now = time.monotonic()
        if now < self._next:
            return self.threads
        self._next = now + self.period_s
        others = other_running_tasks()
        if others is None:
            return self.threads
        self._seen.append(others)
        want = self.want(min(self._seen))
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
            self.changes += 1
        return self.threads

    def restore(self) -> None:
        """torch's thread count as it was when this FairThreads was made."""
        if torch.get_num_threads() != self.start_threads:
            torch.set_num_threads(self.start_threads)
        self.threads = self.start_threads

    def __enter__(self) -> "FairThreads":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
