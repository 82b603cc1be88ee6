"""pytest-benchmark suites for sliding-window attention, grouped by size.

  .venv/bin/python -m pytest benchmarks/bench_window_attention.py --benchmark-only

fastvq.sliding_window_attention per backend (cpp, torch reference) against torch SDPA with a dense
window mask and SDPA is_causal, forward (no_grad) and forward + backward, and one decode step of
SlidingWindowSelfAttention against a ring buffer. The calls are built by compare_window_attention.py's
functions, so both measure the same thing; the side-by-side run with compiled FlexAttention and
peak memory is compare_window_attention.py.
"""
import pytest
import torch

from compare_window_attention import case_call
from fastvq import SlidingWindowSelfAttention, available_backends

SIZES = [(1024, 128), (4096, 256)]  # (T, W) with (B, H, Dh) = (1, 8, 64)
IMPLS = ["fastvq_cpp", "torch_reference", "sdpa_mask", "sdpa_causal"]


def _size_id(size):
    return "T{}-W{}".format(*size)


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_sliding_window_attention(benchmark, mode, impl, size):
    cpp = available_backends()["cpp"]
    if impl == "fastvq_cpp" and not cpp.available:
        pytest.skip(f"backend cpp unavailable: {cpp.reason}")
    t, w = size
    case = {"suite": mode, "impl": impl, "B": 1, "H": 8, "Dh": 64, "T": t, "W": None if impl == "sdpa_causal" else w}
    run, _ = case_call(case, {})
    benchmark.group = f"window attention {mode} {_size_id(size)}"
    benchmark.extra_info["gflop_in_window"] = 4 * 8 * t * min(w, t) * 64 / 1e9  # QK^T and PV over the band
    benchmark(run)


@pytest.mark.parametrize("window", [256, 1024])
def test_decode_step(benchmark, window):
    """One token (B = 1, n_embd = 512, 8 heads) through SlidingWindowSelfAttention.forward_cached."""
    torch.manual_seed(0)
    m = SlidingWindowSelfAttention(512, 8, window, rope=True).eval()
    cache_k, cache_v = m.new_cache(1)
    with torch.no_grad():
        for p in range(window):  # a full ring
            m.forward_cached(torch.randn(1, 1, 512), cache_k, cache_v, p)
    x, pos = torch.randn(1, 1, 512), torch.tensor(10 * window + 3)
    benchmark.group = f"decode step W{window}"

    def step():
        with torch.no_grad():
            return m.forward_cached(x, cache_k, cache_v, pos)

    y = benchmark(step)
    assert y.shape == (1, 1, 512)
