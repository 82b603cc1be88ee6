// What the sliding-window attention kernels share: the blocked layout, the register-blocked GEMM
// micro-kernel, the masked online-softmax row and the input checks. csrc/window_attention.cpp
// (forward, backward) and csrc/window_attention_decode.cpp (ring-buffer decode) include it.
//
// Query i sees key j iff i - window < j <= i. Sequences are cut into blocks of BLK positions; a
// query block meets only the key blocks its window reaches. Inputs become fp32 row copies (Dh
// padded to a multiple of DALIGN with zeros, which changes no dot product), and keys are
// transposed into panels [Dp][BLK] that let the score GEMMs vectorise along keys. Every product of
// two tiles goes through one micro-kernel: C[rows][cols] (+)= sum_k A(row, k) * B[k][cols], cols
// in SIMD lanes, A broadcast. Softmax runs in base 2 (scores times scale * log2 e), so each
// probability is one exp2.
//
// Everything here has internal linkage on purpose (an unnamed namespace, as when it all lived in
// one file): each kernel file gets its own copies, which the compiler specialises for that file's
// constant strides and inlines.
#pragma once

// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "parallel.h"
#include "vec.h"

FASTVQ_ISA_BEGIN

namespace {

using namespace fastvq::vec;
using fastvq::parallel_ranges;

constexpr int VL = kLanes;
#if FASTVQ_HAS_AVX512
constexpr int MR = 6;  // 6 rows x 4 vectors = 24 accumulators of the 32 zmm
#else
constexpr int MR = 4;
#endif
constexpr int NVMAX = 4;     // vectors per micro-tile row
constexpr int64_t BLK = 64;  // positions per query block and per key block
constexpr int NVB = BLK / VL;
constexpr int64_t DALIGN = 16;  // head_dim is padded to a multiple of this
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(BLK % VL == 0 && DALIGN % VL == 0, "blocks and padded rows hold whole vectors");

// Tasks per thread share so that a share is worth starting a thread for (about 1 MFLOP).
inline int64_t grain_for(int64_t flops_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, flops_per_task));
}

// ----------------------------------------------------------------------------- micro-kernel

// C[R][NV*VL] (+)= sum_{k<K} A[r*ars + k*aks] * B[k*ldb + 0 .. NV*VL)
template <int R, int NV, bool ACC>
void tile(float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, int64_t K) {
  vf c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? load(C + r * ldc + v * VL) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * VL);
    const float* a = A + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf ar = splat(a[r * ars]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * VL, c[r][v]);
}

template <int NV, bool ACC>
void tile_rows(int rows, float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B,
               int64_t ldb, int64_t K) {
  switch (rows) {
    case 1: return tile<1, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 2: return tile<2, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 3: return tile<3, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 4: return tile<4, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
#if FASTVQ_HAS_AVX512
    case 5: return tile<5, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 6: return tile<6, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
#endif
  }
}

template <bool ACC>
void tile_cols(int nv, int rows, float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B,
               int64_t ldb, int64_t K) {
  switch (nv) {
    case 1: return tile_rows<1, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
    case 2: return tile_rows<2, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
    case 3: return tile_rows<3, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
    default: return tile_rows<4, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
  }
}

// C[M][N] (+)= A(M x K, element (r, k) at A[r*ars + k*aks]) * B[K][N] (row stride ldb); N % VL == 0.
template <bool ACC>
void gemm(float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, int64_t M,
          int64_t N, int64_t K) {
  for (int64_t r0 = 0; r0 < M; r0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, M - r0));
    for (int64_t n0 = 0; n0 < N; n0 += NVMAX * VL)
      tile_cols<ACC>(static_cast<int>(std::min<int64_t>(NVMAX, (N - n0) / VL)), rows, C + r0 * ldc + n0, ldc,
                     A + r0 * ars, ars, aks, B + n0, ldb, K);
  }
}

// The window's band inside a tile: row x meets only indices [x + lo, x + hi) of the other side.
struct Band {
  int64_t lo, hi;
};
// Queries (rows) against keys (columns) of tiles at positions i0, j0: 0 <= i0 + r - j0 - c < window.
inline Band key_band(int64_t i0, int64_t j0, int64_t window) { return {i0 - j0 - window + 1, i0 - j0 + 1}; }
// The same band seen from the keys (rows) towards the queries.
inline Band query_band(int64_t i0, int64_t j0, int64_t window) { return {j0 - i0, j0 - i0 + window}; }

