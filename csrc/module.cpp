// The extension's Python module. Each op's file registers itself into the torch.ops.fastvq
// namespace with TORCH_LIBRARY_FRAGMENT; importing fastvq._C loads them all. The module itself
// only says which kernel variant (csrc/isa.h) the ops run and lets fastvq/_backend.py choose it.
// pybind11 only (the ops register through torch/library.h in their own files): torch/extension.h
// would add about 30 s of parsing to the build.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "isa.h"
#include "parallel.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvq C++ kernels; the ops live in torch.ops.fastvq";
  m.def("cpu_isas", &fastvq::runnable_isas, "kernel variants this build holds and this CPU runs, best first");
  m.def("compiled_isas", &fastvq::compiled_isas, "kernel variants this build holds, best first");
  m.def("cpu_isa", &fastvq::active_isa_name, "the kernel variant the ops run");
  m.def("set_cpu_isa", &fastvq::set_active_isa, "run the ops on this variant (ValueError / RuntimeError if it cannot)");
  m.def("parallel_mode", &fastvq::pool::mode, "how the kernels split work over threads: 'pool' or 'openmp'");
  m.def("set_parallel_mode", &fastvq::pool::set_mode, "'pool' (default: claimed chunks) or 'openmp' (equal shares)");
}
