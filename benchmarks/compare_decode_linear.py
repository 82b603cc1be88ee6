"""decode_linear against F.linear on a GPT's decode-time Linear layers, weights streaming from memory.

A decoding step of the sampling benchmark's GPT (8 layers, width 512) runs, per layer, the four
products 512 -> 1536 (query/key/value fused), 512 -> 512 (attention output), 512 -> 2048 (MLP in)
and 2048 -> 512 (MLP out) on B rows: 12 * 512^2 weights a layer, ~100 MB in fp32 for the model,
three times the L3 cache of the 2-core CPU here. One timed call sweeps 8 such layers in model
order, so every weight comes from memory as in sampling.

  fastvq           fastvq.decode_linear(backend="cpp" on CPU, "triton" on CUDA): the public
                   function with its argument checks (~10 us of Python a call)
  fastvq_kernel    fastvq.ops.decode_linear.KERNELS[backend]: the unchecked entry a GPT decode
                   step calls (its weights checked once)
  torch_linear     F.linear (MKL on CPU, cuBLAS on CUDA)

Plain product with bias, no epilogue; fp32 on CPU, bf16 on CUDA; batch 1 and 16. Each case
(benchmarks/common.py): the median sweep time, its weight bandwidth (weight bytes / time) and, on
CPU, the time per shape (each call of the timed sweeps timed on its own, summed per shape). Results:
benchmarks/results/decode_linear_<device>.json; report.py prints the table (and draws the plot).

  python benchmarks/compare_decode_linear.py                  # the full CPU run (about 1 minute)
  python benchmarks/compare_decode_linear.py --quick          # a narrow model, to check the script
  python benchmarks/compare_decode_linear.py --device cuda    # on a GPU (benchmarks/gpu_check.sh)
"""
from __future__ import annotations

import statistics
import time

import common

LABELS = {
    "fastvq": "fastvq.decode_linear",
    "fastvq_kernel": "decode_linear KERNELS entry (what a decode step calls)",
    "torch_linear": "F.linear (torch)",
}
SIZES = {
    "cpu": {"width": 512, "layers": 8, "batches": (1, 16), "dtype": "float32"},
    "cpu_quick": {"width": 64, "layers": 2, "batches": (1, 4), "dtype": "float32"},
    "cuda": {"width": 512, "layers": 8, "batches": (1, 16), "dtype": "bfloat16"},
    "cuda_quick": {"width": 64, "layers": 2, "batches": (1, 4), "dtype": "bfloat16"},
}


def layer_shapes(width: int) -> list[tuple[int, int]]:
    """(in, out) of one transformer layer's Linears, in model order."""
    return [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]


def plan(args) -> list[dict]:
    s = args.sizes
    backend = "triton" if args.plan == "cuda" else "cpp"
    return [{"suite": "sweep", "impl": impl, "device": args.device, "backend": backend, "dtype": s["dtype"], "B": b,
             "width": s["width"], "layers": s["layers"]} for b in s["batches"] for impl in LABELS]


def linear_fn(case: dict):
    """(x, weight, bias) -> y for the case's implementation."""
    import torch.nn.functional as F

    from fastvq import decode_linear
    from fastvq.ops.decode_linear import KERNELS

    impl, backend = case["impl"], case["backend"]
    if impl == "fastvq":
        return lambda x, w, b: decode_linear(x, w, b, backend=backend)
    if impl == "fastvq_kernel":
        kernel = KERNELS[backend]
        return lambda x, w, b: kernel(x, w, b, None, None)
    if impl == "torch_linear":
        return F.linear
    raise ValueError(f"unknown implementation {impl!r}")


def measure(case: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from fastvq.bench import peak_memory, time_call

    device, dtype = case["device"], getattr(torch, case["dtype"])
    shapes = layer_shapes(case["width"])
    g = torch.Generator().manual_seed(0)
    def linear(k, n):  # an nn.Linear's (weight, bias), weights N(0, 1/k)
        return ((torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype),
                torch.randn(n, generator=g).to(device, dtype))

    layers = [[linear(k, n) for k, n in shapes] for _ in range(case["layers"])]
    xs = [torch.randn(case["B"], k, generator=g).to(device, dtype) for k, _ in shapes]
    fn = linear_fn(case)
    for x, (w, b) in zip(xs, layers[0]):  # the same answer before timing anything
        torch.testing.assert_close(fn(x, w, b).float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
    per_shape = [[] for _ in shapes]  # seconds per shape of every sweep, CPU only
    cpu = device == "cpu"

    def sweep():
        spent = [0.0] * len(shapes)
        with torch.no_grad():
            for layer in layers:
                for i, (x, (w, b)) in enumerate(zip(xs, layer)):
                    t0 = time.perf_counter() if cpu else 0.0
                    fn(x, w, b)
                    if cpu:
                        spent[i] += time.perf_counter() - t0
        for i, t in enumerate(spent):
            per_shape[i].append(t)

    timing = time_call(sweep, device=device, min_runs=15)
    weight_bytes = [sum(layer[i][0].nbytes for layer in layers) for i in range(len(shapes))]
    result = {**timing, "weight_bytes": sum(weight_bytes), "gb_per_s": sum(weight_bytes) / timing["median_s"] / 1e9}
    if cpu:  # the timed sweeps are the last `runs` ones so far
        medians = [statistics.median(t[-timing["runs"]:]) for t in per_shape]
        result["shapes"] = [{"shape": f"{k}->{n}", "weight_bytes": nb, "median_s": m, "gb_per_s": nb / m / 1e9}
                            for (k, n), nb, m in zip(shapes, weight_bytes, medians)]
    result["peak_extra_bytes"] = peak_memory(sweep, device=device)
    return result


def summary(r: dict) -> str:
    return f"{r['gb_per_s']:.1f} GB/s of weights ({r['weight_bytes'] / 1e6:.0f} MB)"


def method(args) -> dict:
    from fastvq.bench import PEAK_MEMORY_METHOD

    s = args.sizes
    return {
        "model": f"{s['layers']} layers of width {s['width']}: Linears {layer_shapes(s['width'])} (in, out) with bias, "
                 f"{s['dtype']}, weights N(0, 1/in), seed 0",
        "time": "fastvq.bench.time_call of one sweep over every layer in model order (all weights once): median of "
                ">= 15 sweeps after one warm-up (three on CUDA); on CPU each case in a fresh process",
        "gb_per_s": "weight bytes of the sweep / median sweep time",
        "shapes": "CPU only: each call of the timed sweeps timed on its own (perf_counter), summed per shape and "
                  "sweep, median over the sweeps",
        "peak_memory": PEAK_MEMORY_METHOD[args.device],
    }


COMPARISON = common.Comparison(
    name="decode_linear", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, summary=summary, shown=("backend", "dtype", "B", "width", "layers"), expected_s=60,
    budget_s={"cpu": 180, "cuda": 120}, timeout_s=300)

if __name__ == "__main__":
    raise SystemExit(common.main(COMPARISON))
