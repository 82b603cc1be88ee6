import os

# Without a GPU the Triton kernels are tested through the interpreter on CPU tensors. The flag
# must be set before triton.jit decorates anything, so before fastvq.kernels is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
