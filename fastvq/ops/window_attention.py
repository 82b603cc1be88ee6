"""Sliding-window causal attention, and its decode step against a ring-buffer KV cache.

Public:
  sliding_window_attention(q, k, v, window, *, scale=None, backend=None) -> out
  sliding_window_decode(q, k_cache, v_cache, pos, window, *, scale=None, backend=None) -> out

Query i sees key j iff i - window < j <= i: the window counts the query itself, window = 1 is the
diagonal alone and window >= T is ordinary causal attention. Every row sees at least itself, so no
row is ever empty (never NaN). q is (B, H, T, Dh), k and v are (B, H_kv, T, Dh) with H a multiple
of H_kv (grouped-query attention: query head h reads key/value head h // (H // H_kv)).

Backend contract (torch here, triton in fastvq.kernels.window_attention, cpp as
torch.ops.fastvq.sliding_window_attention_fwd/bwd once it is built):
  fwd(q, k, v, window, scale) -> (out in q's dtype, lse fp32 (B, H, T))
  bwd(grad_out, q, k, v, out, lse, window, scale) -> (dq, dk, dv) in the inputs' dtypes
  decode(q, k_cache, v_cache, pos, window, scale) -> out, pos a 0-dim int64 tensor
  (torch.ops.fastvq.sliding_window_decode for cpp); inputs may have any strides.
lse is the natural-log log-sum-exp of each row's scaled scores: the only thing the forward saves
besides its inputs and output, so backward recomputes the probabilities block by block and no
T x T (or T x window) matrix outlives a call.
"""
from __future__ import annotations

import operator
import os

import torch

from .._backend import cpp_ops, resolve_backend
from .._checks import check_tensor

_CHUNK = 256  # query rows per step of the torch reference: memory O(chunk * (chunk + window))


# ----------------------------------------------------------------------------- input checks

def _check_window(window, op: str) -> int:
    if isinstance(window, bool):
        raise TypeError(f"{op}: window must be an int >= 1, got a bool")
    try:
        window = operator.index(window)
    except TypeError:
        raise TypeError(f"{op}: window must be an int >= 1, got {type(window).__name__}") from None
    if window < 1:
        raise ValueError(f"{op}: window must be an int >= 1 (1 = each query sees only itself), got {window}")
    return window


def _check_tensors(op: str, **tensors) -> None:
    """Rank 4, one float dtype and one device for all of them."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        check_tensor(op, name, t, ("B", "heads", "seq", "head_dim"))
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; they must be on the same device")


def _check_heads(op: str, q, k, v, k_name: str, v_name: str) -> None:
    (b, h, _, d), (bk, hk, _, dk) = q.shape, k.shape
    if v.shape != k.shape:
        raise ValueError(f"{op}: {v_name} has shape {tuple(v.shape)} but {k_name} has {tuple(k.shape)}; they must match")
    if bk != b:
        raise ValueError(f"{op}: q has batch {b} but {k_name} has batch {bk}; they must match")
    if dk != d:
        raise ValueError(f"{op}: q has head_dim {d} but {k_name} has head_dim {dk}; they must match")
    if hk == 0 or h % hk:
        raise ValueError(f"{op}: the {h} query heads of q must be a multiple of the {hk} heads of {k_name} (grouped-query attention)")
    if d == 0:
        raise ValueError(f"{op}: head_dim must be at least 1, got q of shape {tuple(q.shape)}")


def _check_scale(scale, head_dim: int, op: str) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


# ----------------------------------------------------------------------------- torch reference

def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(rows, keys) boolean mask of the window rule, from absolute positions."""
    offset = query_pos[:, None] - key_pos[None, :]
    return (offset >= 0) & (offset < window) & (key_pos[None, :] >= 0)


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated to one per query head (a view when no repeat is needed)."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _fold_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum per-query-head gradients back onto the key/value head they share."""
    b, h, t, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, t, d).sum(2)


def _chunks(seq_len: int, window: int, chunk: int):
    """(query rows, key columns) slices covering the band: rows a..b-1 see keys a-window+1..b-1."""
    for a in range(0, seq_len, chunk):
        b = min(a + chunk, seq_len)
        yield slice(a, b), slice(max(0, a - window + 1), b)


def attention_forward_torch(q, k, v, window: int, scale: float, chunk: int = _CHUNK):
    """The oracle: masked softmax attention in fp32, a block of query rows at a time against only
    the keys its window reaches. chunk >= T is the plain dense version."""
    acc = torch.float32
    qf, kf, vf = q.to(acc), _expand_kv(k, q.shape[1]).to(acc), _expand_kv(v, q.shape[1]).to(acc)
    seq_len = q.shape[2]
    pos = torch.arange(seq_len, device=q.device)
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for rows, cols in _chunks(seq_len, window, chunk):
        s = (qf[:, :, rows] @ kf[:, :, cols].transpose(-1, -2)) * scale
        s = s.masked_fill(~_visible(pos[rows], pos[cols], window), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1, keepdim=True)
        out[:, :, rows] = torch.exp(s - row_lse) @ vf[:, :, cols]
        lse[:, :, rows] = row_lse.squeeze(-1).float()
    return out.to(q.dtype), lse


