// Which instruction set a translation unit's kernels are compiled for, and how one set of torch ops
// calls the variant chosen at run time.
//
// setup.py compiles every kernel file (one that ends with FASTVQ_KERNEL lines) once per ISA: as it
// is for the baseline (portable C++ on 4-lane vectors: SSE2 on x86-64, NEON on aarch64), and on
// x86-64 also through a generated wrapper that defines FASTVQ_ISA first (AVX2 + FMA, AVX-512).
// fastvq._C picks one variant when it loads (the best the CPU runs; fastvq/_backend.py can force
// another, see FASTVQ_CPU_ISA) and every op calls through it.
//
// The target is given to the kernel code only, never to torch's or the standard library's headers:
// each kernel file includes everything first, then wraps its own code in FASTVQ_ISA_BEGIN /
// FASTVQ_ISA_END (a target pragma region, GCC's or clang's form). So inline functions and template
// instances from the headers, which the linker merges across translation units, are baseline code
// in every variant, and a baseline CPU never runs an AVX-512 copy of std::vector's growth path that
// the linker happened to keep. What has external linkage inside a region lives in namespace
// fastvq::FASTVQ_ISA_NS (vec.h's and quantize_kernel.h's helpers), so variants never share a symbol.
// As a second guard setup.py links the variants in increasing ISA order (the first copy of a merged
// symbol wins), so whatever a region does instantiate is used only by code of that ISA or above.
#pragma once

#include <atomic>
#include <string>
#include <utility>
#include <vector>

#define FASTVQ_ISA_BASELINE 0
#define FASTVQ_ISA_AVX2 1
#define FASTVQ_ISA_AVX512 2
#define FASTVQ_ISA_COUNT 3

#ifndef FASTVQ_ISA
#define FASTVQ_ISA FASTVQ_ISA_BASELINE
#endif

#if FASTVQ_ISA != FASTVQ_ISA_BASELINE && !defined(__x86_64__)
#error "the AVX2 and AVX-512 variants are for x86-64; other targets build the baseline only"
#endif

// The features each level assumes: x86-64-v3 without MOVBE and x86-64-v4. csrc/isa.cpp checks the
// same list (and the OS's register state) before it lets a variant run.
#if FASTVQ_ISA == FASTVQ_ISA_AVX512
#define FASTVQ_ISA_NS isa_avx512
#define FASTVQ_TARGET "avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl"
#elif FASTVQ_ISA == FASTVQ_ISA_AVX2
#define FASTVQ_ISA_NS isa_avx2
#define FASTVQ_TARGET "avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#else
#define FASTVQ_ISA_NS isa_baseline
#endif

// What the kernels may use, for their #if's: GCC defines __AVX512F__ etc. inside a target region
// but clang does not, so the kernels test these instead.
#define FASTVQ_HAS_AVX512 (FASTVQ_ISA == FASTVQ_ISA_AVX512)
#define FASTVQ_HAS_AVX2 (FASTVQ_ISA >= FASTVQ_ISA_AVX2)

#define FASTVQ_PRAGMA(text) _Pragma(#text)
#define FASTVQ_PRAGMA_EXPANDED(text) FASTVQ_PRAGMA(text)

#if !defined(FASTVQ_TARGET)
#define FASTVQ_ISA_BEGIN
#define FASTVQ_ISA_END
#elif defined(__clang__)
// apply_to = function covers functions, member functions, templates and lambdas declared inside.
#define FASTVQ_ISA_BEGIN \
  FASTVQ_PRAGMA_EXPANDED(clang attribute push(__attribute__((target(FASTVQ_TARGET))), apply_to = function))
#define FASTVQ_ISA_END FASTVQ_PRAGMA(clang attribute pop)
#else
#define FASTVQ_ISA_BEGIN FASTVQ_PRAGMA(GCC push_options) FASTVQ_PRAGMA_EXPANDED(GCC target(FASTVQ_TARGET))
#define FASTVQ_ISA_END FASTVQ_PRAGMA(GCC pop_options)
#endif

// The baseline variant of each kernel file defines and registers the ops (once); the others only
// publish their functions.
#define FASTVQ_REGISTERS_OPS (FASTVQ_ISA == FASTVQ_ISA_BASELINE)

namespace fastvq {

// The variant every op calls: one of FASTVQ_ISA_*, the best one the CPU runs from when fastvq._C
// loads; csrc/isa.cpp detects the CPU's features and lets fastvq/_backend.py change it.
extern std::atomic<int> g_active_isa;
inline int active_isa() { return g_active_isa.load(std::memory_order_relaxed); }

// For fastvq._C (csrc/module.cpp). Names: "avx512", "avx2", "baseline"; lists are best first.
std::vector<std::string> runnable_isas();  // in this build and runnable on this CPU
std::vector<std::string> compiled_isas();  // in this build
std::string active_isa_name();
// Raises std::invalid_argument for an unknown name, std::runtime_error for a variant this build
// lacks or this CPU cannot run (ValueError / RuntimeError in Python).
void set_active_isa(const std::string& name);

// An op `fn` (a function of the kernel file, in its unnamed namespace) as a variable
// fastvq::<variant namespace>::fn holding its address; the baseline variant also declares the
// other variants' and lists all of them in fastvq::dispatch::fn, indexed by FASTVQ_ISA_*. In a
// build without the x86 variants (setup.py leaves FASTVQ_MULTI_ISA undefined) every entry is the
// baseline's.
#define FASTVQ_KERNEL_VARIANT(ns, fn) \
  namespace ns {                      \
  extern const decltype(&::fn) fn;    \
  }
#if FASTVQ_REGISTERS_OPS && defined(FASTVQ_MULTI_ISA)
#define FASTVQ_KERNEL_TABLE(fn)                                                                 \
  FASTVQ_KERNEL_VARIANT(isa_avx2, fn)                                                           \
  FASTVQ_KERNEL_VARIANT(isa_avx512, fn)                                                         \
  namespace dispatch {                                                                          \
  constexpr const decltype(&::fn)* fn[FASTVQ_ISA_COUNT] = {&isa_baseline::fn, &isa_avx2::fn, &isa_avx512::fn}; \
  }
#elif FASTVQ_REGISTERS_OPS
#define FASTVQ_KERNEL_TABLE(fn) \
  namespace dispatch {          \
  constexpr const decltype(&::fn)* fn[FASTVQ_ISA_COUNT] = {&isa_baseline::fn, &isa_baseline::fn, &isa_baseline::fn}; \
  }
#else
#define FASTVQ_KERNEL_TABLE(fn)
#endif

#define FASTVQ_KERNEL(fn)               \
  namespace fastvq {                    \
  FASTVQ_KERNEL_VARIANT(FASTVQ_ISA_NS, fn) \
  namespace FASTVQ_ISA_NS {             \
  const decltype(&::fn) fn = &::fn;     \
  }                                     \
  FASTVQ_KERNEL_TABLE(fn)               \
  }

// The function torch registers for an op: same signature, calls the active variant's.
template <auto* table, typename R, typename... A>
R call_active(A... args) {
  return (*(*table)[active_isa()])(std::forward<A>(args)...);
}

template <auto* table, typename R, typename... A>
constexpr auto dispatcher(R (*)(A...)) {
  return &call_active<table, R, A...>;
}

// m.impl("name", FASTVQ_DISPATCH(fn)) in a kernel file's TORCH_LIBRARY_IMPL block.
#define FASTVQ_DISPATCH(fn) ::fastvq::dispatcher<&::fastvq::dispatch::fn>(&::fn)

}  // namespace fastvq
