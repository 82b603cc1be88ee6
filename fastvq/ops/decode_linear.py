"""decode_linear: nn.Linear for the few rows of a decoding step, reading every weight once.

Public:
  decode_linear(x, weight, bias=None, *, residual=None, activation=None, backend=None) -> (..., N)
  decode_linear_reference(x, weight, bias, residual, activation): the oracle (F.linear and friends)
  linear_for_decoding(x, weight, bias=None, *, residual=None, activation=None): what the models'
      decode steps call: decode_linear's cpp kernel where it is the faster product, torch elsewhere
  decoding_copies(owner, name, sources, build): copies of weights for the decode steps, rebuilt
      when the sources change; packed_in_huge_pages(*tensors): such copies in one buffer backed by
      transparent huge pages

What every backend computes, with x (..., K) flattened to M = prod(...) rows and weight (N, K) in
nn.Linear's layout:
    y = act(x @ weight.T + bias) + residual
act is None or "gelu" (exact erf GELU, nn.GELU()); bias (N,) and residual (..., N) are optional.
That covers a GPT block at decode time: the MLP's first layer is gelu(fc1(h)), the attention and MLP
outputs are x + proj(h). The sum over K is accumulated in fp32 whatever the dtype (float32,
float16 or bfloat16, the same for every tensor); the result has x's dtype.

Why a separate op: sampling a token multiplies a handful of rows (the batch) by every weight
matrix of the model, so the time is the time to stream the weights from memory. A GEMM library
tuned for large products reaches a fraction of the bandwidth there (MKL's F.linear on the AMD CPU
here: ~10 GB/s at M = 1 out of ~28). The cpp backend (csrc/decode_linear.cpp) splits the output
columns over threads so each weight is read by one thread exactly once, with register-tiled fp32
FMAs against x held in cache; the triton backend (kernels/decode_linear.py) is the same split-N
product, one program per block of outputs. Any M works, but the kernels are built for M up to a
few dozen: for a prefill or a training batch, a GEMM (F.linear) is the faster product.

Inference only: no backend has a backward. A call under grad mode with an input that requires
grad raises (wrap decoding in torch.no_grad(), or use nn.Linear where gradients are needed).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

from .._backend import _cpp_error, cpp_ops, resolve_backend
from .._checks import check_tensor

ACTIVATIONS = (None, "gelu")
_OP = "decode_linear"
# Rows up to which linear_for_decoding takes the cpp kernel. It re-reads x from cache for every
# block of weights and has no blocking over rows, so a GEMM wins on large products; measured on the
# EPYC here it still beats F.linear (MKL) at 64 rows (32 vs 42 ms for the GPT's 100 MB, 1 thread).
DECODE_ROWS = 64


def _check(x, weight, bias, residual, activation) -> None:
    check_tensor(_OP, "weight", weight, ("N", "K"))
    N, K = weight.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{_OP}: x must be (..., K={K}) to match weight {tuple(weight.shape)}, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    for name, t, shape in (("x", x, None), ("bias", bias, (N,)), ("residual", residual, lead + (N,))):
        if t is None:
            continue
        if shape is not None:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{_OP}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != weight.dtype:
            raise TypeError(f"{_OP}: {name} must have weight's dtype {weight.dtype}, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but weight is on {weight.device}; they must share a device")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        raise RuntimeError(f"{_OP}: inference only (no backward); call it under torch.no_grad(), or use "
                           "F.linear / nn.Linear where gradients are needed")


def decode_linear_reference(x, weight, bias=None, residual=None, activation=None):
    """act(F.linear(x, weight, bias)) + residual, computed by torch in the inputs' dtype."""
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


def _run_torch(x, weight, bias, residual, activation):
    return decode_linear_reference(x, weight, bias, residual, activation)


def _run_cpp(x, weight, bias, residual, activation):
    return cpp_ops().decode_linear(x, weight, bias, residual, activation == "gelu")  # takes (..., K) as it is


def _run_triton(x, weight, bias, residual, activation):
    from fastvq.kernels.decode_linear import decode_linear as triton_decode_linear

    N, K = weight.shape
    lead = x.shape[:-1]
    M = math.prod(lead)
    residual = None if residual is None else residual.reshape(M, N)
    return triton_decode_linear(x.reshape(M, K), weight, bias, residual, activation == "gelu").reshape(*lead, N)


