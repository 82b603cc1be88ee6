// The thread pool behind parallel_ranges (csrc/parallel.h): chunks claimed one at a time by the
// caller and by helpers that sleep when idle. Compiled once (not per ISA): one pool per process.
#include "parallel.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTVQ_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define FASTVQ_CPU_RELAX() asm volatile("yield")
#else
#define FASTVQ_CPU_RELAX() ((void)0)
#endif

namespace fastvq {
namespace pool {
namespace {

// A helper waiting for the next region spins kHelperSpin, then yields its core in a loop until
// kHelperYield has passed, then sleeps. A decode step's regions come tens to a few hundred
// microseconds apart: a helper still awake for them joins at once (a sleeping one takes a futex
// wake, long enough that the caller does most chunks alone), and a yielding helper hands its core
// to any other runnable thread, so it costs a busy machine little. The caller spins kCallerSpin
// for chunks still running, then yields its core (the helper it waits for may want it).
constexpr auto kHelperSpin = std::chrono::microseconds(20);
constexpr auto kHelperYield = std::chrono::microseconds(500);
constexpr auto kCallerSpin = std::chrono::microseconds(20);

// The region in flight, one word so that a claim is one compare-and-swap that also proves the
// region is still the one the claimer saw: generation (32 bits) | chunks (16) | claimed (16).
inline uint64_t pack(uint64_t gen, uint64_t chunks, uint64_t claimed) { return gen << 32 | chunks << 16 | claimed; }
inline uint32_t gen_of(uint64_t s) { return static_cast<uint32_t>(s >> 32); }
inline int64_t chunks_of(uint64_t s) { return static_cast<int64_t>(s >> 16 & 0xffff); }
inline int64_t claimed_of(uint64_t s) { return static_cast<int64_t>(s & 0xffff); }

thread_local bool t_in_region = false;
std::atomic<bool> g_enabled{true};

struct Pool {
  std::atomic<uint64_t> state{0};
  // the region's function: written by the caller before it publishes `state`, read by a claimer
  // after a successful claim (which proves the region, and so these, are still current)
  std::atomic<ChunkFn> fn{nullptr};
  std::atomic<const void*> ctx{nullptr};
  std::atomic<int64_t> done{0};
  std::atomic<int> helpers_wanted{0};  // helpers with an index below this take part
  std::atomic<int> sleepers{0};
  std::mutex sleep_mutex;
  std::condition_variable wake;
  std::mutex error_mutex;
  std::exception_ptr error;
  std::mutex caller_mutex;  // one region at a time; a second caller runs its region alone
  std::mutex start_mutex;
  int started = 0;

  // Claim and run chunks of the region `seen` belongs to until none is left.
  void work(uint64_t seen) {
    const uint32_t gen = gen_of(seen);
    uint64_t s = state.load(std::memory_order_acquire);
    while (gen_of(s) == gen && claimed_of(s) < chunks_of(s)) {
      if (!state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const ChunkFn f = fn.load(std::memory_order_relaxed);
      const void* c = ctx.load(std::memory_order_relaxed);
      try {
        f(c, claimed_of(s));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_release);
      s = state.load(std::memory_order_acquire);
    }
  }

  void helper(int index) {
    t_in_region = true;  // a helper's chunks never open regions of their own
    uint32_t last = gen_of(state.load(std::memory_order_acquire));
    for (;;) {
      uint64_t s = state.load(std::memory_order_acquire);
      const auto start = std::chrono::steady_clock::now();
      bool yielding = false;
      for (int i = 0; gen_of(s) == last; ++i) {
        if (yielding) {
          std::this_thread::yield();
        } else {
          FASTVQ_CPU_RELAX();
        }
        if (i % 64 == 63 || yielding) {
          const auto waited = std::chrono::steady_clock::now() - start;
          yielding = waited > kHelperSpin;
          if (waited > kHelperYield) {
            std::unique_lock<std::mutex> lock(sleep_mutex);
            sleepers.fetch_add(1);
            wake.wait(lock, [&] { return gen_of(state.load()) != last; });
            sleepers.fetch_sub(1);
          }
        }
        s = state.load(std::memory_order_acquire);
      }
      last = gen_of(s);
      if (index < helpers_wanted.load(std::memory_order_relaxed)) work(s);
    }
  }

  void ensure_helpers(int n) {
    std::lock_guard<std::mutex> lock(start_mutex);
    for (; started < n; ++started) std::thread([this, i = started] { helper(i); }).detach();
  }

  void run(int64_t chunks, int64_t threads, ChunkFn f, const void* c) {
    ensure_helpers(static_cast<int>(threads - 1));
    helpers_wanted.store(static_cast<int>(threads - 1), std::memory_order_relaxed);
    fn.store(f, std::memory_order_relaxed);
    ctx.store(c, std::memory_order_relaxed);
    done.store(0, std::memory_order_relaxed);
    error = nullptr;
    const uint64_t s = pack(gen_of(state.load(std::memory_order_relaxed)) + 1u, chunks, 0);
    state.store(s);  // sequentially consistent: ordered before the read of `sleepers` below
    if (sleepers.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex);
      wake.notify_all();
    }
    work(s);
    // Only chunks a helper has claimed can be outstanding; a helper that never got its core in
    // time claimed nothing, and nothing waits for it.
    const auto until = std::chrono::steady_clock::now() + kCallerSpin;
    for (int i = 0; done.load(std::memory_order_acquire) < chunks; ++i) {
      if (i < 64 || std::chrono::steady_clock::now() < until)
        FASTVQ_CPU_RELAX();
      else
        std::this_thread::yield();  // the helper we wait for may be waiting for this core
    }
    if (error) std::rethrow_exception(error);
  }
};

Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

Pool& the_pool() {
  // A forked child has none of the parent's helper threads (and perhaps a locked mutex): it starts
  // a pool of its own; the parent's is leaked there on purpose.
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
  static std::mutex create_mutex;
  std::lock_guard<std::mutex> lock(create_mutex);
  if (!g_pool) g_pool = new Pool();  // never deleted: detached helpers may outlive static destructors
  return *g_pool;
}

}  // namespace

bool in_region() { return t_in_region; }

bool enabled() { return g_enabled.load(std::memory_order_relaxed); }

std::string mode() { return enabled() ? "pool" : "openmp"; }

void set_mode(const std::string& name) {
  if (name == "pool") {
    g_enabled = true;
    return;
  }
#ifdef _OPENMP
  if (name == "openmp") {
    g_enabled = false;
    return;
  }
  throw std::invalid_argument("parallel mode must be 'pool' or 'openmp', got '" + name + "'");
#else
  throw std::invalid_argument(name == "openmp" ? "this build of fastvq._C was compiled without OpenMP: only 'pool'"
                                               : "parallel mode must be 'pool' or 'openmp', got '" + name + "'");
#endif
}

void run_chunks(int64_t chunks, int64_t threads, ChunkFn fn, const void* ctx) {
  TORCH_CHECK(chunks >= 0 && chunks < 65536, "fastvq parallel region: too many chunks (", chunks, ")");
  Pool& p = the_pool();
  std::unique_lock<std::mutex> caller(p.caller_mutex, std::try_to_lock);
  if (!caller.owns_lock() || threads <= 1) {  // another thread's region is running: do this one alone
    for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
    return;
  }
  t_in_region = true;
  try {
    p.run(chunks, threads, fn, ctx);
  } catch (...) {
    t_in_region = false;
    throw;
  }
  t_in_region = false;
}

}  // namespace pool
}  // namespace fastvq
