"""RasterWindowSelfAttention and RasterKVCache: the cached decode (one token a step, and the
wavefront) gives the training forward's outputs; the ring is reused in place; bad steps are
refused before anything is written."""
import pytest
import torch

import fastvq
from fastvq import RasterKVCache, RasterWindowSelfAttention
from fastvq.nn.raster_attention import wavefront_schedule
from helpers import assert_close, backend_params, device_of, interpreted

# width, height, rows, left, right, n_prefix, n_kv_head
CASES = [(5, 6, 2, 2, 1, 0, None), (7, 5, 1, 3, 2, 1, 2), (4, 7, 3, 1, 0, 2, None), (3, 4, 2, 5, 5, 1, 1)]
# the Triton interpreter is slow: there, one small case (a prefix, grouped heads, a window wider than the grid)
INTERPRETED_CASES = CASES[3:]


def backend_cases(cases, interpreted_cases):
    """(backend, case) params: every case on torch and cpp (and on triton on a GPU), the
    interpreted_cases only where triton runs through the interpreter."""
    return [pytest.param(b.values[0], case, marks=b.marks, id=f"{b.id}-{'-'.join(map(str, case))}")
            for b in backend_params() for case in (interpreted_cases if interpreted(b.values[0]) else cases)]


def module(rows=2, left=2, right=1, n_kv_head=None, seed=0):
    torch.manual_seed(seed)
    return RasterWindowSelfAttention(32, 4, rows=rows, left=left, right=right, n_kv_head=n_kv_head).eval()


def decode(m, x, width, n_prefix, steps, ring_rows):
    """Prefill the prefix, then every step of `steps` (lists of (i, j)); returns the grid outputs
    in raster order."""
    b, t, _ = x.shape
    cache = m.new_cache(b, width, ring_rows=ring_rows, n_prefix=n_prefix)
    ptrs = cache.k.data_ptr(), cache.v.data_ptr()
    out = torch.zeros(b, t - n_prefix, x.shape[-1], device=x.device)
    if n_prefix:
        prefix_out = m.prefill(x[:, :n_prefix], cache)
        cache.prefix_written = n_prefix
    for positions in steps:
        flat = [n_prefix + i * width + j for i, j in positions]
        rows_idx = torch.tensor([i for i, _ in positions], device=x.device)
        cols_idx = torch.tensor([j for _, j in positions], device=x.device)
        y = m.forward_cached(x[:, flat], cache, rows_idx, cols_idx)
        cache.commit(positions)
        out[:, [f - n_prefix for f in flat]] = y
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs  # the ring is written in place, never reallocated
    return (torch.cat((prefix_out, out), 1) if n_prefix else out), cache


@pytest.mark.parametrize("backend, case", backend_cases(CASES, INTERPRETED_CASES))
def test_decoding_equals_the_training_forward(backend, case, monkeypatch):
    """The module's forward and decode on the backend FASTVQ_BACKEND names (auto: cpp on CPU)."""
    monkeypatch.setenv("FASTVQ_BACKEND", backend)
    width, height, rows, left, right, n_prefix, n_kv_head = case
    dev = device_of(backend)
    m = module(rows, left, right, n_kv_head).to(dev)
    x = torch.randn(2, n_prefix + width * height, 32).to(dev)
    with torch.no_grad():
        full = m(x, width=width, n_prefix=n_prefix)
    sequential = [[(i, j)] for i in range(height) for j in range(width)]
    got, cache = decode(m, x, width, n_prefix, sequential, ring_rows=rows + 1)  # the smallest ring one token a step needs
    assert_close(got, full, atol=2e-5, rtol=1e-4)
    steps = wavefront_schedule(height, width, right + 1)
    assert len(steps) == width + (height - 1) * min(right + 1, width) and sum(map(len, steps)) == width * height
    lag_rows = max(len(s) for s in steps)
    got, cache = decode(m, x, width, n_prefix, steps, ring_rows=rows + lag_rows)
    assert_close(got, full, atol=2e-5, rtol=1e-4)
    assert cache.k.shape[3] == n_prefix + (rows + lag_rows) * width  # memory set by the width, not the height


