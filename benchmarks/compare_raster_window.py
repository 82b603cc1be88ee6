"""Side-by-side comparison of fastvq's raster-window (2-D local) attention against the anchors, and
the wavefront against one-token-a-step decoding of a 2-D prior, on one machine, in one run.

Attention (suites "forward", "forward_backward"), the window of a code grid in raster order (token
(i, j) sees rows i - rows .. i - 1 at columns j - left .. j + right, and its own row from j - left
up to itself; fastvq.ops.raster_window.raster_window_visible):
  fastvq_<backend>  fastvq.raster_window_attention with the backend auto picks here, named in the
                    label: cpp on CPU once csrc/raster_window.cpp registers KERNELS["cpp"] (until
                    then auto falls back to the torch reference: fastvq_torch), triton on CUDA
  flex              FlexAttention under torch.compile with a BlockMask from a mask_mod of the same
                    rule (create_block_mask); compile time recorded, not timed. No compiled
                    FlexAttention backward on CPU: forward only there
  sdpa_mask         torch SDPA with the dense (T, T) boolean mask of the rule (built before timing)
  sliding_window    fastvq.sliding_window_attention (cpp on CPU, triton on CUDA) with the 1-D window
                    that contains the 2-D one, W = rows * width + left + 1: what a 1-D window pays
                    for the same context
  torch_reference   fastvq's torch reference, raster_window_attention(backend="torch"), forward,
                    small grids only (skipped where fastvq_torch already is it)

Decode (suite "decode", CPU): sample_grid(model, 64, 64) of a fastvq.models.gpt2d.GPT2D of ~26M
parameters (vocab 1024, 8 layers, 8 heads, width 512, rows = left = 8, right = 7; seed 0, eval,
fp32) at batch 1, wavefront=True (rows advance together, right + 1 columns apart) against
wavefront=False (one token a step). The sequential decoder's cost per code is the same on every row
(a ring of image rows), so by default it samples only the first --sequential-rows rows (8) and its
full-grid time is extrapolated (x 64 / 8), which the JSON and the report say; --sequential-rows 64
measures the whole grid. Both orders draw the same codes (counter-based uniforms per position): each
case records a hash of the first rows to show it.

Scaling (suite "scaling"): fastvq at grid side g and 2g (forward, and forward + backward) in one
process, timed in alternating blocks (a few untimed calls, then timed ones); the median over rounds
of the blocks' time(2g) / time(g) is the figure report.py judges the T-scaling goal by (the tables' medians come from separate processes
minutes apart, and moved by ±15% between runs).

CPU: q, k, v (B, H, T, Dh) = (1, 8, T, 64) fp32, grids 32x32, 64x64, 128x128 (T = 1024, 4096,
16384), rows = left = right = 8, n_prefix = 0; the dense mask up to T = 4096, the torch reference up
to T = 4096. CUDA: (1, 16, T, 64) bf16, grids 128x128, 256x256, 64x64 (most telling first), every
implementation forward and forward + backward (FlexAttention included), the dense mask up to
T = 16384, no decode cases. "forward" runs under torch.no_grad(), "forward_backward" backpropagates
a fixed upstream gradient into q, k and v. Each case (benchmarks/common.py): untimed calls for at
least a second on CPU (a 128 x 128 case ran 1.7x slower for its first half second in a fresh
process; a decode case: one call; three on CUDA), then the median of several timed calls (fastvq's
at least 9; 3 for calls over 0.33 s; a decode call over 8 s is timed once), then the peak extra
memory of one more call. Forward cases of the anchors that
compute the same attention record the largest difference from fastvq's output; every attention case
records the FLOPs of the window's (query, key) pairs. Results:
benchmarks/results/raster_window_<device>.json; `python benchmarks/report.py` draws the plot and
writes the README table with the goals (forward >= 1.5x FlexAttention, forward + backward >= 10x
SDPA-mask at 64x64, 4x the tokens -> <= 4.5x the time, wavefront >= 3x sequential).

  python benchmarks/compare_raster_window.py                  # the full CPU run (estimated 6 min on 2 quiet cores)
  python benchmarks/compare_raster_window.py --quick          # small sizes and a tiny model, to check the script
  python benchmarks/compare_raster_window.py --decode         # the decode cases only (--attention: the others only)
  python benchmarks/compare_raster_window.py --device cuda    # on a GPU (benchmarks/gpu_check.sh)
  python benchmarks/compare_raster_window.py --dry-run        # the CUDA cases, tiny, on CPU (Triton interpreter)
"""
from __future__ import annotations

