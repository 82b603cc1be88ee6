"""Side-by-side comparison of fastvq's VQ op against the anchors, on this machine, in one run.

  nearest_code:  fastvq.nearest_code (cpp) | faiss IndexFlatL2 search k=1 | bare matmul x @ cb.T |
                 fastvq's torch reference, at N = 8192, K in {1024, 16384}, D in {8, 64, 256}
  module:        fastvq.VectorQuantizer | taming VectorQuantizer2 | vector-quantize-pytorch
                 VectorQuantize, input (B, D, H, W) = (8, D, 32, 32) with the same K and D;
                 "forward" is inference (eval mode, no_grad), "forward_backward" a training step
                 (train mode, backward of z_q with a fixed upstream gradient plus the loss).

Every case runs in a fresh subprocess: warm-up, the median of >= 5 timed calls (3 for calls over
2 s), then the peak extra resident memory of one more call (see common.PEAK_MEMORY_METHOD), also
given as a multiple of one N x K fp32 matrix. Results go to benchmarks/results/quantize_cpu.json;
`python benchmarks/report.py` turns them into the plot and the README table.

  python benchmarks/compare_quantize.py            # the full run (several minutes)
  python benchmarks/compare_quantize.py --quick    # small sizes, to check the script works
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MIB, PEAK_MEMORY_METHOD, REPO, RESULTS_DIR, machine_info, peak_extra_bytes, run_cases, time_call, worker_main  # noqa: E402

NEAREST_IMPLS = {
    "fastvq_cpp": "fastvq.nearest_code (cpp)",
    "faiss": "faiss IndexFlatL2 (k=1)",
    "matmul": "matmul x @ cb.T (torch)",
    "torch_reference": "fastvq torch reference",
}
MODULE_IMPLS = {
    "fastvq": "fastvq.VectorQuantizer",
    "taming": "taming VectorQuantizer2",
    "vqp": "vector-quantize-pytorch VectorQuantize",
}
MODES = ("forward", "forward_backward")

FULL = {"N": 8192, "K": (1024, 16384), "D": (8, 64, 256), "BHW": (8, 32, 32)}
QUICK = {"N": 1024, "K": (64, 512), "D": (8, 64), "BHW": (1, 32, 32)}

MODULE_NOTES = {
    "fastvq": "VectorQuantizer(K, D, beta=0.25), legacy=True, backend auto (cpp on CPU)",
    "taming": "VectorQuantizer2(K, D, beta=0.25), legacy=True",
    "vqp": "VectorQuantize(dim=D, codebook_size=K, accept_image_fmap=True), library defaults "
           "(EMA codebook update with decay 0.8 in training, rotation trick, commitment_weight 1)",
}


SUITES = ("nearest_code", "module_forward", "module_forward_backward")


def cases(sizes: dict) -> list[dict]:
    out = []
    for K, D in itertools.product(sizes["K"], sizes["D"]):
        for impl in NEAREST_IMPLS:
            out.append({"suite": "nearest_code", "impl": impl, "N": sizes["N"], "K": K, "D": D})
    B, H, W = sizes["BHW"]
    for mode in MODES:
        for K, D in itertools.product(sizes["K"], sizes["D"]):
            for impl in MODULE_IMPLS:
                out.append({"suite": f"module_{mode}", "impl": impl, "N": B * H * W, "K": K, "D": D,
                            "B": B, "H": H, "W": W})
    return out


# ----------------------------------------------------------------------------- worker: one case, in its own process

def nearest_call(case):
    import torch

    from fastvq.ops.quantize import nearest_code, nearest_code_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(case["N"], case["D"], generator=g)
    cb = torch.randn(case["K"], case["D"], generator=g)
    impl = case["impl"]
    if impl == "fastvq_cpp":
        return lambda: nearest_code(x, cb, backend="cpp")
    if impl == "torch_reference":
        return lambda: nearest_code_reference(x, cb)
    if impl == "matmul":
        return lambda: x @ cb.T
    if impl == "faiss":
        import faiss

        index = faiss.IndexFlatL2(case["D"])
        index.add(cb.numpy())
        xn = x.numpy()
        return lambda: index.search(xn, 1)
    raise ValueError(f"unknown nearest_code implementation {impl!r}")


def make_module(impl, K, D):
    if impl == "fastvq":
        import fastvq

        cls = getattr(fastvq, "VectorQuantizer", None)
        if cls is None:
            from fastvq.nn.quantize import VectorQuantizer as cls  # noqa: N813
        return cls(K, D, beta=0.25), lambda m, z: m(z)[:2]
    if impl == "taming":
        from taming.modules.vqvae.quantize import VectorQuantizer2

        return VectorQuantizer2(K, D, beta=0.25), lambda m, z: m(z)[:2]
    if impl == "vqp":
        from vector_quantize_pytorch import VectorQuantize

        def call(m, z):
            z_q, _, loss = m(z)
            return z_q, loss

        return VectorQuantize(dim=D, codebook_size=K, accept_image_fmap=True), call
    raise ValueError(f"unknown module implementation {impl!r}")


def module_call(case):
    import torch

    torch.manual_seed(0)
    module, call = make_module(case["impl"], case["K"], case["D"])
    z = torch.randn(case["B"], case["D"], case["H"], case["W"])
    if case["suite"] == "module_forward":
        module.eval()

        def run():
            with torch.no_grad():
                return call(module, z)

        return run
    module.train()
    z.requires_grad_(True)
    upstream = torch.randn_like(z)

    def run():
        z.grad = None
        module.zero_grad(set_to_none=True)
        z_q, loss = call(module, z)
        torch.autograd.backward([z_q, loss], [upstream, torch.ones_like(loss)])
        return z.grad

    return run


def run_worker(case: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    fn = nearest_call(case) if case["suite"] == "nearest_code" else module_call(case)
    timing = time_call(fn)
    peak = peak_extra_bytes(fn)
    nk_bytes = case["N"] * case["K"] * 4
    result = {**case, **timing, "peak_extra_bytes": peak, "nk_fp32_bytes": nk_bytes,
              "peak_ratio_to_nk_fp32": None if peak is None else peak / nk_bytes}
    if case["suite"] == "nearest_code":
        result["gflop_per_s"] = 2 * case["N"] * case["K"] * case["D"] / timing["median_s"] / 1e9
    return result


# ----------------------------------------------------------------------------- driver


def describe(case: dict) -> str:
    names = NEAREST_IMPLS if case["suite"] == "nearest_code" else MODULE_IMPLS
    return f"{case['suite']:<24} N={case['N']:<5} K={case['K']:<5} D={case['D']:<3} {names[case['impl']]:<40}"


def outcome(r: dict) -> str:
    if "error" in r:
        return f"skipped: {r['error']}"
    mem = "peak n/a" if r["peak_extra_bytes"] is None else (
        f"peak +{r['peak_extra_bytes'] / MIB:8.1f} MiB ({r['peak_ratio_to_nk_fp32']:.2f}x NK fp32)")
    return f"{r['median_s'] * 1e3:10.2f} ms  ({r['runs']} runs)  {mem}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script (written under build/bench/ by default)")
    p.add_argument("--out", type=Path, help="where to write the JSON (default benchmarks/results/quantize_cpu.json)")
    p.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES), help="which suites to run (default all)")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads (default 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per case (default 900)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return worker_main(args.worker, run_worker, args.threads)

    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    sizes = QUICK if args.quick else FULL
    out = args.out or (REPO / "build" / "bench" / "quantize_cpu_quick.json" if args.quick else RESULTS_DIR / "quantize_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "quantize",
        "quick": args.quick,
        "machine": machine_info(args.threads),
        "method": {
            "time": "median wall time of >= 5 calls after one warm-up (3 calls when the warm-up took over 2 s); "
                    "each case in a fresh process",
            "peak_memory": PEAK_MEMORY_METHOD,
            "nk_fp32_bytes": "N * K * 4, the size of one N x K fp32 distance matrix",
            "module_forward": "eval mode under torch.no_grad()",
            "module_forward_backward": "train mode, z requires grad, backward of [z_q, loss] with a fixed "
                                       "random upstream gradient for z_q and 1 for the loss",
            "modules": MODULE_NOTES,
        },
        "labels": {**NEAREST_IMPLS, **MODULE_IMPLS},
        "results": [],
    }
    todo = [c for c in cases(sizes) if c["suite"] in args.suites]
    run_cases(__file__, todo, doc, out, threads=args.threads, timeout_s=args.timeout, describe=describe,
              outcome=outcome)
    print(f"done in {doc['elapsed_s']:.0f} s; wrote {out}; plot and table: python benchmarks/report.py", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
