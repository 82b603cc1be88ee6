"""raster_window_attention and axial_rope: every backend against a float64 dense-mask oracle whose
mask is built here, token pair by token pair, from the rule as the issue states it."""
import pytest
import torch

import fastvq
from fastvq.ops.raster_window import (KERNELS, Geometry, raster_window_decode_reference, raster_window_visible,
                                      ring_slots, ring_visible)
from helpers import assert_close, backend_params, device_of, interpreted

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rule_mask(t, width, rows, left, right, n_prefix):
    """(T, T) bool: query a sees key b, written out from the rule with plain integers."""
    mask = torch.zeros(t, t, dtype=torch.bool)
    for a in range(t):
        for b in range(t):
            if a < n_prefix:
                mask[a, b] = b <= a  # the prefix is causal among itself and sees no grid token
                continue
            if b < n_prefix:
                mask[a, b] = True
                continue
            (i, j), (i2, j2) = divmod(a - n_prefix, width), divmod(b - n_prefix, width)
            above = i - rows <= i2 < i and j - left <= j2 <= j + right
            own_row = i2 == i and j - left <= j2 <= j
            mask[a, b] = above or own_row
    return mask


def oracle(q, k, v, mask, scale):
    """float64 masked softmax attention (GQA by repeating k/v heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


# (B, H, H_kv, width, grid tokens, rows, left, right, n_prefix, Dh): widths 1, 7, 33, partial last
# rows, prefixes 0/1/3, a window wider than the grid, rows = 0, GQA, Dh not a power of two.
CASES = [
    (1, 2, 2, 1, 9, 2, 1, 1, 0, 16),
    (2, 2, 1, 7, 40, 2, 2, 1, 1, 16),
    (1, 4, 2, 7, 30, 0, 3, 3, 3, 24),
    (1, 2, 2, 33, 70, 1, 8, 7, 1, 32),
    (1, 2, 1, 5, 23, 9, 9, 9, 0, 16),
    (1, 1, 1, 4, 17, 3, 0, 0, 2, 8),
]
SMALL = CASES[:3]


def make(b, h, hk, t, d, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g).to(dtype) for n in (h, hk, hk))
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def test_the_rule_as_a_mask_is_the_oracles():
    for (_, _, _, width, grid, rows, left, right, n_prefix, _) in CASES:
        t = n_prefix + grid
        pos = torch.arange(t)
        got = raster_window_visible(pos, pos, width=width, rows=rows, left=left, right=right, n_prefix=n_prefix)
        assert torch.equal(got, rule_mask(t, width, rows, left, right, n_prefix))


def check_against_oracle(backend, case, dtype):
    """One case's output and (dq, dk, dv) on `backend` against the float64 oracle."""
    dev = device_of(backend)
    b, h, hk, width, grid, rows, left, right, n_prefix, d = case
    t = n_prefix + grid
    q, k, v = make(b, h, hk, t, d, dtype, seed=grid)
    mask = rule_mask(t, width, rows, left, right, n_prefix)
    want = oracle(q, k, v, mask, d ** -0.5)
    leaves = [x.to(dev).detach().requires_grad_() for x in (q, k, v)]
    out = fastvq.raster_window_attention(*leaves, width=width, rows=rows, left=left, right=right,
                                         n_prefix=n_prefix, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert_close(out.cpu(), want, dtype=dtype, atol=tol, rtol=tol, msg=str(case))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.to(dev, dtype))
    refs = [x.double().detach().requires_grad_() for x in (q, k, v)]
    oracle(*refs, mask, d ** -0.5).backward(grad.double())
    for name, leaf, ref in zip("qkv", leaves, refs):
        assert_close(leaf.grad.cpu(), ref.grad, dtype=dtype, atol=4 * tol, rtol=4 * tol, msg=f"d{name} {case}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward_match_the_oracle(backend, dtype):
    if backend not in KERNELS:
        pytest.skip(f"raster_window_attention has no {backend} kernel yet")
    for case in (SMALL if interpreted(backend) else CASES):
        check_against_oracle(backend, case, dtype)


# ----------------------------------------------------------------------------- the kernels' block walk

# Cases for the kernels' spans (interpreter blocks are 16 positions), in fp32: the CASES the
# interpreted run above leaves out (width 33 with a prefix, a window wider than the grid,
# left = right = 0), a prefix longer than a block, a sequence that is all prefix, and blocks that
# straddle three or four rows with right = 0.
SPAN_CASES = CASES[3:] + [
    (1, 2, 1, 3, 40, 2, 1, 1, 20, 8),
    (1, 1, 1, 6, 0, 1, 1, 1, 5, 8),
    (1, 2, 2, 5, 61, 1, 2, 0, 2, 8),
]
# The cpp kernel's structure (query blocks of 128 from the prefix and from the grid's start, key
# tiles of at most 256, the backward's runs of query blocks with their overflow rows): a prefix of
# two blocks and rows of two blocks and a straddling one, in two runs (GQA); spans split into tiles
# (left + right > 256); a 3-wide grid whose blocks hold 42 rows, in two runs; a block of two rows
# at head_dim 64.
CPP_SPAN_CASES = [
    (1, 2, 1, 260, 561, 1, 3, 2, 150, 16),
    (1, 1, 1, 300, 600, 1, 200, 150, 0, 8),
    (1, 2, 2, 3, 400, 5, 1, 1, 0, 8),
    (1, 2, 2, 64, 384, 2, 8, 8, 0, 64),
]


@pytest.mark.parametrize("backend, case", [
    pytest.param(b.values[0], case, marks=b.marks, id=f"{b.id}-{case}") for b in backend_params(("cpp", "triton"))
    for case in SPAN_CASES + (CPP_SPAN_CASES if b.id == "cpp" else [])])
def test_kernel_spans_match_the_oracle(backend, case):
    check_against_oracle(backend, case, torch.float32)


@pytest.mark.parametrize("backend", backend_params(("cpp", "triton")))
@pytest.mark.parametrize("n_prefix, grid_rows, poisoned, clean_queries, clean_keys", [
    (0, 5, (0, 4), (2, 3), (2,)),   # blocks fit in rows: the row above the band, the row after the block
    (1, 4, (0,), (3,), (3,)),       # blocks straddle rows (triton); the prefix's tile also holds row 0's keys
])
def test_kernel_reads_no_row_outside_a_blocks_reach(backend, n_prefix, grid_rows, poisoned, clean_queries,
                                                    clean_keys):
    """With rows = 1 on a 64-wide grid, the queries of clean_queries' rows and the keys of
    clean_keys' rows depend on no poisoned row, and (64 being a multiple of every block size, or
    the rows two apart) no block of theirs may read one. The poisoned rows of q, k, v and of the
    output gradient are NaN, and so is every element of the buffers around the views (past T, past
    Dh): a read of any of them would reach those results through 0 * NaN."""
    dev = device_of(backend)
    width, rows, left, right, d = 64, 1, 1, 2, 16
    t = n_prefix + grid_rows * width
    q, k, v = make(1, 2, 1, t, d, torch.float32, seed=3)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    refs = [x.double().requires_grad_() for x in (q, k, v)]
    want = oracle(*refs, rule_mask(t, width, rows, left, right, n_prefix), d ** -0.5)
    want.backward(grad.double())

    def positions(grid_row_numbers):
        return torch.cat([torch.arange(width) + n_prefix + i * width for i in grid_row_numbers])

    def poisoned_copy(x):
        buf = torch.full((*x.shape[:2], t + 5, d + 3), float("nan"), device=dev)
        buf[:, :, :t, :d] = x.to(dev)
        buf[:, :, positions(poisoned)] = float("nan")
        return buf[:, :, :t, :d]

    leaves = [poisoned_copy(x).requires_grad_() for x in (q, k, v)]
    out = fastvq.raster_window_attention(*leaves, width=width, rows=rows, left=left, right=right,
                                         n_prefix=n_prefix, backend=backend)
    out.backward(poisoned_copy(grad))
    assert out[:, :, positions(poisoned)].isnan().all()  # the poison is there: a row sees itself
    at_q, at_k = positions(clean_queries), positions(clean_keys)
    assert_close(out[:, :, at_q].cpu(), want[:, :, at_q], dtype=torch.float32, atol=2e-5, rtol=2e-5)
    for name, leaf, ref in zip("qkv", leaves, refs):
        at = at_q if name == "q" else at_k
        assert_close(leaf.grad[:, :, at].cpu(), ref.grad[:, :, at], dtype=torch.float32, atol=8e-5, rtol=8e-5,
                     msg=f"d{name}")


# ----------------------------------------------------------------------------- decode against a ring

# (B, H, H_kv, width, ring_rows, rows, left, right, n_prefix, Dh, dtype, layout, queries (i, j)): a
# wavefront on rows 0 .. 7 (ring rows reused), first rows that see fewer rows than `rows`, both
# grid borders, GQA, a window wider than the grid, head sizes the kernels read in whole vectors (64)
# and ones they do not (8, 12, 20, 24), and views that are not contiguous ("strided": q transposed,
# the rings' head_dim every other element). Then, for the Triton kernel's tiles (16 slots, 16 heads
# under the interpreter): runs of 18 slots (two tiles) on a 33-wide grid without a prefix, a prefix
# of 17 (two tiles), a GQA group of 18 heads (two head tiles, a group of 3 (not a power of two)),
# rows = 0 with left wider than the grid, and a ring that wrapped in every case but the second.
DECODE_CASES = [
    (2, 4, 2, 20, 5, 2, 3, 2, 1, 64, torch.float32, "contiguous", [(7, 0), (6, 3), (5, 6), (4, 19), (1, 5), (0, 0)]),
    (1, 2, 2, 20, 4, 3, 8, 7, 2, 64, torch.float16, "contiguous", [(3, 19), (2, 0), (9, 10)]),
    (1, 4, 1, 9, 3, 1, 2, 1, 0, 8, torch.bfloat16, "contiguous", [(5, 4), (4, 8), (0, 3)]),
    (2, 2, 1, 3, 4, 2, 5, 5, 3, 24, torch.float32, "contiguous", [(2, 2), (1, 0), (6, 1)]),
    (1, 2, 2, 16, 4, 2, 2, 2, 1, 32, torch.float32, "strided", [(5, 15), (4, 3), (3, 7)]),
    (1, 6, 2, 33, 6, 2, 9, 8, 0, 20, torch.bfloat16, "contiguous", [(9, 0), (8, 13), (7, 32)]),
    (1, 2, 1, 7, 6, 3, 1, 6, 17, 12, torch.float16, "strided", [(2, 0), (1, 6), (0, 3)]),
    (1, 18, 1, 5, 3, 1, 0, 0, 1, 8, torch.float32, "contiguous", [(4, 4), (3, 0)]),
    (2, 2, 2, 10, 2, 0, 20, 3, 2, 16, torch.float32, "contiguous", [(7, 9), (7, 2)]),
]


@pytest.mark.parametrize("backend, case", [
    pytest.param(b.values[0], case, marks=b.marks, id=f"{b.id}-{n}-{str(case[10])[6:]}-{case[11]}-Dh{case[9]}")
    for b in backend_params(("cpp", "triton")) for n, case in enumerate(DECODE_CASES)])
def test_decode_matches_the_reference_and_reads_only_visible_slots(backend, case):
    """Every ring slot no query sees is NaN (a read of one would reach the outputs); the result is
    the reference's on the clean ring, and the ring is left as it was."""
    dev = device_of(backend)
    b, h, hk, width, ring_rows, rows, left, right, n_prefix, d, dtype, layout, positions = case
    g = torch.Generator().manual_seed(width)
    slots = n_prefix + ring_rows * width
    q = torch.randn(b, h, len(positions), d, generator=g).to(dtype)
    k_ring, v_ring = (torch.randn(b, hk, slots, d, generator=g).to(dtype) for _ in range(2))
    rows_idx, cols_idx = (torch.tensor(c) for c in zip(*positions))
    geometry = Geometry(width, rows, left, right, n_prefix)
    want = raster_window_decode_reference(q, k_ring, v_ring, rows_idx, cols_idx, geometry, d ** -0.5)
    seen = ring_visible(rows_idx, cols_idx, slots, geometry).any(0)
    assert 0 < seen.sum() < slots

    def poisoned(x):
        x = x.clone()
        x[:, :, ~seen] = float("nan")
        if layout == "strided":  # head_dim every other element
            x = torch.stack((x, torch.full_like(x, float("nan"))), -1).flatten(-2)[..., ::2]
        return x.to(dev)

    if layout == "strided":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_dev, v_dev = poisoned(k_ring), poisoned(v_ring)
    k_before, v_before = k_dev.clone(), v_dev.clone()
    got = fastvq.raster_window_decode(q.to(dev), k_dev, v_dev, rows_idx.to(dev), cols_idx.to(dev),
                                      **geometry._asdict(), backend=backend)
    assert got.dtype == dtype and got.shape == q.shape
    assert_close(got.cpu(), want, dtype=dtype)
    for ring, before in ((k_dev, k_before), (v_dev, v_before)):
        assert torch.equal(ring.isnan(), before.isnan()) and torch.equal(ring.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("backend", backend_params())
def test_wavefront_decode_of_a_whole_grid_matches_the_oracle(backend):
    """A 5 x 6 grid after a class token, decoded by wavefront (rows lag right + 1 columns, up to
    three rows a step) into a 4-row ring written in place (row 4 reuses row 0's slots), gives the
    float64 oracle's outputs of the whole sequence. Slots not yet written are NaN for the kernels,
    which read only visible slots; the dense reference reads every slot, so there they are huge."""
    dev = device_of(backend)
    width, grid_rows, rows, left, right, n_prefix, d = 6, 5, 1, 1, 1, 1, 8
    ring_rows, lag = rows + 3, right + 1  # a wavefront spans 3 rows: rows + 1 + 2 ring rows
    t = n_prefix + grid_rows * width
    q, k, v = make(1, 2, 1, t, d, torch.float32, seed=7)
    want = oracle(q, k, v, rule_mask(t, width, rows, left, right, n_prefix), d ** -0.5)
    unwritten = 1e6 if backend == "torch" else float("nan")
    k_ring, v_ring = (torch.full((1, 1, n_prefix + ring_rows * width, d), unwritten, device=dev) for _ in range(2))
    k_ring[:, :, :n_prefix], v_ring[:, :, :n_prefix] = k[:, :, :n_prefix].to(dev), v[:, :, :n_prefix].to(dev)
    storage = k_ring.data_ptr(), v_ring.data_ptr()
    got = torch.full_like(want, float("nan"))
    steps = width + (grid_rows - 1) * lag
    for step in range(steps):
        positions = [(i, step - i * lag) for i in range(grid_rows) if 0 <= step - i * lag < width]
        rows_idx, cols_idx = (torch.tensor(c) for c in zip(*positions))
        flat = n_prefix + rows_idx * width + cols_idx
        slots = ring_slots(rows_idx, cols_idx, width, ring_rows, n_prefix).to(dev)
        k_ring[:, :, slots], v_ring[:, :, slots] = k[:, :, flat].to(dev), v[:, :, flat].to(dev)
        out = fastvq.raster_window_decode(q[:, :, flat].to(dev), k_ring, v_ring, rows_idx.to(dev), cols_idx.to(dev),
                                          width=width, rows=rows, left=left, right=right, n_prefix=n_prefix,
                                          backend=backend)
        got[:, :, flat] = out.cpu().double()
    assert (k_ring.data_ptr(), v_ring.data_ptr()) == storage
    assert_close(got[:, :, n_prefix:], want[:, :, n_prefix:], dtype=torch.float32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("change, exc, words", [
    (dict(rows_idx=[-1, 2]), ValueError, r"query 0 is at .*rows_idx must be >= 0"),
    (dict(cols_idx=[0, 4]), ValueError, r"query 1 is at .*cols_idx in \[0, width = 4\)"),
    (dict(cols_idx=[-2, 1]), ValueError, r"cols_idx in \[0, width = 4\)"),
    (dict(rows_idx=[1]), ValueError, "rows_idx must hold one index per query"),
    (dict(cols_idx=[0.0, 1.0]), TypeError, "cols_idx"),
    (dict(slots=1 + 3 * 4 + 1), ValueError, "k_ring must hold n_prefix"),
    (dict(slots=1 + 1 * 4), ValueError, "ring_rows > rows"),
    (dict(width=0), ValueError, "width must be an integer >= 1"),
    (dict(left=-1), ValueError, "left must be an integer >= 0"),
    (dict(n_prefix=20), ValueError, "n_prefix"),
    (dict(v_dtype=torch.float16), TypeError, "v_ring"),
])
def test_decode_refuses_bad_arguments_and_leaves_the_ring_as_it_was(backend, change, exc, words):
    dev = device_of(backend)
    change = dict(change)  # shared by the backends' runs: pop from a copy
    slots = change.pop("slots", 1 + 3 * 4)
    v_dtype = change.pop("v_dtype", torch.float32)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 2, 8, generator=g).to(dev)
    k_ring = torch.randn(1, 1, slots, 8, generator=g).to(dev)
    v_ring = torch.randn(1, 1, slots, 8, generator=g).to(dev, v_dtype)
    args = dict(rows_idx=[2, 1], cols_idx=[0, 3], width=4, rows=1, left=1, right=1, n_prefix=1) | change
    rows_idx, cols_idx = (torch.tensor(args.pop(name), device=dev) for name in ("rows_idx", "cols_idx"))
    k_before, v_before = k_ring.clone(), v_ring.clone()
    with pytest.raises(exc, match=words):
        fastvq.raster_window_decode(q, k_ring, v_ring, rows_idx, cols_idx, **args, backend=backend)
    assert torch.equal(k_ring, k_before) and torch.equal(v_ring, v_before)


def _decode_qkv_inputs(case, rope: bool, poison: float):
    """A DECODE_CASES case as a decode_qkv step: the stacked product (B, n, H + 2 H_kv, Dh), rings
    whose slots no new query sees and no new token writes hold `poison`, the rope tables, and what the
    step must give: the rings with the new (turned) keys and values in their slots, and the
    reference's attention of the turned queries over them."""
    b, h, hk, width, ring_rows, rows, left, right, n_prefix, d, dtype, layout, positions = case
    g = torch.Generator().manual_seed(width + 1)
    slots, n = n_prefix + ring_rows * width, len(positions)
    qkv = torch.randn(b, n, h + 2 * hk, d, generator=g).to(dtype)
    k_ring, v_ring = (torch.randn(b, hk, slots, d, generator=g).to(dtype) for _ in range(2))
    rows_idx, cols_idx = (torch.tensor(c) for c in zip(*positions))
    geometry = Geometry(width, rows, left, right, n_prefix)
    tables = fastvq.ops.rope.axial_rope_tables(rows_idx, cols_idx, d) if rope else None
    q, k, v = (x.transpose(1, 2) for x in qkv.split((h, hk, hk), dim=2))  # (B, heads, n, Dh)
    if rope:
        q, k = (fastvq.axial_rope(x, rows_idx, cols_idx) for x in (q, k))
    new = ring_slots(rows_idx, cols_idx, width, ring_rows, n_prefix)
    seen = ring_visible(rows_idx, cols_idx, slots, geometry).any(0)
    seen[new] = True
    for ring in (k_ring, v_ring):
        ring[:, :, ~seen] = poison
    want_k, want_v = k_ring.clone(), v_ring.clone()
    want_k[:, :, new], want_v[:, :, new] = k, v
    want = raster_window_decode_reference(q, want_k.nan_to_num(), want_v.nan_to_num(), rows_idx, cols_idx, geometry,
                                          d ** -0.5)
    return qkv, k_ring, v_ring, rows_idx, cols_idx, geometry, tables, want.transpose(1, 2).reshape(b, n, h * d), \
        want_k, want_v


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("backend, case", [
    pytest.param(b.values[0], case, marks=b.marks, id=f"{b.id}-{n}-{str(case[10])[6:]}-{case[11]}-Dh{case[9]}")
    for b in backend_params() for n, case in enumerate(DECODE_CASES)])
def test_decode_qkv_turns_writes_and_attends_as_the_reference(backend, case, rope):
    """The fused step (cpp: one pass for fp32 with Dh a multiple of 16 on contiguous rings, composed
    otherwise) writes exactly the new tokens' turned keys and values into their slots, reads no
    slot it should not (the others are NaN; huge for the dense reference, which reads every slot),
    and attends as the reference over the written rings."""
    dev = device_of(backend)
    poison = 3e4 if backend == "torch" else float("nan")  # finite in fp16
    qkv, k_ring, v_ring, rows_idx, cols_idx, geometry, tables, want, want_k, want_v = _decode_qkv_inputs(case, rope,
                                                                                                        poison)
    if case[11] == "strided":  # rings with head_dim every other element
        k_ring, v_ring = (torch.stack((x, torch.full_like(x, 7.0)), -1).flatten(-2)[..., ::2] for x in (k_ring, v_ring))
    k_dev, v_dev = k_ring.to(dev), v_ring.to(dev)
    if case[11] == "strided" and dev == "cpu":
        k_dev, v_dev = k_ring, v_ring  # keep the views
    with torch.no_grad():
        got = fastvq.raster_window_decode_qkv(
            qkv.to(dev), k_dev, v_dev, rows_idx.to(dev), cols_idx.to(dev), **geometry._asdict(), backend=backend,
            rope=None if tables is None else tuple(t.to(dev) for t in tables))
    dtype = case[10]
    assert got.dtype == dtype and got.shape == want.shape
    assert_close(got.cpu(), want, dtype=dtype)
    for ring, expected in ((k_dev, want_k), (v_dev, want_v)):
        ring = ring.cpu()
        assert torch.equal(ring.isnan(), expected.isnan())
        assert_close(ring.nan_to_num(), expected.nan_to_num(), dtype=dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("change, exc, words", [
    (dict(cols_idx=[0, 4]), ValueError, r"query 1 is at .*cols_idx in \[0, width = 4\)"),
    (dict(heads=2), ValueError, "qkv's 2 heads must be H query heads"),
    (dict(rope_shape=(2, 2, 3)), ValueError, "rope must be None or"),
    (dict(slots=1 + 1 * 4), ValueError, "ring_rows > rows"),
    (dict(v_dtype=torch.float16), TypeError, "v_ring"),
    (dict(grad=True), RuntimeError, "inference only"),
])
def test_decode_qkv_refuses_bad_arguments_and_leaves_the_rings_as_they_were(backend, change, exc, words):
    dev = device_of(backend)
    change = dict(change)
    slots, heads = change.pop("slots", 1 + 3 * 4), change.pop("heads", 2 + 2 * 1)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 2, heads, 8, generator=g).to(dev).requires_grad_(change.pop("grad", False))
    k_ring = torch.randn(1, 1, slots, 8, generator=g).to(dev)
    v_ring = torch.randn(1, 1, slots, 8, generator=g).to(dev, change.pop("v_dtype", torch.float32))
    rope = tuple(torch.ones(change.pop("rope_shape", (2, 2, 2)), device=dev) for _ in range(2))
    args = dict(rows_idx=[2, 1], cols_idx=[0, 3], width=4, rows=1, left=1, right=1, n_prefix=1) | change
    rows_idx, cols_idx = (torch.tensor(args.pop(name), device=dev) for name in ("rows_idx", "cols_idx"))
    k_before, v_before = k_ring.clone(), v_ring.clone()
    with pytest.raises(exc, match=words):
        fastvq.raster_window_decode_qkv(qkv, k_ring, v_ring, rows_idx, cols_idx, **args, rope=rope, backend=backend)
    assert torch.equal(k_ring, k_before) and torch.equal(v_ring, v_before)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype, d", [(torch.float32, 16), (torch.float16, 16), (torch.float32, 12)])
@pytest.mark.parametrize("b, n", [(0, 2), (2, 0)])
def test_decode_qkv_of_an_empty_batch_or_step(backend, dtype, d, b, n):
    """B = 0 or n = 0: an empty (B, n, H * Dh) result on every path (fused, composed), the rings
    untouched."""
    dev = device_of(backend)
    qkv = torch.randn(b, n, 4 + 2 * 2, d).to(dev, dtype)
    k_ring, v_ring = (torch.randn(b, 2, 1 + 3 * 5, d).to(dev, dtype) for _ in range(2))
    before = k_ring.clone()
    idx = torch.zeros(n, dtype=torch.long, device=dev)
    with torch.no_grad():
        out = fastvq.raster_window_decode_qkv(qkv, k_ring, v_ring, idx, idx, width=5, rows=1, left=1, right=1,
                                              n_prefix=1, backend=backend)
    assert out.shape == (b, n, 4 * d) and out.dtype == dtype
    assert torch.equal(k_ring, before)


def test_decode_qkv_without_kv_heads_is_refused():
    ring = torch.zeros(1, 0, 1 + 3 * 4, 8)
    with pytest.raises(ValueError, match="qkv's 4 heads must be H query heads"):
        fastvq.raster_window_decode_qkv(torch.randn(1, 1, 4, 8), ring, ring, torch.tensor([0]), torch.tensor([0]),
                                        width=4, rows=1, left=1, right=1, n_prefix=1)


def test_non_contiguous_inputs_and_a_long_grid_in_chunks():
    # 40 x 13 grid: the reference's chunks start mid-row; q is a transposed view
    width, grid, rows, left, right, n_prefix, d = 13, 520, 3, 2, 4, 1, 16
    t = n_prefix + grid
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, t, 2, d, generator=g).transpose(1, 2)
    k, v = torch.randn(1, 2, t, d, generator=g), torch.randn(1, 2, t, d, generator=g)
    want = oracle(q, k, v, rule_mask(t, width, rows, left, right, n_prefix), d ** -0.5)
    got = fastvq.raster_window_attention(q, k, v, width=width, rows=rows, left=left, right=right, n_prefix=n_prefix)
    assert_close(got, want, dtype=torch.float32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("change, exc, words", [
    (dict(width=0), ValueError, "width must be an integer >= 1"),
    (dict(rows=-1), ValueError, "rows must be an integer >= 0"),
    (dict(left=1.5), ValueError, "left must be an integer"),
    (dict(right=True), ValueError, "right must be an integer"),
    (dict(n_prefix=100), ValueError, "n_prefix"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_arguments_are_refused(change, exc, words):
    q = torch.randn(1, 2, 10, 8)
    args = dict(width=4, rows=1, left=1, right=1) | change
    with pytest.raises(exc, match=words):
        fastvq.raster_window_attention(q, q, q, **args)


# ----------------------------------------------------------------------------- axial rope

def test_axial_rope_scores_depend_only_on_the_2d_offset():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def score(qi, qj, ki, kj):
        rq = fastvq.axial_rope(q, torch.tensor([qi]), torch.tensor([qj]))
        rk = fastvq.axial_rope(k, torch.tensor([ki]), torch.tensor([kj]))
        return (rq * rk).sum()

    base = score(5, 7, 3, 9)
    for shift_i, shift_j in ((1, 0), (0, 4), (11, -2)):
        assert_close(score(5 + shift_i, 7 + shift_j, 3 + shift_i, 9 + shift_j), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 7, 3, 9), score(5, 7, 4, 9))  # a row offset matters
    assert not torch.allclose(score(5, 7, 3, 9), score(5, 7, 3, 8))  # so does a column offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_axial_rope_is_two_half_rotaries_and_its_tables_are_reusable(dtype):
    """The definition: the first half of each head turned by rotary at the row, the second at the
    column (bit for bit), and tables computed once give that for queries and keys of any head count
    (the decode step shares them across layers, heads laid out (n, heads, hs))."""
    from fastvq.ops.rope import apply_axial_rope, axial_rope_tables, rotary

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 17, 32, generator=g).to(dtype)
    rows_idx, cols_idx = torch.randint(0, 500, (17,), generator=g), torch.randint(0, 500, (17,), generator=g)
    want = torch.cat((rotary(x[..., :16], rows_idx), rotary(x[..., 16:], cols_idx)), dim=-1)
    assert torch.equal(fastvq.axial_rope(x, rows_idx, cols_idx), want)
    acc = torch.promote_types(dtype, torch.float32)
    cos, sin = axial_rope_tables(rows_idx, cols_idx, 32, dtype=acc)
    heads_inner = apply_axial_rope(x.transpose(1, 2), (cos[:, None], sin[:, None]))  # (2, 17, 3, 32)
    assert torch.equal(heads_inner.transpose(1, 2), want)


def test_axial_rope_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        fastvq.axial_rope(torch.randn(3, 6), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="cols_idx"):
        fastvq.axial_rope(torch.randn(3, 8), torch.arange(3), torch.arange(4))