_RUN = {"torch": _run_torch, "cpp": _run_cpp, "triton": _run_triton}


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  residual: torch.Tensor | None = None, activation: str | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """y = act(x @ weight.T + bias) + residual for a skinny x (..., K) -> (..., N).

    weight (N, K) as in nn.Linear; bias (N,) or None; residual (..., N) or None, added after the
    activation; activation None or "gelu" (erf GELU). All the same float dtype and device; fp32
    accumulation. Built for few rows (M = prod(x.shape[:-1]) up to a few dozen, e.g. one token per
    sequence of a decoding batch). Inference only: see the module docstring. backend: "auto"
    (default, or FASTVQ_BACKEND), "cpp", "triton" or "torch".
    """
    _check(x, weight, bias, residual, activation)
    return _RUN[resolve_backend(backend, weight.device, _OP)](x, weight, bias, residual, activation)


@functools.lru_cache(maxsize=None)
def _cpp_kernel():
    """torch.ops.fastvq.decode_linear's overload, or None where the extension or the op is missing
    (an extension built before the op lacks it)."""
    if _cpp_error() is not None or not hasattr(torch.ops.fastvq, "decode_linear"):
        return None
    return torch.ops.fastvq.decode_linear.default


def linear_for_decoding(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        residual: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """act(F.linear(x, weight, bias)) + residual, through the cpp kernel where that is the faster
    product: CPU tensors of one dtype, at most DECODE_ROWS (64) rows, no gradient needed, the extension
    built with the op and FASTVQ_BACKEND unset, "auto" or "cpp". Everywhere else torch computes it
    (differentiable). For callers that already hold consistent shapes (an nn.Linear's own weight
    and an input of its width): nothing is checked beyond what picks the path, which costs a few
    microseconds (it runs for every Linear of every decode step).
    """
    kernel = _cpp_kernel()
    K = weight.shape[1]
    fast = (kernel is not None and K > 0 and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.numel() <= DECODE_ROWS * K and x.dtype == weight.dtype
            and (residual is None or residual.dtype == x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)
                                                  or (residual is not None and residual.requires_grad)))
            and os.environ.get("FASTVQ_BACKEND", "auto").lower() in ("auto", "cpp"))
    if not fast:
        return decode_linear_reference(x, weight, bias, residual, activation)
    return kernel(x, weight, bias, residual, activation == "gelu")


# ----------------------------------------------------------------------------- the decode steps' weight copies
# A decode step streams every weight of the model from memory; on 4 KiB pages that stream also walks
# the page tables (one TLB miss per page, ~25k pages for a 100 MB GPT), and backing the weights with
# 2 MiB pages made a batch-1 step of taming's 8-layer GPT ~10% faster here. The parameters
# themselves stay where torch put them (state_dict, optimisers, .to() keep working): the decode path
# reads copies, packed per module into one huge-page-advised buffer and rebuilt when a source changes.

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None off Linux (the advice is then skipped: plain pages, same results)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def packed_in_huge_pages(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of CPU tensors of one dtype, laid end to end in one buffer whose 2 MiB-aligned
    span is advised MADV_HUGEPAGE (advice only: the kernel may decline, the copies are the same)."""
    dtype, item = tensors[0].dtype, tensors[0].element_size()
    total = sum(t.numel() for t in tensors)
    raw = torch.empty(total + _HUGE_PAGE // item, dtype=dtype)  # room to start on a 2 MiB boundary
    start = -raw.data_ptr() % _HUGE_PAGE // item
    buf = raw[start:start + total]
    advise, span = _madvise(), total * item // _HUGE_PAGE * _HUGE_PAGE
    if advise is not None and span:
        advise(buf.data_ptr(), span, _MADV_HUGEPAGE)  # before the copy: the first touch allocates the pages
    copies, offset = [], 0
    for t in tensors:
        copies.append(buf[offset:offset + t.numel()].view(t.shape).copy_(t))
        offset += t.numel()
    return tuple(copies)


def decoding_copies(owner, name: str, sources: tuple[torch.Tensor, ...], build):
    """build() (copies of `sources` for a decode step), kept in owner.__dict__[name] and rebuilt
    when any source is replaced or changed in place (data_ptr and version counter; writes through
    .data bypass the counter: delete the entry after those). Built outside autograd."""
    stamp = tuple((p.data_ptr(), p._version) for p in sources)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != stamp:
        with torch.no_grad():
            cached = (stamp, build())
        owner.__dict__[name] = cached
    return cached[1]
