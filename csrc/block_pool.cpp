// The block cache behind fastvq::empty_big: the sliding-window attention kernels take their big
// fp32 results (forward out, backward dq, dk, dv) from it.
//
// glibc maps blocks of 32 MiB and more afresh on every call and unmaps them on free, so each call
// paid a first-touch page fault per 4 KiB page (8192 of them for a 32 MiB output), while malloc
// recycles smaller blocks without faults: a superlinear step in time vs T. Training repeats its
// shapes, so the next call reuses a freed block of the same size as is, already resident. At most
// kPoolBlocks blocks (enough for one forward + backward: out, dq, dk, dv) and kPoolBytes bytes stay
// cached; fresh blocks ask for transparent huge pages (advice only) so that their first touch
// costs few faults too. fastvq.empty_cache() gives the cached blocks back.
#include "block_pool.h"

#include <torch/library.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

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

int64_t window_attention_empty_cache() { return static_cast<int64_t>(BlockPool::self().clear()); }
int64_t window_attention_cached_bytes() { return static_cast<int64_t>(BlockPool::self().cached_bytes()); }

}  // namespace

namespace fastvq {

at::Tensor empty_big(at::IntArrayRef sizes) {
  return at::detail::empty_generic(sizes, &BlockPool::self(), c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   std::nullopt);
}

}  // namespace fastvq

TORCH_LIBRARY_FRAGMENT(fastvq, m) {
  // no tensor arguments, so no dispatch key: registered with their (catch-all) kernels here
  m.def("window_attention_empty_cache() -> int", &window_attention_empty_cache);
  m.def("window_attention_cached_bytes() -> int", &window_attention_cached_bytes);
}
