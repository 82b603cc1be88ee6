"""Every Triton kernel in kernels/*.py compiled ahead of time for sm_80 and sm_90, no GPU needed.

What a GPU would compile is found by running the launch wrappers themselves (the functions in the
ops' KERNELS tables) on meta tensors of the presets' shapes, with the launch intercepted: each
intercepted launch gives the kernel, its arguments and constexprs exactly as the wrapper chose them,
and an autotuned launch gives every config its autotuner may pick (the list the wrapper built for
that GPU's shared memory; the wrappers' other device queries only size grids, and take their
non-CUDA branch here). Each launch is specialised as the JIT would specialise it (16-byte
aligned pointers, ints divisible by 16, ints equal to 1), then compiled for each target with

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options)

which runs the whole pipeline down to a cubin with the ptxas bundled in the triton wheel. Registers
and spills come from that ptxas's -v log (knobs.nvidia.dump_ptxas_log: no driver is needed, unlike
CompiledKernel.n_regs), shared memory from the kernel's metadata, checked against the target's
opt-in limit per block (a kernel over it would fail at launch).

A record per (kernel, target, distinct specialisation): the workload that launched it, role ("launch":
the one config the wrapper uses for that shape; "autotune i/n": one of its autotuner's configs),
config (tile constexprs, warps, stages), n_regs, spill_store_bytes / spill_load_bytes / stack_bytes
(ptxas), n_spills (stack_bytes / 4, what CompiledKernel.n_spills reports on a GPU), shared (bytes),
fits_smem, ok, error, compile_s. "summary" lists failures and every kernel that spills.

The kernels modules read TRITON_INTERPRET once, when they are imported, and the tests run under
TRITON_INTERPRET=1; so each target compiles in its own subprocess with TRITON_INTERPRET=0 (and a
fresh Triton cache, so every ptxas log is produced afresh).

    python benchmarks/triton_compile.py                 # everything -> benchmarks/results/triton_compile.json
    python benchmarks/triton_compile.py --quick --out /tmp/tc.json   # the subset `make test` compiles
    python benchmarks/triton_compile.py --ops raster_window --merge  # recompile one op, keep the others' records

tests/test_triton_compile.py runs the --quick subset (every launch config at least once, in the
main dtypes) and fails on any compile error or shared memory overflow, naming the kernel.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "triton_compile.json"
# Opt-in dynamic shared memory per block (the driver's max_shared_mem): A100 and H100/H200.
TARGETS = {80: 166912, 90: 232448}


# ----------------------------------------------------------------------------- the kernels

def kernel_names() -> dict[str, list[str]]:
    """{op: [kernel, ...]}: every @triton.jit function named *_kernel in kernels/<op>.py (the
    launched ones; helpers without the suffix are inlined into them). Read from the source, so
    no triton import is needed to list them."""
    found = {}
    for path in sorted(KERNEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                 and node.name.endswith("_kernel") and any("jit" in ast.unparse(d) for d in node.decorator_list)]
        if names:
            found[path.stem] = names
    return found


# ----------------------------------------------------------------------------- workloads

class Workload(NamedTuple):
    """One call of a launch wrapper on meta tensors; `quick` ones are what `make test` compiles."""
    op: str
    label: str
    quick: bool
    call: Callable[[], None]


def _workloads() -> list[Workload]:
    """Calls of every wrapper over the dtypes they take and the shapes the presets use (codebook
    dims 16-256 with 128-1024 codes, GPT head dims 32/64 with window up to 256, vocab 1024, width
    up to 1024), plus the shapes that reach each remaining branch of the wrappers' block tables."""
    import torch
    from fastvq.kernels import decode_linear, quantize, sampling, window_attention

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

    def meta(*shape, dtype=f32):
        return torch.empty(shape, dtype=dtype, device="meta")

    def name(dtype):
        return str(dtype).removeprefix("torch.")

    out = []
    # quantize: the search (small N*K*D launches one config, large ones autotune), the epilogues.
    for dtype in (f32, bf16, f16, f64):
        for d in (32, 256, 512):
            for cosine in (False, True):
                for n, size in ((2048, "small"), (65536, "large")):
                    quick = (not cosine and d == 256 and (dtype == f32 or (dtype == bf16 and size == "large"))
                             or (dtype, d, cosine, size) == (f32, 32, False, "small"))
                    out.append(Workload(
                        "quantize", f"nearest_code {name(dtype)} N={n} K=1024 D={d} {'cosine' if cosine else 'l2'}",
                        quick, lambda n=n, d=d, dtype=dtype, cosine=cosine:
                        quantize.nearest_code(meta(n, d, dtype=dtype), meta(1024, d, dtype=dtype), cosine)))
            n, k = 2048, 1024
            out.append(Workload("quantize", f"vq_gather {name(dtype)} N={n} D={d}", dtype == f32 and d == 256,
                                lambda n=n, d=d, dtype=dtype: quantize.vq_gather(
                                    meta(n, d, dtype=dtype), meta(k, d, dtype=dtype), meta(n, dtype=torch.int64))))
            for grad_code in (True, False):
                out.append(Workload(
                    "quantize", f"vq_backward {name(dtype)} N={n} D={d} grad_codebook={grad_code}",
                    dtype == f32 and d == 256 and grad_code,
                    lambda n=n, d=d, dtype=dtype, grad_code=grad_code: quantize.vq_backward(
                        meta(n, d, dtype=dtype), meta(n, d, dtype=dtype), meta(k, d, dtype=dtype),
                        meta(n, dtype=torch.int64), meta(), 0.25, 1.0, True, grad_code)))

    # window attention: head dims 32/64 (presets), 128 and 256 (the largest supported).
    b, h, t, window = 2, 8, 256, 64
    for dtype in (f32, bf16, f16):
        for hd in (32, 64, 128, 256):
            quick = dtype == bf16 and hd != 32  # the GPU's training dtype, once per row of _blocks' table
            spec = f"{name(dtype)} B={b} H={h} T={t} Dh={hd} window={window}"

            def fwd_bwd(hd=hd, dtype=dtype):
                q = meta(b, h, t, hd, dtype=dtype)
                window_attention.attention_forward(q, q, q, window, hd ** -0.5)
                window_attention.attention_backward(q, q, q, q, q, meta(b, h, t), window, hd ** -0.5)

            def decode(hd=hd, dtype=dtype):
                window_attention.decode(meta(b, h, 1, hd, dtype=dtype), meta(b, h, 256, hd, dtype=dtype),
                                        meta(b, h, 256, hd, dtype=dtype), meta(dtype=torch.int64), 256, hd ** -0.5)

            out.append(Workload("window_attention", f"forward+backward {spec}", quick, fwd_bwd))
            out.append(Workload("window_attention", f"decode {name(dtype)} B={b} H={h} slots=256 Dh={hd}", quick, decode))

    # raster window: a 32-wide grid with taming's window (8 rows, 8 left, 7 right) after a class token,
    # GQA, over the rows of the block-size table.
    from fastvq.kernels import raster_window
    from fastvq.ops.raster_window import Geometry

    geometry = Geometry(32, 8, 8, 7, 1)
    for dtype, hd in ((bf16, 64), (f32, 128), (f16, 256), (bf16, 32)):
        def raster(hd=hd, dtype=dtype):
            q, k = meta(2, 8, 1025, hd, dtype=dtype), meta(2, 4, 1025, hd, dtype=dtype)
            raster_window.attention_forward(q, k, k, geometry, hd ** -0.5)
            raster_window.attention_backward(q, q, k, k, q, meta(2, 8, 1025), geometry, hd ** -0.5)

        out.append(Workload("raster_window", f"forward+backward {name(dtype)} B=2 H=8 H_kv=4 T=1025 Dh={hd} width=32",
                            dtype == bf16 and hd == 64, raster))

    # raster window decode: a wavefront of 17 positions against a ring of 18 rows of 32 (+ the class
    # token), every autotune config; GQA groups of 2 (one head tile) and 32 (the widest tile).
    ring_slots = 1 + 18 * 32
    for dtype, hd, h, h_kv in ((bf16, 64, 8, 4), (f32, 128, 8, 4), (f16, 256, 8, 4), (bf16, 32, 8, 4),
                               (bf16, 64, 32, 1)):
        def raster_decode(hd=hd, dtype=dtype, h=h, h_kv=h_kv):
            ring = meta(2, h_kv, ring_slots, hd, dtype=dtype)
            idx = meta(17, dtype=torch.int64)
            raster_window.decode(meta(2, h, 17, hd, dtype=dtype), ring, ring, idx, idx, geometry, hd ** -0.5)

        out.append(Workload("raster_window", f"decode {name(dtype)} B=2 H={h} H_kv={h_kv} n=17 slots={ring_slots} "
                            f"Dh={hd} width=32", dtype == bf16 and hd == 64 and h_kv == 4, raster_decode))

    # sampling: a codebook-sized row per program, and short rows sharing one; with and without CFG.
    for dtype in (f32, bf16, f16):
        for rows, vocab in ((1, 1024), (16, 128)):
            for cfg in (None, 3.0):
                quick = dtype == f32 and rows == 1 and cfg is None  # the codebook-sized row; compiles take ~20 s

                def draw(rows=rows, vocab=vocab, dtype=dtype, cfg=cfg):
                    logits = meta(rows * (2 if cfg else 1), vocab, dtype=dtype)
                    sampling.sample_logits(logits, meta(rows), meta(rows, dtype=torch.int64), meta(rows),
                                           meta(rows), cfg)
                out.append(Workload("sampling", f"sample_logits {name(dtype)} rows={rows} V={vocab} cfg={cfg}",
                                    quick, draw))

    # decode_linear: a GPT block's three products (qkv; fc + GELU; proj + residual) at batch 1 and 16.
    for dtype in (f32, bf16, f16):
        for m in (1, 16):
            for kind, (n_out, k_in, bias, residual, gelu) in {"qkv": (768, 256, True, False, False),
                                                             "fc": (1024, 256, True, False, True),
                                                             "proj": (256, 1024, True, True, False)}.items():
                quick = dtype == f32 and (m, kind) in ((1, "fc"), (16, "proj"))
                out.append(Workload(
                    "decode_linear", f"decode_linear {kind} {name(dtype)} M={m} N={n_out} K={k_in}", quick,
                    lambda m=m, n_out=n_out, k_in=k_in, bias=bias, residual=residual, gelu=gelu, dtype=dtype:
                    decode_linear.decode_linear(meta(m, k_in, dtype=dtype), meta(n_out, k_in, dtype=dtype),
                                                meta(n_out, dtype=dtype) if bias else None,
                                                meta(m, n_out, dtype=dtype) if residual else None, gelu)))
    return out


