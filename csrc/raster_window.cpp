// Raster-order 2-D window attention on CPU: training forward and backward, and the decode of a
// wavefront of new grid tokens against a ring of image rows.
//
// The rule (fastvq/ops/raster_window.py): after a prefix of P tokens, grid token t is (i, j) =
// divmod(t - P, W); it sees the prefix, rows i - rows .. i - 1 at columns j - left .. j + right, and
// its own row at columns j - left .. j. Prefix tokens are causal among themselves.
//
// Blocks and spans. Queries are cut into blocks of QB consecutive positions: the prefix from 0,
// the grid from P (so on a grid whose width is a multiple or a divisor of QB a block holds whole
// rows or part of one). At row offset d a block's keys lie in one flat interval,
// [first - d W - left, last - d W + right] (own row, d = 0: up to the query itself), clipped to
// the rows its queries can see at that offset; with the prefix that is rows + 2 spans, each at
// most QB + left + right long, so the work is O(T (rows (left + right + 1) + left + 1)) and no
// key outside every query's reach is read. Inside a span query x (position q0 + x) sees key c
// (position k0 + c) only if c - x lies in the span's band [q0 - k0 - d W - left, q0 - k0 - d W +
// right]: the GEMMs compute only the vectors (and sum only over the rows) that band reaches
// (gemm_band of window_attention.h), and the exact rule, restricted to row offset d, decides per
// (query, key) inside it. Spans of neighbouring offsets overlap when the width is small; each
// (query, key) pair belongs to exactly one offset, so each is counted once.
//
// Orientation: keys are the rows of the score tiles and queries their SIMD lanes (S^T = K Q^T).
// Key and value rows are then read where they lie, whatever a span's alignment (no per-span
// packing); only the block's queries (and output gradients) are transposed into a panel, once per
// block. The online softmax keeps its running max and sum per query lane, in vectors.
//
// The forward saves lse = ln-sum-exp. The backward recomputes P from it, per (batch, kv head, run
// of query blocks), looping over the GQA group: dQ of a block is summed in L1 over its spans and
// written once; dK and dV rows at or after the run's first query are written directly (only this
// run reaches them), earlier ones (the prefix and the band of rows just above the run) go to a
// per-run overflow buffer added afterwards.
//
// The decode reads each new query's visible ring slots where they lie: rows + 1 runs of at most
// left + right + 1 slots and the prefix, VL keys at a time (one accumulator per key, folded).
// ATen and the op registry only: torch/extension.h (all of libtorch's C++ API and pybind11)
// costs about 30 s of parsing per file and variant; these two about 10 s.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "block_pool.h"
#include "window_attention.h"

FASTVQ_ISA_BEGIN

namespace {

using fastvq::empty_big;

constexpr int64_t QB = 128;     // queries per block
static_assert(QB % VL == 0, "blocks hold whole vectors");
inline int64_t qblocks(int64_t t) { return (t + QB - 1) / QB; }
constexpr int NQV = QB / VL;    // query vectors per block
constexpr int64_t KT = 2 * QB;  // keys per tile at most (a span longer than that is split evenly)
constexpr int32_t kNoRow = std::numeric_limits<int32_t>::min() / 2;  // grid row of a prefix or padding lane
constexpr int64_t kWide = int64_t{1} << 40;                          // a band reaching every pair

// f(task, scratch) for tasks [0, n) in one parallel region (none below about two grains of work),
// handed out to whichever thread asks next in runs of consecutive tasks that shrink as the work
// runs out (a share of what is left, at least min_run): a thread slowed by other work on its core
// takes fewer tasks, where equal static shares would have every thread wait for it, while the
// long first runs keep each thread on its own heads (its own keys in its own L2).
// make_scratch() runs once per thread.
template <typename MakeScratch, typename F>
void parallel_tasks(int64_t n, int64_t grain, int64_t min_run, const MakeScratch& make_scratch, const F& f) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / grain));
  std::atomic<int64_t> next{0};
  parallel_ranges(threads, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    int64_t t0 = next.load(std::memory_order_relaxed), len = 0;
    for (;;) {
      do {
        if (t0 >= n) return;
        len = std::max(min_run, (n - t0) / (2 * threads));
      } while (!next.compare_exchange_weak(t0, t0 + len, std::memory_order_relaxed));
      for (int64_t t = t0; t < std::min(n, t0 + len); ++t) f(t, scratch);
      t0 = next.load(std::memory_order_relaxed);
    }
  }, n / grain);
}

// ----------------------------------------------------------------------------- geometry

struct Geom {
  int64_t T, P, W, rows, left, right;
};

// The window clipped to the grid (a wider window means the same), which also keeps every position
// computation small.
Geom make_geom(const char* op, int64_t T, int64_t width, int64_t rows, int64_t left, int64_t right,
               int64_t n_prefix) {
  TORCH_CHECK(width >= 1 && rows >= 0 && left >= 0 && right >= 0, op,
              ": needs width >= 1 and rows, left, right >= 0, got width ", width, ", rows ", rows, ", left ", left,
              ", right ", right);
  TORCH_CHECK(n_prefix >= 0 && n_prefix <= T, op, ": n_prefix must be in [0, T = ", T, "], got ", n_prefix);
  TORCH_CHECK(T < (int64_t{1} << 30), op, ": sequences of 2^30 positions or more are not supported, got ", T);
  const int64_t grid_rows = (T - n_prefix + width - 1) / width;
  return {T, n_prefix, width, std::min(rows, std::max<int64_t>(grid_rows - 1, 0)), std::min(left, width - 1),
          std::min(right, width - 1)};
}

int64_t query_blocks(const Geom& g) { return qblocks(g.P) + qblocks(g.T - g.P); }

// Positions [first, second) of query block b: the prefix's blocks first, then the grid's from P.
std::pair<int64_t, int64_t> block_range(const Geom& g, int64_t b) {
  const int64_t pb = qblocks(g.P);
  if (b < pb) return {b * QB, std::min(g.P, (b + 1) * QB)};
  const int64_t s = g.P + (b - pb) * QB;
  return {s, std::min(g.T, s + QB)};
}

