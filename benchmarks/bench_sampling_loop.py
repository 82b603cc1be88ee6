"""Autoregressive sampling loop: fastvq's cached sampler against taming's two samplers, on this CPU.

  fastvq            fastvq.sample_with_past on fastvq.GPT.from_mingpt(the taming model): prefix in
                    one pass, then one token a step through a preallocated KVCache (ring buffers
                    written in place), tokens drawn by the fused fastvq.sample_logits
  taming_past       taming's sample_with_past (growing list of presents, torch.cat every step)
  taming_uncached   taming's sample (the whole sequence recomputed for every token)

The model is taming's minGPT: vocab 1024, 8 layers, 8 heads, width 512, block_size 256, fp32,
weights seed 0, eval mode. Each case samples 256 new tokens (temperature 1, no top-k/top-p:
multinomial in taming) after a 1-token prefix, at batch 1 and 16; tokens/s = batch * 256 / time.
Every case runs in a fresh subprocess on 2 threads: one warm-up, then the median of several timed
calls (1 for calls over 8 s), then the peak extra resident memory of one more call
(common.PEAK_MEMORY_METHOD). Results go to benchmarks/results/sampling_cpu.json.

  python benchmarks/bench_sampling_loop.py            # the full run (the uncached sampler at batch 16 is minutes per call)
  python benchmarks/bench_sampling_loop.py --quick    # a tiny model, to check the script works
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MIB, PEAK_MEMORY_METHOD, REPO, RESULTS_DIR, machine_info, peak_extra_bytes, run_case, time_call, worker_main  # noqa: E402

IMPLS = {
    "fastvq": "fastvq.sample_with_past (KVCache ring buffers, fused sample_logits)",
    "taming_past": "taming sample_with_past (concatenated past)",
    "taming_uncached": "taming sample (no cache, full recompute)",
}
FULL = {"vocab": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 256, "steps": 256, "prefix": 1,
        "batches": (1, 16)}
QUICK = {"vocab": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "steps": 16, "prefix": 1,
         "batches": (1, 4)}


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
    """The timed call of one case (weights and prefix fixed by seed 0)."""
    import torch

    mingpt = _taming_mingpt()
    cfg = case["config"]
    torch.manual_seed(0)
    ref = mingpt.GPT(cfg["vocab"], cfg["block_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                     n_embd=cfg["n_embd"]).eval()
    with torch.no_grad():
        ref.pos_emb.normal_(std=0.02)
    x = torch.randint(0, cfg["vocab"], (case["B"], cfg["prefix"]))
    steps = cfg["steps"]
    if case["impl"] == "fastvq":
        import fastvq

        model = fastvq.GPT.from_mingpt(ref).eval()
        gen = torch.Generator().manual_seed(0)
        return lambda: fastvq.sample_with_past(x, model, steps, generator=gen)
    if case["impl"] == "taming_past":
        return lambda: mingpt.sample_with_past(x, ref, steps)
    return lambda: mingpt.sample(ref, x, steps, sample=True)


def run_worker(case: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    fn = case_call(case)
    timing = time_call(fn, min_runs=3, slow_runs=1, slow_s=8.0)
    peak = peak_extra_bytes(fn)
    tokens = case["B"] * case["config"]["steps"]
    return {**case, **timing, "tokens_per_s": tokens / timing["median_s"], "peak_extra_bytes": peak}


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
    p.add_argument("--out", type=Path, help="where to write the JSON (default benchmarks/results/sampling_cpu.json)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS), help="which samplers to run (default all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per case (default 1800)")
    p.add_argument("--budget-s", type=float, default=3600, help="start no new case after this many seconds (default 3600)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return worker_main(args.worker, run_worker, args.threads)

    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    config = QUICK if args.quick else FULL
    out = args.out or (REPO / "build" / "bench" / "sampling_cpu_quick.json" if args.quick
                       else RESULTS_DIR / "sampling_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "sampling_loop",
        "quick": args.quick,
        "machine": machine_info(args.threads),
        "method": {
            "model": f"taming minGPT vocab {config['vocab']}, {config['n_layer']} layers, {config['n_head']} heads, "
                     f"width {config['n_embd']}, block_size {config['block_size']}, fp32, seed 0, eval",
            "task": f"{config['steps']} new tokens after a {config['prefix']}-token prefix, temperature 1, no top-k/top-p",
            "time": "median wall time of the whole sampling call after one warm-up: up to 50 calls for fast cases, "
                    "3 for calls over 0.33 s, 1 for calls over 8 s; each case in a fresh process",
            "tokens_per_s": "batch * new tokens / median time",
            "peak_memory": PEAK_MEMORY_METHOD,
        },
        "labels": IMPLS,
        "results": [],
    }
    todo = [{"impl": impl, "B": b, "config": {k: v for k, v in config.items() if k != "batches"}}
            for b in config["batches"] for impl in IMPLS if impl in args.impls]
    start = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"{len(todo)} cases, {args.threads} threads, writing {out}; load average {load:.2f}", flush=True)
    if load > 0.5:
        print(f"warning: the machine is not quiet (load average {load:.2f}); timings will be noisy", flush=True)
    for i, case in enumerate(todo, 1):
        if time.perf_counter() - start > args.budget_s:
            r = {**case, "skipped": f"time budget of {args.budget_s:.0f} s spent (--budget-s)"}
        else:
            r = run_case(__file__, case, args.threads, args.timeout)
        doc["results"].append(r)
        out.write_text(json.dumps(doc, indent=1) + "\n")  # after every case: a crash keeps what was measured
        print(f"[{i}/{len(todo)}] B={case['B']:<3} {IMPLS[case['impl']]:<70} {outcome(r)}", flush=True)
    doc["machine"]["load_average_1_5_15min_at_end"] = [round(v, 2) for v in os.getloadavg()]
    doc["elapsed_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"done in {doc['elapsed_s']:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
