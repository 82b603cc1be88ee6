"""The sampling op: temperature, top-k, top-p, classifier-free guidance and the draw, in one pass per row.

Public:
  sample_logits(logits, *, temperature=1.0, top_k=None, top_p=None, cfg_scale=None,
                generator=None, backend=None) -> int64 (B,) or (B/2,) with cfg_scale
  sampling_probs(logits, ...) -> fp32 (B, V): the exact distribution sample_logits draws from
  check_sample_args(where, B, V, device, ...) -> the checked per-row parameters, for a caller that
      must refuse a bad call before it computes the logits (sample_with_past, before its prefill)

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

Non-finite logits, one rule on every backend (checked before dispatch, one max per row): -inf
masks a token; a row holding NaN or +inf, or -inf everywhere, is refused with a ValueError naming
`logits` and the first such row (there is no token to draw, and backends would disagree on one).
With cfg_scale each of the 2B input rows is checked, a token -inf in either half is masked in the
guided row, and each guided row needs a token finite in both halves.

Backends: "torch" (this file's reference: sorts, the oracle), "cpp" (csrc/sampling.cpp: radix
select over each row), "triton" (kernels/sampling.py: radix select by counting, no sort).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from .._backend import cpp_ops, resolve_backend
from .._checks import check_logits, check_tensor



# ----------------------------------------------------------------------------- argument checks

def _per_row(where, value, name, rows, device, *, integer, default):
    """A number or a (rows,) tensor -> a (rows,) tensor on `device` (int64 or fp32)."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.shape not in ((rows,), ()):
            raise ValueError(f"{where}: {name} as a tensor must have shape ({rows},) (one per output row) "
                             f"or be a scalar, got shape {tuple(value.shape)}")
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{where}: {name} must be an integer tensor, got {value.dtype}")
        if not integer and value.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {value.dtype}")
        out = value.to(device=device, dtype=torch.int64 if integer else torch.float32).expand(rows).contiguous()
    else:
        if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
            raise TypeError(f"{where}: {name} must be {'an int' if integer else 'a number'} or a tensor, "
                            f"got {type(value).__name__}")
        if not integer and not math.isfinite(float(value)):
            raise ValueError(f"{where}: {name} must be finite, got {value}")
        if integer and not -2 ** 63 <= value < 2 ** 63:
            raise ValueError(f"{where}: {name} must be an integer >= 1 that fits in int64 (a {name} at "
                             f"least the vocabulary size keeps every token), got {value}")
        out = torch.full((rows,), value, dtype=torch.int64 if integer else torch.float32, device=device)
    return out


def check_sample_args(where: str, batch: int, vocab_size: int, device, *, temperature=1.0, top_k=None, top_p=None,
                      cfg_scale=None):
    """sample_logits' parameter checks, for callers that must refuse a bad call before they compute
    the logits (sample_with_past checks before its prefill writes the cache).

    Args:
        where: the name errors start with.
        batch, vocab_size: the (B, V) shape the logits will have.
        device: where the logits will be.
        temperature, top_k, top_p, cfg_scale: as sample_logits takes them.

    Returns:
        (rows, temperature fp32 (rows,), top_k int64 (rows,) in [1, V], top_p fp32 (rows,)), rows = B
        or B / 2 with cfg_scale.

    Raises:
        TypeError / ValueError naming the argument, as sample_logits.
    """
    if cfg_scale is not None:
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, Real) or not math.isfinite(float(cfg_scale)):
            raise TypeError(f"{where}: cfg_scale must be a finite number, got {cfg_scale!r}")
        if batch % 2:
            raise ValueError(f"{where}: with cfg_scale the batch holds conditional rows then as many "
                             f"unconditional rows, so B must be even; got B={batch}")
    rows = batch // 2 if cfg_scale is not None else batch
    t = _per_row(where, temperature, "temperature", rows, device, integer=False, default=1.0)
    k = _per_row(where, top_k, "top_k", rows, device, integer=True, default=vocab_size)
    p = _per_row(where, top_p, "top_p", rows, device, integer=False, default=1.0)
    if rows:
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{where}: temperature must be >= 0 (0 means argmax), got {_show(temperature)}")
        if bool((k < 1).any()):
            raise ValueError(f"{where}: top_k must be >= 1, got {_show(top_k)}")
        if not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError(f"{where}: top_p must be in (0, 1], got {_show(top_p)}")
    return rows, t, k.clamp_(max=vocab_size), p


def _check_guided_rows(logits, rows) -> bool:
    """With guidance a token has a guided logit only where both halves are finite (elsewhere
    u + s (c - u) is NaN or infinite): each guided row needs one such token, or there is nothing to
    draw. Returns whether any token is masked in either half."""
    both = torch.isfinite(logits[:rows]) & torch.isfinite(logits[rows:])
    empty = ~both.any(1)
    if bool(empty.any()):
        i = int(empty.nonzero()[0])
        raise ValueError(f"sample_logits: logits rows {i} (conditional) and {i + rows} (unconditional) have no "
                         f"token finite in both, so guided row {i} has nothing to draw")
    return not bool(both.all())


def _prepare(logits, temperature, top_k, top_p, cfg_scale):
    """Check everything; return (rows, per-row temperature fp32, top_k int64 in [1, V], top_p fp32,
    whether guidance meets a masked token)."""
    check_tensor("sample_logits", "logits", logits, ("B", "V"))
    B, V = logits.shape
    if V == 0:
        raise ValueError(f"sample_logits: logits must have a vocabulary of at least one token, got shape {tuple(logits.shape)}")
    rows, t, k, p = check_sample_args("sample_logits", B, V, logits.device, temperature=temperature, top_k=top_k,
                                      top_p=top_p, cfg_scale=cfg_scale)
    # The values last: one pass over (B, V) before dispatch, so every backend refuses the same rows.
    check_logits("sample_logits", "logits", logits)
    masked_guidance = cfg_scale is not None and _check_guided_rows(logits, rows)
    return rows, t, k, p, masked_guidance


def _show(value):
    return value.tolist() if isinstance(value, torch.Tensor) and value.numel() <= 8 else value


# ----------------------------------------------------------------------------- torch reference

def _guided(logits, cfg_scale):
    x = logits.float()
    if cfg_scale is None:
        return x
    half = x.shape[0] // 2
    cond, uncond = x[:half], x[half:]
    # A token masked (-inf) in either half stays masked, whatever the sign of cfg_scale
    # (u + s (c - u) would be NaN or +inf there).
    return torch.where(torch.isfinite(cond) & torch.isfinite(uncond), uncond + float(cfg_scale) * (cond - uncond),
                       float("-inf"))


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
    rows, t, k, p, _ = _prepare(logits, temperature, top_k, top_p, cfg_scale)
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
        ValueError naming `logits` and its first row that holds NaN or +inf or is -inf everywhere
        (-inf beside finite logits masks a token), on every backend;
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
    rows, t, k, p, masked_guidance = _prepare(logits, temperature, top_k, top_p, cfg_scale)
    name = resolve_backend(backend, logits.device, "sample_logits")
    if masked_guidance:
        # The kernels guide finite logits only: with masked tokens the guided rows are formed here
        # (O(B V), only then), so every backend masks them the same way.
        logits, cfg_scale = _guided(logits, cfg_scale), None
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
