// nearest_code on CPU: exact nearest-codebook search without an N x K distance matrix.
//
// The codebook is packed once per call into fp32 panels of NR codes (see quantize_kernel.h).
// Each thread takes a contiguous range of row blocks; a block of x is transposed into MR-row
// panels, then code chunks sized for L2 stream past it while every panel keeps its running
// (min, argmin) in registers. Extra memory: the packed codebook (about K x D fp32), one x block
// per thread and the outputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "quantize_kernel.h"

namespace {

namespace nq = fastvq::nearest;
using nq::MR;
using nq::NR;
using nq::RV;
using nq::vf;
using nq::W;

constexpr float kEps = 1e-12f;            // floor on norms for cosine, as in the reference
constexpr int64_t kChunkFloats = 1 << 16;  // 256 KiB of packed codes: stays in L2 while x panels pass
// Rows of x per block: each block makes one pass over the whole codebook, so blocks must be large
// enough that this pass (from L3, or DRAM for big codebooks) is cheap next to the FMAs, and small
// enough that a block (128 x D fp32 per thread) stays a minor share of the call's memory.
constexpr int64_t kBlockRows = 128;
static_assert(kBlockRows % MR == 0, "blocks hold whole panels");
// Least work worth handing to another thread (values packed, or multiply-adds searched): starting
// one costs tens of microseconds.
constexpr int64_t kMinShareValues = 1 << 16;
constexpr int64_t kMinShareMacs = 1 << 22;

// f(begin, end) over contiguous shares of [0, n), one per intra-op thread. at::parallel_for's
// OpenMP backend is inline in the headers, so without -fopenmp on this file (setup.py does not
// pass it) it silently runs on one thread; plain std::threads then stand in for it.
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
#ifdef _OPENMP
  at::parallel_for(0, n, grain, f);
#else
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  const int64_t share = (n + threads - 1) / threads;
  std::vector<std::exception_ptr> errors(threads);
  auto run = [&](int64_t t) {
    try {
      const int64_t b = t * share, e = std::min(n, b + share);
      if (b < e) f(b, e);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(run, t);
  run(0);
  for (auto& h : helpers) h.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
#endif
}

// dst[d * width + r] = scale * src[r][d] for r < live, 0 for live <= r < width. Each source row is
// read in runs of 256 values: long enough for the hardware prefetcher to follow every row, short
// enough that the written span (256 x width floats) stays in L1. Going down d with all rows at
// once instead stalls on cache misses: rows a multiple of 4 KiB apart outnumber L1's ways.
template <typename T>
void transpose_panel(const T* src, int64_t s0, int64_t s1, int64_t live, int64_t width, int64_t D, float scale,
                     float* dst) {
  constexpr int64_t kRun = 256;
  for (int64_t d0 = 0; d0 < D; d0 += kRun) {
    const int64_t d1 = std::min(D, d0 + kRun);
    for (int64_t r = 0; r < width; ++r)
      for (int64_t d = d0; d < d1; ++d)
        dst[d * width + r] = r < live ? scale * static_cast<float>(src[r * s0 + d * s1]) : 0.f;
  }
}

template <typename T>
void pack_codebook(const at::Tensor& cb, bool cosine, float* out) {
  const int64_t K = cb.size(0), D = cb.size(1), s0 = cb.stride(0), s1 = cb.stride(1);
  const T* src = cb.data_ptr<T>();
  const int64_t groups = (K + NR - 1) / NR, gs = nq::group_stride(D);
  const float pad = cosine ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  parallel_ranges(groups, std::max<int64_t>(1, kMinShareValues / (D * NR)), [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      float* dst = out + g * gs;
      const int64_t live = std::min<int64_t>(NR, K - g * NR);
      const T* codes = src + g * NR * s0;
      transpose_panel(codes, s0, s1, live, NR, D, cosine ? 1.f : -2.f, dst);
      // Norms from the packed panel: NR independent sums side by side instead of one serial
      // chain per code. The -2 scale is undone exactly by the 1/4 (a power of two).
      float sq[NR] = {};
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = 0; j < NR; ++j) sq[j] += dst[d * NR + j] * dst[d * NR + j];
      for (int64_t j = 0; j < NR; ++j) {
        const float n2 = cosine ? sq[j] : 0.25f * sq[j];
        dst[D * NR + j] = j >= live ? pad : cosine ? -1.f / std::max(std::sqrt(n2), kEps) : n2;
      }
    }
  });
}

