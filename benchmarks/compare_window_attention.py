"""Side-by-side comparison of fastvq's sliding-window attention against the anchors, on one machine, in one run.

  fastvq_cpp / fastvq_triton   fastvq.sliding_window_attention, backend "cpp" on CPU, "triton" on CUDA
  flex             FlexAttention under torch.compile with a sliding-window BlockMask (the window a
                   captured tensor: one compilation per T and mode); compile time recorded, not timed.
                   No compiled FlexAttention backward on CPU: forward only there
  sdpa_mask        torch SDPA with a dense (T, T) boolean window mask (built before timing)
  sdpa_causal      torch SDPA is_causal=True: full causal attention, the cost a window avoids
                   (does not depend on W, so measured once per T)
  torch_reference  fastvq's torch reference, sliding_window_attention(backend="torch") (CPU only)

CPU: q, k, v (B, H, T, Dh) = (1, 8, T, 64) fp32, T in {1024, 4096, 16384}, W in {128, 256, 1024}.
CUDA: (1, 16, T, 64) bf16, (T, W) in (16384, 1024), (16384, 256), (65536, 1024), (4096, 256),
(4096, 1024), (65536, 256), most telling first so that a short budget keeps them; the dense mask
only up to T = 16384. "forward" runs under torch.no_grad(), "forward_backward" backpropagates a
fixed upstream gradient into q, k and v. Each case (benchmarks/common.py): one warm-up (three on
CUDA), then the median of several timed calls (fastvq's at least 9, for the T-scaling ratios; 3 for
calls over 0.33 s, 1 for calls over 8 s), then the peak extra memory of one more call. Forward cases
of the anchors record the largest difference from fastvq's output; every case records the FLOPs
inside the band (4 B H Dh sum_i min(i + 1, W) forward, 3.5x that for forward + backward). On CPU,
cases that would take over about a minute, or hold a dense T x T matrix at T = 16384, are skipped
with the reason recorded; --budget-s stops starting new cases (fastvq first, the slow reference
last). Results: benchmarks/results/window_attention_<device>.json; `python benchmarks/report.py`
draws the plot and writes the README table.

  python benchmarks/compare_window_attention.py                  # the full CPU run (about 6 minutes on 2 quiet cores)
  python benchmarks/compare_window_attention.py --quick          # small sizes, to check the script
  python benchmarks/compare_window_attention.py --device cuda    # on a GPU (benchmarks/gpu_check.sh)
  python benchmarks/compare_window_attention.py --dry-run        # the CUDA cases, tiny, on CPU (Triton interpreter)
"""
from __future__ import annotations

import itertools
import time

import common

LABELS = {
    "fastvq_cpp": "fastvq.sliding_window_attention (cpp)",
    "fastvq_triton": "fastvq.sliding_window_attention (triton)",
    "flex": "FlexAttention (torch.compile, sliding-window BlockMask)",
    "sdpa_mask": "torch SDPA, dense boolean mask",
    "sdpa_causal": "torch SDPA is_causal (full attention)",
    "torch_reference": "fastvq torch reference",
}
MODES = ("forward", "forward_backward")
# Order of the run: what the comparison is about first, so that a time budget cuts the slow tail.
IMPLS = {"cpu": ("fastvq_cpp", "sdpa_causal", "sdpa_mask", "flex", "torch_reference"),
         "cuda": ("fastvq_triton", "flex", "sdpa_mask", "sdpa_causal")}
FASTVQ_MIN_RUNS = 9  # a tight median for fastvq: report.py reads T-scaling ratios from it

SIZES = {
    "cpu": {"B": 1, "H": 8, "Dh": 64, "dtype": "float32",
            "TW": list(itertools.product((1024, 4096, 16384), (128, 256, 1024))), "mask_max_T": 4096},
    "cpu_quick": {"B": 1, "H": 2, "Dh": 64, "dtype": "float32",
                  "TW": list(itertools.product((256, 512), (32, 128))), "mask_max_T": 512},
    "cuda": {"B": 1, "H": 16, "Dh": 64, "dtype": "bfloat16",
             "TW": [(16384, 1024), (16384, 256), (65536, 1024), (4096, 256), (4096, 1024), (65536, 256)],
             "mask_max_T": 16384},
    "cuda_quick": {"B": 1, "H": 2, "Dh": 32, "dtype": "bfloat16", "TW": [(96, 16)], "mask_max_T": 96},
}
MASK_SKIP = ("dense T x T mask: full T^2 work whatever W (see is_causal at the same T); on CPU over a minute "
             "with warm-up, runs and the memory call at T = 16384")
