"""Sliding-window causal attention, and its decode steps against a ring-buffer KV cache.

Public:
  sliding_window_attention(q, k, v, window, *, scale=None, backend=None) -> out
  sliding_window_decode(q, k_cache, v_cache, pos, window, *, scale=None, backend=None) -> out
  sliding_window_decode_qkv(qkv, k_cache, v_cache, pos, window, *, scale=None, backend=None) -> out
      a model's whole attention step: writes the new keys/values into the rings, then attends
  sliding_window_attention_reference / _backward_reference, sliding_window_decode_reference,
  sliding_window_decode_qkv_reference: the torch oracles
  KERNELS: the per-backend entry points (unchecked), for callers that check once
  empty_cache(): give back the cpp kernels' reused output blocks

Query i sees key j iff i - window < j <= i: the window counts the query itself, window = 1 is the
diagonal alone and window >= T is ordinary causal attention. Every row sees at least itself, so no
row is ever empty (never NaN). q is (B, H, T, Dh), k and v are (B, H_kv, T, Dh) with H a multiple
of H_kv (grouped-query attention: query head h reads key/value head h // (H // H_kv)).

Backend contract (AttentionKernels, one per backend in KERNELS):
  forward(q, k, v, window, scale) -> (out in q's dtype, lse fp32 (B, H, T))
  backward(grad_out, q, k, v, out, lse, window, scale) -> (dq, dk, dv) in the inputs' dtypes
  decode(q, k_cache, v_cache, pos, window, scale) -> out, pos an int or a 0-dim int64 tensor
  decode_qkv(qkv, k_cache, v_cache, pos, window, scale) -> (B, n, H * Dh), the rings written in place
Inputs may have any strides. lse is the natural-log log-sum-exp of each row's scaled scores: the
only thing the forward saves besides its inputs and output, so backward recomputes the
probabilities block by block and no T x T (or T x window) matrix outlives a call.
"""
from __future__ import annotations

import operator
from typing import Callable, NamedTuple

import torch

from .._backend import available_backends, cpp_op, requested_backend, resolve_backend
from .._checks import check_pos, check_tensor
from .masked_attention import (CHUNK, MaskedAttentionFunction, MaskRule, expand_kv, masked_attention_backward,
                               masked_attention_forward)



# ----------------------------------------------------------------------------- input checks

_MAX_WINDOW = 2 ** 31 - 1
_MAX_SCALE = torch.finfo(torch.float32).max  # the kernels scale in fp32: beyond this it is inf