# ----------------------------------------------------------------------------- tracing the launches

class Launch(NamedTuple):
    fn: object          # the JITFunction
    args: tuple
    kwargs: dict        # constexprs and launch options as the wrapper passed them
    role: str           # "launch" (the wrapper's one config for that shape) or "autotune i/n"


@contextlib.contextmanager
def _intercepted(launches: list[Launch]):
    """Record kernel launches instead of running them (JITFunction.run and Autotuner.run)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, "launch"))

    def autotune_run(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        for i, config in enumerate(configs):
            launches.append(Launch(self.fn, args, {**kwargs, **config.all_kwargs()}, f"autotune {i + 1}/{len(configs)}"))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotune_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _trace(workload: Workload, smem: int) -> list[Launch]:
    """The launches one wrapper call makes on a GPU with `smem` bytes of shared memory per block."""
    from unittest import mock

    from fastvq.kernels import quantize

    launches: list[Launch] = []
    # The one driver query a wrapper makes on the way to a launch: the autotune list is filtered by it.
    with _intercepted(launches), mock.patch.object(quantize, "_smem_budget", lambda device: smem):
        workload.call()
    return launches


# ----------------------------------------------------------------------------- compiling one target

_PTXAS = {
    "n_regs": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}
_CONFIG_KEYS = ("BLOCK", "ROWS")  # constexprs that are tile sizes: the "config" of a record


def _specialise(launch: Launch, backend):
    """(signature, constexprs, attrs, options) as JITFunction.run would derive them."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, None)
    return signature, constexprs, attrs, options