// f(k0, kn, d) for every key tile of the queries [q0, q1): the prefix (d = -1), then row offsets
// d = rows .. 0, each span clipped to the rows its queries see at that offset.
template <typename F>
void for_each_key_tile(const Geom& g, int64_t q0, int64_t q1, const F& f) {
  auto tiles = [&](int64_t lo, int64_t hi, int64_t d) {
    const int64_t n = hi - lo;
    if (n <= 0) return;
    const int64_t len = (n + (n + KT - 1) / KT - 1) / ((n + KT - 1) / KT);
    for (int64_t k0 = lo; k0 < hi; k0 += len) f(k0, std::min(len, hi - k0), d);
  };
  if (g.P > 0) tiles(0, std::min(g.P, q1), -1);
  if (q1 <= g.P) return;
  const int64_t gf = std::max(q0, g.P) - g.P, gl = q1 - 1 - g.P, i_first = gf / g.W, i_last = gl / g.W;
  for (int64_t d = std::min(g.rows, i_last); d >= 0; --d) {
    const int64_t reach = d > 0 ? g.right : 0;
    const int64_t lo = std::max(gf - d * g.W - g.left, std::max<int64_t>(i_first - d, 0) * g.W);
    const int64_t hi = std::min(gl - d * g.W + reach + 1, (i_last - d + 1) * g.W);
    tiles(g.P + lo, g.P + hi, d);
  }
}

// Query row x of a block at q0 meets tile columns [x + lo, x + hi) of the tile at k0, offset d.
Band tile_key_band(const Geom& g, int64_t q0, int64_t k0, int64_t d) {
  if (d < 0) return {-kWide, kWide};
  const int64_t shift = q0 - k0 - d * g.W;
  return {shift - g.left, shift + (d > 0 ? g.right : 0) + 1};
}

// The same band seen from key row c: query lanes [c + lo, c + hi).
Band transposed(Band b) { return {1 - b.hi, 1 - b.lo}; }

// For query vector v (lanes [v VL, v VL + VL)), the key rows of a tile whose band (key row c meets
// lanes [c + lo, c + hi)) reaches it, [b0, b1), and the rows the band-restricted GEMMs over P or
// dS may read it from, [z0, z1): they take MR rows at a time, so a row group reaches MR - 1 lanes
// past each member's band. The softmax passes run down each vector's rows (their running max and
// sum stay in registers), leave exact zeros in rows [z0, b0) and [b1, z1) and touch no others.
struct BandRows {
  int64_t z0, b0, b1, z1;
};
inline BandRows band_rows(int v, Band qb, int64_t kn) {
  const int64_t first = v * VL, end = first + VL;
  auto clip = [&](int64_t r) { return std::clamp<int64_t>(r, 0, kn); };
  const int64_t b0 = clip(first - qb.hi + 1), b1 = std::max(b0, clip(end - qb.lo));
  const int64_t z0 = std::min(b0, clip(first - qb.hi + 1 - (MR - 1))), z1 = std::max(b1, clip(end - qb.lo + MR - 1));
  return {z0, b0, b1, z1};
}

// The block's queries, one lane each: position, grid row (kNoRow for prefix and padding lanes)
// and column. Padding lanes (x >= m) have position -1: they see nothing.
struct QueryLanes {
  vi pos[NQV], row[NQV], col[NQV];
};

void query_lanes(const Geom& g, int64_t q0, int64_t m, QueryLanes& ql) {
  for (int v = 0; v < NQV; ++v)
    for (int l = 0; l < VL; ++l) {
      const int64_t x = v * VL + l, p = q0 + x;
      const bool grid = x < m && p >= g.P;
      ql.pos[v][l] = x < m ? static_cast<int32_t>(p) : -1;
      ql.row[v][l] = grid ? static_cast<int32_t>((p - g.P) / g.W) : kNoRow;
      ql.col[v][l] = grid ? static_cast<int32_t>((p - g.P) % g.W) : 0;
    }
}

// Which query lanes see one key of a tile at offset d: a grid key (row ki, column kj) is seen from
// row ki + d by columns kj - right' .. kj + left; a prefix key by every query at or after it.
struct KeyWalk {
  int32_t pos, row, col;  // the key; row/col step along the tile
  int32_t d, left, right, W;
  void next() {
    ++pos;
    if (++col == W) col = 0, ++row;
  }
  template <bool PREFIX>
  vi sees(const QueryLanes& ql, int v) const {
    if (PREFIX) return ql.pos[v] >= pos;
    return (ql.row[v] == row + d) & (ql.col[v] >= col - right) & (ql.col[v] <= col + left);
  }
};

KeyWalk key_walk(const Geom& g, int64_t k0, int64_t d) {
  const int64_t gk = std::max<int64_t>(k0 - g.P, 0);
  return {static_cast<int32_t>(k0), static_cast<int32_t>(gk / g.W), static_cast<int32_t>(gk % g.W),
          static_cast<int32_t>(d), static_cast<int32_t>(g.left), static_cast<int32_t>(d > 0 ? g.right : 0),
          static_cast<int32_t>(g.W)};
}

// dst[d][x] = rows[x][d] for x < m, zero for m <= x < nq (rows read in order: they come from
// memory, the panel stays in L1).
void pack_queries(float* dst, const float* rows, int64_t m, int64_t nq, int64_t Dp) {
  for (int64_t x = 0; x < m; ++x)
    for (int64_t d = 0; d < Dp; ++d) dst[d * QB + x] = rows[x * Dp + d];
  for (int64_t d = 0; m < nq && d < Dp; ++d) std::fill(dst + d * QB + m, dst + d * QB + nq, 0.f);
}

// S^T[c][x] = k_c . q_x for the tile's keys, the band's vectors only.
inline void scores_t(float* ST, const float* keys, const float* QT, int64_t kn, int64_t nq, int64_t Dp, Band qb) {
  gemm_band<false, false>(ST, QB, keys, Dp, 1, QT, QB, kn, nq, Dp, qb);
}

