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


def pytest_addoption(parser):
    parser.addoption("--wheel", action="store_true",
                     help="also build a wheel and smoke-test it in a fresh venv (tests/test_wheel.py; minutes)")
    parser.addoption("--torch-spec", default=None, metavar="SPEC",
                     help="also build fastvq against this torch (e.g. torch==2.14.1) in a fresh venv and smoke-test "
                          "it (tests/test_wheel.py; minutes, GBs of disk)")


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


# ----------------------------------------------------------------------------- one run per CPU variant

# The cpp kernels are compiled for several instruction sets (csrc/isa.h). In these files every case
# of the cpp backend runs once per variant this CPU and build support (ids end in "-avx512",
# "-avx2", "-baseline"; `-k baseline` selects one), the other backends' cases once. With
# FASTVQ_CPU_ISA set, only that variant runs.
PER_ISA_FILES = frozenset({
    "test_quantize.py", "test_window_attention.py", "test_raster_window.py", "test_sampling.py", "test_decode_linear.py",
})


def _isa_params() -> list[str]:
    from fastvq import _backend

    active = _backend.cpu_isa()
    if active is None or _backend.requested_cpu_isa() is not None:
        return [active] if active else []
    return [active] + [isa for isa in _backend.cpu_isas() if isa != active]


def pytest_generate_tests(metafunc):
    if metafunc.definition.path.name not in PER_ISA_FILES:
        return
    if not {"backend", "fast_backend"} & set(metafunc.fixturenames):
        return
    isas = _isa_params()
    if len(isas) > 1:
        metafunc.parametrize("cpu_isa", isas, indirect=True, ids=isas)


def pytest_collection_modifyitems(config, items):
    """Drops the copies of non-cpp cases made by the variant parametrization (the variant changes
    nothing for them): each runs once, under the default variant."""
    isas = _isa_params()
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec else {}
        backend = params.get("backend", params.get("fast_backend"))
        redundant = "cpu_isa" in params and params["cpu_isa"] != isas[0] and backend != "cpp"
        (drop if redundant else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def cpu_isa(request):
    """The cpp kernels' variant for this test (set only in PER_ISA_FILES; restored afterwards)."""
    isa = getattr(request, "param", None)
    if isa is None:
        yield None
        return
    from fastvq import _backend

    previous = _backend.set_cpu_isa(isa)
    try:
        yield isa
    finally:
        _backend.set_cpu_isa(previous)
