// Sliding-window attention on CPU, decoding: new queries against ring-buffer key/value caches.
//
// sliding_window_decode takes n new queries at positions pos .. pos + n - 1 against caches whose
// slot s holds position p with p % S = s. Two paths: the blocked one (window_attention.h's
// micro-kernel on fp32 panels converted from the ring, any dtype and head size) and a direct one
// for fp32 caches with a contiguous head_dim that is a multiple of 16 up to 128.
// sliding_window_decode_qkv is a model's whole attention step on the direct path.
// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "window_attention.h"

FASTVQ_ISA_BEGIN

namespace {

// Rows are the group's (head, new query) pairs of one kv head, BLK at a time; slot tiles of the
// ring are converted to fp32 panels on the fly (the cache is read once per row block, never copied).
template <typename T>
void decode_rows(const at::Tensor& kc, const at::Tensor& vc, const float* qrows, float* out, int64_t bkv, int64_t Hk,
                 int64_t r0, int64_t rows, int64_t n, int64_t pos, int64_t window, float scale, int64_t Dp, float* S,
                 float* O, float* kt, float* vrows, int32_t* kpos) {
  const int64_t slots = kc.size(2), D = kc.size(3), b = bkv / Hk, hk = bkv % Hk;
  const T* kbase = kc.data_ptr<T>() + b * kc.stride(0) + hk * kc.stride(1);
  const T* vbase = vc.data_ptr<T>() + b * vc.stride(0) + hk * vc.stride(1);
  const int64_t ks2 = kc.stride(2), ks3 = kc.stride(3), vs2 = vc.stride(2), vs3 = vc.stride(3);
  const int64_t last = pos + n - 1;
  const float c = scale * kLog2e;
  float mrow[BLK], lrow[BLK];
  std::fill(mrow, mrow + BLK, kNegInf);
  std::fill(lrow, lrow + BLK, 0.f);
  bool first = true;
  for (int64_t s0 = 0; s0 < slots; s0 += BLK) {
    const int64_t sn = std::min(BLK, slots - s0);
    bool any = false;
    for (int64_t j = 0; j < BLK; ++j) {
      // slot s holds position last - ((last - s) mod slots); relative to pos it lies in [-slots, n)
      const int64_t kp = j < sn ? last - ((last - (s0 + j)) % slots + slots) % slots : -1;
      kpos[j] = kp >= 0 ? static_cast<int32_t>(kp - pos) : std::numeric_limits<int32_t>::min() / 2;
      any |= kp >= 0 && kp - pos > -window;
    }
    if (!any) continue;
    if (sn < BLK) std::fill(kt, kt + Dp * BLK, 0.f);  // columns past the ring are masked; keep them finite
    for (int64_t j = 0; j < sn; ++j) {
      const T* kr = kbase + (s0 + j) * ks2;
      const T* vr = vbase + (s0 + j) * vs2;
      // a slot no row of this step sees (never written, or older than the window) may hold a stale
      // NaN: its weight is 0, but 0 * NaN = NaN in the P x V gemm, so it enters as zeros
      const bool live = kpos[j] != std::numeric_limits<int32_t>::min() / 2 && kpos[j] > -window;
      for (int64_t d = 0; d < D; ++d) {
        kt[d * BLK + j] = live ? static_cast<float>(kr[d * ks3]) : 0.f;
        vrows[j * Dp + d] = live ? static_cast<float>(vr[d * vs3]) : 0.f;
      }
    }
    gemm<false>(S, BLK, qrows, Dp, 1, kt, BLK, rows, BLK, Dp);
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t qi = static_cast<int32_t>((r0 + r) % n);
      const float alpha = online_row<true>(S + r * BLK, c, qi, kpos, static_cast<uint32_t>(window), mrow[r], lrow[r]);
      if (!first && alpha != 1.f) scale_row(O + r * Dp, Dp, alpha);
    }
    if (first)
      gemm<false>(O, Dp, S, BLK, 1, vrows, Dp, rows, Dp, sn);
    else
      gemm<true>(O, Dp, S, BLK, 1, vrows, Dp, rows, Dp, sn);
    first = false;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / lrow[r];
    for (int64_t d = 0; d < Dp; d += VL) store(out + r * Dp + d, load(O + r * Dp + d) * inv);
  }
}