// Rows [lo, hi) of each tensor into cache ahead of use: a block asks for the next block's rows
// that are not in cache yet, its queries' rows (and output rows) and, in raster order, its own
// grid row of keys, [q0 - left, q1 + right) (the rows above came with the blocks before it).
inline void prefetch_rows(int64_t lo, int64_t hi, int64_t Dp, std::initializer_list<const float*> bases) {
  for (const float* base : bases)
    for (int64_t row = lo; row < hi; ++row)
      for (int64_t d = 0; d < Dp; d += 64 / sizeof(float)) __builtin_prefetch(base + row * Dp + d);
}

inline std::pair<int64_t, int64_t> own_row_keys(const Geom& g, std::pair<int64_t, int64_t> block) {
  return {std::max(g.P, block.first - g.left), std::min(g.T, block.second + g.right)};
}

// ----------------------------------------------------------------------------- forward

// One online-softmax step over a tile (keys as rows, queries in lanes): turns the band's scores
// into probabilities relative to the updated max (0 where a query does not see a key), updates
// (m, l) (base 2) and leaves in alpha the factor each query's output must be scaled by.
template <bool PREFIX>
void softmax_tile(float* ST, int64_t kn, int nqv, Band qb, const Geom& g, int64_t k0, int64_t d,
                  const QueryLanes& ql, float c, vf* mrow, vf* lrow, vf* alpha) {
  for (int v = 0; v < nqv; ++v) {
    const BandRows br = band_rows(v, qb, kn);
    float* s = ST + v * VL;
    vf mx = splat(kNegInf);
    KeyWalk kw = key_walk(g, k0 + br.b0, d);
    for (int64_t r = br.b0; r < br.b1; ++r, kw.next()) {
      const vf x = kw.sees<PREFIX>(ql, v) ? load(s + r * QB) * c : splat(kNegInf);
      store(s + r * QB, x);
      mx = vmax(mx, x);
    }
    const vf mn = vmax(mrow[v], mx);
    const vf msub = mn == splat(kNegInf) ? vf{} : mn;  // no key seen yet: p = 0, nothing to rescale
    alpha[v] = vexp2(mrow[v] - msub);
    mrow[v] = mn;
    vf sum{};
    for (int64_t r = br.z0; r < br.b0; ++r) store(s + r * QB, vf{});
    for (int64_t r = br.b0; r < br.b1; ++r) {
      const vf p = vexp2(load(s + r * QB) - msub);
      store(s + r * QB, p);
      sum += p;
    }
    for (int64_t r = br.b1; r < br.z1; ++r) store(s + r * QB, vf{});
    lrow[v] = lrow[v] * alpha[v] + sum;
  }
}

struct Forward {
  const float *q, *k, *v;  // rows (B*H or B*Hk, T, Dp)
  float *out, *lse;        // rows (B*H, T, Dp), (B*H, T)
  int64_t H, group, Dp;
  Geom g;
  float scale;
};

struct Scratch {
  std::vector<float> ST, dPT, QT, dOT, O;
  explicit Scratch(int64_t Dp, bool backward)
      : ST(KT * QB), dPT(backward ? KT * QB : 0), QT(Dp * QB), dOT(backward ? Dp * QB : 0), O(QB * Dp) {}
};

void forward_block(const Forward& a, int64_t bh, int64_t qb, int64_t next_bh, int64_t next_qb, Scratch& s) {
  const Geom& g = a.g;
  const auto range = block_range(g, qb);
  const int64_t q0 = range.first, q1 = range.second, m = q1 - q0, Dp = a.Dp;
  const int nqv = static_cast<int>((m + VL - 1) / VL);
  const int64_t nq = nqv * VL;
  const int64_t bkv = (bh / a.H) * (a.H / a.group) + (bh % a.H) / a.group;
  const float* krows = a.k + bkv * g.T * Dp;
  const float* vrows = a.v + bkv * g.T * Dp;
  const float c = a.scale * kLog2e;
  if (next_bh >= 0) {
    const auto nb = block_range(g, next_qb);
    const auto keys = own_row_keys(g, nb);
    const int64_t nkv = (next_bh / a.H) * (a.H / a.group) + (next_bh % a.H) / a.group;
    prefetch_rows(keys.first, keys.second, Dp, {a.k + nkv * g.T * Dp, a.v + nkv * g.T * Dp});
    prefetch_rows(nb.first, nb.second, Dp, {a.q + next_bh * g.T * Dp, a.out + next_bh * g.T * Dp});
  }
  pack_queries(s.QT.data(), a.q + (bh * g.T + q0) * Dp, m, nq, Dp);
  QueryLanes ql;
  query_lanes(g, q0, m, ql);
  vf mrow[NQV], lrow[NQV], alpha[NQV];
  for (int v = 0; v < NQV; ++v) mrow[v] = splat(kNegInf), lrow[v] = vf{};
  float* O = s.O.data();
  std::fill(O, O + m * Dp, 0.f);
  for_each_key_tile(g, q0, q1, [&](int64_t k0, int64_t kn, int64_t d) {
    const Band kb = tile_key_band(g, q0, k0, d), qbt = transposed(kb);
    scores_t(s.ST.data(), krows + k0 * Dp, s.QT.data(), kn, nq, Dp, qbt);
    if (d < 0)
      softmax_tile<true>(s.ST.data(), kn, nqv, qbt, g, k0, d, ql, c, mrow, lrow, alpha);
    else
      softmax_tile<false>(s.ST.data(), kn, nqv, qbt, g, k0, d, ql, c, mrow, lrow, alpha);
    for (int64_t x = 0; x < m; ++x) {
      const float f = alpha[x / VL][x % VL];
      if (f != 1.f) scale_row(O + x * Dp, Dp, f);
    }
    gemm_band<true, true>(O, Dp, s.ST.data(), 1, QB, vrows + k0 * Dp, Dp, m, Dp, kn, kb);  // O += P V
  });
  float* out = a.out + (bh * g.T + q0) * Dp;
  for (int64_t x = 0; x < m; ++x) {
    const float l = lrow[x / VL][x % VL], inv = 1.f / l;
    for (int64_t d = 0; d < Dp; d += VL) store(out + x * Dp + d, load(O + x * Dp + d) * inv);
    a.lse[bh * g.T + q0 + x] = (mrow[x / VL][x % VL] + std::log2(l)) * kLn2;
  }
}

