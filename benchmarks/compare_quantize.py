"""Side-by-side comparison of fastvq's VQ op against the anchors, on one machine, in one run.

  nearest_code   fastvq.nearest_code (cpp on CPU, triton on CUDA) | faiss IndexFlatL2 search k=1 (CPU) |
                 the bare matmul x @ cb.T | fastvq's torch reference. CPU: N = 8192, K in {1024, 16384},
                 D in {8, 64, 256}, fp32. CUDA: N = 65536, K in {1024, 16384}, D in {64, 256}, bf16
                 and fp32, plus cosine and a few-rows case (N = 4096, the codebook split across programs)
  matmul_peak    a square matmul of each dtype: the device's practical matmul throughput, the
                 yardstick for nearest_code's FLOP/s (2 N K D / time)
  module         fastvq.VectorQuantizer | taming VectorQuantizer2 | vector-quantize-pytorch
                 VectorQuantize, input (B, D, H, W) = (8, D, 32, 32) on CPU, (32, D, 32, 32) on CUDA,
                 with the same K and D; "forward" is inference (eval mode, no_grad),
                 "forward_backward" a training step (train mode, backward of z_q with a fixed upstream
                 gradient plus the loss)

Each case (benchmarks/common.py): warm-up, the median of >= 5 timed calls (3 for calls over 2 s),
then the peak extra memory of one more call, also as a multiple of one N x K fp32 matrix (the
distance matrix a plain search forms). fastvq's nearest_code cases record how often its index
agrees with the reference's (below 1 only through near-ties). Results:
benchmarks/results/quantize_<device>.json; `python benchmarks/report.py` draws the plot and
writes the README table.

  python benchmarks/compare_quantize.py                  # the full CPU run (about 8 minutes on 2 quiet cores)
  python benchmarks/compare_quantize.py --quick          # small sizes, to check the script
  python benchmarks/compare_quantize.py --device cuda    # on a GPU (benchmarks/gpu_check.sh)
  python benchmarks/compare_quantize.py --dry-run        # the CUDA cases, tiny, on CPU via the Triton interpreter
"""
from __future__ import annotations

import itertools

import common

LABELS = {
    "fastvq_cpp": "fastvq.nearest_code (cpp)",
    "fastvq_triton": "fastvq.nearest_code (triton)",
    "faiss": "faiss IndexFlatL2 (k=1)",
    "matmul": "matmul x @ cb.T (torch)",
    "torch_reference": "fastvq torch reference",
    "matmul_square": "square matmul (torch): the device's matmul throughput",
    "fastvq": "fastvq.VectorQuantizer",
    "taming": "taming VectorQuantizer2",
    "vqp": "vector-quantize-pytorch VectorQuantize",
}
NEAREST = {"cpu": ("fastvq_cpp", "faiss", "matmul", "torch_reference"),
           "cuda": ("fastvq_triton", "matmul", "torch_reference")}
MODULES = ("fastvq", "taming", "vqp")
MODES = ("forward", "forward_backward")
SUITES = ("matmul_peak", "nearest_code", "module_forward", "module_forward_backward")

# nearest: (N, K, D, dtype, metric); module: (B, H, W) with every K x D; square: side of the matmul probe.
_CUDA_NEAREST = [(65536, k, d, dt, "l2") for dt in ("bfloat16", "float32") for d in (64, 256) for k in (1024, 16384)]
SIZES = {
    "cpu": {"nearest": [(8192, k, d, "float32", "l2") for k in (1024, 16384) for d in (8, 64, 256)],
            "square": 2048, "module_BHW": (8, 32, 32), "module_K": (1024, 16384), "module_D": (8, 64, 256)},
    "cpu_quick": {"nearest": [(1024, k, d, "float32", "l2") for k in (64, 512) for d in (8, 64)],
                  "square": 256, "module_BHW": (1, 32, 32), "module_K": (64, 512), "module_D": (8, 64)},
    # the grid, then cosine, and few rows (a VQGAN training batch: the codebook split across programs)
    "cuda": {"nearest": _CUDA_NEAREST + [(65536, 16384, 64, "bfloat16", "cosine"),
                                         (4096, 16384, 256, "bfloat16", "l2")],
             "square": 8192, "module_BHW": (32, 32, 32), "module_K": (1024, 16384), "module_D": (64, 256)},
    "cuda_quick": {"nearest": [(70, k, d, dt, "l2") for dt in ("bfloat16", "float32") for d in (16, 40)
                               for k in (33, 64)] + [(70, 64, 16, "bfloat16", "cosine")],
                   "square": 64, "module_BHW": (1, 8, 8), "module_K": (64,), "module_D": (16,)},
}

MODULE_NOTES = {
    "fastvq": "VectorQuantizer(K, D, beta=0.25), legacy=True, backend auto (cpp on CPU, triton on CUDA)",
    "taming": "VectorQuantizer2(K, D, beta=0.25), legacy=True",
    "vqp": "VectorQuantize(dim=D, codebook_size=K, accept_image_fmap=True), library defaults "
           "(EMA codebook update with decay 0.8 in training, rotation trick, commitment_weight 1)",
}


def plan(args) -> list[dict]:
    s, device = args.sizes, args.device
    dtypes = sorted({n[3] for n in s["nearest"]})
    out = [{"suite": "matmul_peak", "impl": "matmul_square", "device": device, "dtype": dt,
            "N": s["square"], "K": s["square"], "D": s["square"]} for dt in dtypes]
    for n, k, d, dtype, metric in s["nearest"]:
        for impl in NEAREST[args.plan]:
            out.append({"suite": "nearest_code", "impl": impl, "device": device, "dtype": dtype, "metric": metric,
                        "N": n, "K": k, "D": d})
    b, h, w = s["module_BHW"]
    for mode, k, d in itertools.product(MODES, s["module_K"], s["module_D"]):
        for impl in MODULES:
            out.append({"suite": f"module_{mode}", "impl": impl, "device": device, "dtype": "float32",
                        "N": b * h * w, "K": k, "D": d, "B": b, "H": h, "W": w})
    return [c for c in out if c["suite"] in args.suites]


