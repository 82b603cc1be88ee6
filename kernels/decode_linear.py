"""y = act(x @ W.T + b) + residual for a few rows of x, as a split-N Triton GEMV.

The semantics are fastvq.ops.decode_linear's (its docstring is the contract). One program owns
BLOCK_N outputs (weight rows) for BLOCK_M rows of x and sweeps K in BLOCK_K chunks: each chunk of
its weight rows is loaded once and multiplied against all BLOCK_M rows of x by a broadcast product
summed over K (no tl.dot: M is often 1, below tl.dot's minimum of 16). With M <= BLOCK_M (16) the
grid is one column of programs and every weight is read exactly once, which is what bounds a
decoding step. Loads are widened to fp32 and the sum, bias, GELU and residual are fp32; the store
rounds to the output's dtype.

Limits: tested through the interpreter only (no GPU here). With 16 outputs a program, a layer of
N outputs makes N / 16 programs, fewer than a large GPU has SMs for N below ~2000; a split-K
variant (partial sums over K in several programs, then a reduction) would fill them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvq._backend import triton_interpret

_INTERPRET = triton_interpret()  # read once, when the kernels are defined
_MAX_BLOCK_M = 16
_MAX_TILE, _MAX_TILE_INTERPRET = 8192, 65536


@triton.jit
def _decode_linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                          HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask, rmask = cols < N, rows < M
    lane = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + lane
        kmask = ks < K
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + out, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                  gelu: bool) -> torch.Tensor:
    """Checked inputs from fastvq.ops.decode_linear: x (M, K), weight (N, K), bias (N,) or None,
    residual (M, N) or None, one dtype. Returns (M, N) in that dtype."""
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    tensors = [t.contiguous() if t is not None else None for t in (x, weight, bias, residual)]
    if _INTERPRET and dtype == torch.bfloat16:
        # the interpreter's bf16 conversions are wrong: widen on the host, round the result back
        tensors = [t.float() if t is not None else None for t in tensors]
    x, weight, bias, residual = tensors
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.to(dtype)
    block_m = min(_MAX_BLOCK_M, triton.next_power_of_2(M))
    block_n = 16
    # the (BLOCK_M, BLOCK_N, BLOCK_K) product lives in registers: ~64 fp32 per thread on a GPU;
    # the interpreter runs numpy on whole tiles, so bigger ones are faster there
    block_k = (_MAX_TILE_INTERPRET if _INTERPRET else _MAX_TILE) // (block_m * block_n)
    block_k = max(16, min(block_k, 256, triton.next_power_of_2(max(K, 1))))
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _decode_linear_kernel[grid](
        x, weight, bias if bias is not None else y, residual if residual is not None else y, y, M, N, K,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, GELU=gelu,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return y.to(dtype)