// One new query against a long ring is a matrix-vector product over at most `window` keys: the
// blocked path above (key tiles transposed into panels, a 6-row micro-kernel for one row) spends
// most of its time on that reshuffling. For fp32 caches with a contiguous head_dim that is a
// multiple of 16 (up to 128), each (batch, head, query) row instead reads its visible keys where
// they lie in the ring: VL keys at a time, one accumulator each, whose lane sums a tree of
// shuffles (fold_lanes, vec.h) leaves in one vector; then exp2 over the scores and a pass over the
// values.
constexpr int64_t kDirectMaxD = 128;

// out[0..D) = softmax(c * q . k_p) weighted sum of v_p over positions p in [lo, hi], slot p % slots.
// s: scratch for hi - lo + 1 scores rounded up to VL.
void decode_row_direct(const float* q, const float* kbase, int64_t ks, const float* vbase, int64_t vs, int64_t D,
                       int64_t slots, int64_t lo, int64_t hi, float c, float* s, float* out) {
  const int64_t L = hi - lo + 1, nd = D / VL;
  const int64_t first_slot = lo % slots;
  auto slot_of = [&](int64_t j) { const int64_t t = first_slot + j; return t < slots ? t : t - slots; };
  vf mx = splat(kNegInf);
  for (int64_t j0 = 0; j0 < L; j0 += VL) {
    const float* kp[VL];
    // accumulator i takes key j0 + lane_of(i), so the folded lanes come out in key order; keys past
    // L repeat key j0 (finite) and are masked below
#pragma GCC unroll 16
    for (int i = 0; i < VL; ++i) {
      const int64_t j = j0 + lane_of(i);
      kp[i] = kbase + slot_of(j < L ? j : j0) * ks;
    }
    vf acc[VL];
#pragma GCC unroll 16
    for (int i = 0; i < VL; ++i) acc[i] = vf{};
    for (int64_t d = 0; d < D; d += VL) {
      const vf qv = load(q + d);
#pragma GCC unroll 16
      for (int i = 0; i < VL; ++i) acc[i] += qv * load(kp[i] + d);
    }
    vf sv = fold_lanes<VL>(acc) * c;
    if (L - j0 < VL) {
      vi lane;
      for (int i = 0; i < VL; ++i) lane[i] = i;
      sv = lane < static_cast<int32_t>(L - j0) ? sv : splat(kNegInf);
    }
    store(s + j0, sv);
    mx = vmax(mx, sv);
  }
  const float m = hmax(mx);
  vf sum{};
  for (int64_t j0 = 0; j0 < L; j0 += VL) {
    const vf p = vexp2(load(s + j0) - m);  // masked lanes: exactly 0
    store(s + j0, p);
    sum += p;
  }
  // two keys at a time into separate accumulators: 2 * nd independent FMA chains
  vf o0[kDirectMaxD / VL], o1[kDirectMaxD / VL];
  for (int64_t d = 0; d < nd; ++d) o0[d] = o1[d] = vf{};
  int64_t j = 0;
  for (; j + 2 <= L; j += 2) {
    const float* v0 = vbase + slot_of(j) * vs;
    const float* v1 = vbase + slot_of(j + 1) * vs;
    const vf p0 = splat(s[j]), p1 = splat(s[j + 1]);
    for (int64_t d = 0; d < nd; ++d) {
      o0[d] += p0 * load(v0 + d * VL);
      o1[d] += p1 * load(v1 + d * VL);
    }
  }
  if (j < L) {
    const float* v0 = vbase + slot_of(j) * vs;
    const vf p0 = splat(s[j]);
    for (int64_t d = 0; d < nd; ++d) o0[d] += p0 * load(v0 + d * VL);
  }
  const vf inv = splat(1.f / hsum(sum));
  for (int64_t d = 0; d < nd; ++d) store(out + d * VL, (o0[d] + o1[d]) * inv);
}

