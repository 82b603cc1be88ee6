"""Raster-order 2-D window attention in Triton: forward, atomics-free backward, and the ring decode.

The rule (fastvq.ops.raster_window): after a prefix of P tokens, grid token t is (i, j) =
divmod(t - P, W); it sees the prefix, rows i - rows .. i - 1 at columns j - left .. j + right, and
its own row at columns j - left .. j. Prefix tokens are causal among themselves.

Spans. A block of queries holds a contiguous run of flat positions [q_first, q_last] (it may
straddle rows when W is small or unaligned), so its keys at row offset d (d = 1 .. rows) lie in
the flat interval [q_first - d W - left, q_last - d W + right] and its own-row keys in
[q_first - left, q_last], each clipped to the rows the block's queries can reach at that offset
(rows i_first - d .. i_last - d). With the prefix [0, P) that is rows + 2 intervals, each of
length at most BLOCK_M + left + right, whose bounds only grow as d falls. The loops walk them in
order with a running `next`: a tile starts at max(interval start, end of the previous tile), so a
key block is never visited twice however the intervals overlap (W small: they merge into one
range) and the work is O(T (rows + 1) (BLOCK_M + left + right)), never T x T. Inside a tile the
exact rule decides, from (i, j) recomputed from the flat positions. The key (forward, dQ) and
query (dK/dV) loads are restricted to the rows the block can see at all, so the kernels never read
a row outside a block's reach (the tests poison such rows with NaN).

The backward's key-block side is the inverse: keys [k_first, k_last] are seen at row offset d by
the queries [k_first + d W - right, k_last + d W + left] (d = 0: [k_first, k_last + left]),
clipped to rows k_row_first + d .. k_row_last + d. A key block holding a prefix key is seen by
every later query, so it walks all of them, [n0, T): one program per such block (cdiv(P,
BLOCK_N) blocks, usually one), longer than the others but with a single writer, no atomics and
no second pass. Its programs are put first in the launch order (grid axis 0 is the head, axis 1
the key block) so their longer walk overlaps the rest (CUDA caps axis 1 at 65535 blocks: T up to
65535 * BLOCK_N).

Three backward launches, as in kernels/window_attention.py: delta = rowsum(dO * O); dK and dV by
key block, looping over the GQA group's query heads (one writer per dK/dV element); dQ by query
block over the forward's spans. Both recompute the probabilities from the saved log-sum-exp.

Decode (raster_window_decode): one program per (new query position, batch x key/value head, tile
of the GQA group's query heads). The query heads of a group are the rows of the tile, so each ring
slot is loaded once for all of them; the position (i, j) is read from device memory, so the launch
is the same at every step. The program walks the prefix slots [0, P), then the image rows
i - min(rows, i) .. i, each a contiguous run of ring slots P + (row % ring_rows) W + [max(j - left,
0), min(j + right, W - 1)] (j for row i itself), in tiles of BLOCK_N: exactly the keys the rule
lets the query see, read nowhere else, O(P + (rows + 1)(left + right + 1)) per query. No split of
the keys (flash-decoding): a query reads a few hundred keys at most, and the wavefront's positions
times B x H_kv already give several programs per SM. BLOCK_N and the warps are autotuned per
(head_dim, run length, group size, dtype) over a list filtered by tile size; under the interpreter
one config.

Precision and the interpreter: the shared pieces (row loads that widen to the dot dtype, the online
softmax step, block sizes, bf16 result buffers) come from kernels/window_attention.py, so the same
rules hold: fp32 accumulation, IEEE fp32 dots, bf16 widened to fp32 under TRITON_INTERPRET=1.
Host-side, left/right are clipped to W and rows to the grid's row count (a wider window means the
same), which also keeps every position computation inside int32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastvq.kernels.window_attention import (_INTERPRET, LOG2E, _blocks, _check_supported, _delta_kernel,
                                             _dot_dtype, _empty_result, _finish_rows, _load_rows,
                                             _online_softmax_step, _store_rows, _strides)


# ----------------------------------------------------------------------------- the rule and the spans

@triton.jit
def _coords(pos, P, W):
    """(is a grid token, row, column) of flat positions; prefix positions get row = column = 0."""
    g = pos - P
    gc = tl.maximum(g, 0)
    i = gc // W
    return g >= 0, i, gc - i * W


@triton.jit
def _visible(q_pos, q_grid, qi, qj, k_pos, k_grid, ki, kj, T, ROWS, LEFT, RIGHT):
    """The rule on broadcastable query and key coordinates (either orientation of the tile);
    padding past T is never visible."""
    cols_left = kj >= qj - LEFT
    band = (ki >= qi - ROWS) & (ki < qi) & cols_left & (kj <= qj + RIGHT)
    own_row = (ki == qi) & cols_left & (kj <= qj)
    grid_sees = (~k_grid) | band | own_row
    prefix_sees = (~k_grid) & (k_pos <= q_pos)
    return tl.where(q_grid, grid_sees, prefix_sees) & (q_pos < T) & (k_pos < T)


@triton.jit
def _key_spans(m0, T, P, W, ROWS, BLOCK_M: tl.constexpr):
    """For query rows m0 .. m0 + BLOCK_M - 1: (q_end, i_first, i_last, g_first, g_last, d_max,
    n_spans, k_lo): span 0 is the prefix, spans 1 .. d_max + 1 the row offsets d_max .. 0; keys
    the block may read are [0, P) and [k_lo, q_end)."""
    q_end = tl.minimum(m0 + BLOCK_M, T)
    g_first = tl.maximum(m0, P) - P
    g_last = tl.maximum(q_end - 1 - P, 0)
    i_first = g_first // W
    i_last = g_last // W
    d_max = tl.minimum(ROWS, i_last)
    n_spans = tl.where(q_end > P, d_max + 2, 1)  # no grid query: the prefix alone
    k_lo = P + tl.maximum(i_first - ROWS, 0) * W
    return q_end, i_first, i_last, g_first, g_last, d_max, n_spans, k_lo


@triton.jit
def _key_interval(e, q_end, i_first, i_last, g_first, g_last, d_max, P, W, LEFT, RIGHT):
    """Keys [lo, hi) of span e (see _key_spans); both bounds grow with e."""
    d = d_max - (e - 1)
    lo = tl.maximum(P + g_first - d * W - LEFT, P + tl.maximum(i_first - d, 0) * W)
    hi = tl.minimum(P + g_last - d * W + RIGHT + 1, P + (i_last - d + 1) * W)
    hi = tl.minimum(tl.where(d == 0, q_end, hi), q_end)
    lo = tl.where(e == 0, 0, lo)
    hi = tl.where(e == 0, tl.minimum(P, q_end), hi)
    return lo, hi


@triton.jit
def _query_spans(n0, T, P, W, ROWS, BLOCK_N: tl.constexpr):
    """For key rows n0 .. n0 + BLOCK_N - 1: (r_first, r_last, g_first, g_last, n_spans, q_hi): span e
    is the row offset d = e; a block holding a prefix key has the one span [n0, T). Queries the
    block may read are [n0, q_hi)."""
    g_first = tl.maximum(n0 - P, 0)
    g_last = tl.maximum(tl.minimum(n0 + BLOCK_N, T) - 1 - P, 0)
    r_first = g_first // W
    r_last = g_last // W
    grid_rows = (T - P + W - 1) // W
    n_spans = tl.where(n0 < P, 1, tl.minimum(ROWS, grid_rows - 1 - r_first) + 1)
    q_hi = tl.where(n0 < P, T, tl.minimum(T, P + (r_last + ROWS + 1) * W))
    return r_first, r_last, g_first, g_last, n_spans, q_hi


@triton.jit
def _query_interval(e, n0, T, r_first, r_last, g_first, g_last, P, W, LEFT, RIGHT):
    """Queries [lo, hi) of span e (see _query_spans); both bounds grow with e."""
    lo = tl.maximum(P + g_first + e * W - tl.where(e == 0, 0, RIGHT), P + (r_first + e) * W)
    hi = tl.minimum(P + g_last + e * W + LEFT + 1, P + (r_last + e + 1) * W)
    lo = tl.where(n0 < P, n0, tl.maximum(lo, n0))
    hi = tl.where(n0 < P, T, tl.minimum(hi, T))
    return lo, hi


@triton.jit
def _next_start(start, stop, next_n, BLOCK: tl.constexpr):
    """End of the tiles a span walked from `start`: where the next span may begin."""
    return tl.maximum(next_n, start + (tl.maximum(stop - start, 0) + BLOCK - 1) // BLOCK * BLOCK)


@triton.jit
def _load_keys(base, offs_n, offs_d, s_t, s_d, P, k_lo, k_end, D, DOT: tl.constexpr):
    """Key/value rows the block may see (the prefix and positions k_lo .., all before k_end); the
    others read as zero."""
    ok = ((offs_n < P) | (offs_n >= k_lo)) & (offs_n < k_end)
    mask = ok[:, None] & (offs_d < D)[None, :]
    tile = tl.load(base + offs_n.to(tl.int64)[:, None] * s_t + offs_d[None, :] * s_d, mask=mask, other=0.0)
    return tile.to(DOT)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                    sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
                    H, GROUP, T, D, P, W, ROWS, LEFT, RIGHT, qk_scale,
                    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_grid, qi, qj = _coords(offs_m, P, W)
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_t, sq_d, T, D, DOT)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_end, i_first, i_last, g_first, g_last, d_max, n_spans, k_lo = _key_spans(m0, T, P, W, ROWS, BLOCK_M)
    next_n = m0 * 0
    for e in range(0, n_spans):
        lo, hi = _key_interval(e, q_end, i_first, i_last, g_first, g_last, d_max, P, W, LEFT, RIGHT)
        start = tl.maximum(lo, next_n)
        for n0 in range(start, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k_grid, ki, kj = _coords(offs_n, P, W)
            k = _load_keys(k_base, offs_n, offs_d, sk_t, sk_d, P, k_lo, q_end, D, DOT)
            v = _load_keys(v_base, offs_n, offs_d, sv_t, sv_d, P, k_lo, q_end, D, DOT)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            visible = _visible(offs_m[:, None], q_grid[:, None], qi[:, None], qj[:, None],
                               offs_n[None, :], k_grid[None, :], ki[None, :], kj[None, :], T, ROWS, LEFT, RIGHT)
            m_i, l_i, acc = _online_softmax_step(tl.where(visible, s, float("-inf")), v, m_i, l_i, acc, DOT)
        next_n = _next_start(start, hi, next_n, BLOCK_N)

    out, lse2 = _finish_rows(m_i, l_i, acc)
    _store_rows(o_ptr + b * so_b + h * so_h, out, offs_m, offs_d, so_t, so_d, T, D)
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, lse2 / LOG2E, mask=offs_m < T)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                 sg_b, sg_h, sg_t, sg_d, sdk_b, sdk_h, sdk_t, sdk_d,
                 H, H_KV, T, D, P, W, ROWS, LEFT, RIGHT, scale, qk_scale,
                 DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bhk = tl.program_id(0)  # heads first: the (longer) prefix key blocks, axis 1 = 0, launch first
    n0 = tl.program_id(1) * BLOCK_N
    b, hk = (bhk // H_KV).to(tl.int64), (bhk % H_KV).to(tl.int64)
    group = H // H_KV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_grid, ki, kj = _coords(offs_n, P, W)
    k = _load_rows(k_ptr + b * sk_b + hk * sk_h, offs_n, offs_d, sk_t, sk_d, T, D, DOT)
    v = _load_rows(v_ptr + b * sv_b + hk * sv_h, offs_n, offs_d, sv_t, sv_d, T, D, DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    r_first, r_last, g_first, g_last, n_spans, q_hi = _query_spans(n0, T, P, W, ROWS, BLOCK_N)
    # Every query head of the GQA group adds to this key/value head: looping over them here makes
    # this program the only writer of its dK, dV tile.
    for g in range(group):
        h = hk * group + g
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sg_b + h * sg_h
        row_stats = (b * H + h) * T
        next_m = n0 * 0
        for e in range(0, n_spans):
            lo, hi = _query_interval(e, n0, T, r_first, r_last, g_first, g_last, P, W, LEFT, RIGHT)
            start = tl.maximum(lo, next_m)
            for m0 in range(start, hi, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q_grid, qi, qj = _coords(offs_m, P, W)
                # rows outside [n0, q_hi) see no key here: read as zeros (finite whatever is stored)
                q = _load_rows(q_base, offs_m, offs_d, sq_t, sq_d, q_hi, D, DOT)
                do = _load_rows(do_base, offs_m, offs_d, sg_t, sg_d, q_hi, D, DOT)
                lse2 = tl.load(lse_ptr + row_stats + offs_m, mask=offs_m < q_hi, other=0.0) * LOG2E
                delta = tl.load(delta_ptr + row_stats + offs_m, mask=offs_m < q_hi, other=0.0)
                z_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse2[None, :]
                visible = _visible(offs_m[None, :], q_grid[None, :], qi[None, :], qj[None, :],
                                   offs_n[:, None], k_grid[:, None], ki[:, None], kj[:, None], T, ROWS, LEFT, RIGHT)
                p_t = tl.exp2(tl.where(visible, z_t, float("-inf")))
                dv += tl.dot(p_t.to(DOT), do, input_precision="ieee")
                dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
                dk += tl.dot((p_t * (dp_t - delta[None, :])).to(DOT), q, input_precision="ieee")
            next_m = _next_start(start, hi, next_m, BLOCK_M)

    out_base = b * sdk_b + hk * sdk_h
    _store_rows(dk_ptr + out_base, dk * scale, offs_n, offs_d, sdk_t, sdk_d, T, D)
    _store_rows(dv_ptr + out_base, dv, offs_n, offs_d, sdk_t, sdk_d, T, D)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
               sg_b, sg_h, sg_t, sg_d, sdq_b, sdq_h, sdq_t, sdq_d,
               H, GROUP, T, D, P, W, ROWS, LEFT, RIGHT, scale, qk_scale,
               DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_grid, qi, qj = _coords(offs_m, P, W)
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_t, sq_d, T, D, DOT)
    do = _load_rows(do_ptr + b * sg_b + h * sg_h, offs_m, offs_d, sg_t, sg_d, T, D, DOT)
    row_stats = bh.to(tl.int64) * T
    lse2 = tl.load(lse_ptr + row_stats + offs_m, mask=offs_m < T, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row_stats + offs_m, mask=offs_m < T, other=0.0)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_end, i_first, i_last, g_first, g_last, d_max, n_spans, k_lo = _key_spans(m0, T, P, W, ROWS, BLOCK_M)
    next_n = m0 * 0
    for e in range(0, n_spans):
        lo, hi = _key_interval(e, q_end, i_first, i_last, g_first, g_last, d_max, P, W, LEFT, RIGHT)
        start = tl.maximum(lo, next_n)
        for n0 in range(start, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k_grid, ki, kj = _coords(offs_n, P, W)
            k = _load_keys(k_base, offs_n, offs_d, sk_t, sk_d, P, k_lo, q_end, D, DOT)
            v = _load_keys(v_base, offs_n, offs_d, sv_t, sv_d, P, k_lo, q_end, D, DOT)
            z = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse2[:, None]
            visible = _visible(offs_m[:, None], q_grid[:, None], qi[:, None], qj[:, None],
                               offs_n[None, :], k_grid[None, :], ki[None, :], kj[None, :], T, ROWS, LEFT, RIGHT)
            p = tl.exp2(tl.where(visible, z, float("-inf")))
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            dq += tl.dot((p * (dp - delta[:, None])).to(DOT), k, input_precision="ieee")
        next_n = _next_start(start, hi, next_n, BLOCK_N)
    _store_rows(dq_ptr + b * sdq_b + h * sdq_h, dq * scale, offs_m, offs_d, sdq_t, sdq_d, T, D)


# ----------------------------------------------------------------------------- decode against a ring of image rows

@triton.jit
def _ring_run(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_d, D, first, count, qk_scale, m_i, l_i, acc,
              DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the `count` consecutive ring slots from `first` into the running softmax; slots past
    the run are masked on load (never read) and score -inf."""
    for c0 in range(0, count, BLOCK_N):
        offs = c0 + tl.arange(0, BLOCK_N)
        inside = offs < count
        slot = (first + offs).to(tl.int64)
        mask = inside[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + slot[:, None] * sk_t + offs_d[None, :] * sk_d, mask=mask, other=0.0).to(DOT)
        v = tl.load(v_base + slot[:, None] * sv_t + offs_d[None, :] * sv_d, mask=mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        m_i, l_i, acc = _online_softmax_step(tl.where(inside[None, :], s, float("-inf")), v, m_i, l_i, acc, DOT)
    return m_i, l_i, acc


@triton.jit
def _ring_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, cols_ptr,
                        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                        so_b, so_h, so_t, so_d,
                        H_KV, GROUP, D, P, W, RING_ROWS, ROWS, LEFT, RIGHT, SPAN, qk_scale,
                        DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of the tile: query heads hk * GROUP + r of one key/value head, all at the query
    position t = program_id(0). SPAN (the longest run, min(W, left + right + 1)) only keys the
    autotuner."""
    t = tl.program_id(0).to(tl.int64)
    bhk = tl.program_id(1)
    b, hk = (bhk // H_KV).to(tl.int64), (bhk % H_KV).to(tl.int64)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = hk * GROUP + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (offs_r < GROUP)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + t * sq_t + offs_d[None, :] * sq_d,
                mask=row_mask, other=0.0).to(DOT)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    i = tl.load(rows_ptr + t)  # int64, checked >= 0 by the op
    j = tl.load(cols_ptr + t)  # int64, checked in [0, W)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _ring_run(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_d, D, 0, P, qk_scale, m_i, l_i, acc,
                              DOT, BLOCK_N)
    col_lo = tl.maximum(j - LEFT, 0)
    d_top = tl.minimum(i, ROWS).to(tl.int32)  # rows above the grid's first do not exist
    # Row offsets from the top of the band down to the query's own row: the keys in raster order.
    for e in range(0, d_top + 1):
        d = d_top - e
        ring_row = (i - d) % RING_ROWS
        col_hi = tl.minimum(j + tl.where(d > 0, RIGHT, 0), W - 1)
        first = (P + ring_row * W + col_lo).to(tl.int32)
        count = (col_hi - col_lo + 1).to(tl.int32)
        m_i, l_i, acc = _ring_run(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_d, D, first, count, qk_scale,
                                  m_i, l_i, acc, DOT, BLOCK_N)

    out, _ = _finish_rows(m_i, l_i, acc)  # every query sees itself: l > 0 on real rows
    o_rows = o_ptr + b * so_b + h[:, None] * so_h + t * so_t
    tl.store(o_rows + offs_d[None, :] * so_d, out.to(o_ptr.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------- launch

def _window(geometry, t: int) -> tuple[int, int, int, int, int]:
    """(P, W, rows, left, right) with the window clipped to the grid: the same rule, and every
    position the kernels compute stays far inside int32."""
    width, rows, left, right, n_prefix = geometry
    grid_rows = triton.cdiv(max(t - n_prefix, 0), width)
    return n_prefix, width, min(rows, grid_rows), min(left, width), min(right, width)


def attention_forward(q, k, v, geometry, scale: float):
    """(out in q's dtype, lse fp32 (B, H, T)); any strides on q, k, v."""
    _check_supported(q)
    b, h, t, d = q.shape
    out = _empty_result(q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps, stages = _blocks(d, q.element_size())
    _forward_kernel[(triton.cdiv(t, block_m), b * h)](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        h, h // k.shape[1], t, d, *_window(geometry, t), scale * LOG2E.value,
        DOT=_dot_dtype(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages)
    return out.to(q.dtype), lse


def attention_backward(grad_out, q, k, v, out, lse, geometry, scale: float):
    """(dq, dk, dv) in the inputs' dtypes, from the forward's output and row log-sum-exp."""
    _check_supported(q)
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    window = _window(geometry, t)
    block_m, block_n, block_d, warps, stages = _blocks(d, q.element_size())
    dot = _dot_dtype(q.dtype)

    delta = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(t, block_m), b * h)](out, grad_out, delta, *_strides(out), *_strides(grad_out),
                                                   h, t, d, BLOCK_M=block_m, BLOCK_D=block_d)
    dq, dk, dv = _empty_result(q), _empty_result(k), _empty_result(v)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    _dkdv_kernel[(b * h_kv, triton.cdiv(t, block_n))](
        q, k, v, grad_out, lse, delta, dk, dv, *common, *_strides(dk),
        h, h_kv, t, d, *window, scale, scale * LOG2E.value,
        DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    _dq_kernel[(triton.cdiv(t, block_m), b * h)](
        q, k, v, grad_out, lse, delta, dq, *common, *_strides(dq),
        h, h // h_kv, t, d, *window, scale, scale * LOG2E.value,
        DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# (BLOCK_N, num_warps, num_stages) the decode's autotuner tries, by the bytes of a head row in the
# dot's dtype, the first one the default. A run of the band is min(W, left + right + 1) slots (16
# for taming's window), so tiles beyond 64 would mostly be masked; stages help only on the prefix
# and on runs of several tiles. Measured with benchmarks/triton_compile.py (ptxas, sm_80/sm_90): two
# warps spill at 512-byte rows (fp32 Dh 128: 255 registers, ~500 B of spills) and sit at 254
# registers for fp16 Dh 256, so wide rows start from eight warps and never try two.
_DECODE_CONFIGS = {128: ((16, 2, 1), (16, 4, 2), (32, 4, 2), (64, 4, 2)),
                   256: ((16, 4, 2), (32, 4, 2), (64, 4, 2)),
                   1024: ((16, 8, 2), (16, 4, 2), (32, 4, 2))}
_DECODE_TILE_BYTES = 16 * 1024  # a K or V tile (BLOCK_N x BLOCK_D) above this leaves registers to spill
_DECODE_ACC_ELEMS = 16 * 256   # the fp32 accumulator (BLOCK_R x BLOCK_D): 32 registers a thread at 4 warps
_DECODE_INTERPRET = dict(BLOCK_N=16, num_warps=4, num_stages=1)


def _decode_configs(row_bytes: int) -> list[tuple[int, int, int]]:
    """The configs for head rows of `row_bytes` (BLOCK_D x the dot's element size), tiles too
    large for registers left out (the first config of each list is always kept)."""
    table = next(configs for limit, configs in _DECODE_CONFIGS.items() if row_bytes <= limit)
    return [c for k, c in enumerate(table) if k == 0 or c[0] * row_bytes <= _DECODE_TILE_BYTES]


@functools.lru_cache(maxsize=None)
def _decode_autotuned(row_bytes: int):
    """The decode kernel autotuned over _decode_configs(row_bytes); one config under the
    interpreter, which cannot time."""
    if _INTERPRET:
        chosen = [tuple(_DECODE_INTERPRET.values())]
    else:
        chosen = _decode_configs(row_bytes)
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in chosen]
    return triton.autotune(configs=configs, key=["D", "SPAN", "GROUP"])(_ring_decode_kernel)


def decode(q, k_ring, v_ring, rows_idx, cols_idx, geometry, scale: float):
    """Output (B, H, n, Dh) of n grid queries at (rows_idx[t], cols_idx[t]) against the ring
    (B, H_kv, n_prefix + ring_rows * width, Dh); any strides. Inputs are checked by
    fastvq.ops.raster_window.raster_window_decode (positions in the grid, the ring's size)."""
    _check_supported(q)
    width, rows, left, right, n_prefix = geometry
    b, h, n, d = q.shape
    h_kv = k_ring.shape[1]
    group = h // h_kv
    ring_rows = (k_ring.shape[2] - n_prefix) // width
    left, right = min(left, width), min(right, width)  # wider than the grid means the same window
    block_d = max(16, triton.next_power_of_2(d))
    cap = 16 if _INTERPRET else max(16, _DECODE_ACC_ELEMS // block_d)  # small in tests: groups span tiles
    block_r = min(cap, max(16, triton.next_power_of_2(group)))
    out = _empty_result(q)
    rows_idx = rows_idx.to(torch.int64).contiguous()
    cols_idx = cols_idx.to(torch.int64).contiguous()
    kernel = _decode_autotuned(block_d * q.element_size())
    kernel[(n, b * h_kv, triton.cdiv(group, block_r))](
        q, k_ring, v_ring, out, rows_idx, cols_idx, *_strides(q), *_strides(k_ring), *_strides(v_ring),
        *_strides(out), h_kv, group, d, n_prefix, width, ring_rows, rows, left, right,
        min(width, left + right + 1), scale * LOG2E.value,
        DOT=_dot_dtype(q.dtype), BLOCK_R=block_r, BLOCK_D=block_d)
    return out.to(q.dtype)
