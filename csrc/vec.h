// Vector helpers shared by fastvq's CPU kernels: one SIMD width, loads and stores, broadcasts,
// lane shuffles and sums, and one vector exp.
//
// The vectors are GCC/clang vector extensions (vector_size): arithmetic, comparisons (lanes of -1
// or 0), `?:` as a lane-wise blend and lane subscripts all work on them, and the compiler maps them
// to the target's registers. kLanes floats fill the widest register of the variant being compiled
// (csrc/isa.h: zmm for AVX-512, ymm for AVX2, 128 bits for the baseline). The kernels' tile shapes
// are tuned per width where the register count matters (see csrc/quantize_kernel.h,
// csrc/window_attention.h). Everything here lives in an inline namespace per variant.
//
// GCC and clang differ in one builtin: two-vector shuffles with a constant mask are
// __builtin_shuffle(a, b, mask) in GCC and __builtin_shufflevector(a, b, i...) in clang (GCC has
// the latter only from version 12). shuffle<i...>() below is the one place that knows.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"

FASTVQ_ISA_BEGIN

namespace fastvq {
namespace vec {
inline namespace FASTVQ_ISA_NS {

#if FASTVQ_HAS_AVX512
constexpr int kLanes = 16;
#elif FASTVQ_HAS_AVX2
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));  // kLanes 16-bit values (fp16 / bf16 bits)

// A std::vector of vectors, or of structs holding them, aligned for them. Use it instead of
// std::vector<vf>: GCC works out alignof(vf) inside std::allocator as the baseline target's (std's
// templates are outside the variant's target region, csrc/isa.h), so that memory is only 16-byte
// aligned and the variant's aligned vector moves on it fault.
template <typename T>
struct VectorAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{kLanes * sizeof(float)};
  VectorAllocator() = default;
  template <typename U>
  VectorAllocator(const VectorAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const VectorAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const VectorAllocator<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, VectorAllocator<T>>;

// ---------------------------------------------------------------------------- loads and stores
// Unaligned, through memcpy (one vector move; no alignment or aliasing assumptions).

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vi load(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vu load(const uint32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// kLanes bf16 values widened to fp32: a bf16 is the top half of an fp32.
inline vf load(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// kLanes fp16 values widened to fp32 (one instruction with F16C).
inline vf load(const c10::Half* p) {
#if FASTVQ_HAS_AVX512
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif FASTVQ_HAS_AVX2
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// ---------------------------------------------------------------------------- shuffles

// Lanes i... of the concatenation a:b (i < kLanes picks a[i], else b[i - kLanes]).
template <int... i>
inline vf shuffle(vf a, vf b) {
  static_assert(sizeof...(i) == kLanes, "one index per lane");
#if defined(__clang__)
  return __builtin_shufflevector(a, b, i...);
#else
  return __builtin_shuffle(a, b, vi{i...});
#endif
}

namespace detail {
template <int... l>
inline vf broadcast_lane0(vf a, std::integer_sequence<int, l...>) {
  return shuffle<(l * 0)...>(a, a);
}
// blocks_low<h>: lanes l without bit h take a[l], lanes with it b[l - h]; blocks_high<h>: lanes
// without bit h take a[l + h], lanes with it b[l].
template <int h, int... l>
inline vf blocks_low(vf a, vf b, std::integer_sequence<int, l...>) {
  return shuffle<((l & h) ? kLanes + l - h : l)...>(a, b);
}
template <int h, int... l>
inline vf blocks_high(vf a, vf b, std::integer_sequence<int, l...>) {
  return shuffle<((l & h) ? kLanes + l : l + h)...>(a, b);
}
}  // namespace detail

// x in every lane: a broadcast (vf{} + x would cost an add, since 0 + -0 is +0).
inline vf splat(float x) { return detail::broadcast_lane0(vf{x}, std::make_integer_sequence<int, kLanes>()); }

// Seen as runs of h lanes, blocks_low interleaves the even runs of a and b and blocks_high the odd
// ones: a W x W transpose is log2(W) rounds of them (csrc/quantize_kernel.h), and their sum folds
// two vectors' lane sums into one (fold below).
template <int h>
inline vf blocks_low(vf a, vf b) {
  return detail::blocks_low<h>(a, b, std::make_integer_sequence<int, kLanes>());
}
template <int h>
inline vf blocks_high(vf a, vf b) {
  return detail::blocks_high<h>(a, b, std::make_integer_sequence<int, kLanes>());
}

// ---------------------------------------------------------------------------- lane sums and maxima

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// Many lane sums at once. fold<h>(a, b): lanes l without bit h get a[l] + a[l + h], lanes with it
// b[l - h] + b[l]. Folding `count` vectors pairwise at h = kLanes/2, kLanes/4, ..., 1 leaves one
// vector in which vector i's sum sits in lane lane_of(i): log2(kLanes) shuffle-and-add rounds for
// up to kLanes sums instead of a horizontal sum each. Fewer than kLanes vectors: once one is left,
// it finishes its own lanes (each sum then lands in several lanes).
template <int h>
inline vf fold(vf a, vf b) {
  return blocks_low<h>(a, b) + blocks_high<h>(a, b);
}

template <int count, int h = kLanes / 2>
inline vf fold_lanes(vf* v) {
  static_assert(count >= 1 && count <= kLanes && (count & (count - 1)) == 0, "a power of two up to kLanes");
  if constexpr (count > 1) {
#pragma GCC unroll 16
    for (int j = 0; j < count / 2; ++j) v[j] = fold<h>(v[2 * j], v[2 * j + 1]);
  } else {
    v[0] = fold<h>(v[0], v[0]);
  }
  if constexpr (h > 1) {
    return fold_lanes<(count > 1 ? count / 2 : 1), h / 2>(v);
  } else {
    return v[0];
  }
}

// The lane of fold_lanes' result that holds vector i's sum: bit b of i selects lane bit kLanes/2 >> b.
constexpr int lane_of(int i) {
  int lane = 0;
  for (int b = 0; (kLanes / 2 >> b) > 0; ++b)
    if ((i >> b) & 1) lane |= kLanes / 2 >> b;
  return lane;
}

constexpr int pow2_at_least(int g) {
  int p = 1;
  while (p < g) p *= 2;
  return p;
}

// s[i] = the sum of acc[i]'s lanes for i < G, folded in groups of up to kLanes vectors.
template <int G>
inline void lane_sums(const vf* acc, float* s) {
  constexpr int group = std::min(pow2_at_least(G), kLanes);
#pragma GCC unroll 16
  for (int g0 = 0; g0 < G; g0 += group) {
    vf t[group];
#pragma GCC unroll 16
    for (int i = 0; i < group; ++i) t[i] = g0 + i < G ? acc[g0 + i] : vf{};
    const vf r = fold_lanes<group>(t);
#pragma GCC unroll 16
    for (int i = 0; i < group; ++i)
      if (g0 + i < G) s[g0 + i] = r[lane_of(i)];
  }
}

// ---------------------------------------------------------------------------- exp
// glibc's expf does not vectorise; these do. One polynomial serves both bases: x = n + f (exp2) or
// x = n ln2 + r, f = r log2 e (exp), |f| <= 1/2, and 2^x = 2^f 2^n with 2^n built in the exponent
// bits. Accuracy against a double reference (a dense sweep of inputs): within 0.8 ulp for vexp2 and
// 1.1 ulp for vexp where the target has FMA, 1.1 and 1.4 ulp without. Results that would be below
// 2^-126 (x < -126 for vexp2, x < ln 2^-126 for vexp) are exactly +0, so masked scores (-inf) get
// weight 0 and nothing denormal is produced. NaN stays NaN. Inputs are clamped above at 127 / 88
// (no overflow; the callers pass x <= ~0).

namespace detail {
// x + kRound holds round(x) (to nearest) in the low bits of its mantissa, for |x| < 2^22: bits
// kRoundBits + round(x). (x + kRound) - kRound is round(x) as a float, and the bits give 2^round(x)
// with integer arithmetic only (no float-to-int conversion, which is undefined for NaN).
constexpr float kRound = 12582912.f;  // 1.5 * 2^23
constexpr uint32_t kRoundBits = 0x4B400000u;

// 2^f 2^n for |f| <= 1/2, given t = n + kRound for an integral n in [-127, 127]; n = -127 gives +0.
// The polynomial is a minimax fit of 2^f on [-1/2, 1/2] with the constant term fixed at 1, its
// coefficients rounded to float one at a time (each later one refitted): relative error 3e-9
// before the float rounding of the evaluation.
inline vf exp2_reduced(vf f, vf t) {
  vf p = splat(1.532646274e-4f);
  p = p * f + 1.339080627e-3f;
  p = p * f + 9.618505836e-3f;
  p = p * f + 5.550359935e-2f;
  p = p * f + 2.402264774e-1f;
  p = p * f + 6.931471825e-1f;
  p = p * f + 1.f;
  const vu pow2n = ((vu)t - (kRoundBits - 127u)) << 23;  // (n + 127) << 23
  return p * (vf)pow2n;
}
}  // namespace detail

// 2^x
inline vf vexp2(vf x) {
  x = x < splat(-126.f) ? splat(-127.f) : x;
  x = x > splat(127.f) ? splat(127.f) : x;
  const vf t = x + detail::kRound;
  return detail::exp2_reduced(x - (t - detail::kRound), t);  // x - n is exact
}

// e^x. n ln2 is subtracted in two parts (Cody-Waite: 0.693359375 has few bits, so n times it is
// exact), which keeps r accurate however large n is.
inline vf vexp(vf x) {
  x = x < splat(-87.33654f) ? splat(-88.f) : x;  // ln 2^-126, rounded up
  x = x > splat(88.f) ? splat(88.f) : x;
  const vf t = x * 1.44269504088896341f + detail::kRound;
  const vf n = t - detail::kRound;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  return detail::exp2_reduced(r * 1.44269504088896341f, t);
}

}  // namespace FASTVQ_ISA_NS
}  // namespace vec
}  // namespace fastvq

FASTVQ_ISA_END
