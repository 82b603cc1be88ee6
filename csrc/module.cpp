// The extension's Python module. Each op's file registers itself into the torch.ops.fastvq
// namespace with TORCH_LIBRARY_FRAGMENT; importing fastvq._C loads them all.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvq C++ kernels; the ops live in torch.ops.fastvq";
}
