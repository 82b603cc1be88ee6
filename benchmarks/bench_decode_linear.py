"""decode_linear against F.linear on the GPT's decode-time Linear layers, weights streaming from DRAM.

A decoding step of the sampling benchmark's GPT (8 layers, width 512) runs, per layer, the four
products 512 -> 1536 (query/key/value fused), 512 -> 512 (attention output), 512 -> 2048 (MLP in)
and 2048 -> 512 (MLP out) on B rows: 12 * 512^2 weights a layer, ~100 MB in fp32 for the model,
three times the L3 cache here. This script builds 8 such layers and sweeps them in model order, so
every weight comes from memory as in sampling; each call is timed on its own and summed per shape.

  fastvq_cpp     fastvq.ops.decode_linear.decode_linear(backend="cpp") (csrc/decode_linear.cpp),
                 the public function with its argument checks (~10 us of Python a call)
  fastvq_cpp_op  the kernel alone, torch.ops.fastvq.decode_linear: what a GPT decode step calls
                 (through linear_for_decoding, which checks nothing)
  torch_linear   F.linear (MKL on this CPU)

Reported per shape and for the whole sweep: time (median over the sweeps, and the best) and the
weight bandwidth, weight bytes / time. Plain product with bias, no epilogue. The CPU is shared with
other work: the median of several sweeps, on --threads threads (default 2).

  python benchmarks/bench_decode_linear.py [--batches 1 16] [--dtype float32] [--sweeps 15] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_info  # noqa: E402
from fastvq._backend import cpp_ops  # noqa: E402
from fastvq.ops.decode_linear import decode_linear  # noqa: E402

SHAPES = [(512, 1536), (512, 512), (512, 2048), (2048, 512)]  # (in, out) of one layer, in model order
LAYERS = 8
IMPLS = {
    "fastvq_cpp": lambda x, w, b: decode_linear(x, w, b, backend="cpp"),
    "fastvq_cpp_op": lambda x, w, b: cpp_ops().decode_linear(x, w, b, None, False),
    "torch_linear": F.linear,
}


def sweep_times(impl, layers, xs) -> dict:
    """One pass over every layer in model order; seconds per shape (summed over the layers)."""
    fn = IMPLS[impl]
    spent = {s: 0.0 for s in SHAPES}
    for layer in layers:
        for s, (w, b) in zip(SHAPES, layer):
            t0 = time.perf_counter()
            fn(xs[s], w, b)
            spent[s] += time.perf_counter() - t0
    return spent


def measure(batch: int, dtype: torch.dtype, sweeps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    layers = [[((torch.randn(n, k, generator=g) / k ** 0.5).to(dtype), torch.randn(n, generator=g).to(dtype))
               for k, n in SHAPES] for _ in range(LAYERS)]
    xs = {s: torch.randn(batch, s[0], generator=g).to(dtype) for s in SHAPES}
    for (w, b), s in zip(layers[0], SHAPES):  # same answer before timing anything
        torch.testing.assert_close(IMPLS["fastvq_cpp"](xs[s], w, b).float(), F.linear(xs[s], w, b).float(),
                                   rtol=2e-2, atol=2e-2)
    rows = []
    for impl in IMPLS:
        sweep_times(impl, layers, xs)  # warm-up
        runs = [sweep_times(impl, layers, xs) for _ in range(sweeps)]
        for s in SHAPES + ["all"]:
            per_run = [sum(r.values()) if s == "all" else r[s] for r in runs]
            n_bytes = sum(w.numel() * w.element_size() for layer in layers for (w, _), t in zip(layer, SHAPES)
                          if s in ("all", t))
            med, best = statistics.median(per_run), min(per_run)
            rows.append({"impl": impl, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                         "shape": "all" if s == "all" else f"{s[0]}->{s[1]}", "weight_mb": round(n_bytes / 1e6, 1),
                         "median_ms": round(med * 1e3, 3), "best_ms": round(best * 1e3, 3),
                         "median_gb_s": round(n_bytes / med / 1e9, 1), "best_gb_s": round(n_bytes / best / 1e9, 1)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--sweeps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the results (and the machine) to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    rows = []
    print(f"{'impl':14s} {'B':>3s} {'shape':>10s} {'MB':>6s} {'median ms':>10s} {'GB/s':>6s} {'best ms':>8s} {'GB/s':>6s}")
    for batch in args.batches:
        for r in measure(batch, getattr(torch, args.dtype), args.sweeps):
            rows.append(r)
            print(f"{r['impl']:14s} {r['batch']:3d} {r['shape']:>10s} {r['weight_mb']:6.1f} {r['median_ms']:10.3f} "
                  f"{r['median_gb_s']:6.1f} {r['best_ms']:8.3f} {r['best_gb_s']:6.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
