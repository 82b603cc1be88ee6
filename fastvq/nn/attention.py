"""SlidingWindowSelfAttention: a drop-in for taming-transformers' (minGPT's) CausalSelfAttention,
on the fused sliding-window op.

Same parameters under the same names (`key`, `query`, `value`, `proj`: nn.Linear(n_embd, n_embd)),
so taming GPT weights load unchanged. taming also saves a (1, 1, block_size, block_size) causal
`mask` buffer; this module has no such buffer (the window rule is computed, not stored, and any
length works), so loading drops that key. A mask that is not plain lower-triangular (taming's
n_unmasked > 0) cannot be reproduced and raises instead of loading silently.

Query i sees key j iff i - window < j <= i (window >= T: plain causal attention, i.e. taming's).

Paths:
  * forward (training, prefill): fastvq.sliding_window_attention - O(T * window) work, no T x T
    matrix. With attn_pdrop > 0 in training, dropout has to act on the attention probabilities,
    which the fused kernels never materialise, so that case is an explicit masked softmax +
    attn_drop (minGPT's computation, O(T^2) memory); set attn_pdrop=0 to keep the fused kernel;
  * forward with layer_past (taming's growing KV cache): the new tokens attend to past + new
    through fastvq.sliding_window_decode (the concatenated cache is a ring that never wrapped);
  * forward_cached: the one decode step (inference), a preallocated ring cache written in place:
    the q/k/v product on stacked weights (fastvq.decode_linear), rope rotated in place, then
    fastvq.sliding_window_decode_qkv (ring writes + attention in one op), then the output product.

rope=True rotates q and k (half-split rotary embedding, base 10000) at absolute positions, which
makes attention depend only on position differences: a model trained on short sequences can be
sampled on longer ones through a ring-buffer cache of `window` slots (`forward_cached`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import resolve_backend
from .._checks import check_int, check_pos, check_prob
from ..ops.decode_linear import DECODE_ROWS
from ..ops.decode_linear import KERNELS as LINEAR_KERNELS
from ..ops.window_attention import KERNELS as ATTENTION_KERNELS
from ..ops.rope import ROPE_BASE, rotary  # noqa: F401  (rotary is part of this module's API)
from ..ops.window_attention import sliding_window_attention, sliding_window_decode
from .decode_state import AttentionDecodeWeights, attention_decode_weights

_WHERE = "SlidingWindowSelfAttention"


def _check_int(name: str, value, minimum: int) -> int:
    return check_int(_WHERE, name, value, minimum)


class StepKernels(NamedTuple):
    """The kernels a decode step calls, resolved once per step (fastvq.ops KERNELS entries):
    linear(x, weight, bias, residual, activation) and attend(qkv, k_cache, v_cache, pos, window, scale)."""
    linear: Callable
    attend: Callable


def step_kernels(device: torch.device, rows: int, where: str) -> StepKernels:
    """The dispatch rule for a decode step on `device` with `rows` token rows: the backend
    resolve_backend picks (so FASTVQ_BACKEND applies), decode_linear only up to its DECODE_ROWS
    (a GEMM is the faster product beyond)."""
    name = resolve_backend(None, device, where)
    linear = LINEAR_KERNELS[name] if rows <= DECODE_ROWS else LINEAR_KERNELS["torch"]
    return StepKernels(linear, ATTENTION_KERNELS[name].decode_qkv)


class SlidingWindowSelfAttention(nn.Module):
    """Multi-head causal self-attention over a sliding window of `window` positions (the query's
    own included), with minGPT's layout: x (B, T, n_embd) -> y (B, T, n_embd)."""

    def __init__(self, n_embd: int, n_head: int, window: int, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0, rope: bool = False):
        super().__init__()
        n_embd, n_head = _check_int("n_embd", n_embd, 1), _check_int("n_head", n_head, 1)
        if n_embd % n_head:
            raise ValueError(f"SlidingWindowSelfAttention: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if rope and (n_embd // n_head) % 2:
            raise ValueError(f"SlidingWindowSelfAttention: rope=True needs an even head size, got "
                             f"n_embd // n_head = {n_embd // n_head}")
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, n_embd // n_head
        self.window = _check_int("window", window, 1)
        self.rope = bool(rope)
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.attn_drop = nn.Dropout(check_prob(_WHERE, "attn_pdrop", attn_pdrop))
        self.resid_drop = nn.Dropout(check_prob(_WHERE, "resid_pdrop", resid_pdrop))
        self.proj = nn.Linear(n_embd, n_embd)
        self._decode_weights = attention_decode_weights(self)

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}, window={self.window}, rope={self.rope}"

    # ------------------------------------------------------------------------- taming checkpoints

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mask = state_dict.pop(prefix + "mask", None)  # taming's causal-mask buffer: computed here
        if mask is not None:
            size = mask.shape[-1]
            if not torch.equal(mask.reshape(size, size).bool(), torch.ones(size, size, dtype=torch.bool).tril()):
                raise ValueError(f"SlidingWindowSelfAttention: {prefix}mask in the state dict is not lower-triangular "
                                 "(taming's n_unmasked > 0?); only plain causal attention is supported")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------- pieces

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.n_embd:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SlidingWindowSelfAttention: x must be (B, T, n_embd={self.n_embd}), got {shape}")

    def _check_past(self, layer_past, batch: int) -> None:
        expected = (batch, self.n_head, self.head_dim)
        ok = isinstance(layer_past, (torch.Tensor, tuple, list)) and len(layer_past) == 2 and all(
            isinstance(p, torch.Tensor) and p.dim() == 4 and (p.shape[0], p.shape[1], p.shape[3]) == expected
            for p in layer_past) and layer_past[0].shape == layer_past[1].shape
        if not ok:
            got = tuple(layer_past.shape) if isinstance(layer_past, torch.Tensor) else type(layer_past).__name__
            raise ValueError(f"SlidingWindowSelfAttention: layer_past must be (2, B={batch}, n_head={self.n_head}, "
                             f"T_past, head_dim={self.head_dim}) like taming's present, got {got}")

    def _heads(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return linear(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor | None):
        q, k, v = self._heads(self.query, x), self._heads(self.key, x), self._heads(self.value, x)
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, self.n_embd)))

    # ------------------------------------------------------------------------- decode step

    def decode_weights(self) -> AttentionDecodeWeights:
        """The tensors forward_cached reads (stacked, on CPU in huge pages), rebuilt when a parameter
        changes; `self._decode_weights.invalidate()` frees them."""
        return self._decode_weights.get()

    def _step(self, x, cache_k, cache_v, pos, positions, weights: AttentionDecodeWeights, kernels: StepKernels,
              residual=None) -> torch.Tensor:
        """The decode step itself, on checked arguments: residual + proj(attention of x's tokens)."""
        b, n, _ = x.shape
        qkv = kernels.linear(x, weights.qkv_weight, weights.qkv_bias, None, None).view(b, n, 3, self.n_head, self.head_dim)
        if self.rope:  # q and k rotated in place in the stacked product: the ring keeps rotated keys
            qk = qkv[:, :, :2].permute(0, 2, 3, 1, 4)  # (B, 2, H, n, hs)
            qk.copy_(rotary(qk, positions))
        y = kernels.attend(qkv, cache_k, cache_v, pos, self.window, self.head_dim ** -0.5)
        return kernels.linear(y, weights.proj_weight, weights.proj_bias, residual, None)

    def _masked_attention(self, q, k, v, past_len: int) -> torch.Tensor:
        """minGPT's explicit softmax (with attn_drop on the probabilities) under the window rule;
        the n queries sit at positions past_len .. past_len + n - 1 of the S keys."""
        n, s = q.shape[2], k.shape[2]
        offset = (torch.arange(n, device=q.device)[:, None] + past_len) - torch.arange(s, device=q.device)[None, :]
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        att = att.masked_fill((offset < 0) | (offset >= self.window), float("-inf"))
        return self.attn_drop(F.softmax(att, dim=-1)) @ v

    def _attend_past(self, q, k_all, v_all) -> torch.Tensor:
        """New queries against a linear cache (past + new): a ring of S slots that never wrapped, so
        sliding_window_decode applies; a cache shorter than its rule S >= window + n - 1 is padded
        with slots that hold no position yet (masked). Gradients flow through its torch backend."""
        n, s = q.shape[2], k_all.shape[2]
        if self._dropout_active():
            return self._masked_attention(q, k_all, v_all, s - n)
        missing = self.window + n - 1 - s
        if missing > 0:
            k_all, v_all = (F.pad(t, (0, 0, 0, missing)) for t in (k_all, v_all))
        return sliding_window_decode(q, k_all, v_all, s - n, self.window)

    def _dropout_active(self) -> bool:
        return self.training and self.attn_drop.p > 0

    def positions(self, start_pos, n: int, device) -> torch.Tensor | None:
        """Absolute positions start_pos .. start_pos + n - 1 as a tensor where rope needs them, else None."""
        if not self.rope:
            return None
        return torch.as_tensor(start_pos, device=device).long() + torch.arange(n, device=device)

    # ------------------------------------------------------------------------- public

    def forward(self, x: torch.Tensor, layer_past: torch.Tensor | None = None, return_present: bool = False,
                start_pos=None):
        """x (B, T, n_embd) -> y (B, T, n_embd); (y, present) when return_present or layer_past is given.

        taming's Block unpacks `attn, present = self.attn(x, layer_past=layer_past)` on every call;
        inside it, call with return_present=True (y alone is minGPT's own convention, and unpacking a
        tensor of batch 2 would not even fail).

        present = torch.stack((k, v)), shape (2, B, n_head, T, head_dim): the keys and values of
        the new tokens only (taming's convention; its sampler concatenates them along dim -2 into
        the next layer_past). With rope they are stored rotated, so a cache never needs re-rotating.

        layer_past (2, B, n_head, T_past, head_dim): keys/values of the T_past tokens before x; the
        new tokens attend causally to past + new, under the window in absolute positions (taming
        applies no mask at all here, which only agrees for one new token at a time).

        start_pos: absolute position of x's first token (int or 0-dim tensor), used only by rope.
        Default: 0, or T_past with layer_past. The window rule depends only on differences.
        """
        self._check_x(x)
        b, t, _ = x.shape
        past_len = 0
        if layer_past is not None:
            self._check_past(layer_past, b)
            past_len = layer_past[0].shape[2]
        q, k, v = self._qkv(x, self.positions(past_len if start_pos is None else start_pos, t, x.device))
        if layer_past is not None:
            y = self._attend_past(q, torch.cat((layer_past[0], k), dim=2), torch.cat((layer_past[1], v), dim=2))
        elif self._dropout_active():
            y = self._masked_attention(q, k, v, 0)
        else:
            y = sliding_window_attention(q, k, v, self.window)
        y = self._output(y)
        return (y, torch.stack((k, v))) if return_present or layer_past is not None else y

    def new_cache(self, batch_size: int, slots: int | None = None, *, device=None, dtype=None):
        """Zeroed ring buffers (k_cache, v_cache), each (batch_size, n_head, slots, head_dim), for
        forward_cached. slots defaults to window, enough for one token per step; a step of n
        tokens needs window + n - 1."""
        slots = self.window if slots is None else _check_int("slots", slots, 1)
        p = self.key.weight
        shape = (_check_int("batch_size", batch_size, 1), self.n_head, slots, self.head_dim)
        device, dtype = device or p.device, dtype or p.dtype
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward_cached(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos) -> torch.Tensor:
        """One cached decode step (inference: no gradients, no dropout): x (B, n, n_embd) holds the
        tokens at absolute positions pos .. pos + n - 1 (pos an int or a 0-dim integer tensor on x's
        device, which keeps the step free of host syncs). Their keys/values (rotated, with rope) are
        written IN PLACE into slots (pos + i) % S of cache_k / cache_v (B, n_head, S, head_dim), then
        the n queries attend (fastvq.sliding_window_decode_qkv). S >= window + n - 1 (S = window for
        one token a step). Everything is checked before the cache is touched. Returns y (B, n, n_embd).

        Feeding a sequence token by token from pos = 0 gives the same outputs as forward on the
        whole sequence, however long it is, with memory fixed at S slots.
        """
        self._check_x(x)
        self.check_cache(x, cache_k, cache_v, "SlidingWindowSelfAttention.forward_cached")
        pos = check_pos("SlidingWindowSelfAttention.forward_cached", pos, x.device)
        b, n, _ = x.shape
        with torch.no_grad():
            positions = self.positions(pos, n, x.device)
            kernels = step_kernels(x.device, b * n, "SlidingWindowSelfAttention.forward_cached")
            return self._step(x, cache_k, cache_v, pos, positions, self.decode_weights(), kernels)

    def check_cache(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, where: str) -> None:
        """cache_k / cache_v must be rings (B, n_head, S, head_dim) of x's dtype and device with
        S >= window + n - 1 for x's n new tokens."""
        b, n, _ = x.shape
        expected = (b, self.n_head, self.head_dim)
        for name, c in (("cache_k", cache_k), ("cache_v", cache_v)):
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or (c.shape[0], c.shape[1], c.shape[3]) != expected:
                raise ValueError(f"{where}: {name} must be (B={b}, n_head={self.n_head}, S, head_dim={self.head_dim}), "
                                 f"got {tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if cache_v.shape != cache_k.shape:
            raise ValueError(f"{where}: cache_v has shape {tuple(cache_v.shape)} but cache_k has {tuple(cache_k.shape)}; "
                             "they must match")
        slots = cache_k.shape[2]
        if slots < self.window + n - 1:
            raise ValueError(f"{where}: the cache has {slots} slots but {n} new tokens with window {self.window} need "
                             f"window + n - 1 = {self.window + n - 1}")
        if cache_k.device != x.device or cache_v.device != x.device:
            raise ValueError(f"{where}: the caches must be on x's device ({x.device})")
        if cache_k.dtype != x.dtype or cache_v.dtype != x.dtype:
            raise TypeError(f"{where}: the caches are {cache_k.dtype}/{cache_v.dtype} but x is {x.dtype}; they must match")
