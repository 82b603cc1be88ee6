"""Sliding-window attention on a CUDA GPU: the Triton kernels against FlexAttention and torch SDPA, bf16.

First a correctness sweep on the device (odd shapes, bf16/fp16/fp32, grouped-query heads, forward and
gradients against fastvq's fp32 torch reference, and one ring-buffer decode step), because the test
suite may not put tensors on the GPU. Then, for each (T, W), forward (no_grad) and forward + backward
of a fixed upstream gradient, CUDA-event timed (median after warm-up), with the extra peak memory of
one call, for:

  fastvq_triton  fastvq.sliding_window_attention(backend="triton")
  flex           FlexAttention under torch.compile with a sliding-window BlockMask (W is a captured
                 tensor, so one compilation per T and mode); compile time recorded, not timed
  sdpa_mask      torch SDPA with a dense (T, T) boolean window mask (T <= 16384: the mask is T^2 bytes)
  sdpa_causal    torch SDPA is_causal=True: full causal attention (flash), the cost a window avoids

TFLOP/s counts only the work inside the band (4 B H Dh sum_i min(i + 1, W) for the forward, 3.5x
that for forward + backward), so every implementation is credited with the same useful work.

  python3 benchmarks/gpu_window_attention.py [--out DIR] [--budget-s S]   # CUDA; DIR/window_attention_gpu.json
  python3 benchmarks/gpu_window_attention.py --dry-run                     # CPU, Triton interpreter, tiny sizes

DIR defaults to $OUT, else benchmarks/results. Results are rewritten after every case, so a run cut
short still leaves what it measured. --dry-run only checks that the script runs end to end (FlexAttention
has no CPU backward, so its forward + backward is recorded as an error there); its numbers mean
nothing and go to window_attention_gpu_dryrun.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastvq  # noqa: E402
from gpu_quantize import device_description, measure  # noqa: E402 - same timer and machine description

# (B, H, Dh) and the (T, W) grid, most telling first so that a short budget keeps it.
GPU_SHAPE = (1, 16, 64)
GPU_CASES = [(16384, 1024), (16384, 256), (65536, 1024), (4096, 256), (4096, 1024), (65536, 256)]
DRY_SHAPE = (1, 2, 32)
DRY_CASES = [(96, 16)]
MASK_MAX_T = 16384
# Correctness: (B, H, H_kv, T, Dh, W) against the fp32 torch reference.
CHECKS = [(2, 4, 2, 1000, 64, 100), (1, 3, 3, 777, 128, 777), (1, 2, 1, 4099, 64, 1024), (2, 2, 2, 130, 40, 1)]
DRY_CHECKS = [(1, 2, 1, 45, 32, 7)]
TOL = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 6e-2}  # max |error| / max |reference|


def band_flops(b, h, t, d, w) -> float:
    """Forward multiply-adds x 2 inside the band: QK^T and PV over sum_i min(i + 1, W) pairs."""
    pairs = w * (w + 1) // 2 + (t - w) * w if t > w else t * (t + 1) // 2
    return 4.0 * b * h * d * pairs


def rel_err(x, ref) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def correctness_sweep(device) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(1)
    for (b, h, hk, t, d, w) in (DRY_CHECKS if DRY_RUN else CHECKS):
        for dtype_name in ("float32", "float16", "bfloat16"):
            dtype = getattr(torch, dtype_name)
            r = {"B": b, "H": h, "H_kv": hk, "T": t, "Dh": d, "W": w, "dtype": dtype_name}
            try:
                q = torch.randn(b, h, t, d, device=device, generator=g).to(dtype).requires_grad_()
                k, v = (torch.randn(b, hk, t, d, device=device, generator=g).to(dtype).requires_grad_() for _ in range(2))
                up = torch.randn(b, h, t, d, device=device, generator=g).to(dtype)
                ours = fastvq.sliding_window_attention(q, k, v, w, backend="triton")
                grads = torch.autograd.grad(ours, (q, k, v), up)
                q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
                ref = fastvq.sliding_window_attention(q32, k32, v32, w, backend="torch")
                ref_grads = torch.autograd.grad(ref, (q32, k32, v32), up.float())
                errs = [rel_err(ours, ref)] + [rel_err(a, e) for a, e in zip(grads, ref_grads)]
                r.update(err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3])
                # one decode step: the last query against a ring of W slots holding positions t - W .. t - 1
                slots = torch.arange(t - min(w, t), t, device=device)
                ring_k = torch.zeros(b, hk, w, d, device=device, dtype=dtype)
                ring_v = torch.zeros_like(ring_k)
                ring_k[:, :, slots % w], ring_v[:, :, slots % w] = k.detach()[:, :, slots], v.detach()[:, :, slots]
                with torch.no_grad():
                    step = fastvq.sliding_window_decode(q.detach()[:, :, -1:], ring_k, ring_v, t - 1, w, backend="triton")
                r["err_decode"] = rel_err(step, ref[:, :, -1:].detach())
                r["ok"] = max(errs + [r["err_decode"]]) <= TOL[dtype_name]
            except Exception as e:  # noqa: BLE001 - a compile or launch failure is a finding, not the end of the run
                r.update(ok=False, error=repr(e))
            out.append(r)
            if not r["ok"]:
                print(f"CHECK FAILED: {r}", flush=True)
    print(f"correctness: {sum(r['ok'] for r in out)}/{len(out)} cases ok", flush=True)
    return out


def implementations(t, w, device) -> dict:
    """name -> attend(q, k, v); masks and compiled functions are built here, before any timing."""
    impls = {"fastvq_triton": lambda q, k, v: fastvq.sliding_window_attention(q, k, v, w, backend="triton"),
             "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        window = torch.tensor(w, device=device)

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        block_mask = create_block_mask(sliding_window, None, None, t, t, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        impls["flex"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    except Exception as e:  # noqa: BLE001 - an old torch without FlexAttention: record and go on
        impls["flex"] = e
    if t <= MASK_MAX_T:
        i, j = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]
        mask = (j <= i) & (j > i - w)
        impls["sdpa_mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return impls


def timed_call(attend, mode, q, k, v, up):
    if mode == "forward":
        q, k, v = q.detach(), k.detach(), v.detach()  # FlexAttention on CPU refuses inputs that require grad

        def run():
            with torch.no_grad():
                return attend(q, k, v)
    else:
        def run():
            return torch.autograd.grad(attend(q, k, v), (q, k, v), up)
    return run


def run_case(case, device, warmup, runs, causal_cache, deadline, save) -> None:
    """Fills case["results"] implementation by implementation, saving after each; past the deadline
    the remaining ones are recorded as skipped (one case holds several compilations)."""
    t, w, b, h, d = case["T"], case["W"], case["B"], case["H"], case["Dh"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, up = (torch.randn(b, h, t, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    flops = case["band_flops_forward"]
    outputs = {}
    for name, attend in implementations(t, w, device).items():
        for mode in ("forward", "forward_backward"):
            key = f"{name}/{mode}"
            if isinstance(attend, Exception):
                case["results"][key] = {"error": repr(attend)}
                continue
            if time.perf_counter() > deadline:
                case["results"][key] = {"skipped": "time budget"}
                continue
            if name == "sdpa_causal" and (t, mode) in causal_cache:  # W does not change it
                case["results"][key] = causal_cache[(t, mode)]
                continue
            try:
                fn = timed_call(attend, mode, q, k, v, up)
                t0 = time.perf_counter()
                first = fn()  # compiles (flex, triton autotune) outside the timing
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                r = {"first_call_s": time.perf_counter() - t0, **measure(fn, device, warmup, runs)}
                r["band_tflops"] = (flops if mode == "forward" else 3.5 * flops) / r["median_s"] / 1e12
                if mode == "forward":
                    outputs[name] = first
            except Exception as e:  # noqa: BLE001 - e.g. FlexAttention's missing CPU backward in --dry-run
                r = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            case["results"][key] = r
            if name == "sdpa_causal":
                causal_cache[(t, mode)] = r
            save()
    ours = outputs.get("fastvq_triton")
    if ours is not None:
        case["max_abs_diff_vs_triton"] = {n: (o.float() - ours.float()).abs().max().item()
                                          for n, o in outputs.items() if n not in ("fastvq_triton", "sdpa_causal")}
    save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new measurement after this many seconds")
    parser.add_argument("--runs", type=int, default=2 if DRY_RUN else 10)
    parser.add_argument("--warmup", type=int, default=1 if DRY_RUN else 3)
    args = parser.parse_args()

    if DRY_RUN:
        device, cases, shape = torch.device("cpu"), DRY_CASES, DRY_SHAPE
    elif torch.cuda.is_available():
        device, cases, shape = torch.device("cuda"), GPU_CASES, GPU_SHAPE
    else:
        print("gpu_window_attention: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    out_path = Path(args.out) / ("window_attention_gpu_dryrun.json" if DRY_RUN else "window_attention_gpu.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    doc = {"benchmark": "window_attention_gpu", "machine": device_description(device),
           "settings": {"warmup": args.warmup, "runs": args.runs, "statistic": "median", "shape_B_H_Dh": shape,
                        "timer": "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter",
                        "peak_memory": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
                        "band_tflops": "band_flops_forward (x 3.5 for forward + backward) / median time",
                        "sdpa_mask_max_T": MASK_MAX_T},
           "cases": [], "skipped": []}

    def save():
        doc["elapsed_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(doc, indent=1))

    doc["correctness"] = correctness_sweep(device)
    save()
    causal_cache: dict = {}
    names = ("fastvq_triton", "flex", "sdpa_mask", "sdpa_causal")
    print(f"{'T':>6} {'W':>5} {'mode':>16} | " + " | ".join(f"{n:>21}" for n in names) + "   (ms, band TFLOP/s)", flush=True)
    for t, w in cases:
        if time.perf_counter() - t_start > args.budget_s:
            doc["skipped"].append({"T": t, "W": w, "why": "time budget"})
            continue
        b, h, d = shape
        case = {"T": t, "W": w, "B": b, "H": h, "Dh": d, "dtype": "bfloat16",
                "band_flops_forward": band_flops(b, h, t, d, w), "results": {}}
        doc["cases"].append(case)
        run_case(case, device, args.warmup, args.runs, causal_cache, t_start + args.budget_s, save)
        for mode in ("forward", "forward_backward"):
            cells = []
            for n in names:
                r = case["results"].get(f"{n}/{mode}")
                cells.append("-" if r is None else "error" if "error" in r else "skipped" if "skipped" in r
                             else f"{r['median_s'] * 1e3:9.3f} {r['band_tflops']:7.1f}")
            print(f"{t:>6} {w:>5} {mode:>16} | " + " | ".join(f"{c:>21}" for c in cells), flush=True)
        save()
    save()
    errors = [(c["T"], c["W"], k, r["error"]) for c in doc["cases"] for k, r in c["results"].items() if "error" in r]
    for e in errors:
        print(f"error: T={e[0]} W={e[1]} {e[2]}: {e[3]}", flush=True)
    print(f"wrote {out_path} ({len(doc['cases'])} cases, {len(errors)} errors, {len(doc['skipped'])} skipped, "
          f"{doc['elapsed_s']:.0f} s)", flush=True)
    # FlexAttention's missing CPU backward is expected in a dry run; on a GPU every error counts
    expected = all(k == "flex/forward_backward" for _, _, k, _ in errors) if DRY_RUN else not errors
    return 0 if expected and all(r["ok"] for r in doc["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
