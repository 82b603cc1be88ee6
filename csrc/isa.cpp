// Which kernel variant runs (see csrc/isa.h): what this build holds, what the CPU and its OS can
// run, and the active one. Compiled once, for the baseline.
#include "isa.h"

#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace fastvq {
namespace {

const char* const kNames[FASTVQ_ISA_COUNT] = {"baseline", "avx2", "avx512"};

bool compiled(int isa) {
#if defined(FASTVQ_MULTI_ISA)
  return isa >= 0 && isa < FASTVQ_ISA_COUNT;
#else
  return isa == FASTVQ_ISA_BASELINE;
#endif
}

#if defined(__x86_64__)
// XCR0: which register state the OS saves on a context switch. A CPU with AVX-512 under an OS (or
// hypervisor) that does not save zmm state must not run AVX-512 code.
unsigned long long xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bits(unsigned reg, unsigned mask) { return (reg & mask) == mask; }

// Every feature named in isa.h's FASTVQ_TARGET for the level, from CPUID.
bool cpu_runs(int isa) {
  if (isa == FASTVQ_ISA_BASELINE) return true;
  unsigned a, b, c, d;
  // leaf 1, ecx: FMA 12, POPCNT 23, OSXSAVE 27, AVX 28, F16C 29
  if (!__get_cpuid(1, &a, &b, &c, &d) || !bits(c, 1u << 12 | 1u << 23 | 1u << 27 | 1u << 28 | 1u << 29)) return false;
  const unsigned long long state = xcr0();
  if ((state & 0x6) != 0x6) return false;  // xmm and ymm state
  unsigned b7, c7, d7;
  // leaf 7, ebx: BMI1 3, AVX2 5, BMI2 8
  if (!__get_cpuid_count(7, 0, &a, &b7, &c7, &d7) || !bits(b7, 1u << 3 | 1u << 5 | 1u << 8)) return false;
  // leaf 0x80000001, ecx: LZCNT 5
  if (!__get_cpuid(0x80000001, &a, &b, &c, &d) || !bits(c, 1u << 5)) return false;
  if (isa == FASTVQ_ISA_AVX2) return true;
  // leaf 7, ebx: AVX512F 16, DQ 17, CD 28, BW 30, VL 31; opmask and zmm state
  return bits(b7, 1u << 16 | 1u << 17 | 1u << 28 | 1u << 30 | 1u << 31) && (state & 0xE0) == 0xE0;
}
#else
bool cpu_runs(int isa) { return isa == FASTVQ_ISA_BASELINE; }
#endif

int best_isa() {
  for (int isa = FASTVQ_ISA_COUNT - 1; isa > 0; --isa)
    if (compiled(isa) && cpu_runs(isa)) return isa;
  return FASTVQ_ISA_BASELINE;
}

}  // namespace

std::atomic<int> g_active_isa{best_isa()};

std::vector<std::string> runnable_isas() {
  std::vector<std::string> out;
  for (int isa = FASTVQ_ISA_COUNT - 1; isa >= 0; --isa)
    if (compiled(isa) && cpu_runs(isa)) out.push_back(kNames[isa]);
  return out;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (int isa = FASTVQ_ISA_COUNT - 1; isa >= 0; --isa)
    if (compiled(isa)) out.push_back(kNames[isa]);
  return out;
}

std::string active_isa_name() { return kNames[active_isa()]; }

void set_active_isa(const std::string& name) {
  for (int isa = 0; isa < FASTVQ_ISA_COUNT; ++isa) {
    if (name != kNames[isa]) continue;
    if (!compiled(isa)) throw std::runtime_error("this build of fastvq._C has no " + name + " kernels");
    if (!cpu_runs(isa)) throw std::runtime_error("this CPU cannot run the " + name + " kernels");
    g_active_isa.store(isa, std::memory_order_relaxed);
    return;
  }
  throw std::invalid_argument("unknown kernel ISA '" + name + "' (avx512, avx2 or baseline)");
}

}  // namespace fastvq