bool direct_decode_applies(const at::Tensor& kc, const at::Tensor& vc) {
  const int64_t D = kc.size(3);
  return kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat && kc.stride(3) == 1 && vc.stride(3) == 1 &&
         D % DALIGN == 0 && D % VL == 0 && D <= kDirectMaxD;
}

// Where a (batch, head, query) row's query is read and its output written: element strides of
// the batch, head and query indices (head_dim contiguous).
struct RowLayout {
  int64_t b, h, i;
  int64_t at(int64_t bi, int64_t hi, int64_t ii) const { return bi * b + hi * h + ii * i; }
};

// Every (batch, head, query) row on its own; a task is at least ~128 KiB of keys and values.
void decode_direct(const at::Tensor& kc, const at::Tensor& vc, const float* q, RowLayout ql, float* out,
                   RowLayout ol, int64_t B, int64_t H, int64_t n, int64_t pos, int64_t window, float scale) {
  const int64_t Hk = kc.size(1), slots = kc.size(2), D = kc.size(3), group = H / Hk;
  const float* kd = kc.data_ptr<float>();
  const float* vd = vc.data_ptr<float>();
  const float c = scale * kLog2e;
  const int64_t row_bytes = 2 * std::min(window, slots) * D * static_cast<int64_t>(sizeof(float));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / row_bytes);
  parallel_ranges(B * H * n, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> s((window + VL - 1) / VL * VL);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % n, h = (r / n) % H, b = r / (n * H), hk = h / group;
      const int64_t hi = pos + i, lo = std::max<int64_t>(0, hi - window + 1);
      decode_row_direct(q + ql.at(b, h, i), kd + b * kc.stride(0) + hk * kc.stride(1), kc.stride(2),
                        vd + b * vc.stride(0) + hk * vc.stride(1), vc.stride(2), D, slots, lo, hi, c, s.data(),
                        out + ol.at(b, h, i));
    }
  });
}

at::Tensor sliding_window_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& pos, int64_t window, double scale) {
  const char* op = "sliding_window_decode (cpp)";
  check_attention_inputs(op, q, k_cache, v_cache);
  TORCH_CHECK(pos.dim() == 0 && !pos.is_floating_point() && !pos.is_complex(), op,
              ": pos must be a 0-dim integer tensor, got ", pos.scalar_type(), " of shape ", pos.sizes());
  TORCH_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  const int64_t B = q.size(0), H = q.size(1), Hk = k_cache.size(1), n = q.size(2), D = q.size(3), Dp = padded(D);
  const int64_t slots = k_cache.size(2), p0 = pos.item<int64_t>();
  TORCH_CHECK(p0 >= 0, op, ": pos must be >= 0, got ", p0);
  TORCH_CHECK(slots >= window + n - 1, op, ": k_cache has ", slots, " slots but ", n,
              " new queries with window ", window, " need window + n - 1 = ", window + n - 1);
  if (q.numel() == 0) return at::empty_like(q, at::MemoryFormat::Contiguous);
  window = std::min(window, slots);
  const auto qr = as_rows(q, Dp);
  auto out = at::empty({B, H, n, Dp}, qr.options());
  if (direct_decode_applies(k_cache, v_cache)) {
    const RowLayout rows{H * n * Dp, n * Dp, Dp};  // qr and out are (B, H, n, Dp), Dp = D here
    decode_direct(k_cache, v_cache, qr.data_ptr<float>(), rows, out.data_ptr<float>(), rows, B, H, n, p0, window,
                  static_cast<float>(scale));
    return finish(out, D, q.scalar_type());
  }
  const int64_t group = H / Hk, rows_per_kv = group * n, rblocks = blocks(rows_per_kv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "sliding_window_decode", [&] {
    parallel_ranges(B * Hk * rblocks, grain_for(4 * std::min(BLK, rows_per_kv) * slots * Dp), [&](int64_t t0, int64_t t1) {
      std::vector<float> S(BLK * BLK), O(BLK * Dp), kt(Dp * BLK), vrows(BLK * Dp);
      std::vector<int32_t> kpos(BLK);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bkv = t / rblocks, r0 = (t % rblocks) * BLK, rows = std::min(BLK, rows_per_kv - r0);
        // the group's heads are adjacent in q, so its (head, query) rows are one contiguous run
        const int64_t first_row = bkv * rows_per_kv + r0;
        decode_rows<scalar_t>(k_cache, v_cache, qr.data_ptr<float>() + first_row * Dp,
                              out.data_ptr<float>() + first_row * Dp, bkv, Hk, r0, rows, n, p0, window,
                              static_cast<float>(scale), Dp, S.data(), O.data(), kt.data(), vrows.data(), kpos.data());
      }
    });
  });
  return finish(out, D, q.scalar_type());
}

