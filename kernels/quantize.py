"""Nearest-codebook search as one Triton kernel that never holds the N x K distance matrix.

Each program owns BLOCK_N rows of x and streams the codebook past them BLOCK_K codes at a time.
The x . c^T tile comes from tl.dot (tensor cores: fp16/bf16 natively, fp32 in IEEE mode, never
TF32; fp64 from outer products), and only a running (min, argmin) per row survives a tile. Ranking uses a per-code term that
a small kernel computes once per call, so the inner loop spends a handful of ALU ops per distance:

  l2:      ||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c)      rank by  ||c||^2 - 2 x.c
  cosine:  1 - x.c / (|x| |c|)                            rank by  -x.c / |c|

Ties go to the lowest index, as torch.argmin: inside a tile, the smallest index reaching the tile
minimum; across tiles, a later tile wins only when strictly smaller. When rows are too few to fill
the GPU, the codebook is split across a second grid axis and the per-split winners are merged in
split order with the same strict rule.

Under TRITON_INTERPRET=1 (the tests on CPU) bf16 arithmetic is wrong, so tiles are widened to fp32
before the dot there; autotuning, which needs the GPU driver, is replaced by one fixed config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvq._backend import triton_interpret

_INTERPRET = triton_interpret()  # read once, when the kernels are defined
_EPS = 1e-12  # same norm floor as fastvq.ops.quantize.nearest_code_reference: zero vectors get distance 1
# Up to this many elements per row (by element size), a row block's x tile stays loaded for the
# whole codebook sweep (the flash-attention pattern): codebook tiles are then the only loop traffic
# and the pipeliner can prefetch them. fp32 dots run on FMA units with operands in registers, so
# their resident tile is kept smaller; fp64 takes the outer-product path, which streams x.
_RESIDENT_MAX_D = {2: 256, 4: 64, 8: 0}
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _code_term_kernel(c_ptr, term_ptr, K, D, stride_ck, stride_cd,
                      COSINE: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """term[k] = ||c_k||^2 (l2) or -1 / max(|c_k|, EPS) (cosine), accumulated in ACC."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = c_ptr + offs_k.to(tl.int64)[:, None] * stride_ck
    sq = tl.zeros([BLOCK_K], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        c = tl.load(rows + offs_d[None, :] * stride_cd, mask=k_mask[:, None] & (offs_d < D)[None, :], other=0.0)
        c = c.to(ACC)
        sq += tl.sum(c * c, axis=1)
    if COSINE:
        term = -1.0 / tl.maximum(tl.sqrt(sq), EPS)
    else:
        term = sq
    tl.store(term_ptr + offs_k, term, mask=k_mask)


@triton.jit
def _merge_tile(dots, term_ptr, offs_k, k_mask, floor, best, best_idx, COSINE: tl.constexpr):
    """Fold one (BLOCK_N, BLOCK_K) tile of dot products into the running (best, best_idx)."""
    if COSINE:
        # A padded code's product is 0, which could beat every real code: mask it explicitly.
        term = tl.load(term_ptr + offs_k, mask=k_mask, other=0.0)
        val = tl.where(k_mask[None, :], dots * term[None, :], float("inf"))
        tile_min = tl.min(val, axis=1)
    else:
        # A padded code's term is +inf (and its dot 0), so it ranks last without a select.
        term = tl.load(term_ptr + offs_k, mask=k_mask, other=float("inf"))
        val = term[None, :] - 2.0 * dots
        # The reference clamps distances at 0 before its argmin, so every code at or below the
        # floor ties there and the lowest such index must win. Clamping the tile minimum (one op
        # per row) and selecting with <= is the same as clamping every element (one op per distance).
        tile_min = tl.maximum(tl.min(val, axis=1), floor)
    tile_arg = tl.min(tl.where(val <= tile_min[:, None], offs_k[None, :], 2147483647), axis=1)
    better = tile_min < best  # strict: an earlier tile keeps its tie
    return tl.where(better, tile_min, best), tl.where(better, tile_arg, best_idx)


@triton.jit
def _nearest_code_kernel(x_ptr, c_ptr, term_ptr, dist_ptr, idx_ptr,
                         N, K, D, stride_xn, stride_xd, stride_ck, stride_cd,
                         COSINE: tl.constexpr, EPS: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                         X_RESIDENT: tl.constexpr, OUTER: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    # Axis 1 splits the codebook into contiguous, BLOCK_K-aligned ranges, in index order.
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), n_splits)
    k_start = split * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row_ptrs = x_ptr + offs_n.to(tl.int64) * stride_xn
    x_rows = x_row_ptrs[:, None]
    arange_k = tl.arange(0, BLOCK_K)
    arange_d = tl.arange(0, BLOCK_D)

    best = tl.full([BLOCK_N], float("inf"), dtype=ACC)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32) + k_start

    if X_RESIDENT:
        d_mask = arange_d < D
        x = tl.load(x_rows + arange_d[None, :] * stride_xd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        xf = x.to(ACC)
        x_sq = tl.sum(xf * xf, axis=1)
        x = x.to(DOT)
        floor = -x_sq
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + arange_k
            k_mask = offs_k < K
            c = tl.load(c_ptr + offs_k.to(tl.int64)[:, None] * stride_ck + arange_d[None, :] * stride_cd,
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            dots = tl.dot(x, tl.trans(c.to(DOT)), input_precision="ieee").to(ACC)
            best, best_idx = _merge_tile(dots, term_ptr, offs_k, k_mask, floor, best, best_idx, COSINE)
    else:
        x_sq = tl.zeros([BLOCK_N], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + arange_d
            xf = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=n_mask[:, None] & (offs_d < D)[None, :],
                         other=0.0).to(ACC)
            x_sq += tl.sum(xf * xf, axis=1)
        floor = -x_sq
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + arange_k
            k_mask = offs_k < K
            c_row_ptrs = c_ptr + offs_k.to(tl.int64) * stride_ck
            dots = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
            if OUTER:
                # fp64: tl.dot in triton 3.2 (the oldest supported) takes no fp64 operands, so sum one
                # outer product per coordinate instead (exact fp64 FMAs; fp64 is for accuracy, not speed).
                for d in range(0, D):
                    xv = tl.load(x_row_ptrs + d * stride_xd, mask=n_mask, other=0.0).to(ACC)
                    cv = tl.load(c_row_ptrs + d * stride_cd, mask=k_mask, other=0.0).to(ACC)
                    dots += xv[:, None] * cv[None, :]
            else:
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + arange_d
                    d_mask = offs_d < D
                    x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                    c = tl.load(c_row_ptrs[:, None] + offs_d[None, :] * stride_cd, mask=k_mask[:, None] & d_mask[None, :],
                                other=0.0)
                    dots = tl.dot(x.to(DOT), tl.trans(c.to(DOT)), dots, input_precision="ieee")
            best, best_idx = _merge_tile(dots, term_ptr, offs_k, k_mask, floor, best, best_idx, COSINE)

    if COSINE:
        dist = 1.0 + best / tl.maximum(tl.sqrt(x_sq), EPS)
    else:
        dist = x_sq + best
    out = split.to(tl.int64) * N + offs_n
    tl.store(dist_ptr + out, tl.maximum(dist, 0.0), mask=n_mask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=n_mask)


# ----------------------------------------------------------------------------- launch configuration

# (BLOCK_N, BLOCK_K, num_warps, num_stages). The first is the big-tile shape that keeps the tensor
# cores busy for D >= 64; the others cover large D (shared memory) and few rows.
_GPU_CONFIGS = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3),
                (64, 64, 4, 3), (64, 32, 4, 2))
