"""pytest-benchmark suites for raster-window (2-D local) attention, grouped by grid.

  .venv/bin/python -m pytest benchmarks/bench_raster_window.py --benchmark-only

fastvq.raster_window_attention with the backend auto picks (cpp once it is registered, else the
torch reference) and the torch reference, against torch SDPA with the rule's dense mask and
fastvq.sliding_window_attention with the 1-D window containing the 2-D one, forward (no_grad) and
forward + backward, on 32x32 and 64x64 grids (rows = left = right = 8); and sample_grid of a small
GPT2D, wavefront against one token a step. The calls are built by compare_raster_window.py's
functions, so both measure the same thing; the side-by-side run with compiled FlexAttention, the
26M-parameter decode and peak memory is compare_raster_window.py.
"""
import pytest

from compare_raster_window import case_call, decode_call, fastvq_backend, sliding_window_for, window_pairs

GRIDS = [32, 64]  # square grids, T = 1024, 4096; (B, H, Dh) = (1, 8, 64) fp32
WINDOW = {"rows": 8, "left": 8, "right": 8, "n_prefix": 0}
IMPLS = ["fastvq", "torch_reference", "sdpa_mask", "sliding_window"]
SMALL_GPT2D = {"vocab_size": 1024, "n_layer": 2, "n_head": 4, "n_embd": 128, "rows": 8, "left": 8, "right": 7}


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g}x{g}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_raster_window_attention(benchmark, mode, impl, grid):
    backend = fastvq_backend("cpu")
    if impl == "torch_reference" and backend == "torch":
        pytest.skip("fastvq's auto backend is the torch reference here (no cpp kernel registered): same as fastvq")
    case = {"suite": mode, "impl": f"fastvq_{backend}" if impl == "fastvq" else impl, "backend": backend,
            "B": 1, "H": 8, "Dh": 64, "T": grid * grid, "width": grid, **WINDOW,
            "W": sliding_window_for(WINDOW, grid), "sliding_window_backend": "cpp"}
    run, _ = case_call(case, {})
    benchmark.group = f"raster window {mode} {grid}x{grid}"
    benchmark.extra_info["backend"] = backend if impl == "fastvq" else impl
    benchmark.extra_info["gflop_in_window"] = 4 * 8 * 64 * window_pairs(grid, grid, 8, 8, 8) / 1e9
    benchmark(run)


@pytest.mark.parametrize("wavefront", [True, False], ids=["wavefront", "sequential"])
def test_sample_grid(benchmark, wavefront):
    """An 8 x 8 grid of codes at batch 1 from a 2-layer GPT2D (n_embd 128)."""
    case = {"impl": "wavefront" if wavefront else "sequential", "device": "cpu", "model": SMALL_GPT2D,
            "rows_measured": 8, "width": 8}
    _, sample = decode_call(case)
    benchmark.group = "sample_grid 8x8"
    codes = benchmark.pedantic(sample, rounds=3, warmup_rounds=1)
    assert codes.shape == (1, 8, 8)
