// Sliding-window causal attention on CPU: forward, backward and ring-buffer decode.
//
// Query i sees key j iff i - window < j <= i. Sequences are cut into blocks of BLK positions; a
// query block meets only the key blocks its window reaches, so work is O(T * window * Dh) and
// extra memory O(T * Dh): fp32 row copies of the inputs (Dh padded to a multiple of 16 with
// zeros, which changes no dot product) and transposed key-block panels [Dh][BLK] that let the
// score GEMMs vectorise along keys, packed per thread while the window sweeps (never a whole
// sequence's worth, which at long T would fall out of cache and double the key traffic). Every
// product of two tiles goes through one register-blocked micro-kernel:
// C[rows][cols] (+)= sum_k A(row, k) * B[k][cols], cols in SIMD lanes, A broadcast.
//
// Softmax runs in base 2 (scores times scale * log2 e) so each probability is one exp2; the
// forward keeps a running (max, sum) per row (online softmax) and saves lse = ln-sum-exp. The
// backward recomputes probabilities from lse. It runs per (batch, kv head, run of key blocks):
// dK and dV of a key block are summed over its GQA group and every query block that sees it,
// in registers-and-L1 buffers, while dQ of query blocks inside the run is written directly. The
// few query blocks past the run's end that still see its keys go to a small per-run overflow
// buffer, added afterwards; runs are at least that long, so no two threads touch one row.
#include <torch/extension.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <tuple>
#include <utility>
#include <vector>
#include "parallel.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16, MR = 6;  // 6 rows x 4 vectors = 24 accumulators of the 32 zmm
#else
constexpr int VL = 8, MR = 4;
#endif
constexpr int NVMAX = 4;     // vectors per micro-tile row
constexpr int64_t BLK = 64;  // positions per query block and per key block
constexpr int NVB = BLK / VL;
constexpr int64_t DALIGN = 16;  // head_dim is padded to a multiple of this
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vi load_i(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf splat(float x) { return __builtin_shuffle(vf{x}, vi{}); }  // a broadcast (vf{} + x costs an add)
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// 2^x, relative error ~2e-7; x <= -126.5 (and -inf) gives exactly 0, so masked scores vanish.
inline vf exp2v(vf x) {
  x = x < splat(-127.f) ? splat(-127.f) : x;
  x = x > splat(127.f) ? splat(127.f) : x;
  const vf r = (x + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const vf f = x - r;                          // in [-0.5, 0.5]
  vf p = splat(1.5403530e-4f);
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.f;
  const vi bits = (__builtin_convertvector(r, vi) + 127) << 23;  // 2^r; r = -127 -> +0
  return p * (vf)bits;
}

using fastvq::parallel_ranges;

// Tasks per thread share so that a share is worth starting a thread for (about 1 MFLOP).
int64_t grain_for(int64_t flops_per_task) { return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, flops_per_task)); }

// ----------------------------------------------------------------------------- micro-kernel

// C[R][NV*VL] (+)= sum_{k<K} A[r*ars + k*aks] * B[k*ldb + 0 .. NV*VL)
template <int R, int NV, bool ACC>
void tile(float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, int64_t K) {
  vf c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? load(C + r * ldc + v * VL) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * VL);
    const float* a = A + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf ar = splat(a[r * ars]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * VL, c[r][v]);
}

template <int NV, bool ACC>
void tile_rows(int rows, float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B,
               int64_t ldb, int64_t K) {
  switch (rows) {
    case 1: return tile<1, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 2: return tile<2, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 3: return tile<3, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 4: return tile<4, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
#if defined(__AVX512F__)
    case 5: return tile<5, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
    case 6: return tile<6, NV, ACC>(C, ldc, A, ars, aks, B, ldb, K);
#endif
  }
}

template <bool ACC>
void tile_cols(int nv, int rows, float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B,
               int64_t ldb, int64_t K) {
  switch (nv) {
    case 1: return tile_rows<1, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
    case 2: return tile_rows<2, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
    case 3: return tile_rows<3, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
    default: return tile_rows<4, ACC>(rows, C, ldc, A, ars, aks, B, ldb, K);
  }
}

// C[M][N] (+)= A(M x K, element (r, k) at A[r*ars + k*aks]) * B[K][N] (row stride ldb); N % VL == 0.
template <bool ACC>
void gemm(float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, int64_t M,
          int64_t N, int64_t K) {
  for (int64_t r0 = 0; r0 < M; r0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, M - r0));
    for (int64_t n0 = 0; n0 < N; n0 += NVMAX * VL)
      tile_cols<ACC>(static_cast<int>(std::min<int64_t>(NVMAX, (N - n0) / VL)), rows, C + r0 * ldc + n0, ldc,
                     A + r0 * ars, ars, aks, B + n0, ldb, K);
  }
}