# fp32/fp64 dots run on the FMA units with both operands in registers: 128 x 128 tiles spill there
# (checked with ptxas for sm_90), so only the shapes that stay in registers are tried.
_FMA_CONFIGS = ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2))
# Below this much work (N*K*D multiply-adds; about a second of autotuning per new (K, D) would dwarf
# the search itself) one modest config is launched directly. This also keeps small-shape test
# suites on GPU at one compiled kernel per dtype and metric instead of one per config.
_AUTOTUNE_MIN_WORK = 1 << 30
_SMALL_CONFIG = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
# The interpreter runs numpy per program and per tile: few, large tiles are fastest there.
_INTERPRET_BLOCKS = {"BLOCK_N": 64, "BLOCK_K": 64}
_NOMINAL_BLOCK_N = 128  # for choosing the codebook split before the autotuner has picked a config
_MIN_CODES_PER_SPLIT = 512  # below this the x-tile load and per-row epilogue stop being amortised


def _block_d(D: int, elem_size: int) -> tuple[int, bool]:
    """(BLOCK_D, x tile resident). tl.dot wants every tile dimension >= 16."""
    if D <= _RESIDENT_MAX_D[elem_size]:
        return max(16, triton.next_power_of_2(D)), True
    return 128 // elem_size, False  # 128-byte rows per chunk: full cache lines, bounded shared memory