def attention_backward_torch(grad_out, q, k, v, out, lse, window: int, scale: float, chunk: int = _CHUNK):
    """Gradients from the saved row log-sum-exp, recomputing probabilities chunk by chunk:
    dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO."""
    acc = torch.float32
    heads, kv_heads, seq_len = q.shape[1], k.shape[1], q.shape[2]
    qf, kf, vf = q.to(acc), _expand_kv(k, heads).to(acc), _expand_kv(v, heads).to(acc)
    go = grad_out.to(acc)
    delta = (go * out.to(acc)).sum(-1)
    lse = lse.to(acc)
    pos = torch.arange(seq_len, device=q.device)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(qf)  # per query head; folded onto the shared kv heads at the end
    dv = torch.zeros_like(qf)
    for rows, cols in _chunks(seq_len, window, chunk):
        s = (qf[:, :, rows] @ kf[:, :, cols].transpose(-1, -2)) * scale
        p = torch.exp(s - lse[:, :, rows, None])
        p = p.masked_fill(~_visible(pos[rows], pos[cols], window), 0.0)
        dp = go[:, :, rows] @ vf[:, :, cols].transpose(-1, -2)
        ds = p * (dp - delta[:, :, rows, None])
        dq[:, :, rows] = scale * (ds @ kf[:, :, cols])
        dk[:, :, cols] += scale * (ds.transpose(-1, -2) @ qf[:, :, rows])
        dv[:, :, cols] += p.transpose(-1, -2) @ go[:, :, rows]
    return dq.to(q.dtype), _fold_groups(dk, kv_heads).to(k.dtype), _fold_groups(dv, kv_heads).to(v.dtype)


