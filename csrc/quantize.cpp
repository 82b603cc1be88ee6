// nearest_code on CPU: exact nearest-codebook search without an N x K distance matrix.
//
// The codebook is packed once per call into fp32 panels of NR codes (see quantize_kernel.h).
// Each thread takes a contiguous range of row blocks; a block of x is transposed into W-row
// panels, then code chunks sized for L2 stream past it while every panel keeps its running
// (min, argmin) in registers. Extra memory: the packed codebook (about K x D fp32), one x block
// per thread and the outputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "quantize_kernel.h"

namespace {

using fastvq::nearest::NR;
using fastvq::nearest::W;
using fastvq::nearest::vf;
using fastvq::nearest::vi;

constexpr float kEps = 1e-12f;            // floor on norms for cosine, as in the reference
constexpr int64_t kChunkFloats = 1 << 16;  // 256 KiB of packed codes: stays in L2 beside an x block
constexpr int64_t kBlockFloats = 1 << 15;  // 128 KiB of packed x per block
constexpr int64_t kMaxBlockRows = 256;

template <typename T>
void pack_codebook(const at::Tensor& cb, bool cosine, float* out) {
  const int64_t K = cb.size(0), D = cb.size(1), s0 = cb.stride(0), s1 = cb.stride(1);
  const T* src = cb.data_ptr<T>();
  const int64_t groups = (K + NR - 1) / NR, gs = fastvq::nearest::group_stride(D);
  at::parallel_for(0, groups, 16, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      float* dst = out + g * gs;
      for (int j = 0; j < NR; ++j) {
        const int64_t k = g * NR + j;
        float sq = 0.f;
        for (int64_t d = 0; d < D && k < K; ++d) {
          const float v = static_cast<float>(src[k * s0 + d * s1]);
          sq += v * v;
        }
        const float scale = cosine ? -1.f / std::max(std::sqrt(sq), kEps) : -2.f;
        for (int64_t d = 0; d < D; ++d)
          dst[d * NR + j] = k < K ? scale * static_cast<float>(src[k * s0 + d * s1]) : 0.f;
        dst[D * NR + j] = k >= K ? std::numeric_limits<float>::infinity() : cosine ? 0.f : sq;
      }
    }
  });
}

// Transposes rows [r0, r0 + rows) of x into W-row panels [D][W]; rows past the end are zero.
template <typename T>
void pack_rows(const at::Tensor& x, int64_t r0, int64_t rows, float* out) {
  const int64_t N = x.size(0), D = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const T* src = x.data_ptr<T>();
  for (int64_t p = 0; p < rows; p += W) {
    float* panel = out + p * D;
    for (int64_t d = 0; d < D; ++d)
      for (int r = 0; r < W; ++r) {
        const int64_t i = r0 + p + r;
        panel[d * W + r] = i < N ? static_cast<float>(src[i * s0 + d * s1]) : 0.f;
      }
  }
}

vf squared_norms(const float* panel, int64_t D) {
  vf s{};
  for (int64_t d = 0; d < D; ++d) {
    const vf v = *reinterpret_cast<const vf*>(panel + d * W);
    s += v * v;
  }
  return s;
}

struct Search {
  const float* codes;  // packed codebook
  int64_t groups, D, chunk_groups;
  bool cosine;
};

// Runs every code chunk past `panels` packed panels, keeping (best, idx) per panel across chunks.
void search_block(const Search& s, const float* xblock, int64_t panels, const vf* floors, vf* best, vi* idx) {
  const int64_t gs = fastvq::nearest::group_stride(s.D);
  for (int64_t p = 0; p < panels; ++p) {
    best[p] = vf{} + std::numeric_limits<float>::infinity();
    idx[p] = vi{};
  }
  for (int64_t g0 = 0; g0 < s.groups; g0 += s.chunk_groups) {
    const int64_t g1 = std::min(s.groups, g0 + s.chunk_groups);
    for (int64_t p = 0; p < panels; ++p) {
      vf b = best[p];
      vi k = idx[p];
      const float* xpanel = xblock + p * W * s.D;
      for (int64_t g = g0; g < g1; ++g)
        fastvq::nearest::tile(xpanel, s.codes + g * gs, s.D, static_cast<int32_t>(g * NR), floors[p], b, k);
      best[p] = b;
      idx[p] = k;
    }
  }
}

template <typename T>
void search_rows(const at::Tensor& x, const Search& s, int64_t block_rows, int64_t* out_idx, float* out_dist) {
  const int64_t N = x.size(0), D = s.D;
  const int64_t blocks = (N + block_rows - 1) / block_rows, panels = block_rows / W;
  at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
    auto xbuf = at::empty({block_rows * D}, at::kFloat);
    std::vector<vf> sq(panels), floors(panels), best(panels);
    std::vector<vi> idx(panels);
    float* xblock = xbuf.data_ptr<float>();
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t r0 = blk * block_rows, rows = std::min(block_rows, N - r0);
      const int64_t used = (rows + W - 1) / W;
      pack_rows<T>(x, r0, rows, xblock);
      for (int64_t p = 0; p < used; ++p) {
        sq[p] = squared_norms(xblock + p * W * D, D);
        floors[p] = s.cosine ? vf{} - std::numeric_limits<float>::infinity() : -sq[p];
      }
      search_block(s, xblock, used, floors.data(), best.data(), idx.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float b = best[r / W][r % W], q = sq[r / W][r % W];
        const float d = s.cosine ? 1.f + b / std::max(std::sqrt(q), kEps) : q + b;
        out_dist[r0 + r] = std::max(d, 0.f);
        out_idx[r0 + r] = idx[r / W][r % W];
      }
    }
  });
}

// Rows per block: enough to amortise streaming the codebook from L3, few enough that both
// threads get work when N is small.
int64_t block_rows_for(int64_t N, int64_t D) {
  const int64_t by_cache = std::max<int64_t>(W, std::min(kMaxBlockRows, kBlockFloats / D) / W * W);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = ((N + threads - 1) / threads + W - 1) / W * W;
  return std::max<int64_t>(W, std::min(by_cache, per_thread));
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
  auto packed = at::empty({groups * fastvq::nearest::group_stride(D)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cb.scalar_type(), "nearest_code_pack",
                                  [&] { pack_codebook<scalar_t>(cb, cosine, packed.data_ptr<float>()); });
  const Search s{packed.data_ptr<float>(), groups, D, std::max<int64_t>(1, kChunkFloats / (D * NR)), cosine};
  const int64_t block_rows = block_rows_for(N, D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_code_search", [&] {
    search_rows<scalar_t>(x, s, block_rows, idx.data_ptr<int64_t>(), dist.data_ptr<float>());
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
