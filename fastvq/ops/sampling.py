"""The sampling op: temperature, top-k, top-p, classifier-free guidance and the draw, in one pass per row.

Public:
  sample_logits(logits, *, temperature=1.0, top_k=None, top_p=None, cfg_scale=None,
                generator=None, backend=None) -> int64 (B,) or (B/2,) with cfg_scale
  sampling_probs(logits, ...) -> fp32 (B, V): the exact distribution sample_logits draws from

What every backend computes, per row (fp32 math, whatever the logits' dtype):
  1. guidance: with cfg_scale s, row i of the first half (conditional, c) and row i of the second
     half (unconditional, u) become x = u + s * (c - u); otherwise x = the row.
  2. temperature t = 0: the token is argmax x (lowest index on ties); nothing else applies.
  3. top-k: keep every token whose logit is >= the k-th largest logit (counted with repeats). Ties
     with the k-th value are all kept, so more than k tokens survive only when logits tie exactly.
  4. top-p, on what top-k kept (HF's order): weights w = exp((x - max x) / t) over the kept tokens;
     keep every token whose logit is >= theta, theta the largest logit value with
     sum(w[x >= theta]) >= top_p * sum(w). That is the smallest most-probable set reaching mass
     top_p, plus any token tied with its least probable member.
  5. the draw: one uniform r in [0, 1) per output row, from torch.rand(rows, generator=generator)
     on the logits' device, before any backend runs (also for rows with t = 0). The token is the
     first index i, in index order, whose cumulative kept weight exceeds r * sum(kept w):
     inverse-CDF sampling. Every backend consumes the generator identically, so one seed gives the
     same tokens on all of them, up to fp rounding where r lands on a CDF boundary.
Selection (steps 3, 4) compares logits, not logits / t, so it does not depend on how a backend
rounds the division. temperature, top_k and top_p are numbers or per-row tensors (rows,).

Backends: "torch" (this file's reference: sorts, the oracle), "cpp" (csrc/sampling.cpp: radix
select over each row), "triton" (kernels/sampling.py: radix select by counting, no sort).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from .._backend import cpp_ops, resolve_backend
from .._checks import check_tensor



# ----------------------------------------------------------------------------- argument checks

def _per_row(value, name, rows, device, *, integer, default):
    """A number or a (rows,) tensor -> a (rows,) tensor on `device` (int64 or fp32)."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.shape not in ((rows,), ()):
            raise ValueError(f"sample_logits: {name} as a tensor must have shape ({rows},) (one per output row) "
                             f"or be a scalar, got shape {tuple(value.shape)}")
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"sample_logits: {name} must be an integer tensor, got {value.dtype}")
        if not integer and value.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"sample_logits: {name} must be a floating-point tensor, got {value.dtype}")
        out = value.to(device=device, dtype=torch.int64 if integer else torch.float32).expand(rows).contiguous()
    else:
        if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
            raise TypeError(f"sample_logits: {name} must be {'an int' if integer else 'a number'} or a tensor, "
                            f"got {type(value).__name__}")
        if not integer and not math.isfinite(float(value)):
            raise ValueError(f"sample_logits: {name} must be finite, got {value}")
        if integer and not -2 ** 63 <= value < 2 ** 63:
            raise ValueError(f"sample_logits: {name} must be an integer >= 1 that fits in int64 (a {name} at "
                             f"least the vocabulary size keeps every token), got {value}")
        out = torch.full((rows,), value, dtype=torch.int64 if integer else torch.float32, device=device)
    return out