// Multiply-adds of one query block, roughly: two GEMMs over its spans' bands.
int64_t block_flops(const Geom& g, int64_t Dp) {
  return 4 * QB * Dp * ((g.rows + 1) * (g.left + g.right + 1 + 2 * VL) + std::min<int64_t>(g.P, QB));
}

std::tuple<at::Tensor, at::Tensor> raster_window_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, int64_t width, int64_t rows,
                                                                int64_t left, int64_t right, int64_t n_prefix,
                                                                double scale) {
  const char* op = "raster_window_attention_fwd (cpp)";
  check_attention_inputs(op, q, k, v);
  TORCH_CHECK(k.size(2) == q.size(2), op, ": q has ", q.size(2), " positions but k has ", k.size(2));
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), Dp = padded(D);
  const Geom g = make_geom(op, T, width, rows, left, right, n_prefix);
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {at::empty_like(q, at::MemoryFormat::Contiguous), lse};
  const auto qr = as_rows(q, Dp), kr = as_rows(k, Dp), vr = as_rows(v, Dp);
  auto out = empty_big({B, H, T, Dp});
  const Forward a{qr.data_ptr<float>(), kr.data_ptr<float>(), vr.data_ptr<float>(), out.data_ptr<float>(),
                  lse.data_ptr<float>(), H, H / Hk, Dp, g, static_cast<float>(scale)};
  const int64_t nqb = query_blocks(g);
  const int64_t tasks = B * H * nqb;
  parallel_tasks(tasks, grain_for(block_flops(g, Dp)), 1,
                 [&] { return Scratch(Dp, false); },
                 [&](int64_t t, Scratch& s) {
                   const bool last = t + 1 == tasks;
                   forward_block(a, t / nqb, t % nqb, last ? -1 : (t + 1) / nqb, (t + 1) % nqb, s);
                 });
  return {finish(out, D, q.scalar_type()), lse};
}

// ----------------------------------------------------------------------------- backward

// The tile's P (into ST) and dS = scale P (dP - delta) (into dPT), recomputed from lse; 0 wherever
// a query does not see a key.
template <bool PREFIX>
void grad_tile(float* ST, float* dPT, int64_t kn, int nqv, Band qb, const Geom& g, int64_t k0, int64_t d,
               const QueryLanes& ql, float c, const vf* lse2, const vf* delta, float scale) {
  for (int v = 0; v < nqv; ++v) {
    const BandRows br = band_rows(v, qb, kn);
    float* s = ST + v * VL;
    float* dp = dPT + v * VL;
    for (int64_t r = br.z0; r < br.b0; ++r) store(s + r * QB, vf{}), store(dp + r * QB, vf{});
    KeyWalk kw = key_walk(g, k0 + br.b0, d);
    for (int64_t r = br.b0; r < br.b1; ++r, kw.next()) {
      const vi ok = kw.sees<PREFIX>(ql, v);
      const vf p = vexp2(ok ? load(s + r * QB) * c - lse2[v] : splat(kNegInf));
      const vf ds = p * (load(dp + r * QB) - delta[v]) * scale;
      store(s + r * QB, p);
      store(dp + r * QB, ok ? ds : vf{});
    }
    for (int64_t r = br.b1; r < br.z1; ++r) store(s + r * QB, vf{}), store(dp + r * QB, vf{});
  }
}

struct Backward {
  const float *q, *k, *v, *go, *out, *lse;  // rows (B*H or B*Hk, T, Dp); (B*H, T)
  float *dq, *dk, *dv;                        // fp32 rows
  float* overflow;                            // per (kv head, run): dK then dV rows, ov_rows each
  int64_t H, group, Dp, run, runs, reach, ov_rows;
  Geom g;
  float scale;
};

// Keys a run's queries reach before its first query a_r: the prefix, then [a_r - reach, a_r).
inline int64_t overflow_row(const Geom& g, int64_t key, int64_t a_r, int64_t reach) {
  return key < g.P ? key : g.P + key - (a_r - reach);
}

