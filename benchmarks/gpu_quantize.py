"""nearest_code on a CUDA GPU: the Triton kernel against the bare matmul x @ cb.T and the torch reference.

First a correctness sweep on the device (odd shapes, every dtype and metric, strided x, duplicated
codes, a split codebook), because the test suite may not put tensors on the GPU. Then, for each
(N, K, D, dtype), it records the median time of several CUDA-event-timed runs after warm-up (the
first call also autotunes), the TFLOP/s that time means (2 N K D / t), the ratio to the bare
matmul on the same inputs and to the device's practical matmul throughput (a large square matmul of
the same dtype, measured once), the extra peak memory of one call, and how often the kernel's index
agrees with the reference's. The matmul writes the N x K matrix the search never forms, so at small D
it is memory-bound and the search may beat it; the square-matmul ratio is the compute yardstick.

  python3 benchmarks/gpu_quantize.py [--out DIR] [--budget-s S]   # CUDA; writes DIR/quantize_gpu.json
  python3 benchmarks/gpu_quantize.py --dry-run                     # CPU, Triton interpreter, tiny sizes

DIR defaults to $OUT, else benchmarks/results. Results are rewritten after every case, so a run cut
short still leaves what it measured. --dry-run only checks that the script runs end to end; its
numbers mean nothing and go to quantize_gpu_dryrun.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastvq  # noqa: E402
from fastvq.ops.quantize import nearest_code_reference  # noqa: E402

# (N, K, D, dtype, metric). The grid asked for, then two rows that exercise the other paths on a GPU:
# cosine, and few rows (a VQGAN training batch), where the codebook is split across programs.
GPU_CASES = [(65536, k, d, dt, "l2") for dt in ("bfloat16", "float32") for d in (64, 256) for k in (1024, 16384)]
GPU_CASES += [(65536, 16384, 64, "bfloat16", "cosine"), (4096, 16384, 256, "bfloat16", "l2")]
DRY_CASES = [(70, k, d, dt, "l2") for dt in ("bfloat16", "float32") for d in (16, 40) for k in (33, 64)]
DRY_CASES += [(70, 64, 16, "bfloat16", "cosine")]
SQUARE = 8192  # the matmul-throughput probe: large enough to be compute-bound on any current GPU
# Correctness on the device before timing (the test suite may not reach CUDA tensors): odd shapes
# for every dtype and metric on the small-problem config, then shapes large enough to be autotuned,
# the first with rows few enough to split the codebook. (N, K, D); the tuned ones share their
# compiled kernels with the timed cases (same divisibility by 16), which keeps compile time down.
CHECK_SHAPES = [(1, 1, 1), (300, 257, 64), (129, 1000, 130), (70, 33, 300)]
CHECK_TUNED = [(1024, 6144, 256), (20480, 4096, 64)]
DRY_CHECK_SHAPES = [(1, 1, 1), (37, 45, 3), (70, 33, 300)]
DRY_CHECK_TUNED = [(90, 130, 64)]


def device_description(device: torch.device) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "dry_run": DRY_RUN}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu (Triton interpreter)"
    try:
        from common import machine_info  # CPU, git commit, dirty paths: shared with the CPU benchmarks

        info["host"] = machine_info(torch.get_num_threads())
    except Exception as e:  # noqa: BLE001 - the description is a courtesy, the timings are the point
        info["host"] = f"unavailable: {e}"
    return info


def measure(fn, device: torch.device, warmup: int, runs: int) -> dict:
    """Median of `runs` timed calls after `warmup` untimed ones, plus the extra peak memory of one call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = None
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs, "peak_extra_bytes": peak}


def tflops(n: int, k: int, d: int, seconds: float) -> float:
    return 2.0 * n * k * d / seconds / 1e12


def matmul_probe(dtype: torch.dtype, device: torch.device, warmup: int, runs: int) -> dict:
    size = 64 if DRY_RUN else SQUARE
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    r = measure(lambda: a @ b, device, warmup, runs)
    r["size"] = size
    r["tflops"] = tflops(size, size, size, r["median_s"])
    return r


