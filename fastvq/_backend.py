"""Backend discovery and the dispatch rule shared by every op.

Backends: "torch" (the reference, always there), "cpp" (fastvq._C, CPU tensors) and "triton" (CUDA
tensors, or CPU tensors when TRITON_INTERPRET=1, which is how the Triton kernels are tested without
a GPU). "auto" picks triton for CUDA tensors, cpp for CPU tensors, torch otherwise. An explicit
choice (the backend= keyword, else FASTVQ_BACKEND) that cannot run raises; it never falls back.

The cpp backend's kernels are compiled for several instruction sets (csrc/isa.h: "avx512", "avx2",
"baseline"); fastvq._C runs the best one this CPU supports, FASTVQ_CPU_ISA forces one (read when
the extension loads; a value the CPU or the build cannot honour raises), and
available_backends()["cpp"].isa says which runs. The kernels split their work over torch's intra-op
threads through fastvq's own pool (chunks claimed one at a time, so a thread another process has
descheduled holds nothing up: csrc/parallel.h); FASTVQ_PARALLEL=openmp uses OpenMP's equal shares
instead (at::parallel_for), for comparison.

The environment (FASTVQ_BACKEND, FASTVQ_CPU_ISA, FASTVQ_PARALLEL, TRITON_INTERPRET) is read here and nowhere else:
ops, modules and kernels ask requested_backend() / triton_interpret() / cpu_isa().
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "cpp", "triton")
CPU_ISAS = ("avx512", "avx2", "baseline")  # the cpp kernels' variants, best first
PARALLEL_MODES = ("pool", "openmp")  # how the cpp kernels split work over threads


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on
    isa: str | None = None  # cpp: the instruction set its kernels run ("avx512", "avx2", "baseline")
    parallel: str | None = None  # cpp: "pool" or "openmp" (FASTVQ_PARALLEL)

    def __str__(self) -> str:
        return f"{self.name}: {'yes' if self.available else 'no'} ({self.reason})"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")


@functools.lru_cache(maxsize=None)
def _cpp_error() -> str | None:
    try:
        import fastvq._C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension fastvq._C is not built or does not load ({e}); build it with `pip install --no-build-isolation -e .`"
    _apply_isa_request()  # raises (and so caches nothing) if FASTVQ_CPU_ISA cannot be honoured
    _apply_parallel_request()
    return None


def _isa_module():
    import fastvq._C as C

    return C


def _check_isa(name, what: str) -> str:
    """`name` as a variant the loaded extension can run here, or ValueError / RuntimeError naming `what`."""
    C = _isa_module()
    if not isinstance(name, str) or name.strip().lower() not in CPU_ISAS:
        raise ValueError(f"{what} must be one of {', '.join(CPU_ISAS)}, got {name!r}")
    name = name.strip().lower()
    runnable = list(C.cpu_isas())
    if name not in runnable:
        why = "this build of fastvq._C has no such kernels" if name not in C.compiled_isas() else "this CPU lacks the instructions"
        raise RuntimeError(f"{what}={name!r} cannot run: {why}; here the kernels run {', '.join(runnable)}")
    return name


def requested_cpu_isa() -> str | None:
    """$FASTVQ_CPU_ISA as given (None when unset or empty: the best variant this CPU runs)."""
    return os.environ.get("FASTVQ_CPU_ISA", "").strip() or None


def _apply_isa_request() -> None:
    requested = requested_cpu_isa()
    if requested is not None:
        _isa_module().set_cpu_isa(_check_isa(requested, "FASTVQ_CPU_ISA"))


def _check_parallel(mode, what: str) -> str:
    if not isinstance(mode, str) or mode.strip().lower() not in PARALLEL_MODES:
        raise ValueError(f"{what} must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    return mode.strip().lower()


def _apply_parallel_request() -> None:
    requested = os.environ.get("FASTVQ_PARALLEL", "").strip()
    if requested:
        _isa_module().set_parallel_mode(_check_parallel(requested, "FASTVQ_PARALLEL"))


def parallel_mode() -> str | None:
    """How the cpp kernels split work over threads ("pool" or "openmp"); None without the extension."""
    if _cpp_error():
        return None
    mode = getattr(_isa_module(), "parallel_mode", None)  # None: an extension built before the pool
    return mode() if mode else None


def set_parallel_mode(mode: str) -> str:
    """Splits the cpp kernels' work with `mode` from now on ("pool": chunks claimed by whichever
    thread is running, the default; "openmp": OpenMP's equal shares). Returns the previous mode.

    Raises:
        RuntimeError: the extension is missing.
        ValueError: `mode` is not one of PARALLEL_MODES (or this build has no OpenMP).
    """
    err = _cpp_error()
    if err:
        raise RuntimeError(err)
    previous = _isa_module().parallel_mode()
    _isa_module().set_parallel_mode(_check_parallel(mode, "mode"))
    return previous


def cpu_isa() -> str | None:
    """The instruction set the cpp kernels run ("avx512", "avx2" or "baseline"); None without the extension."""
    return None if _cpp_error() else _isa_module().cpu_isa()


def cpu_isas() -> tuple[str, ...]:
    """The cpp kernel variants this build holds and this CPU runs, best first (empty without the extension)."""
    return () if _cpp_error() else tuple(_isa_module().cpu_isas())


def set_cpu_isa(isa: str) -> str:
    """Runs the cpp kernels on variant `isa` from now on (the tests run them once per variant).

    Args:
        isa: "avx512", "avx2" or "baseline".
    Returns:
        The variant that ran before.
    Raises:
        RuntimeError: the extension is missing, or this build or CPU cannot run `isa`.
        ValueError: `isa` is not one of CPU_ISAS.
    """
    err = _cpp_error()
    if err:
        raise RuntimeError(err)
    previous = _isa_module().cpu_isa()
    _isa_module().set_cpu_isa(_check_isa(isa, "isa"))
    return previous


@functools.lru_cache(maxsize=None)
def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (`pip install triton`)"
    return None


def cpp_ops():
    """The extension's ops namespace (torch.ops.fastvq); raises if the extension is missing."""
    err = _cpp_error()
    if err:
        raise RuntimeError(err)
    return torch.ops.fastvq


