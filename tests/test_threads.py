"""FairThreads (fastvq/threads.py): torch's thread count gives way to lasting load from other
processes and comes back when it is gone; the count of other running tasks sees real busy loops."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from fastvq.threads import FairThreads, other_running_tasks

linux = pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="counts running tasks from /proc")


@pytest.fixture
def threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _settled(count, want, timeout=5.0) -> bool:
    """count() reaches want within timeout (the busy loops need a moment to start running)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if count() >= want:
            return True
        time.sleep(0.05)
    return False


@linux
def test_other_running_tasks_sees_busy_processes_and_not_this_one():
    base = other_running_tasks()
    assert base is not None and base >= 0
    procs = _busy(2)
    try:
        share = min(1.0, len(os.sched_getaffinity(0)) / (os.cpu_count() or 1))
        assert _settled(other_running_tasks, base + 2 * share - 0.5)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_want_leaves_the_cores_others_use_within_bounds(threads_back, monkeypatch):
    fair = FairThreads(max_threads=4)
    monkeypatch.setattr(fair, "cores", lambda: 4)
    assert [fair.want(x) for x in (0, 0.4, 1, 2.6, 3, 9)] == [4, 4, 3, 1, 1, 1]
    assert FairThreads(max_threads=2).want(0) <= 2


def test_gives_way_only_to_lasting_load_and_takes_the_threads_back(threads_back, monkeypatch):
    torch.set_num_threads(2)
    seen = iter([0, 2, 2, 2, 2, 0, 0])  # a passing task would show in one count only
    monkeypatch.setattr("fastvq.threads.other_running_tasks", lambda: next(seen))
    fair = FairThreads(period_s=0, history=3)
    monkeypatch.setattr(fair, "cores", lambda: 2)
    got = [fair() for _ in range(7)]
    # counts 0 | 0,2 | 0,2,2 | 2,2,2 -> give way | 2,2,2 | 2,2,0 -> back | 2,0,0
    assert got == [2, 2, 2, 1, 1, 2, 2]
    assert fair.changes == 2 and torch.get_num_threads() == 2


def test_period_spaces_the_counts_and_restore_puts_the_count_back(threads_back, monkeypatch):
    torch.set_num_threads(2)
    calls = []
    monkeypatch.setattr("fastvq.threads.other_running_tasks", lambda: calls.append(1) or 5)
    with FairThreads(period_s=3600, history=1) as fair:
        monkeypatch.setattr(fair, "cores", lambda: 2)
        assert fair() == 1 and torch.get_num_threads() == 1
        fair(), fair()
        assert len(calls) == 1  # the next count only after period_s
    assert torch.get_num_threads() == 2


def test_disabled_or_without_proc_it_changes_nothing(threads_back, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr("fastvq.threads.other_running_tasks", lambda: 5)
    assert FairThreads(enabled=False, period_s=0)() == 2
    monkeypatch.setattr("fastvq.threads.other_running_tasks", lambda: None)
    assert FairThreads(period_s=0)() == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [dict(max_threads=0), dict(max_threads=True), dict(period_s=-1), dict(history=0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FairThreads(**bad)


def _spin_in_child(code: str, **env) -> str:
    """GOMP_SPINCOUNT as a fresh interpreter running `code` sees it."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "FASTVQ_OPENMP_SPIN")}
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("code, env, want", [
    ("import fastvq", {}, "10000"),                            # before torch: fastvq sets the short spin
    ("import torch, fastvq", {}, "None"),                      # torch first: its OpenMP already read the default
    ("import fastvq", {"FASTVQ_OPENMP_SPIN": "0"}, "None"),    # the opt-out
    ("import fastvq", {"GOMP_SPINCOUNT": "123"}, "123"),       # the user's own setting stays
    ("import fastvq", {"OMP_WAIT_POLICY": "ACTIVE"}, "None"),  # so does a wait policy
])
def test_openmp_spin_is_set_only_before_torch_and_only_when_unset(code, env, want):
    assert _spin_in_child(code, **env) == want
