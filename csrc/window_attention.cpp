// Sliding-window causal attention on CPU, training: forward and backward.
//
// The blocked layout and the micro-kernel are in window_attention.h. Work is O(T * window * Dh)
// and extra memory O(T * Dh): the fp32 row copies and transposed key-block panels packed per
// thread while the window sweeps (never a whole sequence's worth, which at long T would fall out
// of cache and double the key traffic).
//
// The forward keeps a running (max, sum) per row (online softmax) and saves lse = ln-sum-exp. The
// backward recomputes probabilities from lse. It runs per (batch, kv head, run of key blocks):
// dK and dV of a key block are summed over its GQA group and every query block that sees it,
// in registers-and-L1 buffers, while dQ of query blocks inside the run is written directly. The
// few query blocks past the run's end that still see its keys go to a small per-run overflow
// buffer, added afterwards; runs are at least that long, so no two threads touch one row.
// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "block_pool.h"
#include "window_attention.h"

FASTVQ_ISA_BEGIN

namespace {

using fastvq::empty_big;

// Backward row: s (scores) becomes P = 2^(s c - lse2), dp becomes scale * P * (dp - delta); masked
// entries become exactly 0 in both (their scores may be stale values: gemm_band skipped them).
template <bool MASKED>
inline void grad_row(float* s, float* dp, float c, float lse2, float delta, float scale, int32_t qi,
                     const int32_t* kpos, uint32_t window) {
#pragma GCC unroll 8
  for (int v = 0; v < NVB; ++v) {
    const vf x = load(s + v * VL) * c - lse2;
    const vf p = vexp2(MASKED ? masked(x, qi, kpos, v, window) : x);
    const vf ds = p * (load(dp + v * VL) - delta) * scale;
    store(s + v * VL, p);
    store(dp + v * VL, MASKED ? masked(ds, qi, kpos, v, window, 0.f) : ds);
  }
}

// One key-block panel: dst[d][j] = rows[j][d] for j < kn, zero for kn <= j < BLK.
inline void pack_panel(float* dst, const float* rows, int64_t kn, int64_t Dp) {
  if (kn < BLK) std::fill(dst, dst + Dp * BLK, 0.f);
  for (int64_t j = 0; j < kn; ++j)
    for (int64_t d = 0; d < Dp; ++d) dst[d * BLK + j] = rows[j * Dp + d];
}

// ----------------------------------------------------------------------------- forward

struct Forward {
  const float *q, *k, *v;  // q, k, v rows (B*H or B*Hk, T, Dp); key panels are packed lazily per thread
  float *out, *lse;         // out rows (B*H, T, Dp), lse (B*H, T)
  int64_t H, group, T, Dp, window;
  float scale;
};

// Key panels live in a per-thread ring of `ring` slots, slot kb % ring tagged with the global panel
// index: a thread's consecutive query blocks of one head reuse the window's panels while hot and
// pack only the newly reached block (the whole-sequence panel tensor fell out of cache at long T).
struct PanelRing {
  float* data;
  int64_t* tag;
  int64_t ring;
};

// One block of up to BLK queries against the key blocks of its window, nearest first: the diagonal
// block gives every row a finite max before any partly visible block arrives.
void forward_block(const Forward& a, int64_t bh, int64_t qb, float* S, float* O, int32_t* kpos, PanelRing& pr) {
  const int64_t nkb = blocks(a.T), i0 = qb * BLK, m = std::min(BLK, a.T - i0);
  const int64_t bkv = (bh / a.H) * (a.H / a.group) + (bh % a.H) / a.group;
  const int64_t kb_lo = std::max<int64_t>(0, i0 - a.window + 1) / BLK;
  const float c = a.scale * kLog2e;
  const float* q = a.q + (bh * a.T + i0) * a.Dp;
  float mrow[BLK], lrow[BLK];
  std::fill(mrow, mrow + BLK, kNegInf);
  std::fill(lrow, lrow + BLK, 0.f);
  for (int64_t kb = qb; kb >= kb_lo; --kb) {
    const int64_t j0 = kb * BLK, kn = std::min(BLK, a.T - j0);
    const bool first = kb == qb, interior = kb < qb && i0 + m - 1 - j0 < a.window;
    const Band band = key_band(i0, j0, a.window);
    const int64_t slot = kb % pr.ring, id = bkv * nkb + kb;
    float* kt = pr.data + slot * a.Dp * BLK;
    if (pr.tag[slot] != id) {
      pack_panel(kt, a.k + (bkv * a.T + j0) * a.Dp, kn, a.Dp);
      pr.tag[slot] = id;
    }
    gemm_band<false, false>(S, BLK, q, a.Dp, 1, kt, BLK, m, BLK, a.Dp, band);
    for (int64_t j = 0; j < BLK; ++j) kpos[j] = static_cast<int32_t>(j0 + j);
    for (int64_t r = 0; r < m; ++r) {
      const int32_t qi = static_cast<int32_t>(i0 + r);
      const float alpha =
          interior ? online_row<false>(S + r * BLK, c, qi, kpos, a.window, mrow[r], lrow[r])
                   : online_row<true>(S + r * BLK, c, qi, kpos, static_cast<uint32_t>(a.window), mrow[r], lrow[r]);
      if (!first && alpha != 1.f) scale_row(O + r * a.Dp, a.Dp, alpha);
    }
    const float* vrows = a.v + (bkv * a.T + j0) * a.Dp;
    if (first)
      gemm_band<false, true>(O, a.Dp, S, BLK, 1, vrows, a.Dp, m, a.Dp, kn, band);
    else
      gemm_band<true, true>(O, a.Dp, S, BLK, 1, vrows, a.Dp, m, a.Dp, kn, band);
  }
  float* out = a.out + (bh * a.T + i0) * a.Dp;
  for (int64_t r = 0; r < m; ++r) {
    const float inv = 1.f / lrow[r];
    for (int64_t d = 0; d < a.Dp; d += VL) store(out + r * a.Dp + d, load(O + r * a.Dp + d) * inv);
    a.lse[bh * a.T + i0 + r] = (mrow[r] + std::log2(lrow[r])) * kLn2;
  }
}

std::tuple<at::Tensor, at::Tensor> sliding_window_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, int64_t window, double scale) {
  const char* op = "sliding_window_attention_fwd (cpp)";
  check_attention_inputs(op, q, k, v);
  TORCH_CHECK(k.size(2) == q.size(2), op, ": q has ", q.size(2), " positions but k has ", k.size(2));
  TORCH_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), Dp = padded(D);
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {at::empty_like(q, at::MemoryFormat::Contiguous), lse};
  const auto qr = as_rows(q, Dp), kr = as_rows(k, Dp), vr = as_rows(v, Dp);
  auto out = empty_big({B, H, T, Dp});
  const Forward a{qr.data_ptr<float>(), kr.data_ptr<float>(), vr.data_ptr<float>(), out.data_ptr<float>(),
                  lse.data_ptr<float>(), H, H / Hk, T, Dp, std::min(window, T), static_cast<float>(scale)};
  const int64_t nqb = blocks(T);
  parallel_ranges(B * H * nqb, grain_for(4 * BLK * (a.window + BLK) * Dp), [&](int64_t t0, int64_t t1) {
    std::vector<float> S(BLK * BLK), O(BLK * Dp);
    std::vector<int32_t> kpos(BLK);
    // a query block meets at most ceil((window - 1) / BLK) + 1 key blocks
    const int64_t ring = std::min(nqb, (a.window + BLK - 2) / BLK + 2);
    std::vector<float> pdata(ring * Dp * BLK);
    std::vector<int64_t> tag(ring, -1);
    PanelRing pr{pdata.data(), tag.data(), ring};
    for (int64_t t = t0; t < t1; ++t) forward_block(a, t / nqb, t % nqb, S.data(), O.data(), kpos.data(), pr);
  });
  return {finish(out, D, q.scalar_type()), lse};
}

