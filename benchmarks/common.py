"""The template every benchmarks/compare_<op>.py follows, and what those scripts share.

A script declares one Comparison (its cases per device and size, how one case is measured, what its
implementations are) and ends with `raise SystemExit(common.main(COMPARISON))`. The rest is here,
the same for every op:

- one command line: --device cpu|cuda, --quick (small sizes, to check the script), --dry-run (the
  CUDA cases at small sizes on CPU tensors through the Triton interpreter: checks the GPU path
  without a GPU; its numbers mean nothing), --out, --threads, --budget-s, --timeout, --isa (the
  CPU kernel variant: FASTVQ_CPU_ISA), --only KEY=VALUES (a subset of the cases), and the script's
  own options;
- on CPU every case runs in a fresh process (`script --worker CASE`): a clean allocator and a peak
  RSS of its own; on CUDA (and --dry-run) the cases run in this process, since the GPU's memory
  counter needs no fresh process and a process start-up per case would eat a lent GPU's minutes;
- timing and peak memory come from fastvq.bench (time_call, peak_memory), the package's one
  harness, also behind `fastvq bench` and the demos' timings;
- results go to JSON (benchmarks/results/<op>_<device>.json; quick and dry runs under build/bench/),
  rewritten after every case so a crash keeps what was measured, with the machine, the full git
  commit, and the load average at both ends and at the start of every case;
- benchmarks/report.py turns the JSON files into the plots and the README tables.

The scripts import this file as `common`: `python benchmarks/compare_<op>.py` puts the script's own
folder first on sys.path, and pytest does the same for the bench_<op>.py suites beside them
(benchmarks/conftest.py), so nothing edits sys.path. fastvq itself must be installed
(`pip install --no-build-isolation -e .`, which `make build` does).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
SCRATCH_DIR = REPO / "build" / "bench"  # quick and dry runs: never README material
MIB = 1 << 20


@dataclass(frozen=True)
class Comparison:
    """What a compare_<op>.py script declares; main() runs it.

    sizes: "cpu", "cpu_quick", "cuda", "cuda_quick" -> the script's size table; main() puts the one
        in use on args.sizes (and into the JSON).
    plan(args) -> cases: dicts of JSON values with at least "suite" and "impl"; args carries
        device (where tensors live), plan ("cpu" or "cuda": which implementations), sizes, quick
        and the script's own options. A case that is not to be run carries "skipped": why.
    measure(case) -> the case's measurements (merged into the case): runs in the worker, with
        torch's threads already set.
    method(args) -> how it measures, in words, saved in the JSON beside the machine.
    summary(result) -> the script's own figures for the progress line (time, runs and peak memory
        are printed anyway).
    skip(case, results so far, args) -> a skipped result, or None to run the case.
    expected_s: the full CPU run on a quiet 2-core machine, measured (printed before a run, and
        summed by `report.py --expected` for `make compare`).
    shown: the case keys the progress line prints (beside suite and implementation).
    """

    name: str
    doc: str
    script: str
    labels: dict
    sizes: dict
    plan: Callable
    measure: Callable
    method: Callable
    expected_s: float
    budget_s: dict = field(default_factory=lambda: {"cpu": 900.0, "cuda": 240.0})
    timeout_s: float = 900.0
    summary: Callable | None = None
    skip: Callable | None = None
    options: Callable | None = None
    shown: tuple = ()
    worker_env: Callable | None = None  # case -> environment changes of its worker process (None: unset)


# ----------------------------------------------------------------------------- machine description

def _first_match(path: str, pattern: str) -> str | None:
    try:
        m = re.search(pattern, Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return m.group(1).strip() if m else None


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(threads: int, device: str = "cpu") -> dict:
    """What ran the benchmark: enough to tell two result files apart and to judge them."""
    import torch

    flags = (_first_match("/proc/cpuinfo", r"^flags\s*:(.*)$") or "").split()
    mem_kib = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    info = {
        "cpu": _first_match("/proc/cpuinfo", r"^model name\s*:(.*)$") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags],
        "memory_gib": round(int(mem_kib) / MIB, 1) if mem_kib else None,
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other processes on the same cores distort the timings (2-thread OpenMP stalls for whole
        # scheduler slices); the load average says how quiet the machine was.
        "load_average_1_5_15min_at_start": load_average(),
        "git_commit": (git("rev-parse", "HEAD") or "").strip() or None,
        # Work not committed (an edited kernel) changes what was measured; say so.
        "git_dirty_paths": [line[3:] for line in (git("status", "--porcelain", "--", "csrc", "fastvq", "kernels",
                                                       "benchmarks/*.py") or "").splitlines()],
    }
    for dist in ("faiss-cpu", "taming-transformers-rom1504", "vector-quantize-pytorch", "triton"):
        info[dist] = _version(dist)  # absent anchors are recorded as None
    # Which of the extension's kernel variants ran and how it split work: the same CPU gives
    # different figures for each (FASTVQ_CPU_ISA, FASTVQ_PARALLEL; the case processes inherit both).
    try:
        from fastvq import _backend

        info["cpu_isa"], info["parallel"] = _backend.cpu_isa(), _backend.parallel_mode()
    except Exception as e:  # noqa: BLE001 - a benchmark of the anchors alone still runs
        info["cpu_isa"] = info["parallel"] = None
        info["cpu_isa_error"] = f"{type(e).__name__}: {e}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    multiprocessors=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


# ----------------------------------------------------------------------------- one case

def attention_call(case: dict, attend: Callable):
    """The timed call of an attention case: a forward under no_grad, or a forward plus backward of
    a fixed upstream gradient, on seeded q, k, v of shape (B, H, T, Dh); returns (run, (q, k, v))."""
    import torch

    device, dtype = case.get("device", "cpu"), getattr(torch, case.get("dtype", "float32"))
    g = torch.Generator().manual_seed(0)
    shape = (case["B"], case["H"], case["T"], case["Dh"])
    q, k, v, upstream = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    if case["suite"] == "forward":
        def run():
            with torch.no_grad():
                return attend(q, k, v)

        return run, (q, k, v)
    for x in (q, k, v):
        x.requires_grad_(True)

    def run():
        return torch.autograd.grad(attend(q, k, v), (q, k, v), upstream)

    return run, (q, k, v)


def measure_case(comparison: Comparison, case: dict, threads: int) -> dict:
    """The case with its measurements, or with an "error" saying why there are none."""
    import torch

    torch.set_num_threads(threads)
    try:
        return {**case, **comparison.measure(case)}
    except Exception as e:  # noqa: BLE001 - one failing case is a finding, not the end of the run
        return {**case, "error": f"{type(e).__name__}: {e}".splitlines()[0]}


def run_in_process(comparison: Comparison, case: dict, threads: int, timeout_s: float) -> dict:
    """Run `script --worker CASE` in a fresh process (clean allocator and peak RSS) and return the
    result it prints, or the case with an "error" saying why there is none."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key, value in (comparison.worker_env(case) if comparison.worker_env else {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    cmd = [sys.executable, comparison.script, "--worker", json.dumps(case), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**case, "error": f"exit {proc.returncode}: {tail}"}


