// nearest_code on CPU: exact nearest-codebook search without an N x K distance matrix.
//
// The codebook is packed once per call into fp32 panels of NR codes (see quantize_kernel.h).
// Each thread takes a contiguous range of row blocks; a block of x is transposed into MR-row
// panels, then code chunks sized for L2 stream past it while every panel keeps its running
// (min, argmin) in registers. Extra memory: the packed codebook (about K x D fp32), one x block
// per thread and the outputs.
// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "quantize_kernel.h"
#include "parallel.h"

FASTVQ_ISA_BEGIN

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

using fastvq::parallel_ranges;

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

// The search's work in parallel_ranges' grains (about 1 MFLOP, parallel.h). A block is many grains
// (kMinShareMacs and up), so the block count alone would send an 8192 x 1024 x 64 search (about
// 5 ms) to the pool, where a helper must win its core from torch's spinning OpenMP threads: it ran
// 2x slower there than on OpenMP's shares (in-process A/B).
inline int64_t search_grains(int64_t rows, int64_t codes, int64_t D) { return rows * codes * D / (1 << 19); }

// epilogue(block, first row, rows) runs on each block's thread right after its indices are written,
// while the block's rows are still in cache (vq_forward gathers the codes there).
template <typename T, typename Epilogue>
void search_rows(const at::Tensor& x, const nq::Codes& cb, bool cosine, int64_t block_rows, int64_t* out_idx,
                 float* out_dist, const Epilogue& epilogue) {
  const int64_t N = x.size(0), D = cb.D;
  const int64_t blocks = (N + block_rows - 1) / block_rows, panels = block_rows / MR;
  const int64_t grain = std::max<int64_t>(1, kMinShareMacs / (block_rows * cb.groups * NR * D));
  parallel_ranges(blocks, grain, [&](int64_t bb, int64_t be) {
    auto xbuf = at::empty({block_rows * D}, at::kFloat);
    float* xblock = xbuf.data_ptr<float>();
    fastvq::vec::aligned_vector<vf> sq(panels * RV), floors(panels * RV);
    fastvq::vec::aligned_vector<nq::Rows> res(panels);
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
      epilogue(blk, r0, rows);
    }
  }, search_grains(N, cb.groups * NR, D));
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
    search_rows<scalar_t>(x, codes, cosine, block_rows, idx.data_ptr<int64_t>(), dist.data_ptr<float>(),
                          [](int64_t, int64_t, int64_t) {});
  });
  return {idx, dist};
}

// ----------------------------------------------------------------------------- fused epilogues
//
// After the search, the rest of the VQ op is O(N D): gather the chosen codes, the straight-through
// output, the squared error for the loss, and in the backward both gradients. Each is one pass here
// instead of the half-dozen torch passes (index_select, sub, add, pow, mean, ...) it otherwise takes.

// Arithmetic type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kLanes = 16;               // independent partial sums, so reductions vectorise
constexpr int64_t kChunkValues = 1 << 13;    // values per loss partial: fixed, so the sum is deterministic
constexpr int64_t kMinShareRows = 1 << 14;   // values worth handing to a thread in the O(N D) passes

void check_epilogue_inputs(const char* op, const at::Tensor& z, const at::Tensor& cb, const at::Tensor& idx) {
  TORCH_CHECK(z.device().is_cpu() && cb.device().is_cpu() && idx.device().is_cpu(), op,
              " (cpp): z, codebook and idx must be CPU tensors");
  TORCH_CHECK(z.dim() == 2 && cb.dim() == 2 && z.size(1) == cb.size(1) && cb.size(0) > 0, op,
              " (cpp): z (N, D) and codebook (K, D) with K >= 1, got ", z.sizes(), " and ", cb.sizes());
  TORCH_CHECK(z.scalar_type() == cb.scalar_type(), op, " (cpp): z and codebook must share a dtype, got ",
              z.scalar_type(), " and ", cb.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == z.size(0) && idx.scalar_type() == at::kLong, op,
              " (cpp): idx must be int64 of shape (", z.size(0), "), got ", idx.scalar_type(), " ", idx.sizes());
}

inline int64_t checked_code(int64_t k, int64_t K) {
  TORCH_CHECK(k >= 0 && k < K, "vq (cpp): index ", k, " out of range for a codebook of ", K, " entries");
  return k;
}