// Transposes rows [r0, r0 + rows) of x into MR-row panels [D][MR]; rows past the end are zero.
template <typename T>
void pack_rows(const at::Tensor& x, int64_t r0, int64_t rows, float* out) {
  const int64_t D = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const T* src = x.data_ptr<T>() + r0 * s0;
  for (int64_t p = 0; p < rows; p += MR) {
    const int64_t live = std::min<int64_t>(MR, rows - p);
    float* panel = out + p * D;
    int64_t done = 0;
    if constexpr (std::is_same_v<T, float>) {
      if (s1 == 1 && live == MR)
        for (; done + W <= D; done += W)
          for (int r = 0; r < MR; r += W) nq::transpose_block(src + (p + r) * s0 + done, s0, panel + done * MR + r, MR);
    }
    transpose_panel(src + p * s0 + done * s1, s0, s1, live, MR, D - done, 1.f, panel + done * MR);
  }
}

// ||x||^2 for each W-row vector of a panel.
void squared_norms(const float* panel, int64_t D, vf* out) {
  for (int r = 0; r < RV; ++r) {
    vf s{};
    for (int64_t d = 0; d < D; ++d) {
      const vf v = *reinterpret_cast<const vf*>(panel + d * MR + r * W);
      s += v * v;
    }
    out[r] = s;
  }
}

template <typename T>
void search_rows(const at::Tensor& x, const nq::Codes& cb, bool cosine, int64_t block_rows, int64_t* out_idx,
                 float* out_dist) {
  const int64_t N = x.size(0), D = cb.D;
  const int64_t blocks = (N + block_rows - 1) / block_rows, panels = block_rows / MR;
  const int64_t grain = std::max<int64_t>(1, kMinShareMacs / (block_rows * cb.groups * NR * D));
  parallel_ranges(blocks, grain, [&](int64_t bb, int64_t be) {
    auto xbuf = at::empty({block_rows * D}, at::kFloat);
    float* xblock = xbuf.data_ptr<float>();
    std::vector<vf> sq(panels * RV), floors(panels * RV);
    std::vector<nq::Rows> res(panels);
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t r0 = blk * block_rows, rows = std::min(block_rows, N - r0);
      const int64_t used = (rows + MR - 1) / MR;
      pack_rows<T>(x, r0, rows, xblock);
      for (int64_t p = 0; p < used; ++p) {
        squared_norms(xblock + p * MR * D, D, &sq[p * RV]);
        for (int r = 0; r < RV; ++r)
          floors[p * RV + r] = cosine ? vf{} - std::numeric_limits<float>::infinity() : -sq[p * RV + r];
      }
      if (cosine)
        nq::search_block<true>(cb, xblock, used, floors.data(), res.data());
      else
        nq::search_block<false>(cb, xblock, used, floors.data(), res.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = r / MR, v = (r % MR) / W, lane = r % W;
        const float b = res[p].best[v][lane], q = sq[p * RV + v][lane];
        const float d = cosine ? 1.f + b / std::max(std::sqrt(q), kEps) : q + b;
        out_dist[r0 + r] = std::max(d, 0.f);
        out_idx[r0 + r] = res[p].idx[v][lane];
      }
    }
  });
}

// Fewer rows per block when N is small, so that both threads get work.
int64_t block_rows_for(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = ((N + threads - 1) / threads + MR - 1) / MR * MR;
  return std::min(kBlockRows, per_thread);
}

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& cb, bool cosine) {
  TORCH_CHECK(x.device().is_cpu() && cb.device().is_cpu(), "nearest_code (cpp): x and codebook must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && cb.dim() == 2, "nearest_code (cpp): x (N, D) and codebook (K, D) must be 2-D, got ",
              x.sizes(), " and ", cb.sizes());
  TORCH_CHECK(x.size(1) == cb.size(1) && x.size(1) > 0 && cb.size(0) > 0,
              "nearest_code (cpp): need D >= 1, K >= 1 and matching D, got x ", x.sizes(), " and codebook ", cb.sizes());
  TORCH_CHECK(cb.size(0) <= std::numeric_limits<int32_t>::max(), "nearest_code (cpp): codebook has too many entries");
  const int64_t N = x.size(0), K = cb.size(0), D = x.size(1);
  auto idx = at::empty({N}, x.options().dtype(at::kLong));
  auto dist = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {idx, dist};

  const int64_t groups = (K + NR - 1) / NR;
  auto packed = at::empty({groups * nq::group_stride(D)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cb.scalar_type(), "nearest_code_pack",
                                  [&] { pack_codebook<scalar_t>(cb, cosine, packed.data_ptr<float>()); });
  const nq::Codes codes{packed.data_ptr<float>(), groups, D, std::max<int64_t>(1, kChunkFloats / (D * NR))};
  const int64_t block_rows = block_rows_for(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_search", [&] {
    search_rows<scalar_t>(x, codes, cosine, block_rows, idx.data_ptr<int64_t>(), dist.data_ptr<float>());
  });
  return {idx, dist};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("nearest_code(Tensor x, Tensor codebook, bool cosine) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("nearest_code", &nearest_code);
}