# ----------------------------------------------------------------------------- progress lines

def describe(case: dict, comparison: Comparison) -> str:
    sizes = " ".join(f"{k}={case[k]}" for k in comparison.shown if k in case)
    return f"{case['suite']:<23} {sizes:<32} {comparison.labels.get(case['impl'], case['impl']):<40}"


def outcome(r: dict, summary: Callable | None) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return f"error: {r['error']}"
    mem = "peak n/a" if r.get("peak_extra_bytes") is None else f"peak +{r['peak_extra_bytes'] / MIB:.1f} MiB"
    extra = summary(r) if summary else ""
    return f"{r['median_s'] * 1e3:10.3f} ms ({r['runs']} runs)  {mem}" + (f"  {extra}" if extra else "")


# ----------------------------------------------------------------------------- the run

def run_cases(comparison: Comparison, todo: list[dict], doc: dict, out: Path, *, threads: int, timeout_s: float,
              budget_s: float, fresh_process: bool, skip=None) -> dict:
    """Measure every case of `todo` into doc["results"], rewriting `out` after every case. No case
    starts once budget_s seconds have passed; skip(case, results so far) may return a skipped result
    instead. Prints one line per case."""
    start = time.perf_counter()
    width = len(str(len(todo)))
    for i, case in enumerate(todo, 1):
        r = skip(case, doc["results"]) if skip is not None and "skipped" not in case else None
        if "skipped" in case:
            r = case
        elif r is None and time.perf_counter() - start > budget_s:
            r = {**case, "skipped": f"time budget of {budget_s:.0f} s spent (--budget-s)"}
        elif r is None:
            load = os.getloadavg()[0]
            r = (run_in_process(comparison, case, threads, timeout_s) if fresh_process
                 else measure_case(comparison, case, threads))
            r["load_1min_at_start"] = round(load, 2)
        doc["results"].append(r)
        doc["elapsed_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"[{i:>{width}}/{len(todo)}] {describe(case, comparison)}  {outcome(r, comparison.summary)}",
              flush=True)
    doc["machine"]["load_average_1_5_15min_at_end"] = load_average()
    doc["elapsed_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def parser_for(comparison: Comparison) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=comparison.doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(comparison.doc.split("\n\n")[1:]))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the tensors live (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script (written under build/bench/)")
    p.add_argument("--dry-run", action="store_true",
                   help="the --device cuda cases at small sizes on CPU tensors through the Triton interpreter "
                        "(checks the GPU path here; the numbers mean nothing; written under build/bench/)")
    p.add_argument("--out", type=Path,
                   help=f"the JSON to write (default benchmarks/results/{comparison.name}_<device>.json)")
    p.add_argument("--threads", type=int, default=2, help="torch (and faiss) threads (default 2)")
    p.add_argument("--budget-s", type=float,
                   help=f"start no new case after this many seconds (default {comparison.budget_s['cpu']:g} on CPU, "
                        f"{comparison.budget_s['cuda']:g} on CUDA)")
    p.add_argument("--timeout", type=float, default=comparison.timeout_s,
                   help=f"seconds allowed per case in its own process, on CPU (default {comparison.timeout_s:g})")
    p.add_argument("--isa", choices=("avx512", "avx2", "baseline"),
                   help="run fastvq's kernels on this CPU variant (FASTVQ_CPU_ISA; default: the best this CPU "
                        "runs); the default --out gets the suffix _<isa>")
    p.add_argument("--only", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="run only the cases whose KEY is one of the values (repeatable: every one must match), "
                        "e.g. --only suite=forward --only T=4096; the default --out gets the suffix _subset")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    if comparison.options:
        comparison.options(p)
    return p