def _smem_budget(device: torch.device) -> int:
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    except Exception:  # unknown driver layout: assume a consumer-class GPU
        return 99 * 1024


_TUNED: dict[tuple, object] = {}  # one autotuner per config list: (BLOCK_D, resident, elem_size, smem)


def _tuned_kernel(block_d: int, resident: bool, elem_size: int, smem: int):
    """The kernel autotuned over the configs whose pipelined tiles fit in shared memory."""
    key = (block_d, resident, elem_size, smem)
    if key in _TUNED:
        return _TUNED[key]
    candidates = _GPU_CONFIGS if elem_size == 2 else _FMA_CONFIGS
    configs = []
    for bn, bk, warps, stages in candidates:
        per_stage = bk * block_d * elem_size + (0 if resident else bn * block_d * elem_size)
        fixed = bn * block_d * elem_size if resident else 0
        if stages * per_stage + fixed <= smem * 0.9 or (bn, bk) == candidates[-1][:2]:
            configs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    _TUNED[key] = triton.autotune(configs=configs, key=["K", "D"])(_nearest_code_kernel)
    return _TUNED[key]


def _codebook_splits(n_row_blocks: int, K: int, device: torch.device) -> int:
    """How many codebook ranges to run side by side so that few rows still fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if n_row_blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, n_row_blocks), K // _MIN_CODES_PER_SPLIT))


def _code_term(codebook: torch.Tensor, cosine: bool, acc_dtype: torch.dtype) -> torch.Tensor:
    K, D = codebook.shape
    term = torch.empty(K, dtype=acc_dtype, device=codebook.device)
    block_k = 64
    _code_term_kernel[(triton.cdiv(K, block_k),)](
        codebook, term, K, D, codebook.stride(0), codebook.stride(1),
        COSINE=cosine, EPS=_EPS, ACC=_TL_DTYPES[acc_dtype], BLOCK_K=block_k, BLOCK_D=64)
    return term


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, cosine: bool, *, splits: int | None = None):
    """Index (int64) and distance (fp32) of the nearest codebook row for every row of x.

    Inputs are validated by fastvq.ops.quantize.nearest_code. `splits` forces the number of codebook
    ranges searched in parallel (chosen from the GPU's size when None), for testing their merge.
    """
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # Triton launches on the current device, not the tensors'
            return _nearest_code(x, codebook, cosine, splits)
    return _nearest_code(x, codebook, cosine, splits)


def _nearest_code(x, codebook, cosine, splits):
    N, D = x.shape
    K = codebook.shape[0]
    dot_dtype = torch.promote_types(x.dtype, codebook.dtype)
    acc_dtype = torch.float64 if dot_dtype == torch.float64 else torch.float32
    elem_size = dot_dtype.itemsize
    block_d, resident = _block_d(D, elem_size)
    outer = dot_dtype == torch.float64
    if _INTERPRET and dot_dtype in (torch.float16, torch.bfloat16):
        dot_dtype = torch.float32  # the interpreter's bf16 arithmetic is wrong; fp32 is exact for these products

    if splits is None:
        splits = _codebook_splits(triton.cdiv(N, _NOMINAL_BLOCK_N), K, x.device)
    splits = max(1, min(int(splits), K))
    term = _code_term(codebook, cosine, acc_dtype)
    dist = torch.empty((splits, N), dtype=torch.float32 if splits == 1 else acc_dtype, device=x.device)
    idx = torch.empty((splits, N), dtype=torch.int64, device=x.device)

    args = (x, codebook, term, dist, idx, N, K, D, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1))
    meta = dict(COSINE=cosine, EPS=_EPS, DOT=_TL_DTYPES[dot_dtype], ACC=_TL_DTYPES[acc_dtype],
                X_RESIDENT=resident, OUTER=outer, BLOCK_D=block_d)
    if _INTERPRET:
        grid = (triton.cdiv(N, _INTERPRET_BLOCKS["BLOCK_N"]), splits)
        _nearest_code_kernel[grid](*args, **meta, **_INTERPRET_BLOCKS)
    elif N * K * D < _AUTOTUNE_MIN_WORK:
        _nearest_code_kernel[(triton.cdiv(N, _SMALL_CONFIG["BLOCK_N"]), splits)](*args, **meta, **_SMALL_CONFIG)
    else:
        kernel = _tuned_kernel(block_d, resident, elem_size, _smem_budget(x.device))
        kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]), splits)](*args, **meta)

    if splits == 1:
        return idx[0], dist[0]
    # Split order is index order, and argmin returns the first minimum: ties keep the lowest index.
    winner = dist.argmin(0, keepdim=True)
    return idx.gather(0, winner)[0], dist.gather(0, winner)[0].to(torch.float32)


def chosen_configs() -> dict[str, str]:
    """The autotuner's pick per tuning key (K, D, dtypes) so far, for benchmark reports."""
    return {f"BLOCK_D={key[0]} resident={key[1]} {tuning_key}": str(cfg)
            for key, kernel in _TUNED.items() for tuning_key, cfg in kernel.cache.items()}


# ----------------------------------------------------------------------------- fused epilogues
#
# After the search the rest of the VQ op is O(N D): one kernel gathers the codes and writes the
# straight-through output and per-block partial sums of the squared error; one kernel writes
# grad_z and scatter-adds the codebook gradient. Rows are tiled BLOCK_N at a time, D in BLOCK_D
# chunks. Arithmetic is fp32 (fp64 for fp64 inputs); bf16/fp16 are only loaded and stored.

@triton.jit
def _round_to(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """x (fp32) rounded to dtype, as a value of x's type. With RNE_BF16 the bf16 rounding is done
    in integer arithmetic (round to nearest even): the interpreter's fp32 -> bf16 cast truncates."""
    if RNE_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype).to(x.dtype)


@triton.jit
def _vq_gather_kernel(z_ptr, c_ptr, idx_ptr, out_ptr, partial_ptr, N, D,
                      stride_zn, stride_zd, stride_ck, stride_cd, stride_on, stride_od,
                      ACC: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = z + (c_idx - z), with c_idx - z rounded to z's dtype first (torch's two roundings);
    partial[pid] = the block's sum of that rounded difference squared."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k = tl.load(idx_ptr + offs_n, mask=n_mask, other=0)
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    c_rows = c_ptr + k.to(tl.int64)[:, None] * stride_ck
    o_rows = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on
    sq = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = n_mask[:, None] & (offs_d < D)[None, :]
        z = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=mask, other=0.0)
        c = tl.load(c_rows + offs_d[None, :] * stride_cd, mask=mask, other=0.0)
        zf = z.to(ACC)
        diff = _round_to(c.to(ACC) - zf, z.dtype, RNE_BF16)
        tl.store(o_rows + offs_d[None, :] * stride_od, _round_to(zf + diff, z.dtype, RNE_BF16).to(z.dtype), mask=mask)
        sq += diff * diff
    tl.store(partial_ptr + pid, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _vq_backward_kernel(go_ptr, z_ptr, c_ptr, idx_ptr, gl_ptr, gz_ptr, gc_ptr, N, D, scale_z, scale_code,
                        stride_gn, stride_gd, stride_zn, stride_zd, stride_ck, stride_cd,
                        ACC: tl.constexpr, RNE_BF16: tl.constexpr, HAS_GO: tl.constexpr, GRAD_Z: tl.constexpr,
                        GRAD_CODE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_z = grad_out + scale_z * grad_loss * diff (contiguous, z's dtype); with GRAD_CODE,
    gc (fp32, contiguous, zeroed) += scale_code * grad_loss * diff at row idx, by atomics."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    gl = tl.load(gl_ptr).to(ACC)
    coef_z = gl * scale_z
    coef_code = (gl * scale_code).to(tl.float32)
    rows = offs_n.to(tl.int64)[:, None]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = n_mask[:, None] & (offs_d < D)[None, :]
        z = tl.load(z_ptr + rows * stride_zn + offs_d[None, :] * stride_zd, mask=mask, other=0.0)
        c = tl.load(c_ptr + k[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask, other=0.0)
        diff = c.to(ACC) - z.to(ACC)
        if GRAD_Z:
            g = coef_z * diff
            if HAS_GO:
                g += tl.load(go_ptr + rows * stride_gn + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(ACC)
            tl.store(gz_ptr + rows * D + offs_d[None, :], _round_to(g, z.dtype, RNE_BF16).to(z.dtype), mask=mask)
        if GRAD_CODE:
            tl.atomic_add(gc_ptr + k[:, None] * D + offs_d[None, :], coef_code * diff.to(tl.float32), mask=mask)


_EPILOGUE_BLOCK_N = 32


def _epilogue_block_d(D: int) -> int:
    return min(128, max(16, triton.next_power_of_2(D)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _on_device(x: torch.Tensor, fn):
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            return fn()
    return fn()


def vq_gather(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor):
    """(z + (codebook[idx] - z) in z's dtype, fp32 sum of the squared differences). z and codebook
    share a dtype. The sum adds fixed per-block partials in block order: deterministic."""
    N, D = z.shape
    out = torch.empty((N, D), dtype=z.dtype, device=z.device)
    blocks = triton.cdiv(N, _EPILOGUE_BLOCK_N)
    acc = _acc_dtype(z.dtype)
    partial = torch.empty(blocks, dtype=acc, device=z.device)
    _on_device(z, lambda: _vq_gather_kernel[(blocks,)](
        z, codebook, idx, out, partial, N, D, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        out.stride(0), out.stride(1), ACC=_TL_DTYPES[acc], RNE_BF16=_INTERPRET and z.dtype == torch.bfloat16,
        BLOCK_N=_EPILOGUE_BLOCK_N, BLOCK_D=_epilogue_block_d(D)))
    return out, partial.sum().to(torch.float32)


def vq_backward(grad_out, z, codebook, idx, grad_loss, scale_z: float, scale_code: float,
                need_grad_z: bool, need_grad_codebook: bool):
    """(grad_z, grad_codebook) of the VQ op, diff = codebook[idx] - z, gl = grad_loss (0-dim):
    grad_z = grad_out + scale_z gl diff; grad_codebook[k] = scale_code gl Σ_{idx_i = k} diff_i.
    The codebook gradient is an fp32 atomic scatter-add (order not fixed); under
    torch.use_deterministic_algorithms(True) it is torch's deterministic index_put_ instead.
    A gradient not asked for is None."""
    N, D = z.shape
    deterministic = need_grad_codebook and torch.are_deterministic_algorithms_enabled()
    atomic = need_grad_codebook and not deterministic
    grad_z = torch.empty((N, D), dtype=z.dtype, device=z.device) if need_grad_z else None
    grad_code = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device) if atomic else None
    gl = grad_loss.reshape(1)
    acc = _acc_dtype(z.dtype)
    if (need_grad_z or atomic) and N > 0:
        go = grad_out if grad_out is not None else z  # a placeholder pointer when HAS_GO is off
        _on_device(z, lambda: _vq_backward_kernel[(triton.cdiv(N, _EPILOGUE_BLOCK_N),)](
            go, z, codebook, idx, gl, grad_z if grad_z is not None else z, grad_code if atomic else z, N, D,
            scale_z, scale_code, go.stride(0), go.stride(1), z.stride(0), z.stride(1),
            codebook.stride(0), codebook.stride(1), ACC=_TL_DTYPES[acc],
            RNE_BF16=_INTERPRET and z.dtype == torch.bfloat16, HAS_GO=grad_out is not None,
            GRAD_Z=need_grad_z, GRAD_CODE=atomic, BLOCK_N=_EPILOGUE_BLOCK_N, BLOCK_D=_epilogue_block_d(D)))
    if deterministic:
        g = (codebook.index_select(0, idx).float() - z.float()) * (gl.float() * scale_code)
        grad_code = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
        grad_code.index_put_((idx,), g, accumulate=True)
    return grad_z, grad_code.to(codebook.dtype) if grad_code is not None else None