def check_nearest(x, cb, metric, idx, dist) -> dict:
    """Is every chosen code a nearest one, in float64, and is its distance the one returned?"""
    xd, cd = x.double(), cb.double()
    if metric == "l2":
        all_d = torch.cdist(xd, cd).pow(2)
        scale = xd.pow(2).sum(1) + cd.pow(2).sum(1).max()
    else:
        all_d = 1 - (xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (cd / cd.norm(dim=1, keepdim=True).clamp_min(1e-12)).t()
        scale = torch.full((x.shape[0],), 2.0, dtype=torch.float64, device=x.device)
    tol = 1e-5 * scale + 1e-6
    chosen = all_d.gather(1, idx[:, None]).squeeze(1)
    ref_idx, _ = nearest_code_reference(x, cb, metric)
    return {"nearest": bool(((chosen - all_d.min(1).values) <= tol).all()),
            "distance": bool(((dist.double() - chosen.clamp_min(0)).abs() <= 2 * tol).all()),
            "agree_with_reference": (idx == ref_idx).double().mean().item()}


def correctness_sweep(device: torch.device) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(1)
    shapes = DRY_CHECK_SHAPES if DRY_RUN else CHECK_SHAPES
    tuned = DRY_CHECK_TUNED if DRY_RUN else CHECK_TUNED
    plan = [(s, dt, m) for s in shapes for dt in ("float32", "float16", "bfloat16") for m in ("l2", "cosine")]
    plan += [(s, dt, "l2") for s in tuned for dt in ("bfloat16", "float32")]
    for (n, k, d), dtype_name, metric in plan:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(n, 2 * d, device=device, dtype=dtype, generator=g)[:, ::2]  # strided rows and columns
        half = (k + 1) // 2
        base = torch.randn(half, d, device=device, dtype=dtype, generator=g)
        cb = torch.cat([base, base])[:k]  # every code past `half` duplicates one below it
        r = {"N": n, "K": k, "D": d, "dtype": dtype_name, "metric": metric}
        try:
            idx, dist = fastvq.nearest_code(x, cb, metric=metric, backend="triton")
            r.update(check_nearest(x, cb, metric, idx, dist), lowest_index_on_duplicates=bool((idx < half).all()))
            r["ok"] = r["nearest"] and r["distance"] and r["lowest_index_on_duplicates"]
        except Exception as e:  # noqa: BLE001 - a compile or launch failure is a finding, not the end of the run
            r.update(ok=False, error=repr(e))
        out.append(r)
        if not r["ok"]:
            print(f"CHECK FAILED: {r}", flush=True)
    print(f"correctness: {sum(r['ok'] for r in out)}/{len(out)} cases ok", flush=True)
    return out


def run_case(n, k, d, dtype_name, metric, device, warmup, runs, probe) -> dict:
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    cb = torch.randn(k, d, device=device, dtype=dtype, generator=g)
    case = {"N": n, "K": k, "D": d, "dtype": dtype_name, "metric": metric, "results": {}}
    fns = {
        "fastvq_triton": lambda: fastvq.nearest_code(x, cb, metric=metric, backend="triton"),
        "matmul": lambda: x @ cb.t(),
        "torch_reference": lambda: nearest_code_reference(x, cb, metric),
    }
    for name, fn in fns.items():
        r = measure(fn, device, warmup, runs)
        r["tflops"] = tflops(n, k, d, r["median_s"])
        case["results"][name] = r
    fast, mm = case["results"]["fastvq_triton"], case["results"]["matmul"]
    case["ratio_to_matmul"] = fast["tflops"] / mm["tflops"]
    case["ratio_to_device_matmul"] = fast["tflops"] / probe["tflops"]
    case["nk_fp32_bytes"] = n * k * 4  # what a search that forms the distance matrix would hold
    idx, _ = fns["fastvq_triton"]()
    ref_idx, _ = fns["torch_reference"]()
    case["agree_with_reference"] = (idx == ref_idx).double().mean().item()  # < 1 only through near-ties
    return case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this many seconds")
    parser.add_argument("--runs", type=int, default=2 if DRY_RUN else 15)
    parser.add_argument("--warmup", type=int, default=1 if DRY_RUN else 3)
    args = parser.parse_args()

    if DRY_RUN:
        device, cases = torch.device("cpu"), DRY_CASES
    elif torch.cuda.is_available():
        device, cases = torch.device("cuda"), GPU_CASES
    else:
        print("gpu_quantize: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    out_path = Path(args.out) / ("quantize_gpu_dryrun.json" if DRY_RUN else "quantize_gpu.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    doc = {"benchmark": "quantize_gpu", "machine": device_description(device),
           "settings": {"warmup": args.warmup, "runs": args.runs, "statistic": "median",
                        "timer": "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter",
                        "peak_memory": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
                        # the fp32 matmul anchor is only comparable to the kernel's IEEE fp32 dots without TF32
                        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
           "matmul_probe": {}, "cases": [], "skipped": [], "errors": []}

    def save():
        try:
            from fastvq.kernels.quantize import chosen_configs

            doc["triton_configs"] = chosen_configs()
        except Exception as e:  # noqa: BLE001
            doc["triton_configs"] = f"unavailable: {e}"
        doc["elapsed_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(doc, indent=1))

    doc["correctness"] = correctness_sweep(device)
    save()
    for dtype_name in sorted({c[3] for c in cases}):
        doc["matmul_probe"][dtype_name] = matmul_probe(getattr(torch, dtype_name), device, args.warmup, args.runs)
        print(f"matmul probe {dtype_name}: {doc['matmul_probe'][dtype_name]['tflops']:.1f} TFLOP/s", flush=True)
    save()

    print(f"{'N':>6} {'K':>6} {'D':>4} {'dtype':>8} {'metric':>6} | {'triton':>9} {'TFLOP/s':>7} | {'matmul':>9} {'TFLOP/s':>7} | "
          f"{'ref':>9} | {'/matmul':>7} {'/peak':>6} | {'mem MiB':>8} {'agree':>6}", flush=True)
    for n, k, d, dtype_name, metric in cases:
        if time.perf_counter() - t_start > args.budget_s:
            doc["skipped"].append({"N": n, "K": k, "D": d, "dtype": dtype_name, "metric": metric, "why": "time budget"})
            continue
        try:
            case = run_case(n, k, d, dtype_name, metric, device, args.warmup, args.runs, doc["matmul_probe"][dtype_name])
        except Exception as e:  # noqa: BLE001 - record and go on: one failing shape must not hide the others
            doc["errors"].append({"N": n, "K": k, "D": d, "dtype": dtype_name, "metric": metric, "error": repr(e)})
            print(f"{n:>6} {k:>6} {d:>4} {dtype_name:>8} {metric:>6} | ERROR {e!r}", flush=True)
            save()
            continue
        doc["cases"].append(case)
        r = case["results"]
        mem = r["fastvq_triton"]["peak_extra_bytes"]
        print(f"{n:>6} {k:>6} {d:>4} {dtype_name:>8} {metric:>6} | {r['fastvq_triton']['median_s'] * 1e3:>7.3f}ms "
              f"{r['fastvq_triton']['tflops']:>7.1f} | {r['matmul']['median_s'] * 1e3:>7.3f}ms {r['matmul']['tflops']:>7.1f} | "
              f"{r['torch_reference']['median_s'] * 1e3:>7.2f}ms | {case['ratio_to_matmul']:>7.2f} {case['ratio_to_device_matmul']:>6.2f} | "
              f"{'-' if mem is None else f'{mem / 2**20:.1f}':>8} {case['agree_with_reference']:>6.4f}", flush=True)
        save()

    # Hook: window attention (fastvq.ops.window_attention) adds its GPU cases here or in
    # benchmarks/gpu_window_attention.py, against torch SDPA and FlexAttention on the same inputs.
    # Hook: cached sampling (fastvq.ops.sampling) adds its GPU cases here or in benchmarks/gpu_sampling.py.
    save()
    print(f"wrote {out_path} ({len(doc['cases'])} cases, {len(doc['errors'])} errors, {len(doc['skipped'])} skipped, "
          f"{doc['elapsed_s']:.0f} s)", flush=True)
    return 1 if doc["errors"] or not all(r["ok"] for r in doc["correctness"]) else 0


if __name__ == "__main__":
    sys.exit(main())
