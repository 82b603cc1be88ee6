// Register-blocked nearest-code search on raw pointers: the core of csrc/quantize.cpp.
//
// Rows of x sit in SIMD lanes and codes are broadcast, so each lane owns one row: the running
// (min, argmin) over codes is a lane-wise compare-and-blend that stays in registers for a whole
// chunk of codes and needs no horizontal reduction. Codes are visited in increasing order and only
// a strict < replaces the best, so the lowest index wins ties, as in torch.argmin.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "vec.h"

FASTVQ_ISA_BEGIN

namespace fastvq {
namespace nearest {
inline namespace FASTVQ_ISA_NS {

using vec::vf;
using vec::vi;
constexpr int W = vec::kLanes;

// A tile is RV vectors of W rows times NR codes. The RV * NR accumulators and the RV x vectors
// must fit the register file (32 zmm with AVX-512, 16 ymm/xmm otherwise) or they spill and the
// kernel runs at L1 speed instead of FMA speed.
#if FASTVQ_HAS_AVX512
constexpr int RV = 2, NR = 14;
#else
constexpr int RV = 1, NR = 12;
#endif
constexpr int MR = W * RV;  // rows per panel

// Packed codebook: group g of NR codes is [D][NR] floats, column j holding code j of the group,
// followed by one coefficient per code. L2 stores -2c (exact) and ||c||^2, so the score
// ||c||^2 - 2 x.c is one add after the dot products; cosine stores c and -1/max(|c|, eps), so the
// score -x.c / max(|c|, eps) rounds like the reference's dots * c_inv. Padding codes are zero
// with coefficient +inf (L2) or NaN (cosine), scores that never compare < best.
inline int64_t group_stride(int64_t D) { return (D + 1) * NR; }

// Packed x: panel p is [D][MR] floats, row r of the panel in lane r % W of vector r / W.

// Transpose of a W x W block in registers: log2(W) rounds of two-input shuffles, each swapping the
// off-diagonal h x h sub-blocks. Packing x this way instead of element by element keeps the
// packing of a large-D x at memory speed.
template <int h>
inline void swap_blocks(vf* v) {
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i)
    if (!(i & h)) {
      const vf a = v[i], b = v[i + h];
      v[i] = vec::blocks_low<h>(a, b);
      v[i + h] = vec::blocks_high<h>(a, b);
    }
  if constexpr (h > 1) swap_blocks<h / 2>(v);
}

// dst[i * dst_ld + r] = src[r * src_ld + i] for r, i < W.
inline void transpose_block(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  vf v[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) __builtin_memcpy(&v[i], src + i * src_ld, sizeof(vf));
  swap_blocks<W / 2>(v);
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) __builtin_memcpy(dst + i * dst_ld, &v[i], sizeof(vf));
}

struct Rows {  // running result for one panel
  vf best[RV];
  vi idx[RV];
};

inline bool any_lane(vi m) {
#if FASTVQ_HAS_AVX512
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif FASTVQ_HAS_AVX2
  return _mm256_movemask_ps((__m256)m) != 0;
#elif defined(__x86_64__)
  return _mm_movemask_ps((__m128)m) != 0;
#else
  for (int i = 0; i < W; ++i)
    if (m[i]) return true;
  return false;
#endif
}

template <bool COSINE>
inline vf score(vf acc, float coef) {
  return COSINE ? acc * coef : acc + coef;
}

// Folds the NR scores of one tile into (best, idx) for one vector of rows. The common case, no
// lane improving, costs a min tree and one compare; only improving lanes look for the first code
// that reached the tile minimum. L2 scores are clamped below at floor = -||x||^2 because the
// reference clamps distances at 0 before its argmin: codes that all reach 0 tie, lowest index wins.
inline void fold(vf* s, vf floor, int32_t j0, vf& best, vi& idx) {
  vf m[NR];
#pragma GCC unroll 32
  for (int j = 0; j < NR; ++j) m[j] = s[j];
#pragma GCC unroll 32
  for (int step = 1; step < NR; step *= 2)
#pragma GCC unroll 32
    for (int j = 0; j + step < NR; j += 2 * step) m[j] = m[j + step] < m[j] ? m[j + step] : m[j];
  vf tmin = m[0] < floor ? floor : m[0];
  const vi improve = tmin < best;
  if (__builtin_expect(!any_lane(improve), 1)) return;
  vi first = idx;
#pragma GCC unroll 32
  for (int j = NR - 1; j >= 0; --j) {
    const vf c = s[j] < floor ? floor : s[j];
    first = (c == tmin) ? vi{} + (j0 + j) : first;
  }
  best = improve ? tmin : best;
  idx = improve ? first : idx;
}

template <bool COSINE>
inline void tile(const float* __restrict xpanel, const float* __restrict group, int64_t D, int32_t j0,
                 const vf* floor, Rows& rows) {
  vf acc[RV][NR];
#pragma GCC unroll 32
  for (int r = 0; r < RV; ++r)
#pragma GCC unroll 32
    for (int j = 0; j < NR; ++j) acc[r][j] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    const float* c = group + d * NR;
    vf xv[RV];
#pragma GCC unroll 32
    for (int r = 0; r < RV; ++r) xv[r] = *reinterpret_cast<const vf*>(xpanel + d * MR + r * W);
    // Code-major with the scalar operand lets GCC broadcast each c[j] once for the RV FMAs; with
    // rows outermost it hoists all NR broadcasts into registers and spills accumulators instead.
#pragma GCC unroll 32
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 32
      for (int r = 0; r < RV; ++r) acc[r][j] += xv[r] * c[j];
  }
  const float* coef = group + D * NR;
#pragma GCC unroll 32
  for (int r = 0; r < RV; ++r) {
#pragma GCC unroll 32
    for (int j = 0; j < NR; ++j) acc[r][j] = score<COSINE>(acc[r][j], coef[j]);
    fold(acc[r], floor[r], j0, rows.best[r], rows.idx[r]);
  }
}

struct Codes {
  const float* packed;
  int64_t groups, D;
  int64_t chunk_groups;  // groups per chunk: a chunk should stay in L2 while a block of x passes
};

inline void init_rows(Rows& rows) {
  for (int r = 0; r < RV; ++r) {
    rows.best[r] = vf{} + std::numeric_limits<float>::infinity();
    rows.idx[r] = vi{};
  }
}

// Runs every code chunk past `panels` packed panels of x; rows[p] carries panel p's result
// across chunks and floors[p * RV + r] is its clamp floor.
template <bool COSINE>
void search_block(const Codes& cb, const float* xblock, int64_t panels, const vf* floors, Rows* rows) {
  const int64_t gs = group_stride(cb.D);
  for (int64_t p = 0; p < panels; ++p) init_rows(rows[p]);
  for (int64_t g0 = 0; g0 < cb.groups; g0 += cb.chunk_groups) {
    const int64_t g1 = g0 + cb.chunk_groups < cb.groups ? g0 + cb.chunk_groups : cb.groups;
    for (int64_t p = 0; p < panels; ++p) {
      Rows r = rows[p];
      const float* xpanel = xblock + p * MR * cb.D;
      for (int64_t g = g0; g < g1; ++g)
        tile<COSINE>(xpanel, cb.packed + g * gs, cb.D, static_cast<int32_t>(g * NR), floors + p * RV, r);
      rows[p] = r;
    }
  }
}

}  // namespace FASTVQ_ISA_NS
}  // namespace nearest
}  // namespace fastvq

FASTVQ_ISA_END
