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
On CUDA (benchmarks/gpu_check.sh) the defaults shrink to what a lent GPU's minutes allow: 256 new
tokens at batch 1 and 16, fastvq against taming's sample_with_past, no memory cases.
Each case (benchmarks/common.py): one warm-up, then the median of several timed calls (1 for calls
over 8 s), then the peak extra memory of one more call. Results:
benchmarks/results/sampling_<device>.json; benchmarks/report.py draws the plot and writes the
README table.

  python benchmarks/compare_sampling.py                  # the full CPU run (about 22 minutes on 2 quiet cores)
  python benchmarks/compare_sampling.py --quick          # a tiny model, to check the script
  python benchmarks/compare_sampling.py --device cuda    # on a GPU (benchmarks/gpu_check.sh)
  python benchmarks/compare_sampling.py --dry-run        # the CUDA cases with a tiny model, on CPU
"""
from __future__ import annotations

import sys
import types

import common

LABELS = {
    "fastvq": "fastvq.sample_with_past (KVCache ring buffers, fused sample_logits)",
    "taming_past": "taming sample_with_past (concatenated past)",
    "taming_uncached": "taming sample (no cache, full recompute)",
    "fastvq_rope": "fastvq.sample_with_past, rope GPT with a window (a ring of `window` slots per layer)",
}
SPEED_IMPLS = ("fastvq", "taming_past", "taming_uncached")
_FULL_MODEL = {"vocab": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 256, "prefix": 1, "window": 256}
_TINY_MODEL = {"vocab": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "prefix": 1, "window": 16}
SIZES = {
    "cpu": {"model": _FULL_MODEL, "lengths": (256, 1024), "batches": (1, 16), "memory_lengths": (256, 1024, 4096),
            "impls": tuple(LABELS)},
    "cpu_quick": {"model": _TINY_MODEL, "lengths": (16, 48), "batches": (1, 4), "memory_lengths": (16, 64, 256),
                  "impls": tuple(LABELS)},
    "cuda": {"model": _FULL_MODEL, "lengths": (256,), "batches": (1, 16), "memory_lengths": (),
             "impls": ("fastvq", "taming_past")},
    "cuda_quick": {"model": _TINY_MODEL, "lengths": (16,), "batches": (1, 4), "memory_lengths": (),
                   "impls": ("fastvq", "taming_past")},
}


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


def plan(args) -> list[dict]:
    """Speed cases, shortest length first (the uncached estimates need it), then the memory cases."""
    s = args.sizes
    model = s["model"]
    impls = args.impls or s["impls"]
    lengths, batches = args.lengths or s["lengths"], args.batches or s["batches"]
    memory_lengths = s["memory_lengths"] if args.memory_lengths is None else args.memory_lengths
    todo = [{"suite": "speed", "impl": impl, "device": args.device, "B": b, "steps": n,
             "config": {**model, "block_size": max(model["block_size"], n + model["prefix"])}}
            for n in sorted(lengths) for b in batches for impl in SPEED_IMPLS if impl in impls]
    if "fastvq_rope" in impls:
        todo += [{"suite": "memory", "impl": "fastvq_rope", "device": args.device, "B": 1, "steps": n, "config": model}
                 for n in sorted(memory_lengths)]
    return todo


# ----------------------------------------------------------------------------- one case

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


def measure(case: dict) -> dict:
    from fastvq.bench import peak_memory, time_call

    fn = case_call(case)
    timing = time_call(fn, device=case["device"], min_runs=3, slow_runs=1, slow_s=8.0)
    peak = peak_memory(fn, device=case["device"])
    return {**timing, "tokens_per_s": case["B"] * case["steps"] / timing["median_s"], "peak_extra_bytes": peak}


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


def too_slow(case: dict, results: list[dict], args) -> dict | None:
    """taming's O(n^2) sampler at a length whose estimated calls exceed --uncached-budget-s."""
    estimate = uncached_estimate(case, results) if case["impl"] == "taming_uncached" else None
    if estimate is None or 3 * estimate[0] <= args.uncached_budget_s:
        return None
    return {**case, "skipped": f"O(n^2) sampler estimated at ~{estimate[0]:.3g} s per call ({estimate[1]}); "
                               f"warm-up, timed and memory calls exceed --uncached-budget-s "
                               f"{args.uncached_budget_s:g} s", "estimated_s": round(estimate[0], 3)}


def summary(r: dict) -> str:
    return f"{r['tokens_per_s']:.1f} tok/s"


def method(args) -> dict:
    from fastvq.bench import PEAK_MEMORY_METHOD

    m = args.sizes["model"]
    return {
        "model": f"taming minGPT vocab {m['vocab']}, {m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']}, "
                 f"block_size {m['block_size']} (or new tokens + prefix when larger), fp32, seed 0, eval; memory "
                 f"cases: fastvq.GPT of the same size with rope and window {m['window']}",
        "task": f"new tokens after a {m['prefix']}-token prefix, temperature 1, no top-k/top-p",
        "time": "fastvq.bench.time_call: median time of the whole sampling call after one warm-up (three on CUDA): "
                "up to 50 calls for fast cases, 3 for calls over 0.33 s, 1 for calls over 8 s; on CPU each case in "
                "a fresh process",
        "tokens_per_s": "batch * new tokens / median time",
        "uncached_estimate": "taming_uncached at a longer length is run only if its estimated call time, scaled "
                             "as n^2 from the shortest length measured at the same batch, times 3 (warm-up, "
                             f"timed call, memory call) fits {args.uncached_budget_s:.0f} s",
        "peak_memory": PEAK_MEMORY_METHOD[args.device],
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def options(p) -> None:
    p.add_argument("--impls", nargs="+", choices=list(LABELS),
                   help="which samplers to run (default all on CPU; fastvq and taming_past on CUDA)")
    p.add_argument("--lengths", nargs="+", type=_positive,
                   help="new tokens per speed case (default 256 1024; 256 on CUDA)")
    p.add_argument("--batches", nargs="+", type=_positive, help="batch sizes of the speed cases (default 1 16)")
    p.add_argument("--memory-lengths", nargs="*", type=_positive,
                   help="new tokens per memory case of the rope model (default 256 1024 4096 on CPU, none on CUDA; "
                        "none: skip them)")
    p.add_argument("--uncached-budget-s", type=float, default=300,
                   help="skip a taming_uncached case whose estimated warm-up + timed + memory calls exceed this "
                        "(default 300)")


COMPARISON = common.Comparison(
    name="sampling", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, summary=summary, skip=too_slow, options=options, shown=("B", "steps"), expected_s=1320,
    budget_s={"cpu": 1620, "cuda": 240}, timeout_s=1800)

if __name__ == "__main__":
    raise SystemExit(common.main(COMPARISON))