// A whole attention step of a decoding model on the stacked product of its q/k/v projection:
// qkv (B, n, 3, H, D) (query, key, value of the n new tokens at positions pos .. pos + n - 1) is
// written into the rings k_cache / v_cache (B, H, S, D) at slots (pos + i) % S, then the queries
// attend; returns (B, n, H * D), the layout the output projection takes. One call in place of the
// head split, two index_copy_ and the decode op with their bookkeeping (a decode step runs it once
// per layer). fp32 and the direct path's head sizes only; fastvq/nn/attention.py checks the rest.
at::Tensor sliding_window_decode_qkv(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                                     const at::Tensor& pos, int64_t window, double scale) {
  const char* op = "sliding_window_decode_qkv (cpp)";
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && k_cache.dim() == 4, op,
              ": qkv must be (B, n, 3, H, D) and the caches (B, H, S, D), got ", qkv.sizes(), " and ", k_cache.sizes());
  const int64_t B = qkv.size(0), n = qkv.size(1), H = qkv.size(3), D = qkv.size(4), slots = k_cache.size(2);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(1) == H &&
                  k_cache.size(3) == D, op, ": the caches must both be (B=", B, ", H=", H, ", S, D=", D, "), got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  qkv.scalar_type() == at::kFloat && direct_decode_applies(k_cache, v_cache), op,
              ": needs fp32 CPU tensors with head_dim a multiple of 16 up to ", kDirectMaxD);
  TORCH_CHECK(pos.dim() == 0 && !pos.is_floating_point() && !pos.is_complex(), op,
              ": pos must be a 0-dim integer tensor");
  const int64_t p0 = pos.item<int64_t>();
  TORCH_CHECK(p0 >= 0 && window >= 1 && slots >= window + n - 1, op, ": needs pos >= 0 (got ", p0,
              ") and S >= window + n - 1 (S = ", slots, ", window = ", window, ", n = ", n, ")");
  const auto x = qkv.contiguous();
  const float* src = x.data_ptr<float>();
  const int64_t token = 3 * H * D;  // elements per new token in qkv
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = (p0 + i) % slots;
      for (int64_t h = 0; h < H; ++h) {
        const float* kv = src + (b * n + i) * token + h * D;
        std::memcpy(k_cache.data_ptr<float>() + b * k_cache.stride(0) + h * k_cache.stride(1) + slot * k_cache.stride(2),
                    kv + H * D, D * sizeof(float));
        std::memcpy(v_cache.data_ptr<float>() + b * v_cache.stride(0) + h * v_cache.stride(1) + slot * v_cache.stride(2),
                    kv + 2 * H * D, D * sizeof(float));
      }
    }
  auto out = at::empty({B, n, H * D}, x.options());
  decode_direct(k_cache, v_cache, src, RowLayout{n * token, D, token}, out.data_ptr<float>(),
                RowLayout{n * H * D, D, H * D}, B, H, n, p0, std::min(window, slots), static_cast<float>(scale));
  return out;
}

}  // namespace

FASTVQ_ISA_END

FASTVQ_KERNEL(sliding_window_decode)
FASTVQ_KERNEL(sliding_window_decode_qkv)

#if FASTVQ_REGISTERS_OPS
TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("sliding_window_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int window, float scale) -> Tensor");
  m.def("sliding_window_decode_qkv(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, int window, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("sliding_window_decode", FASTVQ_DISPATCH(sliding_window_decode));
  m.impl("sliding_window_decode_qkv", FASTVQ_DISPATCH(sliding_window_decode_qkv));
}
#endif
