// nearest_code on CPU: placeholder scalar kernel (to be replaced by the blocked one).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <limits>
#include <tuple>

namespace {

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x_in, const at::Tensor& cb_in, bool cosine) {
  TORCH_CHECK(x_in.device().is_cpu() && cb_in.device().is_cpu(), "nearest_code (cpp): x and codebook must be CPU tensors");
  auto x = x_in.to(at::kFloat).contiguous();
  auto cb = cb_in.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), K = cb.size(0), D = x.size(1);
  auto idx = at::empty({N}, x.options().dtype(at::kLong));
  auto dist = at::empty({N}, x.options().dtype(at::kFloat));
  const float* xp = x.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();
  std::vector<float> cn(K);
  for (int64_t k = 0; k < K; ++k) {
    float s = 0;
    for (int64_t d = 0; d < D; ++d) s += cp[k * D + d] * cp[k * D + d];
    cn[k] = cosine ? 1.0f / std::max(std::sqrt(s), 1e-12f) : s;
  }
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* xi = xp + i * D;
      float xs = 0;
      for (int64_t d = 0; d < D; ++d) xs += xi[d] * xi[d];
      float best = std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t k = 0; k < K; ++k) {
        float dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += xi[d] * cp[k * D + d];
        float v = cosine ? -dot * cn[k] : cn[k] - 2 * dot;
        if (v < best) { best = v; arg = k; }
      }
      ip[i] = arg;
      float r = cosine ? 1.0f + best / std::max(std::sqrt(xs), 1e-12f) : xs + best;
      dp[i] = std::max(r, 0.0f);
    }
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
