"""Temperature, top-k, top-p, guidance and the draw as one Triton program per row, with no sort.

The semantics are fastvq.ops.sampling's (its docstring is the contract). One program owns ROWS
rows (one for codebook-sized rows; short rows share a program so that a (ROWS, BLOCK) chunk has
about _MAX_TILE elements) and sweeps them in BLOCK-wide chunks a fixed number of times; the row is
re-read on every sweep, from L1/L2 after the first (64K fp32 logits are 256 KiB), and never
written anywhere. Every per-row quantity (max, thresholds, running sums) is a (ROWS,) vector; a
top-k or top-p search is skipped when no row of the program needs it.

  sweep 1      max and argmax of x (x: the fp32 row, guidance applied). Rows with t = 0 return
               the argmax (their later sweeps are computed and discarded).
  top-k        radix select by counting. Logits map to uint32 keys whose unsigned order is the
               float order; the k-th largest key is found 4 bits at a time, most significant first:
               with the prefix T fixed so far, one sweep counts keys >= T | j << shift for all 16
               digits j at once (a BLOCK x 16 compare) and keeps the largest j whose count is >= k.
               8 sweeps give the exact k-th largest key (k = V gives the smallest key).
  top-p        the same search with mass instead of count: sum of w = exp((x - max) / t) over the
               top-k survivors with key >= candidate, against top_p * (the mass at digit 0 of the
               first sweep, which is every survivor). 8 sweeps; rows with top_p = 1 ignore it.
  sum + draw   one sweep for the kept mass S, one for the inverse CDF: chunk-wise cumulative sums
               continue a running total, the first index whose total exceeds r * S is the token.
Ties at a threshold are kept because selection is "key >= threshold key" with the threshold an
exact key of the row.

Up to 19 sweeps of a row held in cache replace a sort; each costs O(V) loads and 16 compares per
element. A long row is one program: a batch of 1 uses one SM (a split of long rows across
programs would need a grid-wide reduction per sweep).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvq._backend import triton_interpret

_INTERPRET = triton_interpret()  # read once, when the kernels are defined
# Elements of a (ROWS, BLOCK) chunk; each also meets 16 candidate keys per radix sweep. Short rows
# share a program. The interpreter runs programs one after another, so it gets wider chunks.
_MAX_TILE = 8192 if _INTERPRET else 1024


@triton.jit
def _chunk(row_ptr, uncond_ptr, offs, mask, scale, CFG: tl.constexpr):
    """fp32 logits of a (ROWS, BLOCK) chunk, guidance applied; -inf where masked off."""
    x = tl.load(row_ptr[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if CFG:
        u = tl.load(uncond_ptr[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        x = u + scale * (x - u)
    return tl.where(mask, x, float("-inf"))


@triton.jit
def _ordered_key(x):
    """uint32 key with the float order of x (-0 and +0 equal): sign bit flipped for x >= 0, all
    bits flipped for x < 0."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.uint32, bitcast=True)
    neg = (b >> 31) == 1
    return tl.where(neg, ~b, b | tl.full([], 0x80000000, tl.uint32))


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, temp_ptr, topk_ptr, topp_ptr, rand_ptr,
                   n_rows, V, stride_row, scale,
                   CFG: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    uncond_ptr = logits_ptr + (rows + n_rows).to(tl.int64) * stride_row
    t = tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    k = tl.load(topk_ptr + rows, mask=rmask, other=1).to(tl.int32)
    p = tl.load(topp_ptr + rows, mask=rmask, other=1.0)
    r = tl.load(rand_ptr + rows, mask=rmask, other=0.0)
    sampled = rmask & (t > 0.0)
    inv_t = 1.0 / tl.where(sampled, t, 1.0)
    lane = tl.arange(0, BLOCK)
    digits = tl.arange(0, 16).to(tl.uint32)

    # sweep 1: max and lowest argmax (a later chunk wins only when strictly larger)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    am = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lane
        mask = rmask[:, None] & (offs < V)[None, :]
        x = _chunk(row_ptr, uncond_ptr, offs, mask, scale, CFG)
        cm = tl.max(x, axis=1)
        ca = tl.min(tl.where(mask & (x == cm[:, None]), offs[None, :], 2147483647), axis=1)
        better = cm > m
        m = tl.where(better, cm, m)
        am = tl.where(better, ca, am)
    m = tl.where(rmask, m, 0.0)  # rows past the end: keep x - m free of inf - inf

    # top-k: the exact k-th largest key, 4 bits per sweep (k = V gives the smallest key: keep all)
    thr = tl.zeros([ROWS], dtype=tl.uint32)
    if tl.max((sampled & (k < V)).to(tl.int32), axis=0) > 0:
        for step in tl.static_range(8):
            cand = thr[:, None] | (digits[None, :] << (28 - 4 * step))
            count = tl.zeros([ROWS, 16], dtype=tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + lane
                mask = rmask[:, None] & (offs < V)[None, :]
                key = _ordered_key(_chunk(row_ptr, uncond_ptr, offs, mask, scale, CFG))
                hit = (key[:, :, None] >= cand[:, None, :]) & mask[:, :, None]
                count += tl.sum(hit.to(tl.int32), axis=1)
            j = tl.max(tl.where(count >= k[:, None], digits[None, :], 0), axis=1)
            thr = thr | (j << (28 - 4 * step))

    # top-p over the top-k survivors: the largest key whose mass at or above reaches p * total
    if tl.max((sampled & (p < 1.0)).to(tl.int32), axis=0) > 0:
        thr_p = tl.zeros([ROWS], dtype=tl.uint32)
        target = tl.zeros([ROWS], dtype=tl.float32)
        for step in tl.static_range(8):
            cand = thr_p[:, None] | (digits[None, :] << (28 - 4 * step))
            mass = tl.zeros([ROWS, 16], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + lane
                mask = rmask[:, None] & (offs < V)[None, :]
                x = _chunk(row_ptr, uncond_ptr, offs, mask, scale, CFG)
                key = _ordered_key(x)
                w = tl.where(mask & (key >= thr[:, None]), tl.exp((x - m[:, None]) * inv_t[:, None]), 0.0)
                mass += tl.sum(tl.where(key[:, :, None] >= cand[:, None, :], w[:, :, None], 0.0), axis=1)
            if step == 0:  # digit 0 of the first sweep is every survivor
                target = p * tl.sum(tl.where(digits[None, :] == 0, mass, 0.0), axis=1)
            j = tl.max(tl.where(mass >= target[:, None], digits[None, :], 0), axis=1)
            thr_p = thr_p | (j << (28 - 4 * step))
        thr = tl.where(p < 1.0, tl.maximum(thr, thr_p), thr)

    # the kept mass S, then the first index whose running kept mass exceeds r * S
    total = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + lane
        mask = rmask[:, None] & (offs < V)[None, :]
        x = _chunk(row_ptr, uncond_ptr, offs, mask, scale, CFG)
        w = tl.where(mask & (_ordered_key(x) >= thr[:, None]), tl.exp((x - m[:, None]) * inv_t[:, None]), 0.0)
        total += tl.sum(w, axis=1)
    goal = r * total
    run = tl.zeros([ROWS], dtype=tl.float32)
    pick = tl.full([ROWS], 2147483647, tl.int32)
    last = tl.full([ROWS], -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lane
        mask = rmask[:, None] & (offs < V)[None, :]
        x = _chunk(row_ptr, uncond_ptr, offs, mask, scale, CFG)
        w = tl.where(mask & (_ordered_key(x) >= thr[:, None]), tl.exp((x - m[:, None]) * inv_t[:, None]), 0.0)
        cdf = run[:, None] + tl.cumsum(w, axis=1)
        pick = tl.minimum(pick, tl.min(tl.where(cdf > goal[:, None], offs[None, :], 2147483647), axis=1))
        last = tl.maximum(last, tl.max(tl.where(w > 0.0, offs[None, :], -1), axis=1))
        run += tl.sum(w, axis=1)
    # r * S rounds up to the total only on a CDF boundary: then the last token with weight.
    drawn = tl.where(pick < V, pick, last)
    tl.store(out_ptr + rows, tl.where(sampled, drawn, am).to(tl.int64), mask=rmask)


def sample_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """Checked inputs from fastvq.ops.sampling: per-row fp32 temperature/top_p, int64 top_k in [1, V],
    fp32 uniforms; one int64 token per output row."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, V = uniform.shape[0], logits.shape[1]
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if _INTERPRET and logits.dtype == torch.bfloat16:
        logits = logits.float()  # the interpreter's bf16 conversions are wrong: widen on the host
    block = min(_MAX_TILE, triton.next_power_of_2(V))
    rows_per_program = max(1, min(triton.next_power_of_2(rows), _MAX_TILE // block))
    _sample_kernel[(triton.cdiv(rows, rows_per_program),)](
        logits, out, temperature, top_k, top_p, uniform,
        rows, V, logits.stride(0), float(cfg_scale) if cfg_scale is not None else 0.0,
        CFG=cfg_scale is not None, ROWS=rows_per_program, BLOCK=block,
        num_warps=8 if block * rows_per_program >= 1024 else 4,
    )
    return out