def _prepare(logits, temperature, top_k, top_p, cfg_scale):
    """Check everything; return (rows, per-row temperature fp32, top_k int64 in [1, V], top_p fp32)."""
    check_tensor("sample_logits", "logits", logits, ("B", "V"))
    B, V = logits.shape
    if V == 0:
        raise ValueError(f"sample_logits: logits must have a vocabulary of at least one token, got shape {tuple(logits.shape)}")
    if cfg_scale is not None:
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, Real) or not math.isfinite(float(cfg_scale)):
            raise TypeError(f"sample_logits: cfg_scale must be a finite number, got {cfg_scale!r}")
        if B % 2:
            raise ValueError(f"sample_logits: with cfg_scale the batch holds conditional rows then as many "
                             f"unconditional rows, so B must be even; got B={B}")
    rows = B // 2 if cfg_scale is not None else B
    dev = logits.device
    t = _per_row(temperature, "temperature", rows, dev, integer=False, default=1.0)
    k = _per_row(top_k, "top_k", rows, dev, integer=True, default=V)
    p = _per_row(top_p, "top_p", rows, dev, integer=False, default=1.0)
    if rows:
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"sample_logits: temperature must be >= 0 (0 means argmax), got {_show(temperature)}")
        if bool((k < 1).any()):
            raise ValueError(f"sample_logits: top_k must be >= 1, got {_show(top_k)}")
        if not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError(f"sample_logits: top_p must be in (0, 1], got {_show(top_p)}")
    return rows, t, k.clamp_(max=V), p


def _show(value):
    return value.tolist() if isinstance(value, torch.Tensor) and value.numel() <= 8 else value


# ----------------------------------------------------------------------------- torch reference

def _guided(logits, cfg_scale):
    x = logits.float()
    if cfg_scale is None:
        return x
    half = x.shape[0] // 2
    cond, uncond = x[:half], x[half:]
    return uncond + float(cfg_scale) * (cond - uncond)


def _kept_weights(x, t, k, p):
    """(rows, V) fp32 weights exp((x - max) / t) on the kept tokens, 0 elsewhere (rows with t > 0)."""
    vals = x.sort(dim=1, descending=True, stable=True).values
    top = vals[:, :1]
    kth = vals.gather(1, (k - 1)[:, None])
    tt = torch.where(t > 0, t, 1.0)[:, None]
    # top-p on what top-k kept: the first sorted position whose running mass reaches p * total;
    # its logit is theta (the running mass only grows, so the last position always qualifies).
    sorted_w = torch.where(vals >= kth, torch.exp((vals - top) / tt), 0.0)
    mass = sorted_w.cumsum(1)
    first = (mass >= p[:, None] * mass[:, -1:]).int().argmax(1)
    theta = torch.where(p[:, None] < 1, torch.maximum(kth, vals.gather(1, first[:, None])), kth)
    return torch.where(x >= theta, torch.exp((x - top) / tt), 0.0)


def _argmax_lowest(x):
    return (x == x.max(1, keepdim=True).values).int().argmax(1)