@functools.lru_cache(maxsize=None)
def cpp_op(name: str):
    """torch.ops.fastvq.<name>.default, looked up once (calling an overload directly skips the
    packet's overload resolution: a few microseconds on every call of a decode step's kernels)."""
    return getattr(cpp_ops(), name).default


def available_backends() -> dict[str, BackendStatus]:
    """Which backends work on this machine and, for the others, why not."""
    out = {"torch": BackendStatus("torch", True, "reference implementation, any device")}
    err = _cpp_error()
    if err:
        out["cpp"] = BackendStatus("cpp", False, err)
    else:
        isa = cpu_isa()
        mode = parallel_mode()
        what = (f"C++ kernels for CPU tensors, {isa} variant (this CPU and build: {', '.join(cpu_isas())}), "
                "work split by " + ("fastvq's thread pool" if mode == "pool" else "OpenMP (FASTVQ_PARALLEL=openmp)"))
        out["cpp"] = BackendStatus("cpp", True, what, isa=isa, parallel=mode)
    err = _triton_error()
    if err is None and not torch.cuda.is_available() and not triton_interpret():
        err = "no CUDA device; set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors (slow, for testing)"
    if err is None:
        what = "CUDA tensors" if torch.cuda.is_available() else "CPU tensors through the Triton interpreter"
    out["triton"] = BackendStatus("triton", err is None, err or what)
    return out


def _unavailable_on(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on tensors of `device`, or None if it can."""
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got tensors on {device}"
        return _cpp_error()
    if name == "triton":
        err = _triton_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"the triton backend runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    return None


def requested_backend(backend: str | None = None) -> str:
    """What the caller asked for: the backend= keyword, else $FASTVQ_BACKEND, else "auto" (lower case)."""
    return (backend if backend is not None else os.environ.get("FASTVQ_BACKEND", "auto")).lower()


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Apply the dispatch rule for one call of `op` on tensors living on `device`: the name of the
    backend that runs it, or an error saying why the one asked for cannot."""
    requested = requested_backend(backend)
    if requested == "auto":
        if device.type == "cuda" and _unavailable_on("triton", device) is None:
            return "triton"
        if device.type == "cpu" and _unavailable_on("cpp", device) is None:
            return "cpp"
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    why = _unavailable_on(requested, device)
    if why:
        raise RuntimeError(f"{op}: backend {requested!r} was requested but is unavailable: {why}")
    return requested