// The window's band inside a tile: row x meets only indices [x + lo, x + hi) of the other side.
struct Band {
  int64_t lo, hi;
};
// Queries (rows) against keys (columns) of tiles at positions i0, j0: 0 <= i0 + r - j0 - c < window.
Band key_band(int64_t i0, int64_t j0, int64_t window) { return {i0 - j0 - window + 1, i0 - j0 + 1}; }
// The same band seen from the keys (rows) towards the queries.
Band query_band(int64_t i0, int64_t j0, int64_t window) { return {j0 - i0, j0 - i0 + window}; }

// gemm restricted to the band, MR rows at a time. INNER: each row group sums only over the k its
// band reaches (the rest of A is zero there), the full N columns. Otherwise: each row group computes
// only the VL-column vectors its band reaches, over the full K; the other columns of C are left as
// they were (the masked softmax overwrites them).
template <bool ACC, bool INNER>
void gemm_band(float* C, int64_t ldc, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
               int64_t M, int64_t N, int64_t K, Band band) {
  for (int64_t r0 = 0; r0 < M; r0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, M - r0));
    const int64_t lo = std::max<int64_t>(0, r0 + band.lo), hi = std::min(INNER ? K : N, r0 + rows - 1 + band.hi);
    float* c = C + r0 * ldc;
    const float* a = A + r0 * ars;
    if (INNER) {
      if (hi <= lo) {
        if (!ACC)
          for (int r = 0; r < rows; ++r) std::fill(c + r * ldc, c + r * ldc + N, 0.f);
        continue;
      }
      for (int64_t n0 = 0; n0 < N; n0 += NVMAX * VL)
        tile_cols<ACC>(static_cast<int>(std::min<int64_t>(NVMAX, (N - n0) / VL)), rows, c + n0, ldc, a + lo * aks,
                       ars, aks, B + lo * ldb + n0, ldb, hi - lo);
    } else {
      const int64_t c_hi = (hi + VL - 1) / VL * VL;
      for (int64_t n0 = lo / VL * VL; n0 < c_hi; n0 += NVMAX * VL)
        tile_cols<ACC>(static_cast<int>(std::min<int64_t>(NVMAX, (c_hi - n0) / VL)), rows, c + n0, ldc, a, ars, aks,
                       B + n0, ldb, K);
    }
  }
}

// ----------------------------------------------------------------------------- softmax rows

// Scores s[0..BLK) of query position qi against keys at kpos[]: visible iff 0 <= qi - kpos < window.
inline vf masked(vf x, int32_t qi, const int32_t* kpos, int v, uint32_t window, float fill = kNegInf) {
  const vu d = (vu)(vi{} + qi - load_i(kpos + v * VL));
  return d < (vu{} + window) ? x : splat(fill);
}

// One online-softmax step for a row of BLK scores: updates (m, l) (base 2), turns s into
// probabilities relative to the new max, and returns the factor the row's output must be scaled by.
template <bool MASKED>
inline float online_row(float* s, float c, int32_t qi, const int32_t* kpos, uint32_t window, float& m, float& l) {
  vf x[NVB];
  vf mx = splat(kNegInf);
#pragma GCC unroll 8
  for (int v = 0; v < NVB; ++v) {
    x[v] = load(s + v * VL) * c;
    if (MASKED) x[v] = masked(x[v], qi, kpos, v, window);
    mx = vmax(mx, x[v]);
  }
  const float mn = std::max(m, hmax(mx));
  if (mn == kNegInf) {  // nothing visible to this row yet: its output and sum stay zero
    std::memset(s, 0, BLK * sizeof(float));
    return 1.f;
  }
  const float alpha = std::exp2(m - mn);  // 0 when m = -inf
  vf sum{};
#pragma GCC unroll 8
  for (int v = 0; v < NVB; ++v) {
    const vf p = exp2v(x[v] - mn);
    store(s + v * VL, p);
    sum += p;
  }
  l = l * alpha + hsum(sum);
  m = mn;
  return alpha;
}

inline void scale_row(float* o, int64_t Dp, float alpha) {
  for (int64_t d = 0; d < Dp; d += VL) store(o + d, load(o + d) * alpha);
}

