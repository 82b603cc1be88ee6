"""Time to sample a large code grid: fastvq's 2-D prior (wavefront and one token a step) against
taming's crop-and-recompute sliding-window sampler on a GPT of the same size, and the wavefront's
peak memory as the grid grows taller.

Suite "grid": a 64 x 64 code grid (a 1024 x 1024 image at f = 16), batch 1, fp32, random weights
(seed 0; speed does not depend on them), temperature 1, no top-k:
  wavefront           fastvq.models.gpt2d.sample_grid(model, 64, 64, wavefront=True): rows advance
                      together, right + 1 columns apart, each step's tokens one small batch through
                      a ring cache of image rows
  sequential          the same call with wavefront=False (one token a step, same ring cache); its
                      cost per code is the same on every row, so only the first --sequential-rows
                      rows (8) are sampled and the grid time is extrapolated (x 64 / 8)
  taming_crop         taming's scripts/sample_conditional.py sampler: for each code (i, j) the 16 x 16
                      crop of the code grid around it, clamped to the grid's borders the way the
                      script clamps it (local row i for i <= 8, 16 - (H - i) when H - i < 8, else 8;
                      columns alike), prefix + the crop's 256 codes (all but the last) through a
                      fastvq.GPT (block_size 256 + prefix, learned positions, full causal
                      attention, same vocab / n_layer / n_head / n_embd as the 2-D model), the logits
                      read at the code's place in the crop, one multinomial draw. Nothing is cached:
                      every token costs a forward of prefix + 255 tokens
  taming_crop_causal  the same crops, but only the prefix and the crop's codes before (i, j) go
                      through the GPT (causal attention makes the later ones irrelevant to the
                      logits read): the least that way of sampling can compute
The crop samplers cost the same for every token of a row class, and a whole grid would take many
minutes, so --crop-rows rows (2) in the middle of the grid are sampled (the grid's other codes stay
0, as the script starts them) and the grid time is extrapolated by the token count (x 4096 /
tokens); every case says what was timed and whether its time is extrapolated. For
taming_crop_causal the middle rows see a crop context of 8 rows above; the grid's mean context
(recorded as mean_context_grid against mean_context_timed) is slightly shorter at the top.
Models: the GPT2D of ~26M parameters the raster-window benchmark uses (vocab 1024, 8 layers, 8
heads, width 512, rows = left = 8, right = 7) and the demo's (fastvq's `demo` preset: vocab 128, 4
layers, 4 heads, width 128, rows = left = 4, right = 3); the crop samplers keep taming's 16 x 16
crop for both.

Suite "memory": peak extra memory of one wavefront sample_grid call at a fixed width (64) as the
height grows (16 ... 4096 rows for the demo model, 16 ... 256 for the 26M one), after one
warm-up call at the smallest height; the call's time is recorded once (not a median). The ring
cache is rows + 1 + lag image rows per layer whatever the height, so the peak should stay flat;
the codes returned (8 bytes each) are counted in it.

Each grid case (benchmarks/common.py): one warm-up, then the median of several timed calls (1 for
calls over 8 s), then the peak extra memory of one more call, each case in a fresh process on CPU.
Goals (issue F; report.py checks them, nothing here asserts them): wavefront >= 50x taming's
sampler and >= 3x fastvq sequential for the grid; memory flat as the height grows. Results:
benchmarks/results/grid_sampling_<device>.json; `python benchmarks/report.py` writes the table.

  python benchmarks/compare_grid_sampling.py                # the full CPU run (about 9 min on 2 quiet cores)
  python benchmarks/compare_grid_sampling.py --quick        # a tiny model on a 16 x 16 grid, to check the script
  python benchmarks/compare_grid_sampling.py --device cuda  # on a GPU (benchmarks/gpu_check.sh)
  python benchmarks/compare_grid_sampling.py --dry-run      # the CUDA cases, tiny, on CPU (Triton interpreter)
"""
from __future__ import annotations

import hashlib
import os

import common

LABELS = {
    "wavefront": "fastvq GPT2D sample_grid, wavefront=True (rows right + 1 columns apart)",
    "sequential": "fastvq GPT2D sample_grid, wavefront=False (one token a step)",
    "taming_crop": "taming's crop-and-recompute sampler (sample_conditional.py's crop around each code, the "
                   "whole crop through a fastvq.GPT of the same size for every token)",
    "taming_crop_causal": "the same crops, only the crop's codes before the one drawn through the GPT",
}
GRID_IMPLS = ("wavefront", "sequential", "taming_crop", "taming_crop_causal")

