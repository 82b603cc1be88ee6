"""Side-by-side comparison of fastvq's sliding-window attention against the anchors, on this CPU, in one run.

  fastvq_cpp       fastvq.sliding_window_attention, backend "cpp" (fastvq._C)
  flex             FlexAttention under torch.compile with a sliding-window BlockMask (forward only:
                   no compiled FlexAttention backward on CPU); compile time is recorded, not timed
  sdpa_mask        torch SDPA with a dense (T, T) boolean window mask (built before timing)
  sdpa_causal      torch SDPA is_causal=True: full causal attention, the cost a window avoids
                   (does not depend on W, so measured once per T)
  torch_reference  fastvq's torch reference (masked softmax, 256 query rows at a time)

q, k, v are (B, H, T, Dh) = (1, 8, T, 64) fp32, T in {1024, 4096, 16384}, W in {128, 256, 1024};
"forward" runs under torch.no_grad(), "forward_backward" backpropagates a fixed upstream gradient
into q, k and v. Every case runs in a fresh subprocess: one warm-up, then the median of several
timed calls (3 for calls over 0.33 s, 1 for calls over 8 s), then the peak extra resident memory of
one more call (common.PEAK_MEMORY_METHOD). Forward cases also record the largest difference from
fastvq's output. Cases that would take over about a minute, or hold a dense T x T matrix at
T = 16384, are skipped with the reason recorded; --budget-s stops starting new cases (fastvq first,
the slow reference last). Results go to benchmarks/results/window_attention_cpu.json;
`python benchmarks/report.py` turns them into the plot and the README table.

  python benchmarks/compare_window_attention.py            # the full run (about 10-12 minutes on 2 quiet cores)
  python benchmarks/compare_window_attention.py --quick    # small sizes, to check the script works
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MIB, PEAK_MEMORY_METHOD, REPO, RESULTS_DIR, machine_info, peak_extra_bytes, run_cases, time_call, worker_main  # noqa: E402

IMPLS = {
    "fastvq_cpp": "fastvq.sliding_window_attention (cpp)",
    "flex": "FlexAttention (torch.compile, sliding-window BlockMask)",
    "sdpa_mask": "torch SDPA, dense boolean mask",
    "sdpa_causal": "torch SDPA is_causal (full attention)",
    "torch_reference": "fastvq torch reference",
}
MODES = ("forward", "forward_backward")
FULL = {"B": 1, "H": 8, "Dh": 64, "T": (1024, 4096, 16384), "W": (128, 256, 1024)}
QUICK = {"B": 1, "H": 2, "Dh": 64, "T": (256, 512), "W": (32, 128)}

# (impl, mode or None for both, T, W or None for all) -> why it is not run. Estimates for 2 quiet cores.
SKIPS = {
    ("flex", "forward_backward", None, None):
        "FlexAttention does not support backward on CPU (NotImplementedError in torch 2.13): forward only",
    ("sdpa_mask", None, 16384, None):
        "dense T x T mask at T = 16384: full T^2 work whatever W (see is_causal at the same T), "
        "estimated over a minute with warm-up, runs and the memory call",
    ("torch_reference", "forward_backward", 16384, 1024):
        "estimated ~25 s per call (71 s measured on a loaded machine): over a minute with warm-up and the memory call",
}
# Order of the run: what the comparison is about first, so that a time budget cuts the slow tail.
ORDER = ("fastvq_cpp", "sdpa_causal", "sdpa_mask", "flex", "torch_reference")


def skip_reason(impl: str, mode: str, t: int, w: int | None, quick: bool) -> str | None:
    if quick and impl != "flex":
        return None
    for (i, m, tt, ww), why in SKIPS.items():
        if i == impl and m in (None, mode) and tt in (None, t) and ww in (None, w):
            return why
    return None


def cases(sizes: dict, quick: bool) -> list[dict]:
    out = []
    for impl in ORDER:
        for mode, t in itertools.product(MODES, sizes["T"]):
            for w in (None,) if impl == "sdpa_causal" else sizes["W"]:
                case = {"suite": mode, "impl": impl, "B": sizes["B"], "H": sizes["H"], "Dh": sizes["Dh"], "T": t, "W": w}
                why = skip_reason(impl, mode, t, w, quick)
                out.append({**case, "skipped": why} if why else case)
    return out


# ----------------------------------------------------------------------------- worker: one case, in its own process

def window_mask(t: int, w: int):
    import torch

    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j <= i) & (j > i - w)


def attention_fn(case: dict, extras: dict):
    """q, k, v -> out for the case's implementation; setup (masks, compilation) done here, untimed."""
    import torch
    import torch.nn.functional as F

    impl, t, w = case["impl"], case["T"], case["W"]
    if impl in ("fastvq_cpp", "torch_reference"):
        from fastvq import sliding_window_attention

        backend = "cpp" if impl == "fastvq_cpp" else "torch"
        return lambda q, k, v: sliding_window_attention(q, k, v, w, backend=backend)
    if impl == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "sdpa_mask":
        mask = window_mask(t, w)
        extras["mask_bytes"] = mask.numel() * mask.element_size()
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

        block_mask = create_block_mask(sliding_window, None, None, t, t, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown implementation {impl!r}")


def case_call(case: dict, extras: dict):
    """The timed call: a forward under no_grad, or a forward plus backward of a fixed upstream gradient."""
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (case["B"], case["H"], case["T"], case["Dh"])
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    attend = attention_fn(case, extras)
    if case["suite"] == "forward":
        def run():
            with torch.no_grad():
                return attend(q, k, v)

        return run, (q, k, v)
    upstream = torch.randn(shape, generator=g)
    for x in (q, k, v):
        x.requires_grad_(True)

    def run():
        for x in (q, k, v):
            x.grad = None
        attend(q, k, v).backward(upstream)
        return q.grad, k.grad, v.grad

    return run, (q, k, v)


def run_worker(case: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    extras: dict = {}
    fn, (q, k, v) = case_call(case, extras)
    if case["impl"] == "flex":  # the first call compiles: time it apart so that it stays out of the median
        t0 = time.perf_counter()
        fn()
        extras["compile_s"] = time.perf_counter() - t0
    timing = time_call(fn, min_runs=case.get("min_runs", 3), slow_runs=1, slow_s=8.0)
    peak = peak_extra_bytes(fn)
    result = {**case, **timing, **extras, "peak_extra_bytes": peak}
    if case["suite"] == "forward" and case["impl"] != "fastvq_cpp":
        from fastvq import sliding_window_attention

        with torch.no_grad():
            ours = sliding_window_attention(q, k, v, case["W"] or case["T"], backend="cpp")
            result["max_abs_diff_vs_fastvq"] = (fn() - ours).abs().max().item()
    return result


# ----------------------------------------------------------------------------- driver


def describe(case: dict) -> str:
    w = "full" if case["W"] is None else case["W"]
    return f"{case['suite']:<16} T={case['T']:<5} W={w:<5} {IMPLS[case['impl']]:<55}"


def outcome(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return f"error: {r['error']}"
    mem = "peak n/a" if r["peak_extra_bytes"] is None else f"peak +{r['peak_extra_bytes'] / MIB:8.1f} MiB"
    extra = f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
    diff = f"  |diff| {r['max_abs_diff_vs_fastvq']:.1e}" if "max_abs_diff_vs_fastvq" in r else ""
    return f"{r['median_s'] * 1e3:10.2f} ms  ({r['runs']} runs)  {mem}{extra}{diff}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script (written under build/bench/ by default)")
    p.add_argument("--out", type=Path, help="where to write the JSON (default benchmarks/results/window_attention_cpu.json)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS), help="which implementations to run (default all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per case (default 300)")
    p.add_argument("--budget-s", type=float, default=720, help="start no new case after this many seconds (default 720)")
    p.add_argument("--min-runs", type=int, default=3,
                   help="timed calls per case at least (default 3; more for a tighter median, e.g. the T-scaling check)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return worker_main(args.worker, run_worker, args.threads)

    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    sizes = QUICK if args.quick else FULL
    out = args.out or (REPO / "build" / "bench" / "window_attention_cpu_quick.json" if args.quick
                       else RESULTS_DIR / "window_attention_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "window_attention",
        "quick": args.quick,
        "machine": machine_info(args.threads),
        "method": {
            "shape": f"q, k, v (B, H, T, Dh) = ({sizes['B']}, {sizes['H']}, T, {sizes['Dh']}) fp32, seed 0",
            "time": "median wall time after one warm-up: up to 50 calls for fast cases, 3 for calls over 0.33 s, "
                    "1 for calls over 8 s; each case in a fresh process",
            "peak_memory": PEAK_MEMORY_METHOD,
            "forward": "under torch.no_grad()",
            "forward_backward": "q, k, v require grad; backward of a fixed random upstream gradient",
            "sdpa_mask": "the (T, T) bool mask is built before timing; its size is mask_bytes",
            "sdpa_causal": "is_causal=True, no window: does not depend on W (W = null)",
            "flex": "torch.compile(flex_attention, dynamic=False) with create_block_mask(sliding window) built before "
                    "timing; compile_s is the first call, excluded from the median",
            "torch_reference": "fastvq's oracle, sliding_window_attention(backend='torch')",
            "window": "query i sees keys i - W < j <= i (the query itself included)",
        },
        "labels": IMPLS,
        "results": [],
    }
    todo = [{**c, "min_runs": args.min_runs} for c in cases(sizes, args.quick) if c["impl"] in args.impls]
    run_cases(__file__, todo, doc, out, threads=args.threads, timeout_s=args.timeout, describe=describe,
              outcome=outcome, budget_s=args.budget_s)
    print(f"done in {doc['elapsed_s']:.0f} s; wrote {out}; plot and table: python benchmarks/report.py", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
