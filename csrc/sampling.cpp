// sample_logits on CPU: guidance, temperature, top-k, top-p and the inverse-CDF draw, one row at a time.
//
// The semantics are fastvq/ops/sampling.py's. Rows are spread over threads (parallel.h); each
// thread keeps three row-sized buffers (logits as fp32, their order keys, the weights).
// Nothing is sorted: thresholds come from a radix select over 32-bit keys whose unsigned order is
// the float order, a digit of 8 to 12 bits per pass, counting tokens for top-k and summing
// weights (in double) for top-p. A pass after the first touches only the keys whose higher digits
// match the prefix chosen so far, so the result is an exact key of the row and every token tied
// with it is kept. The weights exp((x - max) / t) come from vec.h's vector exp (glibc's expf
// does not vectorise).
// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "vec.h"

FASTVQ_ISA_BEGIN

namespace {

using namespace fastvq::vec;

inline uint32_t ordered_key(float x) {
  if (x == 0.0f) x = 0.0f;  // -0 and +0 are the same logit
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return (b >> 31) ? ~b : (b | 0x80000000u);
}

// Radix digits, most significant first. Long rows start with 12 bits (sign, exponent and 3
// mantissa bits, so logits of one binade still spread over 8 bins) and go on 10 at a time; short
// rows take 8 bits a pass, as clearing and scanning 4096 bins would cost more than the row.
constexpr int kMaxBins = 1 << 12;
constexpr int64_t kWideFirstDigit = 16384;  // row length from which the 12-bit first digit pays

// The largest key T with  sum of weight[i] over keys[i] >= T  >= need  (weight 1 when weights is
// null: then T is the need-th largest key). After the first pass only the keys in the chosen top
// bin are copied to `scratch`, so the later passes touch a small share of the row.
uint32_t radix_select(const uint32_t* keys, const float* weights, int64_t n, double need,
                      std::vector<std::pair<uint32_t, float>>& scratch, std::vector<double>& hist,
                      std::vector<int32_t>& count) {
  uint32_t prefix = 0;
  int width = n >= kWideFirstDigit ? 12 : 8;
  for (int shift = 32 - width; width > 0; width = std::min(shift, n >= kWideFirstDigit ? 10 : 8), shift -= width) {
    const bool first = shift + width == 32;
    const int bins = 1 << width;
    const uint32_t low = static_cast<uint32_t>(bins - 1);
    std::fill(hist.begin(), hist.begin() + bins, 0.0);
    if (first && !weights) {
      std::fill(count.begin(), count.begin() + bins, 0);
      for (int64_t i = 0; i < n; ++i) ++count[keys[i] >> shift];
      for (int d = 0; d < bins; ++d) hist[d] = static_cast<double>(count[d]);
    } else if (first) {
      for (int64_t i = 0; i < n; ++i) hist[keys[i] >> shift] += weights[i];
    } else {
      for (const auto& kw : scratch) hist[(kw.first >> shift) & low] += kw.second;
    }
    int digit = -1;
    double above = 0.0;
    for (int d = bins - 1; d >= 0; --d) {
      if (above + hist[d] >= need && hist[d] > 0) {
        digit = d;
        break;
      }
      above += hist[d];
    }
    if (digit < 0) {
      // Only rounding of the mass gets here: keep the whole group (its lowest populated digit).
      digit = 0;
      while (digit < bins - 1 && hist[digit] == 0) ++digit;
      above = 0.0;
      for (int d = bins - 1; d > digit; --d) above += hist[d];
      need = above + hist[digit];
    }
    need -= above;
    prefix |= static_cast<uint32_t>(digit) << shift;
    if (first) {
      scratch.clear();
      for (int64_t i = 0; i < n; ++i)
        if ((keys[i] >> shift) == static_cast<uint32_t>(digit)) scratch.emplace_back(keys[i], weights ? weights[i] : 1.0f);
    } else if (shift > 0) {
      const uint32_t high = ~((1u << shift) - 1u);  // the digits fixed so far
      size_t kept = 0;
      for (const auto& kw : scratch)
        if ((kw.first & high) == prefix) scratch[kept++] = kw;
      scratch.resize(kept);
    }
  }
  return prefix;
}

template <typename T>
void sample_rows(const T* logits, int64_t stride, int64_t rows, int64_t V, bool cfg, float scale,
                 const float* temperature, const int64_t* top_k, const float* top_p, const float* uniform,
                 int64_t* out) {
  // A task of at least ~64K logits: waking a second thread for less costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / V);
  // the row buffers are padded to whole vectors; the padding is computed on and never read
  const int64_t Vp = (V + kLanes - 1) / kLanes * kLanes;
  fastvq::parallel_ranges(rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(Vp), w(Vp);
    std::vector<uint32_t> keys(Vp);
    std::vector<std::pair<uint32_t, float>> scratch;
    scratch.reserve(V);
    std::vector<double> hist(kMaxBins);
    std::vector<int32_t> count(kMaxBins);
    for (int64_t row = begin; row < end; ++row) {
      const T* c = logits + row * stride;
      const T* u = logits + (row + rows) * stride;
      float m = -std::numeric_limits<float>::infinity();
      int64_t argmax = 0;
      for (int64_t i = 0; i < V; ++i) {
        float v = static_cast<float>(c[i]);
        if (cfg) {
          const float uv = static_cast<float>(u[i]);
          v = uv + scale * (v - uv);
        }
        x[i] = v;
        if (v > m) {  // strict: the lowest index wins ties
          m = v;
          argmax = i;
        }
      }
      const float t = temperature[row];
      if (!(t > 0.0f)) {
        out[row] = argmax;
        continue;
      }
      const float inv_t = 1.0f / t;
      for (int64_t i = 0; i < V; ++i) keys[i] = ordered_key(x[i]);
      const uint32_t thr_k = top_k[row] < V ? radix_select(keys.data(), nullptr, V, static_cast<double>(top_k[row]), scratch, hist, count) : 0u;
      double total = 0.0;
      for (int64_t i = 0; i < V; i += kLanes) {
        const vf e = vexp((load(&x[i]) - m) * inv_t);
        // NaN (from -inf - -inf, or +inf - +inf) gets weight 0, like a masked token
        const vi keep = (load(&keys[i]) >= thr_k) & (e == e);
        store(&w[i], keep ? e : vf{});
      }
      uint32_t thr = thr_k;
      const float p = top_p[row];
      if (p < 1.0f) {
        double mass = 0.0;
        for (int64_t i = 0; i < V; ++i) mass += w[i];
        thr = std::max(thr, radix_select(keys.data(), w.data(), V, static_cast<double>(p) * mass, scratch, hist, count));
      }
      for (int64_t i = 0; i < V; ++i) {
        if (keys[i] < thr) w[i] = 0.0f;
        total += w[i];
      }
      const double goal = static_cast<double>(uniform[row]) * total;
      double run = 0.0;
      int64_t pick = -1, last = -1;
      for (int64_t i = 0; i < V; ++i) {
        if (w[i] > 0.0f) {
          last = i;
          run += w[i];
          if (run > goal) {
            pick = i;
            break;
          }
        }
      }
      // r * S rounds up to the total only on a CDF boundary: then the last token with weight.
      out[row] = pick >= 0 ? pick : last;
    }
  });
}

