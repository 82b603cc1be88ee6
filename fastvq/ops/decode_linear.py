"""decode_linear: nn.Linear for the few rows of a decoding step, reading every weight once.

Public:
  decode_linear(x, weight, bias=None, *, residual=None, activation=None, backend=None) -> (..., N)
  decode_linear_reference(x, weight, bias, residual, activation): the oracle (F.linear and friends)
  KERNELS: the per-backend entry points (unchecked), for a decode state that checks once
  DECODE_ROWS: the row count up to which the kernels are the faster product (a GEMM beyond)

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
here reached about a third of the bandwidth at M = 1). The cpp backend (csrc/decode_linear.cpp) splits the output
columns over threads so each weight is read by one thread exactly once, with register-tiled fp32
FMAs against x held in cache; the triton backend (kernels/decode_linear.py) is the same split-N
product, one program per block of outputs. Any M works, but the kernels are built for M up to a
few dozen: for a prefill or a training batch, a GEMM (F.linear) is the faster product.

Inference only: no backend has a backward. A call under grad mode with an input that requires
grad raises (wrap decoding in torch.no_grad(), or use nn.Linear where gradients are needed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._backend import cpp_op, resolve_backend
from .._checks import check_tensor

ACTIVATIONS = (None, "gelu")
_OP = "decode_linear"
# Rows up to which a decode step takes these kernels. They re-read x from cache for every block of
# weights and have no blocking over rows, so a GEMM (F.linear) wins on large products; at 64 rows the
# cpp kernel was still measured ahead of MKL (benchmarks/bench_decode_linear.py).
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


def _run_cpp(x, weight, bias, residual, activation):
    return cpp_op("decode_linear")(x, weight, bias, residual, activation == "gelu")  # takes (..., K) as it is


def _run_triton(x, weight, bias, residual, activation):
    from fastvq.kernels.decode_linear import decode_linear as triton_decode_linear

    N, K = weight.shape
    lead = x.shape[:-1]
    M = math.prod(lead)
    residual = None if residual is None else residual.reshape(M, N)
    return triton_decode_linear(x.reshape(M, K), weight, bias, residual, activation == "gelu").reshape(*lead, N)


# One entry per backend, all (x, weight, bias, residual, activation) -> y, unchecked: decode_linear
# checks first; a model's decode state checks its weights once and calls an entry every step.
KERNELS = {"torch": decode_linear_reference, "cpp": _run_cpp, "triton": _run_triton}


# ----------------------------------------------------------------------------- public

def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  residual: torch.Tensor | None = None, activation: str | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """y = act(x @ weight.T + bias) + residual for a skinny x, every weight read once.

    Built for few rows (M = prod(x.shape[:-1]) up to DECODE_ROWS, e.g. one token per sequence of a
    decoding batch); fp32 accumulation whatever the dtype. Inference only (no backward).

    Args:
        x: (..., K) float32, float16 or bfloat16.
        weight: (N, K) as in nn.Linear, x's dtype and device.
        bias: (N,) or None.
        residual: (..., N) or None, added after the activation.
        activation: None or "gelu" (exact erf GELU, nn.GELU()).
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        y (..., N) in x's dtype.

    Raises:
        TypeError / ValueError naming the argument (shapes, dtypes, devices, activation);
        RuntimeError under grad mode with an input that requires grad, or when the backend asked
        for cannot run here.

    Example:
        >>> fc = torch.nn.Linear(512, 2048)
        >>> h = torch.randn(1, 512)
        >>> with torch.no_grad():
        ...     y = fastvq.decode_linear(h, fc.weight, fc.bias, activation="gelu")
        >>> y.shape
        torch.Size([1, 2048])
    """
    _check(x, weight, bias, residual, activation)
    return KERNELS[resolve_backend(backend, weight.device, _OP)](x, weight, bias, residual, activation)
