"""The thread pool behind every cpp kernel's parallel regions (csrc/parallel.h, parallel.cpp).

What it promises, each checked through real kernels: results do not depend on how many threads
ran the chunks; two Python threads may call kernels at once (the second runs its region alone);
a forked child (a DataLoader worker) gets a pool of its own instead of waiting for helper threads
it does not have; and an idle pool sleeps instead of spinning (on a busy machine a spinning
helper takes CPU from other processes, issue H §3).
"""
import multiprocessing as mp
import os
import threading
import time

import pytest
import torch

import fastvq
from helpers import requires
from fastvq.ops.decode_linear import decode_linear

pytestmark = requires("cpp")


def _linear_case(seed=0, M=3, K=512, N=1025):
    """decode_linear's weights: N=1025 streams 16 grains (one region of fastvq's pool, as in a
    decode step); N=4099, 65 grains, goes to OpenMP's shares (csrc/parallel.h kPoolMaxGrains)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 23, torch.randn(N, generator=g)


def _kernels(x, w, b):
    """Kernels whose every output element one chunk computes: bitwise the same however split."""
    with torch.no_grad():
        y = decode_linear(x, w, b, activation="gelu", backend="cpp")
        big = decode_linear(*_linear_case(N=4099), activation="gelu", backend="cpp")
    g = torch.Generator().manual_seed(1)
    idx, dist = fastvq.nearest_code(torch.randn(2048, 64, generator=g), torch.randn(1024, 64, generator=g),
                                    backend="cpp")
    return y, big, torch.cat([idx.double(), dist.double()])


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_results_do_not_depend_on_the_thread_count(threads, n):
    x, w, b = _linear_case()
    torch.set_num_threads(1)
    expected = _kernels(x, w, b)
    torch.set_num_threads(n)  # more threads than cores: chunks are claimed, never assigned
    for _ in range(3):
        assert all(torch.equal(a, e) for a, e in zip(_kernels(x, w, b), expected))


def test_two_python_threads_call_kernels_at_once(threads):
    torch.set_num_threads(2)
    cases = [_linear_case(seed) for seed in range(2)]
    expected = [_kernels(*c) for c in cases]
    failures = []

    def worker(k):
        for _ in range(40):
            if not all(torch.equal(a, e) for a, e in zip(_kernels(*cases[k]), expected[k])):
                failures.append(k)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a kernel call hung with two callers"
    assert failures == []


def _linear_sum(x, w, b) -> float:
    with torch.no_grad():
        return decode_linear(x, w, b, backend="cpp").sum().item()


def _child(queue, x, w, b):  # the tensors come from the parent: torch.randn itself runs OpenMP regions
    queue.put(_linear_sum(x, w, b))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_parallel_kernels(threads):
    torch.set_num_threads(2)
    x, w, b = _linear_case()
    # a small decode_linear only: its region is all fastvq's pool. An op that also runs torch's own OpenMP
    # regions (a matmul, nearest_code's set-up) can hang in a forked child of a parent that used
    # them, with or without fastvq: libgomp is not fork-safe (DataLoader workers use one thread).
    expected = _linear_sum(x, w, b)  # the parent's pool now has a helper thread
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, x, w, b))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a parallel kernel (it waited for the parent's helpers)")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected


def _thread_cpu_seconds() -> float:
    """CPU time (user + system) of every thread of this process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_an_idle_pool_sleeps(threads):
    torch.set_num_threads(2)
    x, w, b = _linear_case()
    for _ in range(20):  # start the helpers and leave them waiting for more
        _kernels(x, w, b)
    time.sleep(0.2)  # past any short spin (the pool's and OpenMP's)
    before, t0 = _thread_cpu_seconds(), time.perf_counter()
    time.sleep(1.0)
    used, elapsed = _thread_cpu_seconds() - before, time.perf_counter() - t0
    # a helper spinning through the second would use about 1 s of CPU; ticks are 10 ms
    assert used < 0.15 * elapsed, f"idle threads used {used:.2f} s of CPU in {elapsed:.2f} s"


@pytest.fixture
def parallel_mode():
    before = fastvq._backend.parallel_mode()
    yield
    fastvq._backend.set_parallel_mode(before)


def test_the_openmp_mode_gives_the_same_results(threads, parallel_mode):
    torch.set_num_threads(2)
    x, w, b = _linear_case()
    assert fastvq.available_backends()["cpp"].parallel == "pool"  # the default
    pooled = _kernels(x, w, b)
    assert fastvq._backend.set_parallel_mode("openmp") == "pool"
    assert fastvq.available_backends()["cpp"].parallel == "openmp"
    shared = _kernels(x, w, b)
    assert all(torch.equal(a, b) for a, b in zip(pooled, shared))


@pytest.mark.parametrize("mode", ["threads", "", 1])
def test_a_bad_mode_is_refused(parallel_mode, mode):
    with pytest.raises(ValueError, match="mode must be one of pool, openmp"):
        fastvq._backend.set_parallel_mode(mode)
    assert fastvq._backend.parallel_mode() == "pool"


def test_the_environment_variable_is_honoured_and_checked():
    import subprocess
    import sys

    code = "import fastvq; print(fastvq.available_backends()['cpp'].parallel)"
    run = lambda value: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, "FASTVQ_PARALLEL": value}, timeout=120)
    assert run("openmp").stdout.strip() == "openmp"
    bad = run("gomp")
    assert "FASTVQ_PARALLEL must be one of pool, openmp" in bad.stdout + bad.stderr