void backward_run(const Backward& a, int64_t bkv, int64_t run, Scratch& s) {
  const Geom& g = a.g;
  const int64_t Dp = a.Dp, Hk = a.H / a.group, b = bkv / Hk, hk = bkv % Hk;
  const int64_t qb0 = run * a.run, qb1 = std::min(query_blocks(g), qb0 + a.run);
  const int64_t a_r = block_range(g, qb0).first, b_r = block_range(g, qb1 - 1).second;
  const float* krows = a.k + bkv * g.T * Dp;
  const float* vrows = a.v + bkv * g.T * Dp;
  float* dk = a.dk + bkv * g.T * Dp;
  float* dv = a.dv + bkv * g.T * Dp;
  float* ovk = a.overflow + (bkv * a.runs + run) * 2 * a.ov_rows * Dp;
  float* ovv = ovk + a.ov_rows * Dp;
  // This run alone writes keys [a_r, b_r) directly; each row is zeroed where it is first reached
  // (every key is, by its own query), while it comes into cache anyway.
  std::vector<uint8_t> reached(b_r - a_r, 0);
  if (a_r > 0) std::fill(ovk, ovk + 2 * a.ov_rows * Dp, 0.f);
  const float c = a.scale * kLog2e;
  for (int64_t gi = 0; gi < a.group; ++gi) {
    const int64_t bh = b * a.H + hk * a.group + gi;
    for (int64_t qb = qb0; qb < qb1; ++qb) {
      const auto range = block_range(g, qb);
      const int64_t q0 = range.first, q1 = range.second, m = q1 - q0;
      const int nqv = static_cast<int>((m + VL - 1) / VL);
      const int64_t nq = nqv * VL;
      const float* q = a.q + (bh * g.T + q0) * Dp;
      const float* go = a.go + (bh * g.T + q0) * Dp;
      const float* o = a.out + (bh * g.T + q0) * Dp;
      if (qb + 1 < qb1) {
        const auto nb = block_range(g, qb + 1);
        const auto keys = own_row_keys(g, nb);
        const int64_t row0 = bh * g.T;
        prefetch_rows(keys.first, keys.second, Dp, {krows, vrows, dk, dv});
        prefetch_rows(row0 + nb.first, row0 + nb.second, Dp, {a.q, a.go, a.out, a.dq});
      }
      pack_queries(s.QT.data(), q, m, nq, Dp);
      pack_queries(s.dOT.data(), go, m, nq, Dp);
      QueryLanes ql;
      query_lanes(g, q0, m, ql);
      vf lse2[NQV], delta[NQV];  // delta = rowsum(dO * O)
      for (int v = 0; v < nqv; ++v)
        for (int l = 0; l < VL; ++l) {
          const int64_t x = v * VL + l;
          vf acc{};
          for (int64_t d = 0; x < m && d < Dp; d += VL) acc += load(go + x * Dp + d) * load(o + x * Dp + d);
          lse2[v][l] = x < m ? a.lse[bh * g.T + q0 + x] * kLog2e : 0.f;
          delta[v][l] = hsum(acc);
        }
      float* dQ = s.O.data();
      std::fill(dQ, dQ + m * Dp, 0.f);
      for_each_key_tile(g, q0, q1, [&](int64_t k0, int64_t kn, int64_t d) {
        const Band kb = tile_key_band(g, q0, k0, d), qbt = transposed(kb);
        scores_t(s.ST.data(), krows + k0 * Dp, s.QT.data(), kn, nq, Dp, qbt);
        scores_t(s.dPT.data(), vrows + k0 * Dp, s.dOT.data(), kn, nq, Dp, qbt);  // dP^T = V dO^T
        if (d < 0)
          grad_tile<true>(s.ST.data(), s.dPT.data(), kn, nqv, qbt, g, k0, d, ql, c, lse2, delta, a.scale);
        else
          grad_tile<false>(s.ST.data(), s.dPT.data(), kn, nqv, qbt, g, k0, d, ql, c, lse2, delta, a.scale);
        // dV += P^T dO and dK += dS^T Q over the tile's keys: those before a_r into the overflow
        const int64_t split = std::clamp<int64_t>(a_r - k0, 0, kn);
        for (int64_t key = k0 + split; key < k0 + kn; ++key)
          if (!reached[key - a_r]) {
            reached[key - a_r] = 1;
            std::fill(dk + key * Dp, dk + (key + 1) * Dp, 0.f);
            std::fill(dv + key * Dp, dv + (key + 1) * Dp, 0.f);
          }
        for (const auto& [c0, c1] : {std::pair<int64_t, int64_t>{0, split}, {split, kn}}) {
          if (c1 <= c0) continue;
          const int64_t key = k0 + c0;
          const int64_t row = c0 < split ? overflow_row(g, key, a_r, a.reach) : key;
          float* dvr = (c0 < split ? ovv : dv) + row * Dp;
          float* dkr = (c0 < split ? ovk : dk) + row * Dp;
          const Band part{qbt.lo + c0, qbt.hi + c0};
          gemm_band<true, true>(dvr, Dp, s.ST.data() + c0 * QB, QB, 1, go, Dp, c1 - c0, Dp, m, part);
          gemm_band<true, true>(dkr, Dp, s.dPT.data() + c0 * QB, QB, 1, q, Dp, c1 - c0, Dp, m, part);
        }
        gemm_band<true, true>(dQ, Dp, s.dPT.data(), 1, QB, krows + k0 * Dp, Dp, m, Dp, kn, kb);  // dQ += dS K
      });
      std::memcpy(a.dq + (bh * g.T + q0) * Dp, dQ, m * Dp * sizeof(float));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> raster_window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t width, int64_t rows, int64_t left, int64_t right, int64_t n_prefix, double scale) {
  const char* op = "raster_window_attention_bwd (cpp)";
  check_attention_inputs(op, q, k, v);
  TORCH_CHECK(k.size(2) == q.size(2), op, ": q has ", q.size(2), " positions but k has ", k.size(2));
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2), op,
              ": lse must be (B, H, T) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3), Dp = padded(D);
  const Geom g = make_geom(op, T, width, rows, left, right, n_prefix);
  if (q.numel() == 0)
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  const int64_t group = H / Hk, nqb = query_blocks(g);
  const auto qr = as_rows(q, Dp), kr = as_rows(k, Dp), vr = as_rows(v, Dp), gr = as_rows(grad_out, Dp);
  const auto outr = as_rows(out, Dp);
  const auto lse32 = lse.to(at::kFloat).contiguous();
  // Runs of query blocks: about eight tasks a thread (small enough shares to even out a thread
  // slowed by other work), each run at least as long as the reach back (so its overflow rows lie
  // in the run before it: the overflow stays O(T * Dp)).
  const int64_t reach = g.rows * g.W + g.left;
  const int64_t tasks_wanted = 8 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t runs_wanted = std::max<int64_t>(1, (tasks_wanted + B * Hk - 1) / (B * Hk));
  const int64_t run = std::max<int64_t>({1, qblocks(reach) + 1, (nqb + runs_wanted - 1) / runs_wanted});
  const int64_t runs = (nqb + run - 1) / run, ov_rows = g.P + reach;
  auto dq = empty_big({B, H, T, Dp});
  auto dk = empty_big({B, Hk, T, Dp});
  auto dv = empty_big({B, Hk, T, Dp});
  auto overflow = at::empty({runs > 1 ? B * Hk * runs * 2 * ov_rows * Dp : 0}, qr.options());
  const Backward a{qr.data_ptr<float>(), kr.data_ptr<float>(), vr.data_ptr<float>(), gr.data_ptr<float>(),
                   outr.data_ptr<float>(), lse32.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                   dv.data_ptr<float>(), overflow.data_ptr<float>(), H, group, Dp, run, runs, reach, ov_rows, g,
                   static_cast<float>(scale)};
  parallel_tasks(B * Hk * runs, grain_for(3 * run * block_flops(g, Dp)), 1, [&] { return Scratch(Dp, true); },
                 [&](int64_t t, Scratch& s) { backward_run(a, t / runs, t % runs, s); });
  if (runs > 1)  // every run's prefix rows land on the same keys: the runs of one kv head in order
    parallel_ranges(B * Hk, grain_for(runs * ov_rows * Dp), [&](int64_t t0, int64_t t1) {
      for (int64_t bkv = t0; bkv < t1; ++bkv)
        for (int64_t r = 1; r < runs; ++r) {
          const int64_t a_r = block_range(g, r * run).first;
          const float* ovk = a.overflow + (bkv * runs + r) * 2 * ov_rows * Dp;
          const float* ovv = ovk + ov_rows * Dp;
          auto add = [&](int64_t k0, int64_t k1) {
            for (int64_t key = k0; key < k1; ++key) {
              const int64_t o = overflow_row(g, key, a_r, reach) * Dp, t = (bkv * T + key) * Dp;
              for (int64_t d = 0; d < Dp; d += VL) {
                store(a.dk + t + d, load(a.dk + t + d) + load(ovk + o + d));
                store(a.dv + t + d, load(a.dv + t + d) + load(ovv + o + d));
              }
            }
          };
          add(0, std::min(g.P, a_r));
          add(std::max(g.P, a_r - reach), a_r);
        }
    });
  return {finish(dq, D, q.scalar_type()), finish(dk, D, k.scalar_type()), finish(dv, D, v.scalar_type())};
}

// ----------------------------------------------------------------------------- decode

constexpr int kAccVectors = 8;  // head_dim vectors summed in registers at a time

// out[0..D) = softmax(c q . k_s) weighted sum of v_s over the L slots slot[0..L), for a head_dim D
// that is a multiple of VL (keys and values contiguous along it). s: scratch for L rounded up to VL.
template <typename T>
void decode_row(const float* q, const T* kbase, int64_t ks, const T* vbase, int64_t vs, int64_t D,
                const int32_t* slot, int64_t L, float c, float* s, float* out) {
  vf mx = splat(kNegInf);
  for (int64_t j0 = 0; j0 < L; j0 += VL) {
    // accumulator i takes key j0 + lane_of(i), so the folded lanes come out in key order; keys
    // past L repeat key j0 and are masked below
    const T* kp[VL];
#pragma GCC unroll 16
    for (int i = 0; i < VL; ++i) {
      const int64_t j = j0 + lane_of(i);
      kp[i] = kbase + slot[j < L ? j : j0] * ks;
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
  const vf inv = splat(1.f / hsum(sum));
  for (int64_t d0 = 0; d0 < D; d0 += kAccVectors * VL) {
    const int nv = static_cast<int>(std::min<int64_t>(kAccVectors, (D - d0) / VL));
    vf o[kAccVectors];
    for (int d = 0; d < nv; ++d) o[d] = vf{};
    for (int64_t j = 0; j < L; ++j) {
      const T* vr = vbase + slot[j] * vs + d0;
      const vf p = splat(s[j]);
      for (int d = 0; d < nv; ++d) o[d] += p * load(vr + d * VL);
    }
    for (int d = 0; d < nv; ++d) store(out + d0 + d * VL, o[d] * inv);
  }
}

// The ring slots query (i, j) reads: the prefix, then image rows i - rows .. i (those that exist),
// each a run of columns. Returns how many.
int64_t visible_slots(const Geom& g, int64_t ring_rows, int64_t i, int64_t j, int32_t* out) {
  int64_t n = 0;
  for (int64_t p = 0; p < g.P; ++p) out[n++] = static_cast<int32_t>(p);
  for (int64_t d = std::min(g.rows, i); d >= 0; --d) {
    const int64_t base = g.P + ((i - d) % ring_rows) * g.W;
    const int64_t hi = std::min(g.W - 1, j + (d > 0 ? g.right : 0));
    for (int64_t col = std::max<int64_t>(0, j - g.left); col <= hi; ++col) out[n++] = static_cast<int32_t>(base + col);
  }
  return n;
}

// The window of each of n new queries at (ri[t], ci[t]) as ring slots (visible_slots), max_keys
// apart in `slot`, count[t] of them; each position checked to lie on the grid first.
struct VisibleLists {
  int64_t max_keys;
  std::vector<int32_t> slot;
  std::vector<int64_t> count;
};

VisibleLists visible_lists(const char* op, const Geom& g, int64_t ring_rows, const int64_t* ri, const int64_t* ci,
                           int64_t n) {
  VisibleLists v;
  v.max_keys = g.P + (g.rows + 1) * std::min(g.W, g.left + g.right + 1);
  v.slot.resize(std::max<int64_t>(1, n * v.max_keys));
  v.count.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(ri[t] >= 0 && ci[t] >= 0 && ci[t] < g.W, op, ": query ", t, " is at (", ri[t], ", ", ci[t],
                "): rows must be >= 0 and columns in [0, width = ", g.W, ")");
    v.count[t] = visible_slots(g, ring_rows, ri[t], ci[t], v.slot.data() + t * v.max_keys);
  }
  return v;
}

at::Tensor raster_window_decode(const at::Tensor& q, const at::Tensor& k_ring, const at::Tensor& v_ring,
                                const at::Tensor& rows_idx, const at::Tensor& cols_idx, int64_t width, int64_t rows,
                                int64_t left, int64_t right, int64_t n_prefix, double scale) {
  const char* op = "raster_window_decode (cpp)";
  check_attention_inputs(op, q, k_ring, v_ring);
  const int64_t B = q.size(0), H = q.size(1), Hk = k_ring.size(1), n = q.size(2), D = q.size(3), Dp = padded(D);
  const int64_t slots = k_ring.size(2);
  TORCH_CHECK(width >= 1 && rows >= 0 && left >= 0 && right >= 0 && n_prefix >= 0, op,
              ": needs width >= 1 and rows, left, right, n_prefix >= 0");
  TORCH_CHECK(slots >= n_prefix && (slots - n_prefix) % width == 0 && (slots - n_prefix) / width > rows, op,
              ": the ring must hold n_prefix + ring_rows * width slots with ring_rows > rows = ", rows, ", got ", slots,
              " slots for n_prefix ", n_prefix, ", width ", width);
  const int64_t ring_rows = (slots - n_prefix) / width;
  for (const auto* idx : {&rows_idx, &cols_idx})
    TORCH_CHECK(idx->dim() == 1 && idx->size(0) == n && idx->device().is_cpu() && !idx->is_floating_point(), op,
                ": rows_idx and cols_idx must be 1-D integer CPU tensors of one index per query (", n, ")");
  const auto ri = rows_idx.to(at::kLong).contiguous(), ci = cols_idx.to(at::kLong).contiguous();
  const Geom g{slots, n_prefix, width, rows, std::min(left, width - 1), std::min(right, width - 1)};
  const VisibleLists lists = visible_lists(op, g, ring_rows, ri.data_ptr<int64_t>(), ci.data_ptr<int64_t>(), n);
  const int64_t max_keys = lists.max_keys;  // named, not structured bindings: lambdas capture them (C++17)
  const auto& slot = lists.slot;
  const auto& count = lists.count;
  if (q.numel() == 0) return at::empty_like(q, at::MemoryFormat::Contiguous);
  const auto qr = as_rows(q, Dp);
  auto out = at::empty({B, H, n, Dp}, qr.options());
  const int64_t group = H / Hk, scores = (max_keys + VL - 1) / VL * VL;
  const float c = static_cast<float>(scale) * kLog2e;
  // Direct reads need head_dim contiguous and whole vectors; anything else gathers a row's visible
  // keys and values into fp32 rows first.
  const bool direct = k_ring.stride(3) == 1 && v_ring.stride(3) == 1 && D % VL == 0;
  auto run = [&](auto zero) {
    using E = decltype(zero);
    const E* kdata = static_cast<const E*>(k_ring.data_ptr());
    const E* vdata = static_cast<const E*>(v_ring.data_ptr());
    parallel_ranges(B * H * n, grain_for(4 * max_keys * Dp), [&](int64_t r0, int64_t r1) {
      std::vector<float> s(scores), kg(direct ? 0 : max_keys * Dp), vg(direct ? 0 : max_keys * Dp);
      std::vector<int32_t> iota(direct ? 0 : max_keys);
      for (size_t j = 0; j < iota.size(); ++j) iota[j] = static_cast<int32_t>(j);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % n, h = (r / n) % H, b = r / (n * H), hk = h / group;
        const E* kb = kdata + b * k_ring.stride(0) + hk * k_ring.stride(1);
        const E* vb = vdata + b * v_ring.stride(0) + hk * v_ring.stride(1);
        const float* qrow = qr.data_ptr<float>() + r * Dp;
        float* orow = out.data_ptr<float>() + r * Dp;
        const int32_t* sl = slot.data() + t * max_keys;
        if (direct) {
          decode_row<E>(qrow, kb, k_ring.stride(2), vb, v_ring.stride(2), D, sl, count[t], c, s.data(), orow);
          continue;
        }
        for (int64_t j = 0; j < count[t]; ++j)
          for (int64_t d = 0; d < Dp; ++d) {
            kg[j * Dp + d] = d < D ? static_cast<float>(kb[sl[j] * k_ring.stride(2) + d * k_ring.stride(3)]) : 0.f;
            vg[j * Dp + d] = d < D ? static_cast<float>(vb[sl[j] * v_ring.stride(2) + d * v_ring.stride(3)]) : 0.f;
          }
        decode_row<float>(qrow, kg.data(), Dp, vg.data(), Dp, Dp, iota.data(), count[t], c, s.data(), orow);
      }
    });
  };
  switch (k_ring.scalar_type()) {  // check_attention_inputs allows these three
    case at::kHalf: run(c10::Half{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(float{});
  }
  return finish(out, D, q.scalar_type());
}

// A decoding model's whole attention step on the stacked q/k/v product of its n new tokens,
// qkv (B, n, H + 2 Hk, D) (query heads, then key heads, then value heads): the queries and keys
// turned by the axial rope tables cos/sin (n, 2, D / 4) ([token, row or column half, frequency];
// empty: no rope), the keys and values written IN PLACE into their ring slots, then every query
// attends as raster_window_decode; returns (B, n, H * D), the layout the output projection takes.
// One call in place of the head split, the rope's elementwise ops, two index_copy_ and the decode
// op (a small model's step is bound by their per-call overhead). fp32, contiguous rings, head_dim a
// multiple of 16 (every ISA's vector length) only; fastvq/ops/raster_window.py composes the rest.
at::Tensor raster_window_decode_qkv(const at::Tensor& qkv, at::Tensor& k_ring, at::Tensor& v_ring,
                                    const at::Tensor& rows_idx, const at::Tensor& cols_idx, const at::Tensor& cos,
                                    const at::Tensor& sin, int64_t width, int64_t rows, int64_t left, int64_t right,
                                    int64_t n_prefix, double scale) {
  const char* op = "raster_window_decode_qkv (cpp)";
  TORCH_CHECK(qkv.dim() == 4 && k_ring.dim() == 4 && k_ring.sizes() == v_ring.sizes(), op,
              ": qkv must be (B, n, H + 2 H_kv, D) and the rings (B, H_kv, S, D) alike, got ", qkv.sizes(), ", ",
              k_ring.sizes(), " and ", v_ring.sizes());
  const int64_t B = qkv.size(0), n = qkv.size(1), D = qkv.size(3), Hk = k_ring.size(1), H = qkv.size(2) - 2 * Hk;
  const int64_t slots = k_ring.size(2);
  TORCH_CHECK(Hk >= 1 && H >= Hk && H % Hk == 0 && k_ring.size(0) == B && k_ring.size(3) == D, op,
              ": qkv's heads must be H query heads (a multiple of H_kv = ", Hk, ") and 2 H_kv, got ", qkv.sizes(),
              " for rings ", k_ring.sizes());
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && k_ring.scalar_type() == at::kFloat &&
                  v_ring.scalar_type() == at::kFloat && k_ring.is_contiguous() && v_ring.is_contiguous() &&
                  D % 16 == 0, op, ": needs fp32 CPU tensors, contiguous rings and head_dim a multiple of 16");
  TORCH_CHECK(width >= 1 && rows >= 0 && left >= 0 && right >= 0 && n_prefix >= 0 && slots >= n_prefix &&
                  (slots - n_prefix) % width == 0 && (slots - n_prefix) / width > rows, op,
              ": the ring must hold n_prefix + ring_rows * width slots with ring_rows > rows");
  const bool rope = cos.numel() > 0;
  TORCH_CHECK(!rope || (D % 4 == 0 && cos.sizes() == at::IntArrayRef({n, 2, D / 4}) && sin.sizes() == cos.sizes() &&
                        cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat),
              op, ": the rope tables must be fp32 (n, 2, D / 4) or empty");
  const int64_t ring_rows = (slots - n_prefix) / width;
  for (const auto* idx : {&rows_idx, &cols_idx})
    TORCH_CHECK(idx->dim() == 1 && idx->size(0) == n && idx->device().is_cpu() && !idx->is_floating_point() &&
                    !idx->is_complex() && idx->scalar_type() != at::kBool, op,
                ": rows_idx and cols_idx must be 1-D integer CPU tensors of one index per new token (", n, ")");
  const auto ri = rows_idx.to(at::kLong).contiguous(), ci = cols_idx.to(at::kLong).contiguous();
  const int64_t* rp = ri.data_ptr<int64_t>();
  const int64_t* cp = ci.data_ptr<int64_t>();
  const Geom g{slots, n_prefix, width, rows, std::min(left, width - 1), std::min(right, width - 1)};
  // the positions checked (and the windows listed) before any ring write
  const VisibleLists lists = visible_lists(op, g, ring_rows, rp, cp, n);
  const int64_t max_keys = lists.max_keys;
  const auto& slot = lists.slot;
  const auto& count = lists.count;
  const auto x = qkv.contiguous();
  const auto cs = rope ? cos.contiguous() : cos, sn = rope ? sin.contiguous() : sin;
  const float* src = x.data_ptr<float>();
  const int64_t token = (H + 2 * Hk) * D, quarter = D / 4;
  // out[0..D) = the head row turned by token t's tables: pairs (a, b) = (x[f], x[f + D/4]) of each
  // half become (a cos - b sin, a sin + b cos), as fastvq.ops.rope.apply_axial_rope
  auto turn = [&](const float* in, int64_t t, float* out) {
    if (!rope) {
      std::memcpy(out, in, D * sizeof(float));
      return;
    }
    for (int64_t half = 0; half < 2; ++half) {
      const float* c = cs.data_ptr<float>() + (t * 2 + half) * quarter;
      const float* s = sn.data_ptr<float>() + (t * 2 + half) * quarter;
      const float* a = in + half * 2 * quarter;
      float* o = out + half * 2 * quarter;
      for (int64_t f = 0; f < quarter; ++f) {
        const float ca = a[f] * c[f], sb = a[f + quarter] * s[f], sa = a[f] * s[f], cb = a[f + quarter] * c[f];
        o[f] = ca - sb;
        o[f + quarter] = sa + cb;
      }
    }
  };
  float* kdata = k_ring.data_ptr<float>();
  float* vdata = v_ring.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)  // every key and value first: a query sees its own key
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = n_prefix + (rp[t] % ring_rows) * width + cp[t];
      for (int64_t h = 0; h < Hk; ++h) {
        const float* kv = src + (b * n + t) * token + (H + h) * D;
        turn(kv, t, kdata + b * k_ring.stride(0) + h * k_ring.stride(1) + slot * D);
        std::memcpy(vdata + b * v_ring.stride(0) + h * v_ring.stride(1) + slot * D, kv + Hk * D, D * sizeof(float));
      }
    }
  auto out = at::empty({B, n, H * D}, x.options());
  const int64_t group = H / Hk, scores = (max_keys + VL - 1) / VL * VL;
  const float c = static_cast<float>(scale) * kLog2e;
  parallel_ranges(B * H * n, grain_for(4 * max_keys * D), [&](int64_t r0, int64_t r1) {
    std::vector<float> s(scores), q(D);
    for (int64_t r = r0; r < r1; ++r) {  // r = (b, t, h): the output's own order
      const int64_t h = r % H, t = (r / H) % n, b = r / (H * n), hk = h / group;
      turn(src + (b * n + t) * token + h * D, t, q.data());
      decode_row<float>(q.data(), kdata + b * k_ring.stride(0) + hk * k_ring.stride(1), D,
                        vdata + b * v_ring.stride(0) + hk * v_ring.stride(1), D, D, slot.data() + t * max_keys,
                        count[t], c, s.data(), out.data_ptr<float>() + r * D);
    }
  });
  return out;
}

}  // namespace

