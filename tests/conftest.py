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

import pytest  # noqa: E402

from helpers import BACKENDS, FAST_BACKENDS, backend_params  # noqa: E402  (imports fastvq: after the flag)


# The one rule for which backends run here: every backend is collected (ids "torch", "cpp",
# "triton", so `-k cpp` selects one), and those that cannot run on this machine are skipped with
# fastvq.available_backends()'s reason. Direct parametrizations use helpers.backend_params, the same rule.

@pytest.fixture(params=backend_params(BACKENDS))
def backend(request) -> str:
    """Every backend: "torch", "cpp", "triton" (put tensors on helpers.device_of(backend))."""
    return request.param


@pytest.fixture(params=backend_params(FAST_BACKENDS))
def fast_backend(request) -> str:
    """The kernel backends, "cpp" and "triton", for tests comparing them with the torch reference."""
    return request.param