def sample_logits_reference(logits, temperature, top_k, top_p, cfg_scale, uniform):
    """The oracle, on checked per-row parameters and the per-row uniforms: sort, filter, invert the CDF."""
    x = _guided(logits, cfg_scale)
    w = _kept_weights(x, temperature, top_k, top_p)
    cdf = w.cumsum(1)
    target = uniform[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # r * total rounds up to total only on a CDF boundary: fall back to the last token with weight.
    last = torch.where(w > 0, torch.arange(w.shape[1], device=w.device), -1).max(1).values
    drawn = torch.where(drawn < w.shape[1], drawn, last)
    return torch.where(temperature > 0, drawn, _argmax_lowest(x))


def sampling_probs(logits, *, temperature=1.0, top_k=None, top_p=None, cfg_scale=None):
    """The exact distribution sample_logits draws from: (rows, V) fp32, one-hot on argmax where t = 0."""
    rows, t, k, p = _prepare(logits, temperature, top_k, top_p, cfg_scale)
    x = _guided(logits, cfg_scale)
    w = _kept_weights(x, t, k, p)
    probs = w / w.sum(1, keepdim=True)
    onehot = torch.zeros_like(probs).scatter_(1, _argmax_lowest(x)[:, None], 1.0)
    return torch.where((t > 0)[:, None], probs, onehot)


# ----------------------------------------------------------------------------- backends

def _draw_cpp(logits, t, k, p, cfg_scale, r):
    scale = float("nan") if cfg_scale is None else float(cfg_scale)
    return cpp_ops().sample_logits(logits, t, k, p, r, cfg_scale is not None, scale)


def _draw_triton(logits, t, k, p, cfg_scale, r):
    from fastvq.kernels.sampling import sample_logits as triton_sample_logits

    return triton_sample_logits(logits, t, k, p, r, cfg_scale)


# One entry per backend, all with the reference's signature: (logits, temperature (rows,) fp32,
# top_k (rows,) int64, top_p (rows,) fp32, cfg_scale or None, uniforms (rows,) fp32) -> int64 (rows,).
# Unchecked: sample_logits prepares and checks the arguments first.
KERNELS = {"torch": sample_logits_reference, "cpp": _draw_cpp, "triton": _draw_triton}


# ----------------------------------------------------------------------------- public

def sample_logits(logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, cfg_scale=None,
                  generator: torch.Generator | None = None, uniform: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Draw one token per row of logits after temperature, top-k, then top-p filtering.

    Args:
        logits: (B, V) float32, float16 or bfloat16 (math in fp32).
        temperature: >= 0 (0 = argmax, lowest index on ties); a number or a per-row tensor (rows,).
        top_k: >= 1, None = all tokens; a number or a per-row tensor.
        top_p: in (0, 1], None = 1; a number or a per-row tensor.
        cfg_scale: None, or classifier-free guidance: the first B/2 rows are conditional (c), the
            last B/2 unconditional (u), combined as u + cfg_scale * (c - u) before filtering.
        generator: the torch.Generator the per-row uniforms come from (one torch.rand(rows) a call).
        uniform: instead of a generator, the per-row uniforms themselves, (rows,) float32 in [0, 1)
            on the logits' device (a counter-based stream keyed by position gives the same token
            for the same position however the positions are batched).
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        int64 (rows,): rows = B, or B/2 with cfg_scale. Ties at a top-k or top-p threshold are all
        kept (see the module docstring); one seed gives the same tokens on every backend.

    Raises:
        TypeError / ValueError naming the argument (shape, dtype, range, an odd B with cfg_scale);
        RuntimeError when the backend asked for cannot run here.

    Example:
        >>> logits = torch.randn(4, 1024)
        >>> g = torch.Generator().manual_seed(0)
        >>> tokens = fastvq.sample_logits(logits, temperature=0.9, top_k=100, top_p=0.95, generator=g)
        >>> tokens.shape, tokens.dtype
        (torch.Size([4]), torch.int64)
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample_logits: generator must be a torch.Generator or None, got {type(generator).__name__}")
    rows, t, k, p = _prepare(logits, temperature, top_k, top_p, cfg_scale)
    name = resolve_backend(backend, logits.device, "sample_logits")
    if uniform is None:
        r = torch.rand(rows, generator=generator, device=logits.device, dtype=torch.float32)
    else:
        if generator is not None:
            raise ValueError("sample_logits: give generator or uniform, not both")
        if (not isinstance(uniform, torch.Tensor) or uniform.shape != (rows,) or uniform.dtype != torch.float32
                or uniform.device != logits.device):
            got = (uniform.dtype, tuple(uniform.shape), str(uniform.device)) if isinstance(uniform, torch.Tensor) else type(uniform).__name__
            raise ValueError(f"sample_logits: uniform must be a float32 tensor of shape ({rows},) on {logits.device}, got {got}")
        if rows and not bool(((uniform >= 0) & (uniform < 1)).all()):
            raise ValueError("sample_logits: uniform must lie in [0, 1)")
        r = uniform
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    return KERNELS[name](logits, t, k, p, cfg_scale, r)