// out = z + (c - z), with c - z rounded to T first: what torch computes for `z + (z_q - z)` in
// dtype T (each op in fp32 and rounded once to T; exact fp32 for fp32). Returns the sum of the
// rounded (c - z)^2 over the row, accumulated in kLanes partial sums of acc_t.
template <typename T>
void gather_row(const T* z, const T* c, int64_t D, T* out, acc_t<T>* lanes) {
  using A = acc_t<T>;
  int64_t d0 = 0;
  for (; d0 + kLanes <= D; d0 += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const A zv = static_cast<A>(z[d0 + j]);
      const A diff = static_cast<A>(static_cast<T>(static_cast<A>(c[d0 + j]) - zv));
      out[d0 + j] = static_cast<T>(zv + diff);
      lanes[j] += diff * diff;
    }
  for (int64_t j = 0; d0 + j < D; ++j) {
    const A zv = static_cast<A>(z[d0 + j]);
    const A diff = static_cast<A>(static_cast<T>(static_cast<A>(c[d0 + j]) - zv));
    out[d0 + j] = static_cast<T>(zv + diff);
    lanes[j] += diff * diff;
  }
}

template <typename T>
double gather_rows(const T* z, const T* cb, const int64_t* idx, int64_t N, int64_t K, int64_t D, T* out) {
  using A = acc_t<T>;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkValues / D);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
  std::vector<double> partial(chunks, 0.0);
  parallel_ranges(chunks, std::max<int64_t>(1, kMinShareRows / (chunk_rows * D)), [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      A lanes[kLanes] = {};
      const int64_t r1 = std::min(N, (ch + 1) * chunk_rows);
      for (int64_t r = ch * chunk_rows; r < r1; ++r)
        gather_row<T>(z + r * D, cb + checked_code(idx[r], K) * D, D, out + r * D, lanes);
      double s = 0;
      for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
      partial[ch] = s;
    }
  });
  double total = 0;  // combined in chunk order: the same bits whatever the thread count
  for (double p : partial) total += p;
  return total;
}

// (out, sum of squared error): out = z + (codebook[idx] - z) in z's dtype, and the fp32 sum over
// all elements of (codebook[idx] - z)^2 (accumulated in fp64 across chunks, deterministically).
std::tuple<at::Tensor, at::Tensor> vq_gather(const at::Tensor& z_in, const at::Tensor& cb_in, const at::Tensor& idx_in) {
  check_epilogue_inputs("vq_gather", z_in, cb_in, idx_in);
  const auto z = z_in.contiguous(), cb = cb_in.contiguous(), idx = idx_in.contiguous();
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  auto out = at::empty_like(z);
  double total = 0;
  if (N > 0 && D > 0)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vq_gather", [&] {
      total = gather_rows<scalar_t>(z.data_ptr<scalar_t>(), cb.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), N, K, D,
                                    out.data_ptr<scalar_t>());
    });
  return {out, at::scalar_tensor(total, z.options().dtype(at::kFloat))};
}

// grad_z = grad_out + coef_z (c_idx - z), in z's dtype (computed in acc_t, rounded once).
template <typename T>
void grad_z_rows(const T* go, const T* z, const T* cb, const int64_t* idx, int64_t N, int64_t K, int64_t D,
                 double coef, T* gz) {
  using A = acc_t<T>;
  const A cz = static_cast<A>(coef);
  parallel_ranges(N, std::max<int64_t>(1, kMinShareRows / D), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* c = cb + checked_code(idx[r], K) * D;
      const T* zr = z + r * D;
      T* o = gz + r * D;
      if (go) {
        const T* g = go + r * D;
        for (int64_t d = 0; d < D; ++d)
          o[d] = static_cast<T>(static_cast<A>(g[d]) + cz * (static_cast<A>(c[d]) - static_cast<A>(zr[d])));
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(cz * (static_cast<A>(c[d]) - static_cast<A>(zr[d])));
      }
    }
  });
}