// Backward row: s (scores) becomes P = 2^(s c - lse2), dp becomes scale * P * (dp - delta); masked
// entries become exactly 0 in both (their scores may be stale values: gemm_band skipped them).
template <bool MASKED>
inline void grad_row(float* s, float* dp, float c, float lse2, float delta, float scale, int32_t qi,
                     const int32_t* kpos, uint32_t window) {
#pragma GCC unroll 8
  for (int v = 0; v < NVB; ++v) {
    const vf x = load(s + v * VL) * c - lse2;
    const vf p = exp2v(MASKED ? masked(x, qi, kpos, v, window) : x);
    const vf ds = p * (load(dp + v * VL) - delta) * scale;
    store(s + v * VL, p);
    store(dp + v * VL, MASKED ? masked(ds, qi, kpos, v, window, 0.f) : ds);
  }
}

// ----------------------------------------------------------------------------- layouts

int64_t padded(int64_t d) { return (d + DALIGN - 1) / DALIGN * DALIGN; }
int64_t blocks(int64_t t) { return (t + BLK - 1) / BLK; }

// (B, heads, T, Dp) contiguous fp32: t itself when it already is, else a copy zero-padded in Dh.
at::Tensor as_rows(const at::Tensor& t, int64_t Dp) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous() && t.size(3) == Dp) return t;
  auto sizes = t.sizes().vec();
  sizes[3] = Dp;
  auto out = Dp == t.size(3) ? at::empty(sizes, t.options().dtype(at::kFloat))
                             : at::zeros(sizes, t.options().dtype(at::kFloat));
  out.narrow(3, 0, t.size(3)).copy_(t);
  return out;
}

// The big fp32 results (forward out, backward dq, dk, dv) come from a small cache of recently freed
// blocks. glibc maps blocks of 32 MiB and more afresh on every call and unmaps them on free, so each
// call paid a first-touch page fault per 4 KiB page (8192 faults, about 12 ms of kernel time for one
// 32 MiB output at T = 16384, on a 60-90 ms forward), while malloc recycles smaller blocks without
// faults: a superlinear step in time vs T. Training repeats its shapes, so the next call reuses a
// freed block of the same size as is, already resident. At most kPoolBlocks blocks (enough for one
// forward + backward: out, dq, dk, dv) and kPoolBytes bytes stay cached; fresh blocks ask for
// transparent huge pages (advice only) so that their first touch costs few faults too.
class BlockPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinCached = size_t{1} << 20, kPoolBlocks = 4, kPoolBytes = size_t{512} << 20;
  static BlockPool& self();

  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, cpu};
    void* p = take(n);
    if (!p) p = fresh(n);
    return {p, new Block{p, n}, &BlockPool::release, cpu};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // Give every cached block back to the system; returns the bytes freed (fastvq.empty_cache()).
  size_t clear() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(cached_);
      bytes_ = 0;
    }
    size_t freed = 0;
    for (const Block& b : blocks) {
      freed += b.n;
      std::free(b.p);
    }
    return freed;
  }
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  struct Block {
    void* p;
    size_t n;
  };
  std::mutex mu_;
  std::vector<Block> cached_;  // oldest first
  size_t bytes_ = 0;

  static void* fresh(size_t n) {
    constexpr size_t kHuge = size_t{2} << 20;
    void* p = nullptr;
    if (posix_memalign(&p, n >= 2 * kHuge ? kHuge : 64, n) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= 2 * kHuge) madvise(p, n / kHuge * kHuge, MADV_HUGEPAGE);  // advice only
#endif
    return p;
  }
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = cached_.size(); i-- > 0;)
      if (cached_[i].n == n) {
        void* p = cached_[i].p;
        cached_.erase(cached_.begin() + i);
        bytes_ -= n;
        return p;
      }
    return nullptr;
  }
  static void release(void* ctx) {
    const Block b = *static_cast<Block*>(ctx);
    delete static_cast<Block*>(ctx);
    if (b.n < kMinCached || b.n > kPoolBytes) return std::free(b.p);
    BlockPool& pool = self();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(pool.mu_);
      pool.cached_.push_back(b);
      pool.bytes_ += b.n;
      while (pool.cached_.size() > kPoolBlocks || pool.bytes_ > kPoolBytes) {
        evicted.push_back(pool.cached_.front().p);
        pool.bytes_ -= pool.cached_.front().n;
        pool.cached_.erase(pool.cached_.begin());
      }
    }
    for (void* p : evicted) std::free(p);
  }
};

// Never destroyed: tensors may outlive static destruction at exit and still return their blocks.
BlockPool& BlockPool::self() {
  static BlockPool* pool = new BlockPool();
  return *pool;
}

// An uninitialised contiguous fp32 CPU tensor from the block cache.
at::Tensor empty_big(at::IntArrayRef sizes) {
  return at::detail::empty_generic(sizes, &BlockPool::self(), c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   std::nullopt);
}

