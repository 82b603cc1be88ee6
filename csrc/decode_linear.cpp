// decode_linear on CPU: y = x @ W.T (+ b) (-> GELU) (+ residual) for a few rows of x, reading W once.
//
// Decoding a transformer one token at a time multiplies a handful of rows (the batch) by every
// weight matrix of the model: a matrix-vector product bound by how fast W streams from memory,
// where a GEMM library tuned for square products reaches a fraction of the bandwidth. Here threads
// split W's rows (the outputs), so each weight is read by exactly one thread, once per call; x
// (M x K, M small) stays in L1/L2 and is re-read for every block of weights. W is used in
// nn.Linear's (N, K) layout as it is: a block of weight rows is one contiguous stretch of memory,
// a sequential stream the hardware prefetcher follows.
//
// The tile: NR weight rows against MB rows of x, one vector accumulator per (x row, weight row)
// pair, accumulated over K in SIMD-width chunks; at most 16 accumulators plus the loaded vectors,
// so they stay in the 32 AVX-512 registers. After the K loop the accumulators are summed across
// their lanes together, by a transpose-like tree of shuffles (W sums in log2(W) adds instead of W
// separate horizontal sums); the K % W tail is added in scalar. Weights may be fp32, fp16 or bf16
// (converted to fp32 as they are loaded); x, the accumulation and the epilogue are fp32. Without
// AVX-512 the same code runs on 8- or 4-lane vectors (16 registers: correct, with some spilling).
//
// What bounds it: at M = 1 the bandwidth of memory (one FMA per weight streamed); at M = 16, 16
// FMAs per weight, the FMA units. benchmarks/bench_decode_linear.py measures both against F.linear.
// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "vec.h"

FASTVQ_ISA_BEGIN

namespace {

using namespace fastvq::vec;

constexpr int W = kLanes;

// Pins a loaded vector to a register. Left alone, GCC folds the loads into the FMAs as memory
// operands and so loads every x and w vector once per FMA instead of once per tile step, which
// makes the tile bound by loads (two per FMA) rather than FMAs.
inline vf in_register(vf v) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#endif
  return v;
}

// ---------------------------------------------------------------------------- tiles

// Software prefetch of the weights after a tile's own: `lines` cache lines from `next`, issued
// evenly over the tile's K steps. The tiles that share a set of weight rows (one per four rows of
// x) each take a share of the rows that follow, so the stream from memory keeps flowing while x
// passes over weights already in cache. Prefetched into L2 (T1): the lines are used a block later.
struct Ahead {
  const char* next;
  int64_t lines;
};

// y[r * ldy + j] = x row r . w row j for r < MB, j < NR (x and w rows K apart).
template <int MB, int NR, typename T>
inline void tile(const float* __restrict x, const T* __restrict w, int64_t K, float* __restrict y, int64_t ldy,
                 Ahead ahead) {
  vf acc[MB * NR];
#pragma GCC unroll 32
  for (int i = 0; i < MB * NR; ++i) acc[i] = vf{};
  const int64_t steps = K / W;
  const int64_t per_step = steps > 0 ? (ahead.lines + steps - 1) / steps : 0;
  const char* pf = ahead.next;
  const char* const pf_end = pf + ahead.lines * 64;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf xv[MB];
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) xv[r] = in_register(load(x + r * K + k));
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const vf wv = in_register(load(w + j * K + k));
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r) acc[r * NR + j] += xv[r] * wv;
    }
    for (int64_t i = 0; i < per_step && pf < pf_end; ++i, pf += 64) __builtin_prefetch(pf, 0, 2);
  }
  float s[MB * NR];
  lane_sums<MB * NR>(acc, s);  // one shuffle tree for all the sums (vec.h)
  for (; k < K; ++k)
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < NR; ++j) s[r * NR + j] += x[r * K + k] * static_cast<float>(w[j * K + k]);
#pragma GCC unroll 32
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) y[r * ldy + j] = s[r * NR + j];
}

// NR weight rows against all M rows of x, four rows of x at a time; the tiles share the prefetch
// of the following NR rows (up to `end`, the end of this thread's weights).
template <int NR, typename T>
inline void weight_rows(const float* x, int64_t M, const T* w, int64_t K, float* y, int64_t ldy, const T* end) {
  const T* next = w + NR * K;
  const int64_t next_bytes = std::max<int64_t>(0, std::min<int64_t>(NR * K, end - next)) * sizeof(T);
  const int64_t tiles = (M + 3) / 4, lines = (next_bytes + 63) / 64, share = (lines + tiles - 1) / tiles;
  for (int64_t m = 0, t = 0; m < M; m += 4, ++t) {
    const Ahead ahead{reinterpret_cast<const char*>(next) + t * share * 64,
                      std::max<int64_t>(0, std::min(share, lines - t * share))};
    const float* xm = x + m * K;
    float* ym = y + m * ldy;
    switch (std::min<int64_t>(4, M - m)) {
      case 4: tile<4, NR>(xm, w, K, ym, ldy, ahead); break;
      case 3: tile<3, NR>(xm, w, K, ym, ldy, ahead); break;
      case 2: tile<2, NR>(xm, w, K, ym, ldy, ahead); break;
      default: tile<1, NR>(xm, w, K, ym, ldy, ahead); break;
    }
  }
}