// gemm restricted to the band, MR rows at a time. INNER: each row group sums only over the k its
// band reaches (the rest of A is zero there), the full N columns. Otherwise: each row group computes
// only the VL-column vectors its band reaches, over the full K; the other columns of C are left as
// they were (the masked softmax overwrites them).
template <bool ACC, bool INNER>
void gemm_band(float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
               int64_t M, int64_t N, int64_t K, Band band) {
  for (int64_t r0 = 0; r0 < M; r0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, M - r0));
    const int64_t lo = std::max<int64_t>(0, r0 + band.lo), hi = std::min(INNER ? K : N, r0 + rows - 1 + band.hi);
    float* c = C + r0 * ldc;
    const float* a = A + r0 * ars;
    if (INNER) {
      if (hi <= lo) {
        if (!ACC)
          for (int r = 0; r < rows; ++r) std::fill(c + r * ldc, c + r * ldc + N, 0.f);
        continue;
      }
      for (int64_t n0 = 0; n0 < N; n0 += NVMAX * VL)
        tile_cols<ACC>(static_cast<int>(std::min<int64_t>(NVMAX, (N - n0) / VL)), rows, c + n0, ldc, a + lo * aks,
                       ars, aks, B + lo * ldb + n0, ldb, hi - lo);
    } else {
      const int64_t c_hi = (hi + VL - 1) / VL * VL;
      for (int64_t n0 = lo / VL * VL; n0 < c_hi; n0 += NVMAX * VL)
        tile_cols<ACC>(static_cast<int>(std::min<int64_t>(NVMAX, (c_hi - n0) / VL)), rows, c + n0, ldc, a, ars, aks,
                       B + n0, ldb, K);
    }
  }
}

// ----------------------------------------------------------------------------- softmax rows

// Scores s[0..BLK) of query position qi against keys at kpos[]: visible iff 0 <= qi - kpos < window.
inline vf masked(vf x, int32_t qi, const int32_t* kpos, int v, uint32_t window, float fill = kNegInf) {
  const vu d = (vu)(vi{} + qi - load(kpos + v * VL));
  return d < (vu{} + window) ? x : splat(fill);
}

// One online-softmax step for a row of BLK scores: updates (m, l) (base 2), turns s into
// probabilities relative to the new max, and returns the factor the row's output must be scaled by.
template <bool MASKED>
inline float online_row(float* s, float c, int32_t qi, const int32_t* kpos, uint32_t window, float& m, float& l) {
  vf x[NVB];
  vf mx = splat(kNegInf);
#pragma GCC unroll 8
  for (int v = 0; v < NVB; ++v) {
    x[v] = load(s + v * VL) * c;
    if (MASKED) x[v] = masked(x[v], qi, kpos, v, window);
    mx = vmax(mx, x[v]);
  }
  const float mn = std::max(m, hmax(mx));
  if (mn == kNegInf) {  // nothing visible to this row yet: its output and sum stay zero
    std::memset(s, 0, BLK * sizeof(float));
    return 1.f;
  }
  const float alpha = std::exp2(m - mn);  // 0 when m = -inf
  vf sum{};
#pragma GCC unroll 8
  for (int v = 0; v < NVB; ++v) {
    const vf p = vexp2(x[v] - mn);
    store(s + v * VL, p);
    sum += p;
  }
  l = l * alpha + hsum(sum);
  m = mn;
  return alpha;
}

inline void scale_row(float* o, int64_t Dp, float alpha) {
  for (int64_t d = 0; d < Dp; d += VL) store(o + d, load(o + d) * alpha);
}

// ----------------------------------------------------------------------------- layouts

inline int64_t padded(int64_t d) { return (d + DALIGN - 1) / DALIGN * DALIGN; }
inline int64_t blocks(int64_t t) { return (t + BLK - 1) / BLK; }

// (B, heads, T, Dp) contiguous fp32: t itself when it already is, else a copy zero-padded in Dh.
inline at::Tensor as_rows(const at::Tensor& t, int64_t Dp) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous() && t.size(3) == Dp) return t;
  auto sizes = t.sizes().vec();
  sizes[3] = Dp;
  auto out = Dp == t.size(3) ? at::empty(sizes, t.options().dtype(at::kFloat))
                             : at::zeros(sizes, t.options().dtype(at::kFloat));
  out.narrow(3, 0, t.size(3)).copy_(t);
  return out;
}

// Back to the caller's dtype and head_dim (a view-free no-op for fp32 without padding).
inline at::Tensor finish(const at::Tensor& rows, int64_t D, at::ScalarType dtype) {
  if (rows.size(3) == D && dtype == at::kFloat) return rows;
  return rows.narrow(3, 0, D).to(dtype).contiguous();
}

inline void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, heads, seq, head_dim), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": tensors must be on the CPU");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k, v must share one dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": k/v ", k.sizes(), " must match q ", q.sizes(), " in batch and head_dim, with q's heads a multiple of theirs");
}

}  // namespace

FASTVQ_ISA_END