def parse_only(items: list[str]) -> dict[str, set[str]]:
    """--only KEY=V1,V2 ... -> {KEY: {"V1", "V2"}}."""
    only = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--only expects KEY=VALUE[,VALUE...], got {item!r}")
        only.setdefault(key, set()).update(values.split(","))
    return only


def matches(case: dict, only: dict[str, set[str]]) -> bool:
    # values compare as text, so that --only T=4096 matches the integer 4096
    return all(key in case and str(case[key]) in values for key, values in only.items())


def main(comparison: Comparison, argv=None) -> int:
    p = parser_for(comparison)
    args = p.parse_args(argv)
    if args.worker:  # one case, in its own process: print the result for run_in_process
        print("RESULT " + json.dumps(measure_case(comparison, json.loads(args.worker), args.threads)), flush=True)
        return 0
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    try:
        only = parse_only(args.only)
    except ValueError as e:
        p.error(str(e))
    if args.isa:
        if args.device == "cuda" or args.dry_run:
            p.error("--isa chooses a CPU kernel variant: leave out --device cuda and --dry-run")
        os.environ["FASTVQ_CPU_ISA"] = args.isa  # before fastvq loads; the case processes inherit it
    if args.dry_run:
        if args.device == "cuda":
            p.error("--dry-run runs the CUDA cases on CPU tensors: leave out --device cuda")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel
    import torch

    try:
        import fastvq  # noqa: F401
    except ImportError as e:
        p.error(f"fastvq does not import ({e}); install it first: pip install --no-build-isolation -e .")
    if args.isa:  # fastvq may have loaded before main() set FASTVQ_CPU_ISA
        from fastvq import _backend

        try:
            _backend.set_cpu_isa(args.isa)
        except (RuntimeError, ValueError) as e:
            p.error(f"--isa {args.isa}: {e}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine (--dry-run checks the CUDA "
                "cases on CPU)")
    args.plan = "cuda" if args.dry_run else args.device
    args.quick = args.quick or args.dry_run
    args.sizes = comparison.sizes[args.plan + ("_quick" if args.quick else "")]
    budget_s = args.budget_s if args.budget_s is not None else comparison.budget_s[args.plan]
    kind = "dryrun" if args.dry_run else "quick" if args.quick else None
    name = f"{comparison.name}_{args.device}" + (f"_{args.isa}" if args.isa else "") + ("_subset" if only else "")
    out = args.out or (SCRATCH_DIR / f"{name}_{kind}.json" if kind else RESULTS_DIR / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    todo = [case for case in comparison.plan(args) if matches(case, only)]
    if not todo:
        p.error("--only matches no case of this plan")
    doc = {
        "benchmark": comparison.name,
        "device": args.device,
        "plan": args.plan,
        "quick": args.quick,
        "dry_run": args.dry_run,
        "command": " ".join([Path(comparison.script).relative_to(REPO).as_posix(), *(argv or sys.argv[1:])]),
        "machine": machine_info(args.threads, args.device),
        "sizes": args.sizes,
        "method": comparison.method(args),
        "labels": comparison.labels,
        "only": {key: sorted(values) for key, values in only.items()},
        # what names a case (the rest of a result is measurement): report.py matches the same case
        # across files by these keys
        "case_keys": sorted({key for case in todo for key in case if key != "skipped"}),
        "results": [],
    }
    load = doc["machine"]["load_average_1_5_15min_at_start"][0]
    runs = sum("skipped" not in c for c in todo)
    expected = (f"expected about {comparison.expected_s / 60:.0f} min on a quiet 2-core CPU; "
                if args.plan == "cpu" and not args.quick else "")
    print(f"{comparison.name} on {args.device}{' (dry run: CUDA cases, Triton interpreter)' if args.dry_run else ''}: "
          f"{len(todo)} cases ({runs} to run), {args.threads} threads; {expected}budget {budget_s:.0f} s; "
          f"load average {load:.2f}; writing {out}", flush=True)
    if load > 0.5 and args.device == "cpu":
        print(f"warning: the machine is not quiet (load average {load:.2f}); timings will be noisy", flush=True)
    skip = (lambda case, results: comparison.skip(case, results, args)) if comparison.skip else None
    run_cases(comparison, todo, doc, out, threads=args.threads, timeout_s=args.timeout, budget_s=budget_s,
              fresh_process=args.device == "cpu" and not args.dry_run, skip=skip)
    errors = sum("error" in r for r in doc["results"])
    print(f"done in {doc['elapsed_s']:.0f} s ({errors} errors); wrote {out}; plots and tables: "
          f"python benchmarks/report.py", flush=True)
    return 0
