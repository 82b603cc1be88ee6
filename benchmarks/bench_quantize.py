"""pytest-benchmark suites for the VQ op, grouped by size.

  .venv/bin/python -m pytest benchmarks/bench_quantize.py --benchmark-only

nearest_code per backend (cpp, torch reference), and the module forward (inference: eval, no_grad)
and forward + backward (a training step) of fastvq.VectorQuantizer against taming's
VectorQuantizer2. The cases are built by compare_quantize.py's functions, so both measure the same
calls; the side-by-side run with faiss, the bare matmul, vector-quantize-pytorch and peak memory
is compare_quantize.py.
"""
import pytest

from compare_quantize import module_call, nearest_call
from fastvq import available_backends

SIZES = [(4096, 512, 32), (8192, 1024, 64), (8192, 4096, 256)]  # (N, K, D); N = B * 32 * 32
NEAREST = {"cpp": "fastvq_cpp", "torch": "torch_reference"}


def _size_id(size):
    return "N{}-K{}-D{}".format(*size)


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("backend", list(NEAREST))
def test_nearest_code(benchmark, backend, size):
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend} unavailable: {status.reason}")
    n, k, d = size
    benchmark.group = f"nearest_code {_size_id(size)}"
    benchmark.extra_info["gflop"] = 2 * n * k * d / 1e9
    idx, _ = benchmark(nearest_call({"suite": "nearest_code", "impl": NEAREST[backend], "N": n, "K": k, "D": d}))
    assert idx.shape == (n,)


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("impl", ["fastvq", "taming"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_vector_quantizer(benchmark, mode, impl, size):
    n, k, d = size
    case = {"suite": f"module_{mode}", "impl": impl, "N": n, "K": k, "D": d, "B": n // 1024, "H": 32, "W": 32}
    try:
        run = module_call(case)
    except ImportError as e:
        pytest.skip(f"{impl} module unavailable: {e}")
    benchmark.group = f"VQ {mode} {_size_id(size)}"
    benchmark(run)