import hashlib
import itertools
import time

import common

LABELS = {
    "fastvq_cpp": "fastvq.raster_window_attention (cpp)",
    "fastvq_triton": "fastvq.raster_window_attention (triton)",
    "fastvq_torch": "fastvq.raster_window_attention (auto fell back to the torch reference: no cpp kernel registered)",
    "flex": "FlexAttention (torch.compile, raster-window mask_mod BlockMask)",
    "sdpa_mask": "torch SDPA, dense boolean raster-window mask",
    "sliding_window": "fastvq.sliding_window_attention, the 1-D window containing the 2-D one "
                      "(W = rows·width + left + 1)",
    "torch_reference": "fastvq torch reference (raster_window_attention_reference)",
    "wavefront": "GPT2D sample_grid, wavefront=True (rows right + 1 columns apart)",
    "sequential": "GPT2D sample_grid, wavefront=False (one token a step)",
}
MODES = ("forward", "forward_backward")
# Order of the run: fastvq first, so that a time budget cuts the slow tail.
IMPLS = {"cpu": ("fastvq", "sliding_window", "sdpa_mask", "flex", "torch_reference"),
         "cuda": ("fastvq", "flex", "sdpa_mask", "sliding_window")}
FASTVQ_MIN_RUNS = 9  # a tight median for fastvq
WARMUP_S = 1.0       # untimed calls for at least this long before an attention case's timed ones (CPU)
# The T-scaling goal compares two grid sizes; timed in separate processes minutes apart, their
# ratio moved by ±15% between runs (4× the tokens: 3.6× to 4.8× the time). Suite "scaling" times
# both sizes in one process in alternating blocks, each after a few calls that bring the allocator
# to that size's steady state (measure_scaling).
SCALING_ROUNDS, SCALING_BLOCK_WARMUP, SCALING_BLOCK_RUNS = 7, 3, 3