def _check_window(window, op: str) -> int:
    if isinstance(window, bool):
        raise TypeError(f"{op}: window must be an int >= 1, got a bool")
    try:
        window = operator.index(window)
    except TypeError:
        raise TypeError(f"{op}: window must be an int >= 1, got {type(window).__name__}") from None
    if window < 1:
        raise ValueError(f"{op}: window must be an int >= 1 (1 = each query sees only itself), got {window}")
    if window > _MAX_WINDOW:
        # The kernels do index arithmetic with the window in C++ and Triton integers; any window >= T
        # is plain causal attention, so nothing is lost by asking for one that fits.
        raise ValueError(f"{op}: window must be at most 2**31 - 1 = {_MAX_WINDOW} (any window >= the sequence "
                         f"length is plain causal attention), got {window}")
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
    if not abs(scale) <= _MAX_SCALE:  # also catches NaN: every score would be NaN or +-inf
        raise ValueError(f"{op}: scale must be a finite number (within float32's range), got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------- torch reference

def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(rows, keys) boolean mask of the window rule, from absolute positions."""
    offset = query_pos[:, None] - key_pos[None, :]
    return (offset >= 0) & (offset < window) & (key_pos[None, :] >= 0)


def _rule(window: int) -> MaskRule:
    """The window as a rule of the shared reference: rows a..b-1 see keys a-window+1..b-1."""
    return MaskRule(lambda rows, keys: _visible(rows, keys, window),
                    lambda a, b: torch.arange(max(0, a - window + 1), b))


def sliding_window_attention_reference(q, k, v, window: int, scale: float, chunk: int = CHUNK):
    """The oracle: (out, lse) of masked softmax attention in fp32, a block of query rows at a time
    against only the keys its window reaches. chunk >= T is the plain dense version."""
    return masked_attention_forward(q, k, v, scale, _rule(window), chunk)


def sliding_window_attention_backward_reference(grad_out, q, k, v, out, lse, window: int, scale: float,
                                                 chunk: int = CHUNK):
    """(dq, dk, dv) from the saved row log-sum-exp, probabilities recomputed chunk by chunk."""
    return masked_attention_backward(grad_out, q, k, v, out, lse, scale, _rule(window), chunk)


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


def sliding_window_decode_reference(q, k_cache, v_cache, pos, window: int, scale: float):
    """The decode oracle: dense masked softmax of the n new queries over every ring slot."""
    acc = torch.float32
    heads = q.shape[1]
    kf, vf = expand_kv(k_cache, heads).to(acc), expand_kv(v_cache, heads).to(acc)
    query_pos, key_pos = ring_positions(pos, q.shape[2], k_cache.shape[2], q.device)
    visible = _visible(query_pos, key_pos, window)
    s = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    # A slot no new query sees may hold anything (another sequence's keys, NaN): its weight is 0,
    # but 0 * NaN is NaN in the product, so its values are left out, not just weighted 0.
    vf = vf.masked_fill(~visible.any(0)[:, None], 0.0)
    return (torch.softmax(s, dim=-1) @ vf).to(q.dtype)


def _write_rings(qkv, k_cache, v_cache, pos):
    """The ring writes of a decode step: the keys/values of tokens pos .. pos + n - 1 into slots
    (pos + i) % S. Returns q (B, H, n, Dh) as a view of qkv."""
    n, slots = qkv.shape[1], k_cache.shape[2]
    slot_index = torch.remainder(torch.as_tensor(pos, device=qkv.device) + torch.arange(n, device=qkv.device), slots)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, n, Dh)
    k_cache.index_copy_(2, slot_index, k)
    v_cache.index_copy_(2, slot_index, v)
    return q


def _decode_qkv_with(decode: Callable):
    """decode_qkv from a backend's decode: ring writes, then the attention (out as (B, n, H * Dh))."""
    def decode_qkv(qkv, k_cache, v_cache, pos, window, scale):
        q = _write_rings(qkv, k_cache, v_cache, pos)
        b, h, n, d = q.shape
        return decode(q, k_cache, v_cache, pos, window, scale).transpose(1, 2).reshape(b, n, h * d)
    return decode_qkv


def sliding_window_decode_qkv_reference(qkv, k_cache, v_cache, pos, window: int, scale: float):
    """The decode_qkv oracle: index_copy_ into the rings, then sliding_window_decode_reference."""
    return _decode_qkv_with(sliding_window_decode_reference)(qkv, k_cache, v_cache, pos, window, scale)


# ----------------------------------------------------------------------------- backends

class AttentionKernels(NamedTuple):
    """One backend's entry points (signatures in the module docstring). Unchecked: the public
    functions check first; a caller that checks once may call an entry directly."""
    forward: Callable
    backward: Callable
    decode: Callable
    decode_qkv: Callable


def _triton(name: str) -> Callable:
    """fastvq.kernels.window_attention.<name>, imported at the first call (triton is optional)."""
    def run(*args):
        from fastvq.kernels import window_attention

        return getattr(window_attention, name)(*args)
    return run


def _as_pos_tensor(pos) -> torch.Tensor:
    return pos if isinstance(pos, torch.Tensor) else torch.tensor(pos, dtype=torch.int64)


def _decode_cpp(q, k_cache, v_cache, pos, window, scale):
    return cpp_op("sliding_window_decode")(q, k_cache, v_cache, _as_pos_tensor(pos), window, scale)


_decode_qkv_cpp_composed = _decode_qkv_with(_decode_cpp)

# The cpp kernel's one-call step (ring writes and attention on the stacked product) covers fp32 with
# the direct decode path's head sizes (multiples of 16 up to 128) on contiguous rings; other steps
# are the ring writes followed by the general cpp decode.
_DIRECT_MAX_HEAD_DIM = 128


def _decode_qkv_cpp(qkv, k_cache, v_cache, pos, window, scale):
    d = qkv.shape[-1]
    if (qkv.dtype == torch.float32 and k_cache.dtype == torch.float32 and d % 16 == 0 and d <= _DIRECT_MAX_HEAD_DIM
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return cpp_op("sliding_window_decode_qkv")(qkv, k_cache, v_cache, _as_pos_tensor(pos), window, scale)
    return _decode_qkv_cpp_composed(qkv, k_cache, v_cache, pos, window, scale)


KERNELS = {
    "torch": AttentionKernels(sliding_window_attention_reference, sliding_window_attention_backward_reference,
                              sliding_window_decode_reference, sliding_window_decode_qkv_reference),
    "cpp": AttentionKernels(lambda q, k, v, w, s: cpp_op("sliding_window_attention_fwd")(q, k, v, w, s),
                            lambda *a: cpp_op("sliding_window_attention_bwd")(*a), _decode_cpp, _decode_qkv_cpp),
    "triton": AttentionKernels(_triton("attention_forward"), _triton("attention_backward"), _triton("decode"),
                               _decode_qkv_with(_triton("decode"))),
}


# ----------------------------------------------------------------------------- autograd

# ----------------------------------------------------------------------------- public

def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
                             scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention where query i sees keys i - window + 1 .. i (window >= T: plain causal).

    Softmax and accumulation are fp32; the cpp and triton backends do O(T * window) work and keep
    O(T) extra memory (the row log-sum-exp); one autograd node (MaskedAttentionFunction).

    Args:
        q: (B, H, T, Dh) float32, float16 or bfloat16, any strides.
        k, v: (B, H_kv, T, Dh), q's dtype and device, H a multiple of H_kv (grouped-query attention).
        window: int in [1, 2**31 - 1], the positions each query sees, itself included.
        scale: the score scale, a finite number; default Dh ** -0.5.
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        (B, H, T, Dh) in q's dtype, differentiable in q, k and v.

    Raises:
        TypeError / ValueError naming the argument (rank, dtype, device, shapes, a window outside
        [1, 2**31 - 1], a scale that is NaN or infinite);
        RuntimeError when the backend asked for cannot run here.

    Example:
        >>> q = k = v = torch.randn(1, 8, 1024, 64, requires_grad=True)
        >>> out = fastvq.sliding_window_attention(q, k, v, window=256)
        >>> out.sum().backward()
    """
    op = "sliding_window_attention"
    _check_tensors(op, q=q, k=k, v=v)
    _check_heads(op, q, k, v, "k", "v")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: q has {q.shape[2]} positions but k has {k.shape[2]}; they must match")
    window = _check_window(window, op)
    scale = _check_scale(scale, q.shape[3], op)
    name = resolve_backend(backend, q.device, op)
    out, _ = MaskedAttentionFunction.apply(q, k, v, window, scale, KERNELS[name], KERNELS["torch"])
    return out


def _check_ring(op: str, num_new: int, slots: int, window: int) -> None:
    # The ring must still hold the window of the earliest new query after the latest one was written.
    if slots < window + num_new - 1:
        raise ValueError(f"{op}: k_cache has {slots} slots but {num_new} new queries with window {window} need "
                         f"window + n - 1 = {window + num_new - 1} (the earliest query's window must still be in the ring)")


def _decode_backend(op: str, backend: str | None, device: torch.device, *tensors) -> str:
    """The dispatch rule, plus: only the torch backend is differentiable. When gradients are needed
    "auto" takes it and an explicit cpp/triton raises."""
    name = resolve_backend(backend, device, op)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if name == "torch" or not needs_grad:
        return name
    if requested_backend(backend) != "auto":
        raise RuntimeError(f"{op}: the {name} backend has no backward; use backend='torch' for gradients "
                           f"(or run the step under torch.no_grad())")
    return "torch"


def sliding_window_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, window: int, *,
                          scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of n new queries at absolute positions pos .. pos + n - 1 against a ring-buffer cache.

    The cache holds the key/value of absolute position p in slot p % S, the new queries' own already
    written. Same rule as sliding_window_attention: the query at t sees positions t - window + 1 .. t
    that are >= 0. S >= window + n - 1 keeps each call a single pass over the ring: no roll, no
    copy, no separate buffer for the new keys (one step, n = 1, needs exactly `window` slots).

    Args:
        q: (B, H, n, Dh) float32, float16 or bfloat16.
        k_cache, v_cache: (B, H_kv, S, Dh), q's dtype and device.
        pos: absolute position of the first new query: an int >= 0 or a 0-dim integer tensor on q's
            device (read only on the device, so a step can be captured in a CUDA graph; trusted >= 0).
        window: int in [1, 2**31 - 1].
        scale: a finite number; default Dh ** -0.5.
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton". Only "torch" is
            differentiable: with gradients, "auto" takes it and an explicit cpp/triton raises.

    Returns:
        (B, H, n, Dh) in q's dtype.

    Raises:
        TypeError / ValueError naming the argument (shapes, dtypes, pos, a ring of fewer than
        window + n - 1 slots); RuntimeError when the backend asked for cannot run here.

    Example:
        >>> k_cache = v_cache = torch.zeros(1, 8, 256, 64)      # a ring of 256 slots
        >>> q = torch.randn(1, 8, 1, 64)
        >>> out = fastvq.sliding_window_decode(q, k_cache, v_cache, pos=300, window=256)
    """
    op = "sliding_window_decode"
    _check_tensors(op, q=q, k_cache=k_cache, v_cache=v_cache)
    _check_heads(op, q, k_cache, v_cache, "k_cache", "v_cache")
    window = _check_window(window, op)
    scale = _check_scale(scale, q.shape[3], op)
    _check_ring(op, q.shape[2], k_cache.shape[2], window)
    pos = check_pos(op, pos, q.device)
    name = _decode_backend(op, backend, q.device, q, k_cache, v_cache)
    return KERNELS["torch" if q.numel() == 0 else name].decode(q, k_cache, v_cache, pos, window, scale)


def sliding_window_decode_qkv(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, window: int, *,
                              scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """A decoding model's whole attention step on the stacked product of its q/k/v projection.

    The keys and values of the n new tokens (positions pos .. pos + n - 1) are written IN PLACE into
    ring slots (pos + i) % S, then their queries attend as in sliding_window_decode. The result is
    laid out as the output projection takes it. One call in place of the head split, two
    index_copy_ and the decode op: the cpp backend does it in one pass for fp32 with head sizes
    that are multiples of 16 up to 128, and as ring writes + its decode kernel otherwise.
    Everything is checked before a ring is written. Inference only (no backend has a backward).

    Args:
        qkv: (B, n, 3, H, Dh): query, key and value of each new token, e.g.
            (x @ cat(Wq, Wk, Wv).T).view(B, n, 3, H, Dh); float32, float16 or bfloat16.
        k_cache, v_cache: (B, H, S, Dh) rings, qkv's dtype and device, S >= window + n - 1.
        pos: int >= 0 or a 0-dim integer tensor on qkv's device.
        window: int in [1, 2**31 - 1].
        scale: a finite number; default Dh ** -0.5.
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        (B, n, H * Dh) in qkv's dtype.

    Raises:
        TypeError / ValueError naming the argument; RuntimeError under grad mode with an input that
        requires grad, or when the backend asked for cannot run here.

    Example:
        >>> cache_k = cache_v = torch.zeros(2, 8, 256, 64)
        >>> qkv = torch.randn(2, 1, 3, 8, 64)
        >>> y = fastvq.sliding_window_decode_qkv(qkv, cache_k, cache_v, pos=0, window=256)
        >>> y.shape
        torch.Size([2, 1, 512])
    """
    op = "sliding_window_decode_qkv"
    check_tensor(op, "qkv", qkv, ("B", "n", "3", "heads", "head_dim"))
    _check_tensors(op, k_cache=k_cache, v_cache=v_cache)
    b, n, three, h, d = qkv.shape
    if three != 3:
        raise ValueError(f"{op}: qkv must be (B, n, 3, H, Dh) (query, key, value stacked on dim 2), got {tuple(qkv.shape)}")
    if qkv.dtype != k_cache.dtype or qkv.device != k_cache.device:
        raise TypeError(f"{op}: qkv ({qkv.dtype} on {qkv.device}) and the caches ({k_cache.dtype} on {k_cache.device}) "
                        "must share a dtype and a device")
    if tuple(k_cache.shape) != tuple(v_cache.shape) or (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (b, h, d):
        raise ValueError(f"{op}: k_cache and v_cache must both be (B={b}, H={h}, S, Dh={d}), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if d == 0:
        raise ValueError(f"{op}: head_dim must be at least 1, got qkv of shape {tuple(qkv.shape)}")
    window = _check_window(window, op)
    scale = _check_scale(scale, d, op)
    _check_ring(op, n, k_cache.shape[2], window)
    pos = check_pos(op, pos, qkv.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, k_cache, v_cache)):
        raise RuntimeError(f"{op}: inference only (it writes the rings in place; no backward): call it under "
                           "torch.no_grad()")
    name = resolve_backend(backend, qkv.device, op)
    return KERNELS["torch" if qkv.numel() == 0 else name].decode_qkv(qkv, k_cache, v_cache, pos, window, scale)


def empty_cache() -> int:
    """Free the output blocks the C++ kernels keep for reuse; returns the bytes freed.

    The cpp forward and backward take their large fp32 results (out, dq, dk, dv) from a cache of
    at most 4 recently freed blocks of >= 1 MiB (512 MiB in all): a training loop repeats its
    shapes, and a recycled block costs no page faults, where a fresh block of tens of MiB pays a
    first-touch fault per page on every call (what made time grow faster than T). Like
    torch.cuda.empty_cache, call this to give that memory back between phases.
    """
    if not available_backends()["cpp"].available:
        return 0
    return int(cpp_op("window_attention_empty_cache")())
