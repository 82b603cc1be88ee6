"""Sliding-window causal attention in Triton: forward, fused backward and a ring-buffer decode step.

Query i sees key j iff 0 <= i - j < window. A block of BLOCK_M queries starting at m0 therefore
meets only the keys m0 - window + 1 .. m0 + BLOCK_M - 1, and every loop below walks exactly the
key (or query) blocks that band touches: the work is O(T * window), not O(T^2). Each walk is cut
in three: the edge tiles that straddle the band's borders are masked, the interior tiles that every
row sees whole (usually most of them when the window spans several blocks) skip the mask.

Forward (one program per query block and head): the flash-attention-2 online softmax. Scores are
kept in base 2 (scale * log2 e folded into one multiply, exp2 in the loop) and only the row
log-sum-exp leaves the kernel (natural log, fp32), which is all backward needs.

Backward, atomics-free, three launches:
  1. delta_i = rowsum(dO_i * O_i), the softmax-Jacobian term shared by both kernels below;
  2. one program per key block and key/value head computes dK and dV, looping over the query heads
     of its GQA group and the query blocks whose window reaches the block, so each dK/dV element has
     a single writer;
  3. one program per query block and head computes dQ over the same key range as the forward.
P is recomputed from the saved log-sum-exp in both (2) and (3): the price of never storing it.

Decode: one program per key/value head, tile of (query head of the group, new query) rows and
split of the ring; each slot's absolute position is derived from pos on the device, and the splits'
partial outputs are merged by their log-sum-exp (flash-decoding), so B * H_kv small still fills a GPU.

Precision: tl.dot takes fp16/bf16 operands as they are (fp32 accumulation) and fp32 operands in
IEEE mode, never TF32. Block sizes come from a small table by head size (no autotuning, which the
interpreter cannot run). Under TRITON_INTERPRET=1 bf16 arithmetic is wrong and fp32 -> bf16 stores
truncate, so there every tile is widened to fp32 on load and bf16 results are rounded by torch.
Everything here compiles with Triton 3.2 (hence no *args in kernel calls, no tl.range options).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvq._backend import triton_interpret

_INTERPRET = triton_interpret()  # read once, when the kernels are defined
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # scores run in base 2: exp2 is the cheap instruction
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
MAX_HEAD_DIM = 256  # a whole head row lives in registers; beyond this the tiles no longer fit


# ----------------------------------------------------------------------------- shared pieces

@triton.jit
def _in_window(q_pos, k_pos, WINDOW):
    diff = q_pos - k_pos
    return (diff >= 0) & (diff < WINDOW)


@triton.jit
def _visible(q_pos, k_pos, T, WINDOW):
    """The window rule on broadcastable query and key positions (either orientation of the tile);
    padding past T is never visible."""
    return _in_window(q_pos, k_pos, WINDOW) & (q_pos < T) & (k_pos < T)


@triton.jit
def _split(lo, hi, full_lo, full_hi):
    """Cut [lo, hi) at the aligned range [full_lo, full_hi) of fully visible tiles (possibly empty),
    so the loops on either side mask and the one between does not. Returns lo <= mid_lo <= mid_hi <= hi."""
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return mid_lo, mid_hi


@triton.jit
def _key_ranges(m0, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks met by query rows m0 .. m0 + BLOCK_M - 1: [lo, hi), of which [mid_lo, mid_hi)
    are seen whole by every row (last key <= first query, last query - first key < window)."""
    lo = (tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N
    full_hi = ((m0 + 1) // BLOCK_N) * BLOCK_N
    mid_lo, mid_hi = _split(lo, hi, full_lo, full_hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_ranges(n0, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same from a key block's side: query blocks whose rows see keys n0 .. n0 + BLOCK_N - 1,
    and the middle ones that see all of them with no padding row."""
    lo = (n0 // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n0 + BLOCK_N - 1 + WINDOW, T)
    full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    full_hi = (tl.minimum(n0 + WINDOW, T) // BLOCK_M) * BLOCK_M
    mid_lo, mid_hi = _split(lo, hi, full_lo, full_hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _load_rows(base, offs_t, offs_d, stride_t, stride_d, n_rows, D, DOT: tl.constexpr):
    mask = (offs_t < n_rows)[:, None] & (offs_d < D)[None, :]
    tile = tl.load(base + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    return tile.to(DOT)


@triton.jit
def _store_rows(base, tile, offs_t, offs_d, stride_t, stride_d, n_rows, D):
    mask = (offs_t < n_rows)[:, None] & (offs_d < D)[None, :]
    tl.store(base + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :] * stride_d,
             tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT: tl.constexpr):
    """Fold one tile of base-2 scores (-inf where not visible) into the running (max, sum, values).

    A row that has seen no visible key yet keeps m = -inf; its exponent is taken against 0 instead,
    so the tile contributes exact zeros rather than exp2(-inf - -inf) = NaN."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _finish_rows(m_i, l_i, acc):
    """Normalised output and base-2 log-sum-exp; l = 0 only on padding rows, kept finite."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], m_i + tl.log2(l_safe)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _forward_tiles(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW, qk_scale,
                   start, stop, m_i, l_i, acc,
                   MASKED: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, sk_t, sk_d, T, D, DOT)
        v = _load_rows(v_base, offs_n, offs_d, sv_t, sv_d, T, D, DOT)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, WINDOW), s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT)
    return m_i, l_i, acc


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                    sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
                    H, GROUP, T, D, WINDOW, qk_scale,
                    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_t, sq_d, T, D, DOT)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_ranges(m0, T, WINDOW, BLOCK_M, BLOCK_N)
    # (Argument lists are spelled out: Triton 3.2 cannot compile *args.)
    m_i, l_i, acc = _forward_tiles(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
                                   qk_scale, lo, mid_lo, m_i, l_i, acc, True, DOT, BLOCK_N)
    m_i, l_i, acc = _forward_tiles(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
                                   qk_scale, mid_lo, mid_hi, m_i, l_i, acc, False, DOT, BLOCK_N)
    m_i, l_i, acc = _forward_tiles(q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
                                   qk_scale, mid_hi, hi, m_i, l_i, acc, True, DOT, BLOCK_N)

    out, lse2 = _finish_rows(m_i, l_i, acc)
    _store_rows(o_ptr + b * so_b + h * so_h, out, offs_m, offs_d, so_t, so_d, T, D)
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, lse2 / LOG2E, mask=offs_m < T)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_h, so_t, so_d, sg_b, sg_h, sg_t, sg_d,
                  H, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(o_ptr + b * so_b + h * so_h, offs_m, offs_d, so_t, so_d, T, D, tl.float32)
    do = _load_rows(do_ptr + b * sg_b + h * sg_h, offs_m, offs_d, sg_t, sg_d, T, D, tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _dkdv_tiles(k, v, q_base, do_base, row_stats, sq_t, sq_d, sg_t, sg_d, lse_ptr, delta_ptr,
                offs_n, offs_d, T, D, WINDOW, qk_scale, start, stop, dk, dv,
                MASKED: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate one query head's contribution to a key block's dK, dV over query blocks
    [start, stop). Tiles are transposed (keys x queries) so both come out of the dots directly."""
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, offs_d, sq_t, sq_d, T, D, DOT)
        do = _load_rows(do_base, offs_m, offs_d, sg_t, sg_d, T, D, DOT)
        lse2 = tl.load(lse_ptr + row_stats + offs_m, mask=offs_m < T, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + row_stats + offs_m, mask=offs_m < T, other=0.0)
        z_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse2[None, :]
        if MASKED:
            z_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], T, WINDOW), z_t, float("-inf"))
        p_t = tl.exp2(z_t)
        dv += tl.dot(p_t.to(DOT), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        dk += tl.dot((p_t * (dp_t - delta[None, :])).to(DOT), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                 sg_b, sg_h, sg_t, sg_d, sdk_b, sdk_h, sdk_t, sdk_d,
                 H, H_KV, T, D, WINDOW, scale, qk_scale,
                 DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b, hk = (bhk // H_KV).to(tl.int64), (bhk % H_KV).to(tl.int64)
    group = H // H_KV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr + b * sk_b + hk * sk_h, offs_n, offs_d, sk_t, sk_d, T, D, DOT)
    v = _load_rows(v_ptr + b * sv_b + hk * sv_h, offs_n, offs_d, sv_t, sv_d, T, D, DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _query_ranges(n0, T, WINDOW, BLOCK_M, BLOCK_N)
    # Every query head of the GQA group adds to this key/value head: looping over them here makes
    # this program the only writer of its dK, dV tile, with no atomics and no reduction pass.
    for g in range(group):
        h = hk * group + g
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sg_b + h * sg_h
        row_stats = (b * H + h) * T
        dk, dv = _dkdv_tiles(k, v, q_base, do_base, row_stats, sq_t, sq_d, sg_t, sg_d, lse_ptr, delta_ptr,
                             offs_n, offs_d, T, D, WINDOW, qk_scale, lo, mid_lo, dk, dv, True, DOT, BLOCK_M)
        dk, dv = _dkdv_tiles(k, v, q_base, do_base, row_stats, sq_t, sq_d, sg_t, sg_d, lse_ptr, delta_ptr,
                             offs_n, offs_d, T, D, WINDOW, qk_scale, mid_lo, mid_hi, dk, dv, False, DOT, BLOCK_M)
        dk, dv = _dkdv_tiles(k, v, q_base, do_base, row_stats, sq_t, sq_d, sg_t, sg_d, lse_ptr, delta_ptr,
                             offs_n, offs_d, T, D, WINDOW, qk_scale, mid_hi, hi, dk, dv, True, DOT, BLOCK_M)

    out_base = b * sdk_b + hk * sdk_h
    _store_rows(dk_ptr + out_base, dk * scale, offs_n, offs_d, sdk_t, sdk_d, T, D)
    _store_rows(dv_ptr + out_base, dv, offs_n, offs_d, sdk_t, sdk_d, T, D)


@triton.jit
def _dq_tiles(q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
              qk_scale, start, stop, dq, MASKED: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, sk_t, sk_d, T, D, DOT)
        v = _load_rows(v_base, offs_n, offs_d, sv_t, sv_d, T, D, DOT)
        z = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse2[:, None]
        if MASKED:
            z = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, WINDOW), z, float("-inf"))
        p = tl.exp2(z)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        dq += tl.dot((p * (dp - delta[:, None])).to(DOT), k, input_precision="ieee")
    return dq


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
               sg_b, sg_h, sg_t, sg_d, sdq_b, sdq_h, sdq_t, sdq_d,
               H, GROUP, T, D, WINDOW, scale, qk_scale,
               DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_t, sq_d, T, D, DOT)
    do = _load_rows(do_ptr + b * sg_b + h * sg_h, offs_m, offs_d, sg_t, sg_d, T, D, DOT)
    row_stats = bh.to(tl.int64) * T
    lse2 = tl.load(lse_ptr + row_stats + offs_m, mask=offs_m < T, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + row_stats + offs_m, mask=offs_m < T, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_ranges(m0, T, WINDOW, BLOCK_M, BLOCK_N)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    dq = _dq_tiles(q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
                   qk_scale, lo, mid_lo, dq, True, DOT, BLOCK_N)
    dq = _dq_tiles(q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
                   qk_scale, mid_lo, mid_hi, dq, False, DOT, BLOCK_N)
    dq = _dq_tiles(q, do, lse2, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, T, D, WINDOW,
                   qk_scale, mid_hi, hi, dq, True, DOT, BLOCK_N)
    _store_rows(dq_ptr + b * sdq_b + h * sdq_h, dq * scale, offs_m, offs_d, sdq_t, sdq_d, T, D)


# ----------------------------------------------------------------------------- decode on a ring buffer

@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, part_ptr, lse_ptr, pos_ptr,
                   sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                   H_KV, GROUP, N_NEW, SLOTS, SLOTS_PER_SPLIT, D, WINDOW, qk_scale,
                   DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows are (query head of the group, new query) pairs of one key/value head: the group shares
    every cache tile it loads, and with one new query per step that is what fills a tile at all.
    Axis 2 splits the ring (flash-decoding): each split leaves its normalised partial output and
    base-2 log-sum-exp, so a few rows still spread over the whole GPU; the host merges them."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bhk = tl.program_id(1)
    split = tl.program_id(2)
    b, hk = (bhk // H_KV).to(tl.int64), (bhk % H_KV).to(tl.int64)
    h = hk * GROUP + offs_r // N_NEW
    i = offs_r % N_NEW
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < GROUP * N_NEW
    row_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + i[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_mask, other=0.0).to(DOT)
    # pos is read here, not on the host, so the launch is the same whatever the position.
    pos = tl.load(pos_ptr).to(tl.int64)
    q_pos = pos + i
    last = pos + N_NEW - 1
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    first = split * SLOTS_PER_SPLIT
    for s0 in range(first, tl.minimum(first + SLOTS_PER_SPLIT, SLOTS), BLOCK_N):
        slot = s0 + tl.arange(0, BLOCK_N)
        # Slot s holds the latest position <= last that is s mod SLOTS; negative means never written.
        # last - slot > -SLOTS, so adding SLOTS keeps the remainder's operand non-negative.
        k_pos = last - (last - slot + SLOTS) % SLOTS
        k = _load_rows(k_base, slot, offs_d, sk_t, sk_d, SLOTS, D, DOT)
        v = _load_rows(v_base, slot, offs_d, sv_t, sv_d, SLOTS, D, DOT)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        visible = _in_window(q_pos[:, None], k_pos[None, :], WINDOW) & ((k_pos >= 0) & (slot < SLOTS))[None, :]
        # A slot no query of this block sees may hold anything (a stale NaN from a reused cache):
        # its weight is 0, but 0 * NaN = NaN in the P x V product, so its value row is zeroed.
        seen = tl.max(visible.to(tl.int32), axis=0) > 0
        v = tl.where(seen[:, None], v, tl.zeros_like(v))
        m_i, l_i, acc = _online_softmax_step(tl.where(visible, s, float("-inf")), v, m_i, l_i, acc, DOT)

    # A split that saw nothing visible leaves zeros and lse = -inf: weight 0 in the merge.
    out, lse2 = _finish_rows(m_i, l_i, acc)
    row = ((b * H_KV * GROUP + h) * N_NEW + i) * tl.num_programs(2) + split  # part is (B, H, n, splits, D)
    tl.store(part_ptr + row[:, None] * D + offs_d[None, :], out, mask=row_mask)
    tl.store(lse_ptr + row, lse2, mask=row_ok)


# ----------------------------------------------------------------------------- launch

def _check_supported(q: torch.Tensor) -> None:
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the triton window-attention kernels support head_dim up to {MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}; use backend='torch'")


def _dot_dtype(dtype: torch.dtype):
    return tl.float32 if _INTERPRET else _TL_DTYPES[dtype]


def _blocks(head_dim: int, elem_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for one launch.

    Small square tiles under the interpreter, so shapes of a few dozen positions already cross
    several blocks. On a GPU, tiles shrink as a head row grows so q, k, v and the accumulator stay
    in registers and shared memory; fp32 operands count double."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _INTERPRET:
        return 16, 16, block_d, 4, 1
    row_bytes = block_d * elem_size
    if row_bytes <= 128:
        return 64, 64, block_d, 4, 3
    if row_bytes <= 256:
        return 64, 32, block_d, 4, 2
    return 32, 32, block_d, 8, 1


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _empty_result(like: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer for a result shaped and typed like `like`. The interpreter truncates
    fp32 -> bf16 where a GPU rounds to nearest even, so there bf16 results are written as fp32 and
    rounded by torch (`.to(like.dtype)` on the way out)."""
    dtype = torch.float32 if _INTERPRET and like.dtype == torch.bfloat16 else like.dtype
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def attention_forward(q, k, v, window: int, scale: float):
    """(out in q's dtype, lse fp32 (B, H, T)); any strides on q, k, v."""
    _check_supported(q)
    b, h, t, d = q.shape
    window = min(window, t)  # beyond T the rule is plain causal; also keeps indices in int32
    out = _empty_result(q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps, stages = _blocks(d, q.element_size())
    grid = (triton.cdiv(t, block_m), b * h)
    _forward_kernel[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                          h, h // k.shape[1], t, d, window, scale * LOG2E.value,
                          DOT=_dot_dtype(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                          num_warps=warps, num_stages=stages)
    return out.to(q.dtype), lse


def attention_backward(grad_out, q, k, v, out, lse, window: int, scale: float):
    """(dq, dk, dv) in the inputs' dtypes, from the forward's output and row log-sum-exp."""
    _check_supported(q)
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    window = min(window, t)
    block_m, block_n, block_d, warps, stages = _blocks(d, q.element_size())
    dot = _dot_dtype(q.dtype)

    delta = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(t, block_m), b * h)](out, grad_out, delta, *_strides(out), *_strides(grad_out),
                                                   h, t, d, BLOCK_M=block_m, BLOCK_D=block_d)
    dq, dk, dv = _empty_result(q), _empty_result(k), _empty_result(v)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    _dkdv_kernel[(triton.cdiv(t, block_n), b * h_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, *common, *_strides(dk),
        h, h_kv, t, d, window, scale, scale * LOG2E.value,
        DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    _dq_kernel[(triton.cdiv(t, block_m), b * h)](
        q, k, v, grad_out, lse, delta, dq, *common, *_strides(dq),
        h, h // h_kv, t, d, window, scale, scale * LOG2E.value,
        DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _decode_splits(programs: int, slot_tiles: int, device: torch.device) -> int:
    """How many pieces to cut the ring into so about two programs run per SM, each still walking
    a few tiles. Under the interpreter one tile per split, so small tests exercise the merge."""
    if _INTERPRET or device.type != "cuda":
        return slot_tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(slot_tiles, 4)))


def decode(q, k_cache, v_cache, pos, window: int, scale: float):
    """Output (B, H, n, Dh) of n new queries at pos.. against the ring caches (B, H_kv, S, Dh)."""
    _check_supported(q)
    b, h, n_new, d = q.shape
    h_kv, slots = k_cache.shape[1], k_cache.shape[2]
    group = h // h_kv
    if not isinstance(pos, torch.Tensor):
        pos = torch.tensor(pos, dtype=torch.int64, device=q.device)
    block_m, block_n, block_d, warps, stages = _blocks(d, q.element_size())
    block_r = min(block_m, max(16, triton.next_power_of_2(group * n_new)))
    row_tiles, slot_tiles = triton.cdiv(group * n_new, block_r), triton.cdiv(slots, block_n)
    splits = _decode_splits(row_tiles * b * h_kv, slot_tiles, q.device)
    part = torch.empty((b, h, n_new, splits, d), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((b, h, n_new, splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(row_tiles, b * h_kv, splits)](
        q, k_cache, v_cache, part, lse2, pos, *_strides(q), *_strides(k_cache), *_strides(v_cache),
        h_kv, group, n_new, slots, triton.cdiv(slot_tiles, splits) * block_n, d, window, scale * LOG2E.value,
        DOT=_dot_dtype(q.dtype), BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages)
    if splits == 1:
        return part[:, :, :, 0].to(q.dtype)
    # Every row's own key is in some split, so the largest lse is finite.
    weight = torch.exp2(lse2 - lse2.amax(-1, keepdim=True))
    return ((weight[..., None] * part).sum(-2) / weight.sum(-1, keepdim=True)).to(q.dtype)