// Both gradients in one pass, code by code: rows are counting-sorted by code (O(N), stable), and
// each code walks its own rows in row order, writing their grad_z (gz may be null) and summing
// their diffs for grad_codebook[k] = coef_code Σ_{i: idx_i = k} (c_k - z_i). The code row stays in
// cache, z and grad_out are read once, and there are no atomics or shared accumulators, so the
// result is bitwise reproducible. Codes are split among threads in contiguous ranges of about equal
// work (rows + 1 per code), all in one parallel region.
template <typename T>
void grad_by_code(const T* go, const T* z, const T* cb, const int64_t* idx, int64_t N, int64_t K, int64_t D,
                  double coef_z, double coef_code, T* gz, T* gc) {
  using A = acc_t<T>;
  std::vector<int64_t> start(K + 1, 0), order(N);
  for (int64_t r = 0; r < N; ++r) ++start[checked_code(idx[r], K) + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < N; ++r) order[next[idx[r]]++] = r;
  }
  const int64_t work = N + K;  // in units of D values
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work * D / kMinShareRows));
  std::vector<int64_t> bound(shares + 1, K);
  bound[0] = 0;
  for (int64_t t = 1, k = 0; t < shares; ++t) {
    while (k < K && start[k] + k < t * work / shares) ++k;
    bound[t] = k;
  }
  const A cz = static_cast<A>(coef_z), cc = static_cast<A>(coef_code);
  parallel_ranges(shares, 1, [&](int64_t tb, int64_t te) {
    std::vector<A> acc(D);
    for (int64_t k = bound[tb]; k < bound[te]; ++k) {
      T* o = gc + k * D;
      if (start[k] == start[k + 1]) {
        std::fill(o, o + D, static_cast<T>(0));
        continue;
      }
      const T* c = cb + k * D;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t p = start[k]; p < start[k + 1]; ++p) {
        const int64_t r = order[p];
        const T* zr = z + r * D;
        if (gz && go) {
          const T* g = go + r * D;
          T* out = gz + r * D;
          for (int64_t d = 0; d < D; ++d) {
            const A diff = static_cast<A>(c[d]) - static_cast<A>(zr[d]);
            out[d] = static_cast<T>(static_cast<A>(g[d]) + cz * diff);
            acc[d] += diff;
          }
        } else if (gz) {
          T* out = gz + r * D;
          for (int64_t d = 0; d < D; ++d) {
            const A diff = static_cast<A>(c[d]) - static_cast<A>(zr[d]);
            out[d] = static_cast<T>(cz * diff);
            acc[d] += diff;
          }
        } else {
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<A>(c[d]) - static_cast<A>(zr[d]);
        }
      }
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(cc * acc[d]);
    }
  }, work * D / kMinShareRows);
}

// (grad_z, grad_codebook) of the VQ op, with diff = codebook[idx] - z:
//   grad_z = grad_out + coef_z diff                   (grad_out None: zeros)
//   grad_codebook[k] = coef_code Σ_{idx_i = k} diff_i  (deterministic segmented sum, same pass)
// A gradient that is not asked for comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor> vq_backward(const std::optional<at::Tensor>& grad_out, const at::Tensor& z_in,
                                               const at::Tensor& cb_in, const at::Tensor& idx_in, double coef_z,
                                               double coef_code, bool need_grad_z, bool need_grad_codebook) {
  check_epilogue_inputs("vq_backward", z_in, cb_in, idx_in);
  const auto z = z_in.contiguous(), cb = cb_in.contiguous(), idx = idx_in.contiguous();
  at::Tensor go;
  if (grad_out.has_value() && grad_out->defined()) {
    TORCH_CHECK(grad_out->sizes() == z.sizes(), "vq_backward (cpp): grad_out must have z's shape ", z.sizes(),
                ", got ", grad_out->sizes());
    go = grad_out->to(z.scalar_type()).contiguous();
  }
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  at::Tensor gz = need_grad_z ? at::empty_like(z) : at::empty({0}, z.options());
  at::Tensor gc = need_grad_codebook ? at::empty_like(cb) : at::empty({0}, cb.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vq_backward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* cp = cb.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* gop = go.defined() ? go.data_ptr<scalar_t>() : nullptr;
    scalar_t* gzp = need_grad_z ? gz.data_ptr<scalar_t>() : nullptr;
    if (D == 0) return;
    if (need_grad_codebook)
      grad_by_code<scalar_t>(gop, zp, cp, ip, N, K, D, coef_z, coef_code, gzp, gc.data_ptr<scalar_t>());
    else if (need_grad_z)
      grad_z_rows<scalar_t>(gop, zp, cp, ip, N, K, D, coef_z, gzp);
  });
  return {gz, gc};
}