# ----------------------------------------------------------------------------- the calls (bench_quantize.py's too)

def nearest_inputs(case: dict):
    """x (N, D) and the codebook (K, D) of a nearest_code case, from seed 0."""
    import torch

    g = torch.Generator().manual_seed(0)
    dtype, device = getattr(torch, case.get("dtype", "float32")), case.get("device", "cpu")
    return (torch.randn(case["N"], case["D"], generator=g).to(device, dtype),
            torch.randn(case["K"], case["D"], generator=g).to(device, dtype))


def nearest_call(case: dict):
    from fastvq import nearest_code
    from fastvq.ops import nearest_code_reference

    x, cb = nearest_inputs(case)
    impl, metric = case["impl"], case.get("metric", "l2")
    if impl.startswith("fastvq_"):
        backend = impl.removeprefix("fastvq_")
        return lambda: nearest_code(x, cb, metric=metric, backend=backend)
    if impl == "torch_reference":
        return lambda: nearest_code_reference(x, cb, metric)
    if impl in ("matmul", "matmul_square"):
        return lambda: x @ cb.T
    if impl == "faiss" and metric == "l2":
        import faiss

        index = faiss.IndexFlatL2(case["D"])
        index.add(cb.float().numpy())
        xn = x.float().numpy()
        return lambda: index.search(xn, 1)
    raise ValueError(f"no nearest_code implementation {impl!r} for metric {metric!r}")


def make_module(impl: str, K: int, D: int):
    if impl == "fastvq":
        from fastvq import VectorQuantizer

        return VectorQuantizer(K, D, beta=0.25), lambda m, z: m(z)[:2]
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


def module_call(case: dict):
    import torch

    device = case.get("device", "cpu")
    torch.manual_seed(0)
    module, call = make_module(case["impl"], case["K"], case["D"])
    module = module.to(device)
    z = torch.randn(case["B"], case["D"], case["H"], case["W"]).to(device)
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


# ----------------------------------------------------------------------------- one case

def measure(case: dict) -> dict:
    import torch

    from fastvq.bench import peak_memory, time_call

    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        pass
    device = case["device"]
    fn = module_call(case) if case["suite"].startswith("module_") else nearest_call(case)
    timing = time_call(fn, device=device)
    peak = peak_memory(fn, device=device)
    nk_bytes = case["N"] * case["K"] * 4
    result = {**timing, "peak_extra_bytes": peak, "nk_fp32_bytes": nk_bytes,
              "peak_ratio_to_nk_fp32": None if peak is None else peak / nk_bytes}
    if case["suite"] in ("nearest_code", "matmul_peak"):
        result["flop"] = 2 * case["N"] * case["K"] * case["D"]
        result["tflop_per_s"] = result["flop"] / timing["median_s"] / 1e12
    if case["impl"].startswith("fastvq_"):  # below 1 only through near-ties
        from fastvq.ops import nearest_code_reference

        idx, _ = fn()
        ref, _ = nearest_code_reference(*nearest_inputs(case), case["metric"])
        result["agree_with_reference"] = (idx == ref).double().mean().item()
    return result


def summary(r: dict) -> str:
    parts = []
    if "tflop_per_s" in r:
        parts.append(f"{r['tflop_per_s'] * 1e3:.1f} GFLOP/s")
    if r.get("peak_ratio_to_nk_fp32") is not None:
        parts.append(f"{r['peak_ratio_to_nk_fp32']:.2f}x NK fp32")
    if "agree_with_reference" in r:
        parts.append(f"agree {r['agree_with_reference']:.4f}")
    return "  ".join(parts)


def method(args) -> dict:
    import torch

    from fastvq.bench import PEAK_MEMORY_METHOD

    return {
        "time": "fastvq.bench.time_call: median wall time of >= 5 calls after one warm-up (3 calls when the warm-up "
                "took over 2 s); on CUDA three warm-ups and CUDA-event timing; on CPU each case in a fresh process",
        "peak_memory": PEAK_MEMORY_METHOD[args.device],
        "nk_fp32_bytes": "N * K * 4, the size of one N x K fp32 distance matrix",
        "flop": "2 N K D for nearest_code and the matmuls; tflop_per_s = flop / median time",
        "matmul_peak": "a square N x N x N matmul per dtype: the device's practical matmul throughput",
        "agree_with_reference": "fraction of rows where fastvq's index equals nearest_code_reference's",
        "module_forward": "eval mode under torch.no_grad()",
        "module_forward_backward": "train mode, z requires grad, backward of [z_q, loss] with a fixed "
                                   "random upstream gradient for z_q and 1 for the loss",
        "modules": MODULE_NOTES,
        # the fp32 matmul anchor is comparable to the kernel's IEEE fp32 dots only without TF32
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def options(p) -> None:
    p.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES),
                   help="which suites to run (default all)")


COMPARISON = common.Comparison(
    name="quantize", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, summary=summary, options=options, shown=("dtype", "metric", "N", "K", "D"), expected_s=480,
    budget_s={"cpu": 720, "cuda": 240}, timeout_s=900)

if __name__ == "__main__":
    raise SystemExit(common.main(COMPARISON))
