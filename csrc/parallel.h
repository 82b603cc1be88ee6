// parallel_ranges: the one way fastvq's CPU kernels split work over torch's intra-op threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace fastvq {

// f(begin, end) over contiguous shares of [0, n). at::parallel_for's OpenMP backend is inline in
// the ATen headers, so it is only parallel where this file is compiled with -fopenmp (setup.py
// does so on Linux, sharing torch's libgomp). Compilers without OpenMP (Apple clang) would get a
// serial loop from it: plain std::threads, one per intra-op thread, stand in there.
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
#ifdef _OPENMP
  at::parallel_for(0, n, grain, f);
#else
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  const int64_t share = (n + threads - 1) / threads;
  std::vector<std::exception_ptr> errors(threads);
  auto run = [&](int64_t t) {
    try {
      const int64_t b = t * share, e = std::min(n, b + share);
      if (b < e) f(b, e);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(run, t);
  run(0);
  for (auto& h : helpers) h.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
#endif
}

}  // namespace fastvq