// ----------------------------------------------------------------------------- backward

struct Backward {
  const float *q, *k, *v, *go, *lse, *delta;  // rows (B*H or B*Hk, T, Dp); (B*H, T)
  float *dq, *dk, *dv;                                // fp32 rows
  float* overflow;                                    // per run: (group, ov * BLK, Dp)
  int64_t H, group, T, Dp, window, run, ov;           // run: key blocks per task; ov: overflow query blocks
  float scale;
};

// Query blocks that see key block kb: kb .. last_query_block(kb).
int64_t last_query_block(int64_t kb, int64_t T, int64_t window) {
  const int64_t j_last = std::min(kb * BLK + BLK, T) - 1;
  return std::min(blocks(T) - 1, (j_last + window - 1) / BLK);
}

void backward_run(const Backward& a, int64_t bkv, int64_t run_index, float* S, float* dP, float* dK, float* dV,
                  int32_t* kpos, float* kt, float* vt) {
  const int64_t nkb = blocks(a.T), Hk = a.H / a.group, b = bkv / Hk, hk = bkv % Hk;
  const int64_t kb0 = run_index * a.run, kb1 = std::min(nkb, kb0 + a.run);
  const int64_t runs = (nkb + a.run - 1) / a.run;
  float* overflow = a.overflow + (bkv * runs + run_index) * a.group * a.ov * BLK * a.Dp;
  const float c = a.scale * kLog2e;
  const uint32_t window = static_cast<uint32_t>(a.window);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * BLK, kn = std::min(BLK, a.T - j0), qb_last = last_query_block(kb, a.T, a.window);
    const float* krows = a.k + (bkv * a.T + j0) * a.Dp;
    pack_panel(kt, krows, kn, a.Dp);  // each key block is visited once: pack its panels here, hot
    pack_panel(vt, a.v + (bkv * a.T + j0) * a.Dp, kn, a.Dp);
    for (int64_t j = 0; j < BLK; ++j) kpos[j] = static_cast<int32_t>(j0 + j);
    std::fill(dK, dK + BLK * a.Dp, 0.f);
    std::fill(dV, dV + BLK * a.Dp, 0.f);
    for (int64_t g = 0; g < a.group; ++g) {
      const int64_t bh = b * a.H + hk * a.group + g;
      for (int64_t qb = kb; qb <= qb_last; ++qb) {
        const int64_t i0 = qb * BLK, m = std::min(BLK, a.T - i0);
        const bool interior = kb < qb && i0 + m - 1 - j0 < a.window;
        const float* q = a.q + (bh * a.T + i0) * a.Dp;
        const float* go = a.go + (bh * a.T + i0) * a.Dp;
        const Band keys = key_band(i0, j0, a.window), queries = query_band(i0, j0, a.window);
        gemm_band<false, false>(S, BLK, q, a.Dp, 1, kt, BLK, m, BLK, a.Dp, keys);
        gemm_band<false, false>(dP, BLK, go, a.Dp, 1, vt, BLK, m, BLK, a.Dp, keys);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t row = bh * a.T + i0 + r;
          const float lse2 = a.lse[row] * kLog2e, delta = a.delta[row];
          const int32_t qi = static_cast<int32_t>(i0 + r);
          if (interior)
            grad_row<false>(S + r * BLK, dP + r * BLK, c, lse2, delta, a.scale, qi, kpos, window);
          else
            grad_row<true>(S + r * BLK, dP + r * BLK, c, lse2, delta, a.scale, qi, kpos, window);
        }
        gemm_band<true, true>(dV, a.Dp, S, 1, BLK, go, a.Dp, kn, a.Dp, m, queries);  // dV += P^T dO
        gemm_band<true, true>(dK, a.Dp, dP, 1, BLK, q, a.Dp, kn, a.Dp, m, queries);  // dK += dS^T Q (scale in dS)
        // dQ += dS K. dq is not zeroed beforehand: the first key block of the run to reach an
        // in-run query block writes it (zeroing a big dq first would cost as much as the page faults
        // the block cache saves).
        if (qb >= kb1)
          gemm_band<true, true>(overflow + (g * a.ov + (qb - kb1)) * BLK * a.Dp, a.Dp, dP, BLK, 1, krows, a.Dp, m,
                                a.Dp, kn, keys);
        else if (kb == kb0 || last_query_block(kb - 1, a.T, a.window) < qb)
          gemm_band<false, true>(a.dq + (bh * a.T + i0) * a.Dp, a.Dp, dP, BLK, 1, krows, a.Dp, m, a.Dp, kn, keys);
        else
          gemm_band<true, true>(a.dq + (bh * a.T + i0) * a.Dp, a.Dp, dP, BLK, 1, krows, a.Dp, m, a.Dp, kn, keys);
      }
    }
    std::memcpy(a.dk + (bkv * a.T + j0) * a.Dp, dK, kn * a.Dp * sizeof(float));
    std::memcpy(a.dv + (bkv * a.T + j0) * a.Dp, dV, kn * a.Dp * sizeof(float));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t window, double scale) {
  const char* op = "sliding_window_attention_bwd (cpp)";
  check_attention_inputs(op, q, k, v);
  TORCH_CHECK(k.size(2) == q.size(2), op, ": q has ", q.size(2), " positions but k has ", k.size(2));
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2), op,
              ": lse must be (B, H, T) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  TORCH_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), Dp = padded(D);
  if (q.numel() == 0)
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  window = std::min(window, T);
  const int64_t group = H / Hk, nkb = blocks(T);
  const auto qr = as_rows(q, Dp), kr = as_rows(k, Dp), gr = as_rows(grad_out, Dp);
  const auto vr = as_rows(v, Dp);
  // delta = rowsum(dO * O), row by row: the product as a tensor would be one more fresh (B, H, T, Dh) block
  const auto outr = as_rows(out, Dp);
  auto delta = at::empty({B, H, T}, qr.options());
  parallel_ranges(B * H * T, grain_for(2 * Dp), [&](int64_t r0, int64_t r1) {
    const float *g = gr.data_ptr<float>(), *o = outr.data_ptr<float>();
    float* dst = delta.data_ptr<float>();
    for (int64_t r = r0; r < r1; ++r) {
      vf acc{};
      for (int64_t d = 0; d < Dp; d += VL) acc += load(g + r * Dp + d) * load(o + r * Dp + d);
      dst[r] = hsum(acc);
    }
  });
  const auto lse32 = lse.to(at::kFloat).contiguous();
  // Runs of key blocks: enough tasks for every thread, each run at least ov blocks long.
  const int64_t ov = last_query_block(0, std::numeric_limits<int32_t>::max(), window);  // (BLK - 1 + window - 1) / BLK
  const int64_t tasks_wanted = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t runs_wanted = std::max<int64_t>(1, (tasks_wanted + B * Hk - 1) / (B * Hk));
  const int64_t run = std::max<int64_t>({1, ov, (nkb + runs_wanted - 1) / runs_wanted});
  const int64_t runs = (nkb + run - 1) / run;
  auto dq = empty_big({B, H, T, Dp});
  auto dk = empty_big({B, Hk, T, Dp});
  auto dv = empty_big({B, Hk, T, Dp});
  auto overflow = at::zeros({B * Hk * runs * group * std::max<int64_t>(ov, 1) * BLK * Dp}, qr.options());
  const Backward a{qr.data_ptr<float>(), kr.data_ptr<float>(), vr.data_ptr<float>(),
                   gr.data_ptr<float>(), lse32.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
                   dk.data_ptr<float>(), dv.data_ptr<float>(), overflow.data_ptr<float>(), H, group, T, Dp, window,
                   run, std::max<int64_t>(ov, 1), static_cast<float>(scale)};
  // a few runs per thread, each worth many grains: the total work (about 4 GEMMs of 2 flops per
  // (query, key) pair and dimension) says how large the region is
  const int64_t grains = 8 * B * H * T * std::min(window, T) * Dp / (int64_t{1} << 20);
  parallel_ranges(B * Hk * runs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(BLK * BLK), dP(BLK * BLK), dK(BLK * Dp), dV(BLK * Dp), kt(Dp * BLK), vt(Dp * BLK);
    std::vector<int32_t> kpos(BLK);
    for (int64_t t = t0; t < t1; ++t)
      backward_run(a, t / runs, t % runs, S.data(), dP.data(), dK.data(), dV.data(), kpos.data(), kt.data(), vt.data());
  }, grains);
  // Each run's overflow lands in the next run's query blocks (runs are >= ov blocks long).
  parallel_ranges(B * Hk * runs, grain_for(group * ov * BLK * Dp), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bkv = t / runs, r = t % runs, b = bkv / Hk, hk = bkv % Hk;
      const int64_t i0 = std::min(nkb, (r + 1) * run) * BLK, rows = std::min(a.ov * BLK, T - i0);
      if (rows <= 0) continue;
      for (int64_t g = 0; g < group; ++g) {
        const float* src = a.overflow + ((bkv * runs + r) * group + g) * a.ov * BLK * Dp;
        float* dst = a.dq + ((b * H + hk * group + g) * T + i0) * Dp;
        for (int64_t i = 0; i < rows * Dp; ++i) dst[i] += src[i];
      }
    }
  });
  return {finish(dq, D, q.scalar_type()), finish(dk, D, k.scalar_type()), finish(dv, D, v.scalar_type())};
}

}  // namespace

FASTVQ_ISA_END

FASTVQ_KERNEL(sliding_window_attention_fwd)
FASTVQ_KERNEL(sliding_window_attention_bwd)

#if FASTVQ_REGISTERS_OPS
TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("sliding_window_attention_fwd(Tensor q, Tensor k, Tensor v, int window, float scale) -> (Tensor, Tensor)");
  m.def("sliding_window_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int window, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("sliding_window_attention_fwd", FASTVQ_DISPATCH(sliding_window_attention_fwd));
  m.impl("sliding_window_attention_bwd", FASTVQ_DISPATCH(sliding_window_attention_bwd));
}
#endif