# (impl, mode or None for both, T, W or None for all) -> why it is not run: estimates for 2 quiet cores.
CPU_SKIPS = {
    ("torch_reference", "forward_backward", 16384, 1024):
        "estimated ~25 s per call (71 s measured on a loaded machine): over a minute with warm-up and the memory call",
}


def skip_reason(case: dict, plan: str, sizes: dict) -> str | None:
    impl, mode, t, w = case["impl"], case["suite"], case["T"], case["W"]
    if impl == "flex" and mode == "forward_backward" and case["device"] == "cpu":
        return "FlexAttention does not support backward on CPU (NotImplementedError in torch 2.13): forward only"
    if impl == "sdpa_mask" and t > sizes["mask_max_T"]:
        return MASK_SKIP
    if plan == "cpu":
        for (i, m, tt, ww), why in CPU_SKIPS.items():
            if i == impl and m in (None, mode) and tt in (None, t) and ww in (None, w):
                return why
    return None


def band_flops(b: int, h: int, t: int, d: int, w: int) -> float:
    """Forward multiply-adds x 2 inside the band: QK^T and PV over sum_i min(i + 1, W) pairs."""
    pairs = w * (w + 1) // 2 + (t - w) * w if t > w else t * (t + 1) // 2
    return 4.0 * b * h * d * pairs


def plan(args) -> list[dict]:
    s = args.sizes
    backend = "triton" if args.plan == "cuda" else "cpp"

    def case(impl, mode, t, w):
        c = {"suite": mode, "impl": impl, "device": args.device, "dtype": s["dtype"], "B": s["B"], "H": s["H"],
             "Dh": s["Dh"], "T": t, "W": w, "backend": backend,
             "band_flops_forward": band_flops(s["B"], s["H"], t, s["Dh"], w or t),
             "min_runs": FASTVQ_MIN_RUNS if impl.startswith("fastvq_") else 3}
        why = skip_reason(c, args.plan, s)
        return {**c, "skipped": why} if why else c

    impls = [i for i in IMPLS[args.plan] if i in args.impls]
    out, causal_done = [], set()
    if args.plan == "cuda":  # (T, W) first: a budget cut keeps whole rows of the table
        for (t, w), impl, mode in itertools.product(s["TW"], impls, MODES):
            if impl == "sdpa_causal":
                if (t, mode) in causal_done:
                    continue
                causal_done.add((t, mode))
                w = None
            out.append(case(impl, mode, t, w))
        return out
    for impl, mode in itertools.product(impls, MODES):  # implementation first: the slow reference last
        for t, w in s["TW"]:
            if impl == "sdpa_causal":
                if (t, mode) in causal_done:
                    continue
                causal_done.add((t, mode))
                w = None
            out.append(case(impl, mode, t, w))
    return out


# ----------------------------------------------------------------------------- the calls (bench_window_attention.py's too)

def window_mask(t: int, w: int, device="cpu"):
    import torch

    i, j = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]
    return (j <= i) & (j > i - w)


