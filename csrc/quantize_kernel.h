// Register-blocked nearest-code search: the micro-kernel behind csrc/quantize.cpp.
//
// Layout choice: rows of x sit in SIMD lanes and codes are broadcast. Each lane then owns one row,
// so the running (min, argmin) over codes is a plain lane-wise compare-and-blend that stays in
// registers for a whole chunk of codes, needs no horizontal reduction, and keeps the lowest index
// on ties because codes are visited in increasing order and only a strict < replaces the best.
#pragma once

#include <cstdint>

namespace fastvq {
namespace nearest {

// W rows per tile (one vector) times NR codes per tile: NR accumulators plus x, best, idx, the
// clamp floor and two temporaries must fit the register file (32 zmm with AVX-512, 16 otherwise),
// or the accumulators spill and the kernel runs at L1 speed instead of FMA speed.
#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int NR = 24;
#elif defined(__AVX__)
constexpr int W = 8;
constexpr int NR = 10;
#else
constexpr int W = 4;
constexpr int NR = 10;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

// Packed codebook: group g of NR codes is [D][NR] floats, column j holding code j of the group
// scaled by a = -2 (L2) or a = -1/max(|c|, eps) (cosine), followed by one offset per code:
// ||c||^2 for L2, 0 for cosine. The score a x.c + offset then costs one add per code after the
// dot products (GCC does not contract a separate multiply-add into an FMA under -std=c++17, and
// scaling by -2 is exact). Padding codes are zero with offset +inf, so they never win.
inline int64_t group_stride(int64_t D) { return (D + 1) * NR; }

// One W x NR tile over the full depth D, then the fold of its NR scores into (best, idx).
// L2 score: ||c||^2 - 2 x.c, clamped below at floor = -||x||^2 (the reference clamps the
// distance at 0 before its argmin, so codes that all reach 0 tie and the lowest index must win).
// Cosine score: -x.c / max(|c|, eps) with floor = -inf; dividing by |x| would not change the order.
inline void tile(const float* __restrict xpanel, const float* __restrict group, int64_t D, int32_t j0, vf floor,
                 vf& best, vi& idx) {
  vf acc[NR];
#pragma GCC unroll 32
  for (int j = 0; j < NR; ++j) acc[j] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    const vf xv = *reinterpret_cast<const vf*>(xpanel + d * W);
    const float* c = group + d * NR;
#pragma GCC unroll 32
    for (int j = 0; j < NR; ++j) acc[j] += xv * c[j];
  }
  const float* offset = group + D * NR;
#pragma GCC unroll 32
  for (int j = 0; j < NR; ++j) {
    vf s = acc[j] + offset[j];
    s = s < floor ? floor : s;
    const vi better = s < best;
    best = better ? s : best;
    idx = better ? vi{} + (j0 + j) : idx;
  }
}

}  // namespace nearest
}  // namespace fastvq