def _describe(constexprs: dict, fn) -> dict:
    return {fn.arg_names[path[0]]: (value if isinstance(value, (bool, int, float)) else str(value))
            for path, value in constexprs.items()}


def compile_target(arch: int, quick: bool, ops: list[str] | None = None) -> list[dict]:
    """Compile every traced launch (deduplicated) for sm_<arch>; one record per compiled kernel."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by make_cubin: captured below
    smem_limit = TARGETS[arch]
    records, seen = [], set()
    for workload in _workloads():
        if (quick and not workload.quick) or (ops and workload.op not in ops):
            continue
        for launch in _trace(workload, smem_limit):
            kernel = launch.fn.__name__
            record = {"op": workload.op, "kernel": kernel, "target": f"sm_{arch}", "workload": workload.label,
                      "role": launch.role}
            try:
                signature, constexprs, attrs, options = _specialise(launch, backend)
            except Exception as e:  # a wrapper/kernel mismatch: report it as this kernel's failure
                records.append({**record, "ok": False, "error": f"specialisation: {type(e).__name__}: {e}"})
                continue
            key = (kernel, str(signature), str(constexprs), str(attrs), str(options))
            if key in seen:
                continue
            seen.add(key)
            named = _describe(constexprs, launch.fn)
            record.update(
                config=" ".join([f"{k}={v}" for k, v in named.items() if k.startswith(_CONFIG_KEYS)]
                                + [f"warps={options.num_warps}", f"stages={options.num_stages}"]),
                constexprs=named, num_warps=options.num_warps, num_stages=options.num_stages)
            log = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                              options=options.__dict__)
            except Exception as e:
                message = f"{type(e).__name__}: {e}"
                record.update(ok=False, error=message[:4000], compile_s=round(time.perf_counter() - start, 2))
                records.append(record)
                continue
            text = log.getvalue()
            stats = {k: int(m.group(1)) if (m := pattern.search(text)) else None for k, pattern in _PTXAS.items()}
            shared = int(compiled.metadata.shared)
            record.update(stats, n_spills=None if stats["stack_bytes"] is None else stats["stack_bytes"] // 4,
                          shared=shared, smem_limit=smem_limit, fits_smem=shared <= smem_limit,
                          ok=shared <= smem_limit and stats["n_regs"] is not None,
                          compile_s=round(time.perf_counter() - start, 2))
            if not record["ok"]:
                record["error"] = (f"needs {shared} bytes of shared memory, sm_{arch} allows {smem_limit}"
                                   if shared > smem_limit else f"no register count in the ptxas log: {text[-2000:]}")
            records.append(record)
    return records


# ----------------------------------------------------------------------------- driver

def compile_all(targets=tuple(TARGETS), quick: bool = False, ops: list[str] | None = None,
                timeout_s: float = 3600) -> list[dict]:
    """Compile for every target, one subprocess each, side by side. A worker that dies or times
    out gives one failed record per op it was asked for, with its output's tail."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    records = []
    with tempfile.TemporaryDirectory(prefix="triton_aot_") as tmp:
        workers = []
        for arch in targets:
            result = Path(tmp) / f"sm_{arch}.json"
            cmd = [sys.executable, __file__, "--worker", str(arch), "--out", str(result)]
            cmd += ["--quick"] if quick else []
            cmd += ["--ops", *ops] if ops else []
            worker_env = {**env, "TRITON_CACHE_DIR": str(Path(tmp) / f"cache_{arch}")}
            workers.append((arch, result, subprocess.Popen(cmd, env=worker_env, cwd=ROOT, stdout=subprocess.PIPE,
                                                           stderr=subprocess.STDOUT, text=True)))
        deadline = time.monotonic() + timeout_s
        for arch, result, proc in workers:
            try:
                output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                failure = None if proc.returncode == 0 and result.exists() else f"worker exited {proc.returncode}"
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                failure = f"worker timed out after {timeout_s:.0f} s"
            if failure is None:
                records += json.loads(result.read_text())
            else:
                for op in ops or kernel_names():
                    records.append({"op": op, "kernel": None, "target": f"sm_{arch}", "ok": False,
                                    "error": f"{failure}: {(output or '')[-3000:]}"})
    return records