def attention_fn(case: dict, extras: dict):
    """q, k, v -> out for the case's implementation; setup (masks, compilation) done here, untimed."""
    import torch
    import torch.nn.functional as F

    impl, t, w, device = case["impl"], case["T"], case["W"], case.get("device", "cpu")
    if impl.startswith("fastvq_") or impl == "torch_reference":
        from fastvq import sliding_window_attention

        backend = "torch" if impl == "torch_reference" else impl.removeprefix("fastvq_")
        return lambda q, k, v: sliding_window_attention(q, k, v, w, backend=backend)
    if impl == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "sdpa_mask":
        mask = window_mask(t, w, device)
        extras["mask_bytes"] = mask.numel() * mask.element_size()
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "flex":
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        dynamo = torch._dynamo.config  # many (T, mode) compilations in one process on CUDA
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        window = torch.tensor(w, device=device)

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        block_mask = create_block_mask(sliding_window, None, None, t, t, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown implementation {impl!r}")


def case_call(case: dict, extras: dict):
    """The timed call and its inputs q, k, v (common.attention_call on this case's implementation)."""
    return common.attention_call(case, attention_fn(case, extras))


# ----------------------------------------------------------------------------- one case

def measure(case: dict) -> dict:
    import torch

    from fastvq import sliding_window_attention
    from fastvq.bench import peak_memory, time_call

    device = case["device"]
    extras: dict = {}
    fn, (q, k, v) = case_call(case, extras)
    if case["impl"] == "flex":  # the first call compiles: time it apart so that it stays out of the median
        t0 = time.perf_counter()
        fn()
        extras["compile_s"] = time.perf_counter() - t0
    timing = time_call(fn, device=device, min_runs=case["min_runs"],
                       slow_runs=1, slow_s=8.0)
    peak = peak_memory(fn, device=device)
    flops = case["band_flops_forward"] * (1 if case["suite"] == "forward" else 3.5)
    result = {**timing, **extras, "peak_extra_bytes": peak, "band_tflop_per_s": flops / timing["median_s"] / 1e12}
    if case["suite"] == "forward" and not case["impl"].startswith("fastvq_"):
        with torch.no_grad():
            ours = sliding_window_attention(q, k, v, case["W"] or case["T"], backend=case["backend"])
            result["max_abs_diff_vs_fastvq"] = (fn().float() - ours.float()).abs().max().item()
    return result


def summary(r: dict) -> str:
    parts = [f"band {r['band_tflop_per_s'] * 1e3:.1f} GFLOP/s"]
    if "compile_s" in r:
        parts.append(f"compile {r['compile_s']:.1f} s")
    if "max_abs_diff_vs_fastvq" in r:
        parts.append(f"|diff| {r['max_abs_diff_vs_fastvq']:.1e}")
    return "  ".join(parts)


def method(args) -> dict:
    from fastvq.bench import PEAK_MEMORY_METHOD

    s = args.sizes
    return {
        "shape": f"q, k, v (B, H, T, Dh) = ({s['B']}, {s['H']}, T, {s['Dh']}) {s['dtype']}, seed 0",
        "time": "fastvq.bench.time_call: median time after one warm-up (three and CUDA-event timing on CUDA): up to "
                "50 calls for fast cases, at least 3 (fastvq 9), 3 for calls over 0.33 s, 1 for calls over 8 s; "
                "on CPU each case in a fresh process",
        "peak_memory": PEAK_MEMORY_METHOD[args.device],
        "forward": "under torch.no_grad()",
        "forward_backward": "q, k, v require grad; torch.autograd.grad of a fixed random upstream gradient",
        "sdpa_mask": "the (T, T) bool mask is built before timing; its size is mask_bytes",
        "sdpa_causal": "is_causal=True, no window: does not depend on W (W = null)",
        "flex": "torch.compile(flex_attention, dynamic=False) with create_block_mask(sliding window, the window a "
                "captured tensor) built before timing; compile_s is the first call, excluded from the median",
        "torch_reference": "fastvq's oracle, sliding_window_attention(backend='torch')",
        "window": "query i sees keys i - W < j <= i (the query itself included)",
        "band_tflop_per_s": "band_flops_forward (x 3.5 for forward + backward) / median time",
    }


def options(p) -> None:
    p.add_argument("--impls", nargs="+", choices=list(LABELS), default=list(LABELS),
                   help="which implementations to run (default all that the device has)")


COMPARISON = common.Comparison(
    name="window_attention", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, summary=summary, options=options, shown=("dtype", "T", "W"), expected_s=360,
    budget_s={"cpu": 600, "cuda": 240}, timeout_s=300)

if __name__ == "__main__":
    raise SystemExit(common.main(COMPARISON))