at::Tensor sample_logits(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& uniform, bool cfg, double cfg_scale) {
  TORCH_CHECK(logits_in.dim() == 2, "sample_logits: logits must be 2-D (B, V)");
  const auto logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t rows = uniform.size(0), V = logits.size(1);
  TORCH_CHECK(logits.size(0) == (cfg ? 2 * rows : rows), "sample_logits: logits rows do not match the uniforms");
  const auto t = temperature.to(at::kFloat).contiguous();
  const auto k = top_k.to(at::kLong).contiguous();
  const auto p = top_p.to(at::kFloat).contiguous();
  const auto r = uniform.to(at::kFloat).contiguous();
  TORCH_CHECK(t.numel() == rows && k.numel() == rows && p.numel() == rows, "sample_logits: one parameter per row");
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_logits", [&] {
    sample_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), rows, V, cfg, static_cast<float>(cfg_scale),
                          t.data_ptr<float>(), k.data_ptr<int64_t>(), p.data_ptr<float>(), r.data_ptr<float>(),
                          out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

FASTVQ_ISA_END

FASTVQ_KERNEL(sample_logits)

#if FASTVQ_REGISTERS_OPS
TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("sample_logits(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor uniform, bool cfg, float cfg_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("sample_logits", FASTVQ_DISPATCH(sample_logits));
}
#endif