_GPT2D_26M = {"vocab_size": 1024, "n_layer": 8, "n_head": 8, "n_embd": 512, "rows": 8, "left": 8, "right": 7}
_GPT2D_DEMO = {"vocab_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "rows": 4, "left": 4, "right": 3}
_GPT2D_TINY = {"vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "rows": 2, "left": 2, "right": 1}
SIZES = {
    "cpu": {"models": {"26M": _GPT2D_26M, "demo": _GPT2D_DEMO}, "grid": 64, "crop": 16, "crop_rows": 2,
            "sequential_rows": 8, "memory": {"demo": [16, 64, 256, 1024, 4096], "26M": [16, 64, 256]},
            "memory_width": 64},
    "cpu_quick": {"models": {"tiny": _GPT2D_TINY}, "grid": 16, "crop": 8, "crop_rows": 1, "sequential_rows": 4,
                  "memory": {"tiny": [8, 32, 128]}, "memory_width": 16},
    "cuda": {"models": {"26M": _GPT2D_26M}, "grid": 64, "crop": 16, "crop_rows": 1, "sequential_rows": 8,
             "memory": {"26M": [64, 256, 1024]}, "memory_width": 64},
    "cuda_quick": {"models": {"tiny": _GPT2D_TINY}, "grid": 8, "crop": 4, "crop_rows": 1, "sequential_rows": 2,
                   "memory": {"tiny": [4, 8]}, "memory_width": 8},
}
PREFIX = 1  # one start / class token before the grid, in both models


# ----------------------------------------------------------------------------- taming's crop rule

def crop_start(i: int, size: int, crop: int) -> tuple[int, int]:
    """(first index of the crop, index of i inside it) along one axis of `size` codes: taming's
    sample_conditional.py keeps the code `crop // 2` from the crop's start in the interior and
    slides the crop no further than the grid's edges (its rule, written for crop = 16)."""
    half = crop // 2
    if i <= half:
        local = i
    elif size - i < half:
        local = crop - (size - i)
    else:
        local = half
    return i - local, local


def crop_recompute_sample(model, codes, prefix, rows, *, crop: int = 16, causal: bool = False,
                          generator=None) -> None:
    """taming's crop-and-recompute sampler over `rows` of codes (B, H, W), written in place.

    Args:
        model: a fastvq.GPT with block_size >= prefix length + crop * crop - 1 (learned positions).
        codes: (B, H, W) int64 code grid; codes not yet drawn are read as they are (taming zeros them).
        prefix: (B, P) int64 tokens before every crop (taming's cond codes; here a start token).
        rows: the grid rows to draw, each left to right.
        crop: the crop's side (taming: 16); H and W must be at least crop.
        causal: run only the prefix and the crop's codes before (i, j) instead of the whole crop
            (the same logits: the attention is causal).
        generator: for the multinomial draws.

    Raises:
        ValueError: the grid is smaller than the crop.
    """
    import torch

    b, h, w = codes.shape
    if h < crop or w < crop:
        raise ValueError(f"crop_recompute_sample: the grid ({h} x {w}) must be at least crop x crop ({crop})")
    p = prefix.shape[1]
    with torch.no_grad():
        for i in rows:
            i0, li = crop_start(i, h, crop)
            for j in range(w):
                j0, lj = crop_start(j, w, crop)
                seq = torch.cat((prefix, codes[:, i0:i0 + crop, j0:j0 + crop].reshape(b, -1)), dim=1)
                at = p + li * crop + lj  # where code (i, j) sits in seq
                if causal:
                    logits = model(seq[:, :at])[0][:, -1]
                else:  # the script's call: all but the last token, logits of the code's place
                    logits = model(seq[:, :-1])[0][:, at - 1]
                drawn = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                codes[:, i, j] = drawn[:, 0]


def mean_context(h: int, w: int, crop: int, rows) -> float:
    """Mean tokens through the GPT per code of `rows` for the causal crop sampler (prefix included)."""
    lengths = [PREFIX + crop_start(i, h, crop)[1] * crop + crop_start(j, w, crop)[1] for i in rows for j in range(w)]
    return sum(lengths) / len(lengths)


# ----------------------------------------------------------------------------- the plan

def plan(args) -> list[dict]:
    """Per model the grid cases (fastvq first, so that a time budget cuts taming's slow tail), then
    the memory cases, shortest grid first."""
    s = args.sizes
    g, out = s["grid"], []
    seq_rows = min(args.sequential_rows or s["sequential_rows"], g)
    crop_rows = min(args.crop_rows or s["crop_rows"], g)
    for name, model in s["models"].items():
        for impl in (i for i in GRID_IMPLS if i in args.impls):
            first, rows = {"wavefront": (0, g), "sequential": (0, seq_rows)}.get(impl, ((g - crop_rows) // 2, crop_rows))
            case = {"suite": "grid", "impl": impl, "device": args.device, "model_name": name, "model": model, "B": 1,
                    "grid": f"{g}x{g}", "height": g, "width": g, "first_row_timed": first, "rows_timed": rows,
                    "tokens_timed": rows * g, "extrapolated": rows < g, "compare_rows": seq_rows}
            if impl.startswith("taming_crop"):
                case.update(crop=s["crop"], block_size=s["crop"] ** 2 + PREFIX)
            out.append(case)
    if args.memory:
        width = s["memory_width"]
        for name, heights in s["memory"].items():
            out += [{"suite": "memory", "impl": "wavefront", "device": args.device, "model_name": name,
                     "model": s["models"][name], "B": 1, "height": h, "width": width, "grid": f"{h}x{width}",
                     "warmup_height": heights[0]} for h in heights]
    if args.dry_run:  # the CUDA path's kernels on CPU tensors: ask for them by name
        out = [{**case, "backend": "triton"} for case in out]
    return out


# ----------------------------------------------------------------------------- one case

def build_gpt2d(case: dict):
    import torch

    from fastvq.models.gpt2d import GPT2D

    cfg = dict(case["model"])
    torch.manual_seed(0)
    return GPT2D(cfg.pop("vocab_size"), **cfg).to(case["device"]).eval()


def build_crop_gpt(case: dict):
    """The 1-D GPT taming's sampler runs: the 2-D model's vocab and shape, taming's block size."""
    import torch

    import fastvq

    m = case["model"]
    torch.manual_seed(0)
    return fastvq.GPT(m["vocab_size"], case["block_size"], n_layer=m["n_layer"], n_head=m["n_head"],
                      n_embd=m["n_embd"]).to(case["device"]).eval()


def grid_call(case: dict):
    """(the timed call, the model) of a grid case."""
    import torch

    from fastvq.models.gpt2d import sample_grid

    if case["impl"] in ("wavefront", "sequential"):
        model = build_gpt2d(case)
        wavefront = case["impl"] == "wavefront"
        return (lambda: sample_grid(model, case["rows_timed"], case["width"], wavefront=wavefront, seed=0)), model
    model = build_crop_gpt(case)
    device = case["device"]
    codes = torch.zeros(case["B"], case["height"], case["width"], dtype=torch.long, device=device)
    prefix = torch.zeros(case["B"], PREFIX, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    causal = case["impl"] == "taming_crop_causal"
    rows = range(case["first_row_timed"], case["first_row_timed"] + case["rows_timed"])

    def run():
        crop_recompute_sample(model, codes, prefix, rows, crop=case["crop"], causal=causal, generator=gen)
        return codes

    return run, model


def measure_grid(case: dict) -> dict:
    from fastvq.bench import peak_memory, time_call

    fn, model = grid_call(case)
    last = {}

    def call():
        last["codes"] = fn()
        return last["codes"]

    timing = time_call(call, device=case["device"], min_runs=3, slow_runs=1, slow_s=8.0)
    peak = peak_memory(call, device=case["device"])
    tokens, full = case["tokens_timed"], case["height"] * case["width"]
    result = {**timing, "peak_extra_bytes": peak, "parameters": sum(p.numel() for p in model.parameters()),
              "tokens_per_s": tokens / timing["median_s"],
              "grid_time_s": timing["median_s"] * full / tokens}  # extrapolated when tokens < full
    if case["impl"] in ("wavefront", "sequential"):
        head = last["codes"][:, :case["compare_rows"]].cpu().contiguous().numpy().tobytes()
        result["first_rows_sha1"] = hashlib.sha1(head).hexdigest()[:16]
    if case["impl"] == "taming_crop_causal":
        h, w, crop = case["height"], case["width"], case["crop"]
        first = case["first_row_timed"]
        result.update(mean_context_timed=mean_context(h, w, crop, range(first, first + case["rows_timed"])),
                      mean_context_grid=mean_context(h, w, crop, range(h)))
    return result


def measure_memory(case: dict) -> dict:
    import time

    import torch

    from fastvq.bench import peak_memory
    from fastvq.models.gpt2d import sample_grid

    model = build_gpt2d(case)
    sample_grid(model, case["warmup_height"], case["width"], seed=0)  # decode weights, allocator, threads
    took = {}

    def call():
        t0 = time.perf_counter()
        codes = sample_grid(model, case["height"], case["width"], seed=0)
        if case["device"] == "cuda":
            torch.cuda.synchronize()
        took["s"] = time.perf_counter() - t0
        return codes

    peak = peak_memory(call, device=case["device"])
    return {"median_s": took["s"], "runs": 1, "peak_extra_bytes": peak,
            "tokens_per_s": case["height"] * case["width"] / took["s"],
            "codes_bytes": case["height"] * case["width"] * 8, "parameters": sum(p.numel() for p in model.parameters())}


def measure(case: dict) -> dict:
    if case.get("backend"):
        os.environ["FASTVQ_BACKEND"] = case["backend"]
    return measure_grid(case) if case["suite"] == "grid" else measure_memory(case)


def summary(r: dict) -> str:
    if r["suite"] == "memory":
        return f"{r['tokens_per_s']:.0f} tok/s (one call)"
    extra = f" ({r['tokens_timed']} codes timed, grid time extrapolated)" if r["extrapolated"] else ""
    return f"{r['tokens_per_s']:.1f} tok/s, grid {r['grid_time_s']:.3g} s{extra}"


def method(args) -> dict:
    from fastvq.bench import PEAK_MEMORY_METHOD

    s = args.sizes
    models = "; ".join(f"{n}: GPT2D " + ", ".join(f"{k} {v}" for k, v in m.items()) for n, m in s["models"].items())
    return {
        "models": models + f"; weights seed 0, eval, fp32, batch 1, prefix {PREFIX} token",
        "grid": f"{s['grid']}x{s['grid']} codes, temperature 1, no top-k / top-p",
        "time": "fastvq.bench.time_call: median of the whole sampling call after one warm-up (three on CUDA): "
                "at least 3 calls, 1 for calls over 8 s; on CPU each case in a fresh process",
        "extrapolation": f"sequential: first {s['sequential_rows']} rows; crop samplers: {s['crop_rows']} rows in "
                         "the middle of the grid; grid_time_s = median x grid codes / codes timed",
        "crop": f"taming's sample_conditional.py rule with a {s['crop']}x{s['crop']} crop, a fastvq.GPT of the "
                f"2-D model's vocab and shape with block_size {s['crop'] ** 2 + PREFIX} (learned positions, full "
                "causal attention); softmax + torch.multinomial per code",
        "memory": f"wavefront sample_grid at width {s['memory_width']}, heights "
                  + "; ".join(f"{n}: {', '.join(map(str, hs))}" for n, hs in s["memory"].items())
                  + ": peak extra memory of one call after a warm-up call at the smallest height; its time is one "
                    "call, not a median",
        "peak_memory": PEAK_MEMORY_METHOD[args.device],
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def options(p) -> None:
    p.add_argument("--impls", nargs="+", choices=GRID_IMPLS, default=list(GRID_IMPLS),
                   help="which grid samplers to run (default all)")
    p.add_argument("--sequential-rows", type=_positive, metavar="N",
                   help="rows the sequential decoder samples before its grid time is extrapolated (default 8)")
    p.add_argument("--crop-rows", type=_positive, metavar="N",
                   help="rows the crop samplers sample before their grid time is extrapolated (default 2)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory-vs-height cases")


COMPARISON = common.Comparison(
    name="grid_sampling", doc=__doc__, script=__file__, labels=LABELS, sizes=SIZES, plan=plan, measure=measure,
    method=method, summary=summary, options=options, shown=("model_name", "grid"),
    # estimated, not yet run on a quiet machine: ~4.5 min of grid cases, ~4.5 min of memory cases (the
    # demo model at 4096 rows: 262k codes at ~1900 tok/s)
    expected_s=540, budget_s={"cpu": 900, "cuda": 240}, timeout_s=900)

if __name__ == "__main__":
    raise SystemExit(common.main(COMPARISON))