// One key-block panel: dst[d][j] = rows[j][d] for j < kn, zero for kn <= j < BLK.
inline void pack_panel(float* dst, const float* rows, int64_t kn, int64_t Dp) {
  if (kn < BLK) std::fill(dst, dst + Dp * BLK, 0.f);
  for (int64_t j = 0; j < kn; ++j)
    for (int64_t d = 0; d < Dp; ++d) dst[d * BLK + j] = rows[j * Dp + d];
}

// Back to the caller's dtype and head_dim (a view-free no-op for fp32 without padding).
at::Tensor finish(const at::Tensor& rows, int64_t D, at::ScalarType dtype) {
  if (rows.size(3) == D && dtype == at::kFloat) return rows;
  return rows.narrow(3, 0, D).to(dtype).contiguous();
}

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, heads, seq, head_dim), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": tensors must be on the CPU");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k, v must share one dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(), " must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": k/v ", k.sizes(), " must match q ", q.sizes(), " in batch and head_dim, with q's heads a multiple of theirs");
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
        // in-run query block writes it (a fresh 32 MiB memset per call cost as much as the faults).
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
  parallel_ranges(B * Hk * runs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(BLK * BLK), dP(BLK * BLK), dK(BLK * Dp), dV(BLK * Dp), kt(Dp * BLK), vt(Dp * BLK);
    std::vector<int32_t> kpos(BLK);
    for (int64_t t = t0; t < t1; ++t)
      backward_run(a, t / runs, t % runs, S.data(), dP.data(), dK.data(), dV.data(), kpos.data(), kt.data(), vt.data());
  });
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

// ----------------------------------------------------------------------------- decode

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
      for (int64_t d = 0; d < D; ++d) {
        kt[d * BLK + j] = static_cast<float>(kr[d * ks3]);
        vrows[j * Dp + d] = static_cast<float>(vr[d * vs3]);
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
// shuffles (fold_lanes) leaves in one vector; then exp2 over the scores and a pass over the values.
constexpr int64_t kDirectMaxD = 128;

// fold<h>(a, b): lanes l without bit h get a[l] + a[l + h], lanes with it b[l - h] + b[l].
template <int h, int... l>
constexpr vi fold_low(std::integer_sequence<int, l...>) { return vi{((l & h) ? VL + l - h : l)...}; }
template <int h, int... l>
constexpr vi fold_high(std::integer_sequence<int, l...>) { return vi{((l & h) ? VL + l : l + h)...}; }
template <int h>
inline vf fold(vf a, vf b) {
  constexpr vi lo = fold_low<h>(std::make_integer_sequence<int, VL>());
  constexpr vi hi = fold_high<h>(std::make_integer_sequence<int, VL>());
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}
// VL vectors folded pairwise at h = VL/2, ..., 1: lane lane_of(i) of the result is the sum of v[i].
template <int count, int h>
inline vf fold_lanes(vf* v) {
#pragma GCC unroll 16
  for (int j = 0; j < count / 2; ++j) v[j] = fold<h>(v[2 * j], v[2 * j + 1]);
  if constexpr (h > 1) {
    return fold_lanes<count / 2, h / 2>(v);
  } else {
    return v[0];
  }
}
constexpr int lane_of(int i) {  // bit b of i selects lane bit VL/2 >> b
  int lane = 0;
  for (int b = 0; (VL / 2 >> b) > 0; ++b)
    if ((i >> b) & 1) lane |= VL / 2 >> b;
  return lane;
}

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
    vf sv = fold_lanes<VL, VL / 2>(acc) * c;
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
    const vf p = exp2v(load(s + j0) - m);  // masked lanes: exactly 0
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

int64_t window_attention_empty_cache() { return static_cast<int64_t>(BlockPool::self().clear()); }
int64_t window_attention_cached_bytes() { return static_cast<int64_t>(BlockPool::self().cached_bytes()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  // no tensor arguments, so no dispatch key: registered with their (catch-all) kernels here
  m.def("window_attention_empty_cache() -> int", &window_attention_empty_cache);
  m.def("window_attention_cached_bytes() -> int", &window_attention_cached_bytes);
  m.def("sliding_window_attention_fwd(Tensor q, Tensor k, Tensor v, int window, float scale) -> (Tensor, Tensor)");
  m.def("sliding_window_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int window, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("sliding_window_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int window, float scale) -> Tensor");
  m.def("sliding_window_decode_qkv(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, int window, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("sliding_window_attention_fwd", &sliding_window_attention_fwd);
  m.impl("sliding_window_attention_bwd", &sliding_window_attention_bwd);
  m.impl("sliding_window_decode", &sliding_window_decode);
  m.impl("sliding_window_decode_qkv", &sliding_window_decode_qkv);
}
