"""Autoregressive sampling loop: fastvq's cached sampler against taming's two samplers.

  fastvq            fastvq.sample_with_past on fastvq.GPT.from_mingpt(the taming model): prefix in
                    one pass, then one token a step through a preallocated KVCache (ring buffers
                    written in place), tokens drawn by the fused fastvq.sample_logits
  taming_past       taming's sample_with_past (growing list of presents, torch.cat every step)
  taming_uncached   taming's sample (the whole sequence recomputed for every token)
  fastvq_rope       fastvq.sample_with_past on a fastvq.GPT with rope and a window of 256: a ring of
                    256 slots per layer, so memory must stay flat however many tokens are drawn

Speed: taming's minGPT (vocab 1024, 8 layers, 8 heads, width 512, fp32, weights seed 0, eval)
samples 256 and 1024 new tokens (temperature 1, no top-k/top-p: multinomial in taming) after a
1-token prefix, at batch 1 and 16; block_size is 256, or 1025 for 1024 tokens. tokens/s = batch *
new tokens / time. taming's uncached sampler costs O(n^2) in the number of tokens: a case of it is
run only if its estimate from the shortest length measured (time * (n / n0)^2) fits
--uncached-budget-s for its warm-up, timed call and memory call; otherwise it is recorded as
skipped with the estimate. Memory: the rope model (same size, window 256) samples 256, 1024 and
4096 tokens at batch 1; its peak extra memory must not grow with the length.
Every case runs in a fresh subprocess: one warm-up, then the median of several timed calls (1 for
calls over 8 s), then the peak extra memory of one more call (common.PEAK_MEMORY_METHOD on CPU,
torch.cuda.max_memory_allocated on CUDA). Results go to benchmarks/results/sampling_cpu.json
(sampling_cuda.json with --device cuda); benchmarks/report.py draws the plot and the README table.

  python benchmarks/bench_sampling_loop.py            # the full run (about 25 minutes on the 2-core CPU here)
  python benchmarks/bench_sampling_loop.py --quick    # a tiny model, to check the script works
  python benchmarks/bench_sampling_loop.py --device cuda --lengths 256 --impls fastvq taming_past --memory-lengths
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MIB, PEAK_MEMORY_METHOD, REPO, RESULTS_DIR, machine_info, peak_extra_bytes, run_cases, time_call, worker_main  # noqa: E402

IMPLS = {
    "fastvq": "fastvq.sample_with_past (KVCache ring buffers, fused sample_logits)",
    "taming_past": "taming sample_with_past (concatenated past)",
    "taming_uncached": "taming sample (no cache, full recompute)",
    "fastvq_rope": "fastvq.sample_with_past, rope GPT with a window (a ring of `window` slots per layer)",
}
SPEED_IMPLS = ("fastvq", "taming_past", "taming_uncached")
FULL = {"vocab": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 256, "prefix": 1, "window": 256,
        "lengths": (256, 1024), "batches": (1, 16), "memory_lengths": (256, 1024, 4096)}
QUICK = {"vocab": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "prefix": 1, "window": 16,
         "lengths": (16, 48), "batches": (1, 4), "memory_lengths": (16, 64, 256)}
MODEL_KEYS = ("vocab", "n_layer", "n_head", "n_embd", "prefix", "window")


def _taming_mingpt():
    """taming's mingpt imports transformers' top_k_top_p_filtering (current transformers lacks it);
    these samplers never call it without top_k, so a stub will do when it is missing."""
    try:
        from transformers import top_k_top_p_filtering  # noqa: F401
    except ImportError:
        stub = types.ModuleType("transformers")
        stub.top_k_top_p_filtering = None
        sys.modules["transformers"] = stub
    from taming.modules.transformer import mingpt

    return mingpt


def case_call(case: dict):
    """The timed call of one case (weights and prefix fixed by seed 0), on case["device"]."""
    import torch

    import fastvq

    cfg, device, steps = case["config"], case["device"], case["steps"]
    torch.manual_seed(0)
    x = torch.randint(0, cfg["vocab"], (case["B"], cfg["prefix"])).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    if case["impl"] == "fastvq_rope":
        model = fastvq.GPT(cfg["vocab"], cfg["block_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                           n_embd=cfg["n_embd"], window=cfg["window"], rope=True).to(device).eval()
        return lambda: fastvq.sample_with_past(x, model, steps, generator=gen)
    mingpt = _taming_mingpt()
    ref = mingpt.GPT(cfg["vocab"], cfg["block_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                     n_embd=cfg["n_embd"]).eval()
    with torch.no_grad():
        ref.pos_emb.normal_(std=0.02)
    ref = ref.to(device)
    if case["impl"] == "fastvq":
        model = fastvq.GPT.from_mingpt(ref).eval()
        return lambda: fastvq.sample_with_past(x, model, steps, generator=gen)
    if case["impl"] == "taming_past":
        return lambda: mingpt.sample_with_past(x, ref, steps)
    return lambda: mingpt.sample(ref, x, steps, sample=True)


def run_worker(case: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    call = case_call(case)
    if case["device"] == "cuda":
        def fn():
            out = call()
            torch.cuda.synchronize()
            return out
    else:
        fn = call
    timing = time_call(fn, min_runs=3, slow_runs=1, slow_s=8.0)
    if case["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        peak = torch.cuda.max_memory_allocated() - before
        del out
    else:
        peak = peak_extra_bytes(fn)
    tokens = case["B"] * case["steps"]
    return {**case, **timing, "tokens_per_s": tokens / timing["median_s"], "peak_extra_bytes": peak}


def uncached_estimate(case: dict, done: list[dict]) -> tuple[float, str] | None:
    """(seconds per call, how) for taming's uncached sampler at case's length, scaled as n^2 from the
    shortest length measured at the same batch; None when nothing shorter was measured."""
    base = [r for r in done if r["impl"] == "taming_uncached" and r["B"] == case["B"] and "median_s" in r
            and r["steps"] < case["steps"]]
    if not base:
        return None
    r = min(base, key=lambda r: r["steps"])
    est = r["median_s"] * (case["steps"] / r["steps"]) ** 2
    return est, f"{r['median_s']:.3g} s measured at {r['steps']} tokens x ({case['steps']}/{r['steps']})^2"


def plan(config: dict, impls: list[str], lengths, batches, memory_lengths, device: str) -> list[dict]:
    """Speed cases, shortest length first (the uncached estimates need it), then the memory cases."""
    model = {k: config[k] for k in MODEL_KEYS}
    todo = [{"suite": "speed", "impl": impl, "B": b, "steps": n, "device": device,
             "config": {**model, "block_size": max(config["block_size"], n + config["prefix"])}}
            for n in sorted(lengths) for b in batches for impl in SPEED_IMPLS if impl in impls]
    if "fastvq_rope" in impls:
        todo += [{"suite": "memory", "impl": "fastvq_rope", "B": 1, "steps": n, "device": device,
                  "config": {**model, "block_size": config["block_size"]}} for n in sorted(memory_lengths)]
    return todo


def describe(case: dict) -> str:
    return f"{case['suite']:<6} B={case['B']:<3} n={case['steps']:<5} {case['impl']:<16}"


def outcome(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return f"error: {r['error']}"
    mem = "peak n/a" if r["peak_extra_bytes"] is None else f"peak +{r['peak_extra_bytes'] / MIB:8.1f} MiB"
    return f"{r['tokens_per_s']:10.1f} tok/s  {r['median_s']:8.3f} s ({r['runs']} runs)  {mem}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, to check the script (written under build/bench/ by default)")
    p.add_argument("--out", type=Path, help="where to write the JSON (default benchmarks/results/sampling_<device>.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run (default cpu)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS), help="which samplers to run (default all)")
    p.add_argument("--lengths", nargs="+", type=int, help="new tokens per speed case (default 256 1024)")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes of the speed cases (default 1 16)")
    p.add_argument("--memory-lengths", nargs="*", type=int,
                   help="new tokens per memory case of the rope model (default 256 1024 4096; none: skip them)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case (default 1800)")
    p.add_argument("--budget-s", type=float, default=3600, help="start no new case after this many seconds (default 3600)")
    p.add_argument("--uncached-budget-s", type=float, default=300,
                   help="skip a taming_uncached case whose estimated warm-up + timed + memory calls exceed this (default 300)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return worker_main(args.worker, run_worker, args.threads)

    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    for name in ("lengths", "batches", "memory_lengths"):
        if any(v < 1 for v in getattr(args, name) or ()):
            p.error(f"--{name.replace('_', '-')} must be positive integers, got {getattr(args, name)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    config = QUICK if args.quick else FULL
    lengths = args.lengths or config["lengths"]
    batches = args.batches or config["batches"]
    memory_lengths = config["memory_lengths"] if args.memory_lengths is None else args.memory_lengths
    name = f"sampling_{args.device}"
    out = args.out or (REPO / "build" / "bench" / f"{name}_quick.json" if args.quick else RESULTS_DIR / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    if args.device == "cuda":
        import torch

        machine["device"] = torch.cuda.get_device_name()
    doc = {
        "benchmark": "sampling",
        "quick": args.quick,
        "device": args.device,
        "machine": machine,
        "method": {
            "model": f"taming minGPT vocab {config['vocab']}, {config['n_layer']} layers, {config['n_head']} heads, "
                     f"width {config['n_embd']}, block_size {config['block_size']} (or new tokens + prefix when "
                     f"larger), fp32, seed 0, eval; memory cases: fastvq.GPT of the same size with rope and "
                     f"window {config['window']}",
            "task": f"new tokens after a {config['prefix']}-token prefix, temperature 1, no top-k/top-p",
            "time": "median wall time of the whole sampling call after one warm-up: up to 50 calls for fast cases, "
                    "3 for calls over 0.33 s, 1 for calls over 8 s; each case in a fresh process",
            "tokens_per_s": "batch * new tokens / median time",
            "uncached_estimate": "taming_uncached at a longer length is run only if its estimated call time, scaled "
                                 "as n^2 from the shortest length measured at the same batch, times 3 (warm-up, "
                                 f"timed call, memory call) fits {args.uncached_budget_s:.0f} s",
            "peak_memory": ("torch.cuda.max_memory_allocated during one call minus memory_allocated before it"
                            if args.device == "cuda" else PEAK_MEMORY_METHOD),
        },
        "labels": IMPLS,
        "results": [],
    }
    todo = plan(config, args.impls, lengths, batches, memory_lengths, args.device)

    def too_slow(case, results):
        """taming's O(n^2) sampler at a length whose estimated calls exceed --uncached-budget-s."""
        estimate = uncached_estimate(case, results) if case["impl"] == "taming_uncached" else None
        if estimate is None or 3 * estimate[0] <= args.uncached_budget_s:
            return None
        return {**case, "skipped": f"O(n^2) sampler estimated at ~{estimate[0]:.3g} s per call ({estimate[1]}); "
                                   f"warm-up, timed and memory calls exceed --uncached-budget-s "
                                   f"{args.uncached_budget_s:g} s", "estimated_s": round(estimate[0], 3)}

    run_cases(__file__, todo, doc, out, threads=args.threads, timeout_s=args.timeout, describe=describe,
              outcome=outcome, budget_s=args.budget_s, skip=too_slow, label=f" on {args.device}")
    print(f"done in {doc['elapsed_s']:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