// Search, gather, loss and straight-through in one parallel region: (idx, out, sum of squared
// error) = nearest_code's l2 indices, then vq_gather's out and fp32 sum, each block gathered right
// after its search. The sum adds per-block fp64 partials in block order (blocks depend only on N
// and the thread count): reproducible run to run.
std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_forward(const at::Tensor& z_in, const at::Tensor& cb) {
  TORCH_CHECK(z_in.device().is_cpu() && cb.device().is_cpu(), "vq_forward (cpp): z and codebook must be CPU tensors");
  TORCH_CHECK(z_in.dim() == 2 && cb.dim() == 2 && z_in.size(1) == cb.size(1) && z_in.size(1) > 0 && cb.size(0) > 0,
              "vq_forward (cpp): z (N, D) and codebook (K, D) with D, K >= 1, got ", z_in.sizes(), " and ", cb.sizes());
  TORCH_CHECK(z_in.scalar_type() == cb.scalar_type(), "vq_forward (cpp): z and codebook must share a dtype, got ",
              z_in.scalar_type(), " and ", cb.scalar_type());
  TORCH_CHECK(cb.size(0) <= std::numeric_limits<int32_t>::max(), "vq_forward (cpp): codebook has too many entries");
  const auto z = z_in.contiguous();
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  auto idx = at::empty({N}, z.options().dtype(at::kLong));
  auto dist = at::empty({N}, z.options().dtype(at::kFloat));
  auto out = at::empty_like(z);
  if (N == 0) return {idx, out, at::zeros({}, z.options().dtype(at::kFloat))};

  const int64_t groups = (K + NR - 1) / NR;
  auto packed = at::empty({groups * nq::group_stride(D)}, z.options().dtype(at::kFloat));
  const auto cbc = cb.contiguous();
  const int64_t block_rows = block_rows_for(N);
  std::vector<double> partial((N + block_rows - 1) / block_rows, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vq_forward", [&] {
    using A = acc_t<scalar_t>;
    pack_codebook<scalar_t>(cbc, false, packed.data_ptr<float>());
    const nq::Codes codes{packed.data_ptr<float>(), groups, D, std::max<int64_t>(1, kChunkFloats / (D * NR))};
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* cp = cbc.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    search_rows<scalar_t>(z, codes, false, block_rows, idx.data_ptr<int64_t>(), dist.data_ptr<float>(),
                          [&](int64_t blk, int64_t r0, int64_t rows) {
                            A lanes[kLanes] = {};
                            for (int64_t r = r0; r < r0 + rows; ++r)
                              gather_row<scalar_t>(zp + r * D, cp + ip[r] * D, D, op + r * D, lanes);
                            double s = 0;
                            for (int64_t j = 0; j < kLanes; ++j) s += lanes[j];
                            partial[blk] = s;
                          });
  });
  double total = 0;
  for (double p : partial) total += p;
  return {idx, out, at::scalar_tensor(total, z.options().dtype(at::kFloat))};
}

}  // namespace

FASTVQ_ISA_END

FASTVQ_KERNEL(nearest_code)
FASTVQ_KERNEL(vq_forward)
FASTVQ_KERNEL(vq_gather)
FASTVQ_KERNEL(vq_backward)

#if FASTVQ_REGISTERS_OPS
TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("nearest_code(Tensor x, Tensor codebook, bool cosine) -> (Tensor, Tensor)");
  m.def("vq_forward(Tensor z, Tensor codebook) -> (Tensor, Tensor, Tensor)");
  m.def("vq_gather(Tensor z, Tensor codebook, Tensor idx) -> (Tensor, Tensor)");
  m.def("vq_backward(Tensor? grad_out, Tensor z, Tensor codebook, Tensor idx, float coef_z, float coef_code, "
        "bool grad_z, bool grad_codebook) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("nearest_code", FASTVQ_DISPATCH(nearest_code));
  m.impl("vq_forward", FASTVQ_DISPATCH(vq_forward));
  m.impl("vq_gather", FASTVQ_DISPATCH(vq_gather));
  m.impl("vq_backward", FASTVQ_DISPATCH(vq_backward));
}
#endif