def test_a_wavefront_needs_far_fewer_steps_on_a_wide_grid():
    steps = wavefront_schedule(64, 64, 9)
    assert len(steps) == 64 + 63 * 9 and len(steps) < 64 * 64 / 6


def test_refused_steps_leave_the_ring_as_it_was():
    m = module(rows=2, left=1, right=1)
    width = 6
    x = torch.randn(1, 3 * width, 32)
    cache = m.new_cache(1, width, ring_rows=3)
    first_row = [[(0, j)] for j in range(width)]
    decode_steps = []
    for positions in first_row + [[(1, 0)]]:
        flat = [i * width + j for i, j in positions]
        m.forward_cached(x[:, flat], cache, torch.tensor([p[0] for p in positions]), torch.tensor([p[1] for p in positions]))
        cache.commit(positions)
        decode_steps.append(positions)
    before = cache.k.clone(), cache.v.clone(), list(cache.row_held), list(cache.columns_written)
    bad = [
        ([(1, 2)], "continues at column 1"),                # skips a column
        ([(1, 1), (2, 0)], "needs row 1 up to column 1"),   # row 2 starts before row 1 is right + 1 ahead
        ([(0, 6)], "outside a grid of width 6"),
    ]
    for positions, words in bad:
        with pytest.raises(ValueError, match=words):
            m.forward_cached(torch.randn(1, len(positions), 32), cache, torch.tensor([p[0] for p in positions]),
                             torch.tensor([p[1] for p in positions]))
    # two positions for one token of x: refused by name before any ring write (a composed step would
    # otherwise broadcast the keys over both slots)
    with pytest.raises(ValueError, match=r"rows_idx must be an integer tensor of shape \(1,\)"):
        m.forward_cached(torch.randn(1, 1, 32), cache, torch.tensor([1, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cols_idx must be an integer tensor"):
        m.forward_cached(torch.randn(1, 1, 32), cache, torch.tensor([1]), torch.tensor([1.0]))
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    assert (cache.row_held, cache.columns_written) == (before[2], before[3])


def test_a_ring_too_small_for_the_wavefront_is_refused():
    cache = RasterKVCache(1, 1, 1, 8, width=4, ring_rows=3)
    for j in range(4):
        cache.commit([(0, j)])
    for j in range(2):
        cache.commit([(1, j)])
    cache.commit([(2, 0)])
    # rows = 2: row 3 would take ring row 0 (row 0), which row 1's token (window 2 rows up) needs
    with pytest.raises(ValueError, match="would overwrite row 0"):
        cache.check_step([(1, 2), (3, 0)], rows=2, left=1, right=0)


def test_prefix_must_be_written_first_and_bad_module_args():
    cache = RasterKVCache(1, 1, 1, 8, width=4, ring_rows=3, n_prefix=1)
    with pytest.raises(ValueError, match="prefix"):
        cache.check_step([(0, 0)], rows=1, left=1, right=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        RasterWindowSelfAttention(24, 4, rows=1, left=1, right=1)
    with pytest.raises(ValueError, match="rows must be an integer >= 0"):
        RasterWindowSelfAttention(32, 4, rows=-1, left=1, right=1)
    with pytest.raises(ValueError, match="n_kv_head"):
        RasterWindowSelfAttention(32, 4, rows=1, left=1, right=1, n_kv_head=3)


def test_exported():
    assert fastvq.RasterWindowSelfAttention is RasterWindowSelfAttention
    assert fastvq.raster_window_decode is not None


def test_wavefront_steps_are_every_position_once_within_the_lag_and_lanes_bound_them():
    from fastvq.nn.raster_attention import wavefront_lanes, wavefront_steps

    for height, width, lag in [(1, 1, 1), (5, 7, 3), (7, 5, 9), (9, 4, 2), (3, 12, 1)]:
        steps = list(wavefront_steps(height, width, lag))
        flat = [p for step in steps for p in step]
        assert sorted(flat) == [(i, j) for i in range(height) for j in range(width)]  # each once
        when = {p: s for s, step in enumerate(steps) for p in step}
        lag_ = max(1, min(lag, width))
        assert all(when[(i, j)] == i * lag_ + j for i, j in flat)
        assert max(len(step) for step in steps) == wavefront_lanes(height, width, lag)