def summarise(records: list[dict]) -> dict:
    failures = [f"{r['target']} {r['kernel']} [{r.get('workload')}; {r.get('config')}]: {r['error']}"
                for r in records if not r["ok"]]
    spills = [f"{r['target']} {r['kernel']} [{r['workload']}; {r['config']}; {r['role']}]: "
              f"{r['spill_store_bytes']} B spill stores, {r['spill_load_bytes']} B spill loads, {r['n_regs']} regs"
              for r in records if r["ok"] and (r["spill_store_bytes"] or r["spill_load_bytes"])]
    per_kernel = {}
    for r in records:
        if r["ok"]:
            row = per_kernel.setdefault(f"{r['target']} {r['kernel']}", {"compiled": 0, "max_regs": 0, "max_shared": 0,
                                                                        "spilling": 0})
            row["compiled"] += 1
            row["max_regs"] = max(row["max_regs"], r["n_regs"])
            row["max_shared"] = max(row["max_shared"], r["shared"])
            row["spilling"] += bool(r["spill_store_bytes"] or r["spill_load_bytes"])
    return {"compiled": sum(r["ok"] for r in records), "failed": len(failures), "failures": failures,
            "spills": spills, "per_kernel": per_kernel}


def write_json(path: Path, result: dict) -> None:
    """Indented, except one line per record: readable, and a diff shows which kernels changed."""
    records = "[\n" + ",\n".join(json.dumps(r) for r in result["records"]) + "\n]"
    text = json.dumps({**result, "records": "@records@"}, indent=1).replace('"@records@"', records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _ptxas_versions() -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    versions = {}
    for arch in TARGETS:
        tool = get_ptxas(arch)
        versions[f"sm_{arch}"] = {"path": Path(tool.path).name, "version": tool.version}
    return versions


def _kept_records(path: Path, ops: list[str] | None, quick: bool) -> list[dict]:
    """--merge: the records of the ops not recompiled, from a previous result of the same mode."""
    if not ops:
        raise SystemExit("--merge needs --ops (the ops whose records are replaced)")
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    if previous.get("mode") != ("quick" if quick else "full"):
        raise SystemExit(f"--merge: {path} is a {previous.get('mode')} result; rerun everything instead")
    return [r for r in previous["records"] if r["op"] not in ops]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the subset `make test` compiles")
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--ops", nargs="+", help="only these ops (kernels/<op>.py)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for all targets together")
    parser.add_argument("--merge", action="store_true",
                        help="with --ops: replace only those ops' records in --out, keep the other ops' records")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:  # one target, in a process with TRITON_INTERPRET=0
        import warnings
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        args.out.write_text(json.dumps(compile_target(args.worker, args.quick, args.ops)))
        return 0

    import triton
    start = time.perf_counter()
    records = compile_all(args.targets, args.quick, args.ops, args.timeout)
    kept = _kept_records(args.out, args.ops, args.quick) if args.merge else []
    records = kept + records
    summary = summarise(records)
    result = {
        "what": "every Triton kernel x launch config x specialisation, compiled ahead of time (no GPU) "
                "by benchmarks/triton_compile.py; registers and spills from ptxas -v, shared memory from "
                "the kernel metadata, against the target's opt-in limit per block",
        "mode": "quick" if args.quick else "full",
        "triton": triton.__version__, "ptxas": _ptxas_versions(),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "wall_s": round(time.perf_counter() - start, 1),
        **({"merged": f"records of {', '.join(args.ops)} compiled in this run (wall_s); the others kept from the "
                      f"previous {args.out.name}"} if kept else {}),
        "smem_limit": {f"sm_{a}": TARGETS[a] for a in args.targets},
        "summary": summary,
        "records": records,
    }
    write_json(args.out, result)
    print(f"{summary['compiled']} kernels compiled, {summary['failed']} failed, {len(summary['spills'])} spill, "
          f"in {result['wall_s']} s -> {args.out}")
    for line in summary["failures"] + summary["spills"]:
        print(" ", line)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