// Weight rows are handed out in blocks of kBlock. One or two rows of x take all 8 rows of a block
// at once (8 or 16 accumulators: more loads in flight for the memory-bound case); more rows of x
// take it as two halves of 4 (at most 16 accumulators).
constexpr int64_t kBlock = 8;

template <typename T>
void weight_block(const float* x, int64_t M, const T* w, int64_t K, int64_t rows, float* y, int64_t ldy,
                  const T* end) {
  if (rows == kBlock && M <= 2) {
    weight_rows<8>(x, M, w, K, y, ldy, end);
    return;
  }
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) weight_rows<4>(x, M, w + j * K, K, y + j, ldy, end);
  for (; j < rows; ++j) weight_rows<1>(x, M, w + j * K, K, y + j, ldy, end);
}

// ---------------------------------------------------------------------------- epilogue

// nn.GELU(): v * Phi(v) = 0.5 v erfc(-v / sqrt 2). erfc(z), z >= 0, from the Chebyshev fit of
// Numerical Recipes (erfcc: relative error below 1.2e-7 for every z), so the small negative tail
// keeps its relative accuracy; for v >= 0, erfc(-z) = 2 - erfc(z). W lanes at a time (GCC does not
// vectorise the scalar form), so GELU costs about as much as the bias add.
inline vf gelu(vf v) {
  const vf z = (v < 0.0f ? -v : v) * 0.70710678118654752f;
  const vf t = 1.0f / (1.0f + 0.5f * z);
  vf p = vf{} + 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const vf tail = t * vexp(p - z * z);  // erfc(|v| / sqrt 2)
  return 0.5f * v * (v < 0.0f ? tail : 2.0f - tail);
}

inline void gelu_inplace(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf g = gelu(load(y + i));
    std::memcpy(y + i, &g, sizeof g);
  }
  if (i < n) {  // the tail through a zero-padded vector
    float buf[W] = {};
    std::memcpy(buf, y + i, (n - i) * sizeof(float));
    const vf g = gelu(load(buf));
    std::memcpy(y + i, &g, (n - i) * sizeof(float));
  }
}

// y[m, n] = act(y[m, n] + bias[n]) + residual[m, n] over the columns [n0, n1) of every row.
void epilogue(float* __restrict y, int64_t M, int64_t N, int64_t n0, int64_t n1, const float* __restrict bias,
              const float* __restrict residual, bool use_gelu) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = y + m * N;
    if (bias)
      for (int64_t n = n0; n < n1; ++n) row[n] += bias[n];
    if (use_gelu) gelu_inplace(row + n0, n1 - n0);
    if (residual) {
      const float* res = residual + m * N;
      for (int64_t n = n0; n < n1; ++n) row[n] += res[n];
    }
  }
}

template <typename T>
void run(const float* x, int64_t M, const T* w, int64_t N, int64_t K, const float* bias, const float* residual,
         bool use_gelu, float* y) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  // A task streams at least ~128 KiB of weights: waking the other thread for less costs more.
  const int64_t block_bytes = kBlock * std::max<int64_t>(K, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / block_bytes);
  fastvq::parallel_ranges(blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kBlock, n1 = std::min(N, b1 * kBlock);
    for (int64_t n = n0; n < n1; n += kBlock)
      weight_block(x, M, w + n * K, K, std::min(kBlock, n1 - n), y + n, N, w + n1 * K);
    epilogue(y, M, N, n0, n1, bias, residual, use_gelu);
  });
}

// x (..., K) -> (..., N); residual (..., N). Shapes and dtypes are checked with friendlier
// messages in fastvq/ops/decode_linear.py; these checks keep a direct call from reading out of bounds.
at::Tensor decode_linear(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& residual, bool use_gelu) {
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 2, "decode_linear: x must be (..., K) and weight (N, K)");
  const int64_t K = x_in.size(-1), N = weight_in.size(0);
  const int64_t M = c10::multiply_integers(x_in.sizes().begin(), x_in.sizes().end() - 1);
  TORCH_CHECK(weight_in.size(1) == K, "decode_linear: weight must be (N, K=", K, ")");
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  const auto dtype = weight_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "decode_linear: weight must be float32, float16 or bfloat16");
  TORCH_CHECK(x_in.scalar_type() == dtype, "decode_linear: x and weight must have the same dtype");
  const auto x = x_in.reshape({M, K}).to(at::kFloat).contiguous();
  const auto weight = weight_in.contiguous();
  at::Tensor b, res;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "decode_linear: bias must be (N,)");
    b = bias->to(at::kFloat).contiguous();
  }
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_sizes), "decode_linear: residual must be (..., N) like the output");
    res = residual->reshape({M, N}).to(at::kFloat).contiguous();
  }
  auto y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return y.to(dtype);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* rp = res.defined() ? res.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (dtype == at::kFloat) {
    run(xp, M, weight.data_ptr<float>(), N, K, bp, rp, use_gelu, yp);
  } else if (dtype == at::kHalf) {
    run(xp, M, weight.data_ptr<at::Half>(), N, K, bp, rp, use_gelu, yp);
  } else {
    run(xp, M, weight.data_ptr<at::BFloat16>(), N, K, bp, rp, use_gelu, yp);
  }
  return dtype == at::kFloat ? y : y.to(dtype);
}

}  // namespace

FASTVQ_ISA_END

FASTVQ_KERNEL(decode_linear)

#if FASTVQ_REGISTERS_OPS
TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("decode_linear", FASTVQ_DISPATCH(decode_linear));
}
#endif
