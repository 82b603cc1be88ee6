// parallel_ranges: the one way fastvq's CPU kernels split work over torch's intra-op threads.
//
// Why not at::parallel_for: its OpenMP backend hands each thread one equal share and then waits at a
// barrier for every thread of the team. On a machine where other processes want the cores, one of
// those threads is often off its core when a region starts; the caller then waits a whole
// scheduler time slice (milliseconds) for a share it could have done in microseconds, and a decode
// step opens dozens of regions. Here the work is cut into a few chunks per thread that every
// thread, the caller included, claims one at a time (csrc/parallel.cpp): a thread that is not
// running claims nothing, the running ones do its chunks, and the caller waits only for chunks
// already being worked on, never for a thread that has not started. Helpers wait for work by
// spinning briefly, then yielding their core for a while, then sleeping, so an idle pool takes no
// CPU from other processes. Large regions still go to OpenMP (kPoolMaxGrains below).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace fastvq {
namespace pool {

using ChunkFn = void (*)(const void* ctx, int64_t chunk);

// fn(ctx, c) for every c in [0, chunks), on the calling thread and up to threads - 1 helpers;
// returns when all have run and rethrows the first exception one threw. chunks < 65536.
void run_chunks(int64_t chunks, int64_t threads, ChunkFn fn, const void* ctx);

// True on a thread that is running chunks (a nested region then runs serially).
bool in_region();

// False when FASTVQ_PARALLEL=openmp chose at::parallel_for (OpenMP's equal shares) for every
// region, small ones included; kept for comparisons and as a way back. fastvq/_backend.py sets it through fastvq._C.
bool enabled();
std::string mode();                   // "pool" or "openmp"
void set_mode(const std::string& m);  // std::invalid_argument (ValueError) for anything else

}  // namespace pool

// Chunks per thread: enough that the running threads can take over a stalled one's share, few
// enough that each chunk is still worth a claim (an atomic) and f's per-call set-up.
constexpr int64_t kChunksPerThread = 4;

// Regions of more grains than this (about a millisecond of work and up) go to OpenMP's equal
// shares: its threads are the ones torch's own ops have just used, still spinning on their cores,
// where a pool helper would have to win a core from them; and a time slice lost to a descheduled
// thread is a small part of such a region. Below it (every region of a decode step) the pool's
// claimed chunks keep a busy machine from stalling each region.
constexpr int64_t kPoolMaxGrains = 64;

// f(begin, end) over contiguous pieces of [0, n) that together cover it once; no piece is smaller
// than `grain` items unless n is, and no thread is used for less than a grain of work. `grains`
// is the work in grains when n / grain does not say it (a loop over one task list per thread).
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f, int64_t grains = -1) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t pieces = (n + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), pieces);
  if (threads <= 1 || pool::in_region() || at::in_parallel_region()) {
    f(0, n);
    return;
  }
#ifdef _OPENMP
  if (!pool::enabled() || (grains < 0 ? pieces : grains) > kPoolMaxGrains) {
    at::parallel_for(0, n, grain, f);
    return;
  }
#endif
  struct Ctx {
    const F* f;
    int64_t n, chunks;
  };
  const Ctx ctx{&f, n, std::min<int64_t>(pieces, threads * kChunksPerThread)};
  pool::run_chunks(ctx.chunks, threads, [](const void* p, int64_t c) {
    const Ctx& x = *static_cast<const Ctx*>(p);
    const int64_t b = c * x.n / x.chunks, e = (c + 1) * x.n / x.chunks;
    if (b < e) (*x.f)(b, e);
  }, &ctx);
}

}  // namespace fastvq