def ring_positions(pos, num_new: int, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the new queries and of what each ring slot holds.

    The newest position written is last = pos + num_new - 1; slot s holds the latest position
    p <= last with p % slots == s, which is last - ((last - s) mod slots) (negative: never written).
    Pure tensor arithmetic, so a tensor pos never leaves the device."""
    pos = torch.as_tensor(pos, device=device).long()
    query_pos = pos + torch.arange(num_new, device=device)
    last = pos + (num_new - 1)
    slot = torch.arange(slots, device=device)
    return query_pos, last - torch.remainder(last - slot, slots)


def decode_torch(q, k_cache, v_cache, pos, window: int, scale: float):
    acc = torch.float32
    heads = q.shape[1]
    kf, vf = _expand_kv(k_cache, heads).to(acc), _expand_kv(v_cache, heads).to(acc)
    query_pos, key_pos = ring_positions(pos, q.shape[2], k_cache.shape[2], q.device)
    s = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~_visible(query_pos, key_pos, window), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vf).to(q.dtype)


# ----------------------------------------------------------------------------- backends

def _cpp_op(name: str):
    """torch.ops.fastvq.<name> if the extension is built and has it, else None."""
    try:
        return getattr(cpp_ops(), name, None)
    except RuntimeError:  # no extension at all: resolve_backend has already said why
        return None


def _is_auto(backend: str | None) -> bool:
    return (backend if backend is not None else os.environ.get("FASTVQ_BACKEND", "auto")).lower() == "auto"


def _resolve(backend: str | None, device: torch.device, op: str, cpp_name: str) -> str:
    """The shared dispatch rule, plus: this op's C++ kernel may not be in fastvq._C yet. Then "auto"
    on CPU uses the torch reference, and an explicit "cpp" raises saying so."""
    name = resolve_backend(backend, device, op)
    if name != "cpp" or _cpp_op(cpp_name) is not None:
        return name
    if _is_auto(backend):
        return "torch"
    raise RuntimeError(f"{op}: backend 'cpp' was requested but is unavailable: fastvq._C is built without "
                       f"torch.ops.fastvq.{cpp_name} (the C++ window-attention kernel is not built yet)")


def _triton_kernels():
    from fastvq.kernels import window_attention

    return window_attention


def _forward(backend: str, q, k, v, window, scale):
    if backend == "torch" or q.numel() == 0:
        return attention_forward_torch(q, k, v, window, scale)
    if backend == "triton":
        return _triton_kernels().attention_forward(q, k, v, window, scale)
    return _cpp_op("sliding_window_attention_fwd")(q, k, v, window, scale)


def _backward(backend: str, grad_out, q, k, v, out, lse, window, scale):
    if backend == "torch" or q.numel() == 0:
        return attention_backward_torch(grad_out, q, k, v, out, lse, window, scale)
    if backend == "triton":
        return _triton_kernels().attention_backward(grad_out, q, k, v, out, lse, window, scale)
    return _cpp_op("sliding_window_attention_bwd")(grad_out, q, k, v, out, lse, window, scale)


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """One node for the whole attention: saves q, k, v, out and the row log-sum-exp (B, H, T)."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale, backend):
        out, lse = _forward(backend, q.detach(), k.detach(), v.detach(), window, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (window, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        window, scale, backend = ctx.config
        dq, dk, dv = _backward(backend, grad_out, q.detach(), k.detach(), v.detach(), out, lse, window, scale)
        return dq, dk, dv, None, None, None


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
                             scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention where query i sees keys i - window + 1 .. i (window >= T: plain causal).

    q (B, H, T, Dh), k and v (B, H_kv, T, Dh) with H a multiple of H_kv; float32, float16 or
    bfloat16 (one dtype for all three), any strides. Returns (B, H, T, Dh) in q's dtype; softmax and
    accumulation are fp32. scale defaults to Dh ** -0.5. Differentiable in q, k and v; the fast
    backends do O(T * window) work and keep O(T) extra memory.
    """
    op = "sliding_window_attention"
    _check_tensors(op, q=q, k=k, v=v)
    _check_heads(op, q, k, v, "k", "v")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: q has {q.shape[2]} positions but k has {k.shape[2]}; they must match")
    window = _check_window(window, op)
    scale = _check_scale(scale, q.shape[3], op)
    name = _resolve(backend, q.device, op, "sliding_window_attention_fwd")
    out, _ = SlidingWindowAttentionFunction.apply(q, k, v, window, scale, name)
    return out


def sliding_window_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, window: int, *,
                          scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of n new queries at absolute positions pos .. pos + n - 1 against a ring-buffer cache.

    q (B, H, n, Dh); k_cache and v_cache (B, H_kv, S, Dh) hold the key/value of absolute position p
    in slot p % S, the new queries' own keys/values already written. Same rule as
    sliding_window_attention: the query at t sees positions t - window + 1 .. t that are >= 0.

    The ring must still hold the window of the earliest new query after the latest one was written,
    so S >= window + n - 1: one step (n = 1) needs exactly `window` slots; a chunk of n queries
    needs n - 1 more. This is the rule that keeps each call a single pass over the cache with no
    roll, no copy and no separate buffer for the new keys. pos is a Python int or a 0-dim integer
    tensor on q's device (read only on the device, so a step can be captured in a CUDA graph; a
    tensor pos is trusted to be >= 0). Returns (B, H, n, Dh) in q's dtype. Only the torch backend
    is differentiable: when gradients are needed, "auto" uses it and an explicit triton/cpp raises.
    """
    op = "sliding_window_decode"
    _check_tensors(op, q=q, k_cache=k_cache, v_cache=v_cache)
    _check_heads(op, q, k_cache, v_cache, "k_cache", "v_cache")
    window = _check_window(window, op)
    scale = _check_scale(scale, q.shape[3], op)
    num_new, slots = q.shape[2], k_cache.shape[2]
    if slots < window + num_new - 1:
        raise ValueError(f"{op}: k_cache has {slots} slots but {num_new} new queries with window {window} need "
                         f"window + n - 1 = {window + num_new - 1} (the earliest query's window must still be in the ring)")
    pos = _check_pos(pos, q.device, op)
    name = _resolve(backend, q.device, op, "sliding_window_decode")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if name != "torch" and needs_grad:
        if not _is_auto(backend):
            raise RuntimeError(f"{op}: the {name} backend has no backward; use backend='torch' for gradients "
                               f"(or run the step under torch.no_grad())")
        name = "torch"
    if name == "torch" or q.numel() == 0:
        return decode_torch(q, k_cache, v_cache, pos, window, scale)
    if name == "triton":
        return _triton_kernels().decode(q, k_cache, v_cache, pos, window, scale)
    return _cpp_op("sliding_window_decode")(q, k_cache, v_cache, torch.as_tensor(pos, dtype=torch.int64), window, scale)


def _check_pos(pos, device: torch.device, op: str):
    if isinstance(pos, torch.Tensor):
        if pos.dim() != 0 or pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
            raise TypeError(f"{op}: pos must be an int or a 0-dim integer tensor, got {pos.dtype} of shape {tuple(pos.shape)}")
        if pos.device != device:
            raise ValueError(f"{op}: pos is on {pos.device} but q is on {device}; they must be on the same device")
        return pos
    if isinstance(pos, bool):
        raise TypeError(f"{op}: pos must be an int or a 0-dim integer tensor, got a bool")
    try:
        pos = operator.index(pos)
    except TypeError:
        raise TypeError(f"{op}: pos must be an int or a 0-dim integer tensor, got {type(pos).__name__}") from None
    if pos < 0:
        raise ValueError(f"{op}: pos (the absolute position of the first new query) must be >= 0, got {pos}")
    return pos


def empty_cache() -> int:
    """Free the output blocks the C++ kernels keep for reuse; returns the bytes freed.

    The cpp forward and backward take their large fp32 results (out, dq, dk, dv) from a cache of
    at most 4 recently freed blocks of >= 1 MiB (512 MiB in all): a training loop repeats its
    shapes, and a recycled block costs no page faults, where a fresh 32 MiB one costs ~12 ms of
    first-touch faults per call (what made time grow faster than T). Like torch.cuda.empty_cache,
    call this to give that memory back between phases.
    """
    from .._backend import available_backends, cpp_ops

    if not available_backends()["cpp"].available:
        return 0
    return int(cpp_ops().window_attention_empty_cache())