FASTVQ_ISA_END

FASTVQ_KERNEL(raster_window_attention_fwd)
FASTVQ_KERNEL(raster_window_attention_bwd)
FASTVQ_KERNEL(raster_window_decode)
FASTVQ_KERNEL(raster_window_decode_qkv)

#if FASTVQ_REGISTERS_OPS
TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  m.def("raster_window_attention_fwd(Tensor q, Tensor k, Tensor v, int width, int rows, int left, int right, "
        "int n_prefix, float scale) -> (Tensor, Tensor)");
  m.def("raster_window_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int width, int rows, int left, int right, int n_prefix, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("raster_window_decode(Tensor q, Tensor k_ring, Tensor v_ring, Tensor rows_idx, Tensor cols_idx, int width, "
        "int rows, int left, int right, int n_prefix, float scale) -> Tensor");
  m.def("raster_window_decode_qkv(Tensor qkv, Tensor(a!) k_ring, Tensor(b!) v_ring, Tensor rows_idx, Tensor cols_idx, "
        "Tensor cos, Tensor sin, int width, int rows, int left, int right, int n_prefix, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvq, CPU, m) {
  m.impl("raster_window_attention_fwd", FASTVQ_DISPATCH(raster_window_attention_fwd));
  m.impl("raster_window_attention_bwd", FASTVQ_DISPATCH(raster_window_attention_bwd));
  m.impl("raster_window_decode", FASTVQ_DISPATCH(raster_window_decode));
  m.impl("raster_window_decode_qkv", FASTVQ_DISPATCH(raster_window_decode_qkv));
}
#endif