_GPT2D_26M = {"vocab_size": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "rows": 8, "left": 8, "right": 7}
_GPT2D_TINY = {"vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "rows": 2, "left": 2, "right": 1}
SIZES = {
    "cpu": {"B": 1, "H": 8, "Dh": 64, "dtype": "float32", "grids": [32, 64, 128], "rows": 8, "left": 8, "right": 8,
            "n_prefix": 0, "mask_max_T": 4096, "reference_max_T": 4096,
            "decode": {"model": _GPT2D_26M, "grid": 64, "sequential_rows": 8}},
    "cpu_quick": {"B": 1, "H": 2, "Dh": 64, "dtype": "float32", "grids": [16, 32], "rows": 4, "left": 4, "right": 4,
                  "n_prefix": 0, "mask_max_T": 1024, "reference_max_T": 1024,
                  "decode": {"model": _GPT2D_TINY, "grid": 8, "sequential_rows": 2}},
    "cuda": {"B": 1, "H": 16, "Dh": 64, "dtype": "bfloat16", "grids": [128, 256, 64], "rows": 8, "left": 8,
             "right": 8, "n_prefix": 0, "mask_max_T": 16384, "reference_max_T": 0, "decode": None},
    "cuda_quick": {"B": 1, "H": 2, "Dh": 32, "dtype": "bfloat16", "grids": [10], "rows": 2, "left": 2, "right": 2,
                   "n_prefix": 0, "mask_max_T": 100, "reference_max_T": 0, "decode": None},
}
MASK_SKIP = ("dense T x T mask: full T^2 work whatever the window, and (H, T, T) fp32 scores "
             "(8 GiB at H = 8, T = 16384); over a minute with warm-up, runs and the memory call")


# ----------------------------------------------------------------------------- the plan

def fastvq_backend(plan: str) -> str:
    """The backend auto picks for raster_window_attention here: triton on CUDA, cpp on CPU where
    the op has a cpp kernel (fastvq.ops.raster_window.KERNELS) and the extension loads, else torch.
    The timed calls name it explicitly, so the label is what ran."""
    from fastvq import available_backends
    from fastvq.ops.raster_window import KERNELS

    preferred = "triton" if plan == "cuda" else "cpp"
    return preferred if preferred in KERNELS and available_backends()[preferred].available else "torch"


def window_pairs(h: int, w: int, rows: int, left: int, right: int, n_prefix: int = 0) -> int:
    """(query, key) pairs the rule keeps on an h x w grid after n_prefix prefix tokens."""
    per_col = [(min(j + right, w - 1) - max(j - left, 0) + 1, min(j, left) + 1) for j in range(w)]
    band = sum(c for c, _ in per_col)
    own = sum(o for _, o in per_col)
    above = sum(min(i, rows) for i in range(h))  # rows above each row that exist
    return h * own + above * band + n_prefix * (n_prefix + 1) // 2 + h * w * n_prefix


def sliding_window_for(s: dict, width: int) -> int:
    """The 1-D window that contains the 2-D one: the farthest key back is (i - rows, j - left)."""
    return s["rows"] * width + s["left"] + 1


def skip_reason(case: dict, s: dict, fastvq_is_torch: bool) -> str | None:
    impl, mode, t = case["impl"], case["suite"], case["T"]
    if impl == "flex" and mode == "forward_backward" and case["device"] == "cpu":
        return "FlexAttention does not support backward on CPU (NotImplementedError in torch 2.13): forward only"
    if impl == "sdpa_mask" and t > s["mask_max_T"]:
        return MASK_SKIP
    if impl == "torch_reference" and fastvq_is_torch:
        return "fastvq's auto backend fell back to this same reference (no cpp kernel registered): see fastvq's column"
    if impl == "torch_reference" and t > s["reference_max_T"]:
        return f"small grids only (T <= {s['reference_max_T']})"
    return None


def plan(args) -> list[dict]:
    s = args.sizes
    backend = fastvq_backend(args.plan)
    sw_backend = "triton" if args.plan == "cuda" else "cpp"
    impls = [i for i in IMPLS[args.plan] if i in args.impls and (i != "torch_reference" or args.plan == "cpu")]

    def case(impl, mode, g):
        t = s["n_prefix"] + g * g
        pairs = window_pairs(g, g, s["rows"], s["left"], s["right"], s["n_prefix"])
        c = {"suite": mode, "impl": f"fastvq_{backend}" if impl == "fastvq" else impl, "device": args.device,
             "dtype": s["dtype"], "B": s["B"], "H": s["H"], "Dh": s["Dh"], "grid": f"{g}x{g}", "height": g,
             "width": g, "T": t, "rows": s["rows"], "left": s["left"], "right": s["right"], "n_prefix": s["n_prefix"],
             "backend": backend, "window_pairs": pairs,
             "window_flops_forward": 4.0 * s["B"] * s["H"] * s["Dh"] * pairs,
             "min_runs": FASTVQ_MIN_RUNS if impl == "fastvq" and not args.dry_run else 3}
        if impl == "sliding_window":
            c.update(W=sliding_window_for(s, g), sliding_window_backend=sw_backend)
        why = skip_reason(c, s, backend == "torch")
        return {**c, "skipped": why} if why else c

    out = []
    if args.parts != "decode":
        if args.plan == "cuda":  # grid first: a budget cut keeps whole rows of the table
            out += [case(i, m, g) for g, i, m in itertools.product(s["grids"], impls, MODES)]
        else:  # implementation first: the slow reference last (forward only)
            out += [case(i, m, g) for i, m, g in itertools.product(impls, MODES, s["grids"])
                    if i != "torch_reference" or m == "forward"]
    if args.parts != "decode" and "fastvq" in impls:
        out += [scaling_case(case("fastvq", m, a), case("fastvq", m, b), args.dry_run)
                for m in MODES for a, b in zip(s["grids"], s["grids"][1:]) if b == 2 * a]
    d = s["decode"]
    if args.parts != "attention" and d is not None:
        seq_rows = min(args.sequential_rows or d["sequential_rows"], d["grid"])
        for impl in ("wavefront", "sequential"):
            if impl not in args.impls:
                continue
            rows_run = d["grid"] if impl == "wavefront" else seq_rows
            out.append({"suite": "decode", "impl": impl, "device": args.device, "B": 1, "model": d["model"],
                        "grid": f"{d['grid']}x{d['grid']}", "height": d["grid"], "width": d["grid"],
                        "rows_measured": rows_run, "compare_rows": seq_rows, "extrapolated": rows_run < d["grid"]})
    return out


def scaling_case(small: dict, large: dict, dry_run: bool) -> dict:
    """fastvq at grid side g and 2g in one process, alternating (suite "scaling", mode = the timed call)."""
    keep = ("impl", "device", "dtype", "B", "H", "Dh", "rows", "left", "right", "n_prefix", "backend")
    rounds = (2, 1, 1) if dry_run else (SCALING_ROUNDS, SCALING_BLOCK_WARMUP, SCALING_BLOCK_RUNS)
    return {"suite": "scaling", "mode": small["suite"], **{k: small[k] for k in keep},
            "grid": f"{small['grid']}->{large['grid']}", "height": large["height"], "from_height": small["height"],
            "T": large["T"], "from_T": small["T"], "rounds": rounds[0], "block_warmup": rounds[1],
            "block_runs": rounds[2],
            "pairs_ratio": large["window_pairs"] / small["window_pairs"]}


# ----------------------------------------------------------------------------- the calls (bench_raster_window.py's too)

def geometry(case: dict) -> dict:
    return {k: case[k] for k in ("width", "rows", "left", "right", "n_prefix")}


def raster_mask(case: dict, device="cpu"):
    import torch

    from fastvq.ops.raster_window import raster_window_visible

    pos = torch.arange(case["T"], device=device)
    return raster_window_visible(pos, pos, **geometry(case))


def raster_mask_mod(case: dict):
    """The rule as a FlexAttention mask_mod (elementwise on index scalars; same as raster_window_visible)."""
    import torch

    width, rows, left, right, n_prefix = (case[k] for k in ("width", "rows", "left", "right", "n_prefix"))

    def raster_window(b, h, q_idx, kv_idx):
        qg, kg = q_idx - n_prefix, kv_idx - n_prefix
        qi, qj, ki, kj = qg // width, qg % width, kg // width, kg % width
        cols_left = kj >= qj - left
        band = (ki >= qi - rows) & (ki < qi) & cols_left & (kj <= qj + right)
        own_row = (ki == qi) & cols_left & (kj <= qj)
        grid_sees = (kg < 0) | band | own_row
        prefix_sees = (kg < 0) & (kv_idx <= q_idx)
        return torch.where(qg >= 0, grid_sees, prefix_sees)

    return raster_window


def attention_fn(case: dict, extras: dict):
    """q, k, v -> out for the case's implementation; setup (masks, compilation) done here, untimed."""
    import torch
    import torch.nn.functional as F

    impl, device = case["impl"], case.get("device", "cpu")
    if impl.startswith("fastvq_") or impl == "torch_reference":
        from fastvq import raster_window_attention

        backend = "torch" if impl == "torch_reference" else case["backend"]
        return lambda q, k, v: raster_window_attention(q, k, v, **geometry(case), backend=backend)
    if impl == "sliding_window":
        from fastvq import sliding_window_attention

        return lambda q, k, v: sliding_window_attention(q, k, v, case["W"], backend=case["sliding_window_backend"])
    if impl == "sdpa_mask":
        mask = raster_mask(case, device)
        extras["mask_bytes"] = mask.numel() * mask.element_size()
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "flex":
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        dynamo = torch._dynamo.config  # several (T, mode) compilations in one process on CUDA
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        t0 = time.perf_counter()
        block_mask = create_block_mask(raster_mask_mod(case), None, None, case["T"], case["T"], device=device)
        extras["block_mask_s"] = time.perf_counter() - t0
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown implementation {impl!r}")


def case_call(case: dict, extras: dict):
    """The timed call and its inputs q, k, v (common.attention_call on this case's implementation)."""
    return common.attention_call(case, attention_fn(case, extras))


def decode_call(case: dict):
    """sample_grid of the case's GPT2D (weights seed 0) over its first rows_measured rows."""
    import torch

    from fastvq.models.gpt2d import GPT2D, sample_grid

    cfg = dict(case["model"])
    torch.manual_seed(0)
    model = GPT2D(cfg.pop("vocab_size"), **cfg).to(case["device"]).eval()
    wavefront = case["impl"] == "wavefront"
    return model, lambda: sample_grid(model, case["rows_measured"], case["width"], wavefront=wavefront, seed=0)


# ----------------------------------------------------------------------------- one case

def measure_decode(case: dict) -> dict:
    from fastvq.bench import peak_memory, time_call
    from fastvq.nn.raster_attention import wavefront_schedule

    model, sample = decode_call(case)
    last = {}

    def fn():
        last["codes"] = sample()
        return last["codes"]

    timing = time_call(fn, device=case["device"], min_runs=3, slow_runs=1, slow_s=8.0)
    peak = peak_memory(fn, device=case["device"])
    codes = last.pop("codes")
    rows, width, full_rows = case["rows_measured"], case["width"], case["height"]
    lag = min(model.right + 1, width + 1)
    steps = len(wavefront_schedule(rows, width + 1, lag)) if case["impl"] == "wavefront" else rows * (width + 1)
    head = codes[:, :case["compare_rows"]].cpu().contiguous().numpy().tobytes()
    return {**timing, "peak_extra_bytes": peak, "parameters": sum(p.numel() for p in model.parameters()),
            "codes_measured": rows * width, "steps": steps, "tokens_per_s": rows * width / timing["median_s"],
            "grid_time_s": timing["median_s"] * full_rows / rows,  # extrapolated when rows < full_rows
            "first_rows_sha1": hashlib.sha1(head).hexdigest()[:16]}


def measure_scaling(case: dict) -> dict:
    """Time the small and the large grid in blocks, alternating which size goes first (ABBA): a
    block's first `block_warmup` calls only bring the allocator back to that size's steady state
    (after the other size's buffers, the first calls page-fault fresh memory: alternating single
    calls made the large grid 1.8x slower than repeating it), the next `block_runs` are timed.
    Each block pair's ratio of medians sees the same machine state; their median is the figure."""
    import statistics

    import torch

    def call(height: int, t: int):
        c = {**case, "suite": case["mode"], "height": height, "width": height, "T": t}
        return case_call(c, {})[0]

    sizes = {"small": call(case["from_height"], case["from_T"]), "large": call(case["height"], case["T"])}

    def block(name: str) -> list[float]:
        fn, times = sizes[name], []
        for i in range(case["block_warmup"] + case["block_runs"]):
            t0 = time.perf_counter()
            fn()
            if case["device"] != "cpu":
                torch.cuda.synchronize()
            if i >= case["block_warmup"]:
                times.append(time.perf_counter() - t0)
        return times

    times = {"small": [], "large": []}
    ratios = []
    for r in range(case["rounds"]):
        order = ("small", "large") if r % 2 == 0 else ("large", "small")
        got = {name: block(name) for name in order}
        for name in times:
            times[name] += got[name]
        ratios.append(statistics.median(got["large"]) / statistics.median(got["small"]))
    return {"median_s": statistics.median(times["large"]), "runs": len(times["large"]), "times_s": times["large"],
            "median_small_s": statistics.median(times["small"]), "times_small_s": times["small"], "ratios": ratios,
            "ratio_median": statistics.median(ratios)}


def measure(case: dict) -> dict:
    if case["suite"] == "decode":
        return measure_decode(case)
    if case["suite"] == "scaling":
        return measure_scaling(case)
    import torch

    from fastvq import raster_window_attention
    from fastvq.bench import peak_memory, time_call

    device = case["device"]
    extras: dict = {}
    fn, (q, k, v) = case_call(case, extras)
    if case["impl"] == "flex":  # the first call compiles: time it apart so that it stays out of the median
        t0 = time.perf_counter()
        fn()
        extras["compile_s"] = time.perf_counter() - t0
    # warm-up for a second: the 128 x 128 cases (32 MB outputs) ran 1.7x slower for their first
    # half second in a fresh process, which one warm-up call left in the median
    timing = time_call(fn, device=device, min_runs=case["min_runs"], slow_runs=1, slow_s=8.0,
                       warmup_s=0.0 if case["device"] == "cuda" else WARMUP_S)
    peak = peak_memory(fn, device=device)
    flops = case["window_flops_forward"] * (1 if case["suite"] == "forward" else 3.5)
    result = {**timing, **extras, "peak_extra_bytes": peak, "window_tflop_per_s": flops / timing["median_s"] / 1e12}
    if case["suite"] == "forward" and case["impl"] in ("flex", "sdpa_mask", "torch_reference"):
        with torch.no_grad():
            ours = raster_window_attention(q, k, v, **geometry(case), backend=case["backend"])
            result["max_abs_diff_vs_fastvq"] = (fn().float() - ours.float()).abs().max().item()
    return result


def summary(r: dict) -> str:
    if r["suite"] == "scaling":
        return f"{r['mode']}: {r['ratio_median']:.2f}x the time (median of {r['rounds']} paired blocks)"
    if r["suite"] == "decode":
        extra = f" (first {r['rows_measured']} rows; full grid extrapolated)" if r["extrapolated"] else ""
        return f"{r['tokens_per_s']:.1f} tok/s, {r['steps']} steps{extra}"
    parts = [f"window {r['window_tflop_per_s'] * 1e3:.1f} GFLOP/s"]
    if "compile_s" in r:
        parts.append(f"compile {r['compile_s']:.1f} s")
    if "max_abs_diff_vs_fastvq" in r:
        parts.append(f"|diff| {r['max_abs_diff_vs_fastvq']:.1e}")
    return "  ".join(parts)


def method(args) -> dict:
    from fastvq.bench import PEAK_MEMORY_METHOD

    s = args.sizes
    m = {
        "shape": f"q, k, v (B, H, T, Dh) = ({s['B']}, {s['H']}, T, {s['Dh']}) {s['dtype']}, seed 0; square grids "
                 f"{', '.join(f'{g}x{g}' for g in s['grids'])}; rows {s['rows']}, left {s['left']}, right "
                 f"{s['right']}, n_prefix {s['n_prefix']}",
        "window": "grid token (i, j) sees (i', j') with i - rows <= i' < i and j - left <= j' <= j + right, or i' = i "
                  "and j - left <= j' <= j (columns outside the grid do not exist); the prefix is visible to all",
        "time": f"fastvq.bench.time_call: median time after warm-up calls for at least {WARMUP_S:g} s (attention "
                "cases on CPU; decode: one call; on CUDA three calls and CUDA-event timing): up to "
                "50 calls for fast cases, at least 3 (fastvq 9), 3 for calls over 0.33 s, 1 for calls over 8 s; "
                "on CPU each case in a fresh process",
        "peak_memory": PEAK_MEMORY_METHOD[args.device],
        "fastvq": f"raster_window_attention with the backend auto picks here ({fastvq_backend(args.plan)}), "
                  "named explicitly in the call and in the implementation's name",
        "forward": "under torch.no_grad()",
        "forward_backward": "q, k, v require grad; torch.autograd.grad of a fixed random upstream gradient",
        "sdpa_mask": "the (T, T) bool mask from raster_window_visible, built before timing; its size is mask_bytes",
        "flex": "torch.compile(flex_attention, dynamic=False) with create_block_mask of a mask_mod of the same rule, "
                "built before timing (block_mask_s); compile_s is the first call, excluded from the median",
        "sliding_window": "sliding_window_attention with W = rows * width + left + 1 (query i sees keys "
                          "i - W < j <= i): the smallest 1-D window holding the 2-D one, more keys than it",
        "torch_reference": "fastvq's oracle, raster_window_attention(backend='torch'): chunked masked softmax",
        "scaling": f"fastvq at grid side g and 2g in one process, {SCALING_ROUNDS} rounds; a round runs a block of "
                   f"each size ({SCALING_BLOCK_WARMUP} untimed calls, then {SCALING_BLOCK_RUNS} timed), which size "
                   "first alternating by round; ratios = per round, median time(2g) / median time(g) of its blocks; "
                   "ratio_median = their median",
        "window_tflop_per_s": "window_flops_forward (4 B H Dh x the rule's (query, key) pairs; x 3.5 for forward + "
                              "backward) / median time",
    }
    if s.get("decode"):
        d = s["decode"]
        cfg = ", ".join(f"{k} {v}" for k, v in d["model"].items())
        m["decode"] = (f"fastvq.models.gpt2d.GPT2D ({cfg}), weights seed 0, eval, fp32, batch 1: time of one "
                       f"sample_grid(model, rows, {d['grid']}, wavefront=..., seed=0) call (prefill included) after "
                       "one warm-up, median of 3 (1 for calls over 8 s); tokens_per_s = codes drawn / median time; "
                       "wavefront over the whole grid; sequential over its first rows_measured rows, "
                       f"grid_time_s = median x {d['grid']} / rows_measured (extrapolated: every row costs the same "
                       "against the ring); first_rows_sha1 hashes the first compare_rows rows (same in both orders)")
    return m


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def options(p) -> None:
    p.add_argument("--impls", nargs="+", choices=("fastvq", *[k for k in LABELS if not k.startswith("fastvq_")]),
                   default=["fastvq", *[k for k in LABELS if not k.startswith("fastvq_")]],
                   help="which implementations to run (default all that the device has)")
    parts = p.add_mutually_exclusive_group()
    parts.add_argument("--decode", dest="parts", action="store_const", const="decode",
                       help="the decode cases only (the JSON then holds only them)")
    parts.add_argument("--attention", dest="parts", action="store_const", const="attention",
                       help="the attention cases only")
    p.add_argument("--sequential-rows", type=_positive, metavar="N",
                   help="rows the sequential decoder samples before its full-grid time is extrapolated "
                        "(default 8; the grid's height measures it all)")
    p.set_defaults(parts="all")


COMPARISON = common.Comparison(
    name="raster_window", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, summary=summary, options=options, shown=("dtype", "grid", "T"),
    # estimated (not yet run on a quiet machine): ~2.5 min of attention cases, ~2.5 min of decode
    expected_s=360,
    budget_s={"cpu": 900, "cuda": 240}, timeout_s=900)

if __name__ == "__main__":
    raise SystemExit(common.main(COMPARISON))
