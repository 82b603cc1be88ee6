"""SlidingWindowSelfAttention: a drop-in for taming-transformers' (minGPT's) CausalSelfAttention,
on the fused sliding-window op.

Same parameters under the same names (`key`, `query`, `value`, `proj`: nn.Linear(n_embd, n_embd)),
so taming GPT weights load unchanged. taming also saves a (1, 1, block_size, block_size) causal
`mask` buffer; this module has no such buffer (the window rule is computed, not stored, and any
length works), so loading drops that key. A mask that is not plain lower-triangular (taming's
n_unmasked > 0) cannot be reproduced and raises instead of loading silently.

Query i sees key j iff i - window < j <= i (window >= T: plain causal attention, i.e. taming's).

Paths through forward:
  * no layer_past, no attention dropout: fastvq.sliding_window_attention (backend from
    FASTVQ_BACKEND, auto by default) - O(T * window) work, no T x T matrix;
  * training with attn_pdrop > 0: dropout has to act on the attention probabilities, which the
    fused kernels never materialise, so this falls back to an explicit masked softmax + attn_drop
    (minGPT's computation, O(T^2) memory). Set attn_pdrop=0 to keep the fused kernel in training;
  * layer_past (taming's growing KV cache): the new tokens attend to past + new through
    sliding_window_decode on the concatenated cache (masked softmax when gradients are needed, as
    the decode kernels have no backward, or when the cache shape does not fit the decode op).

rope=True rotates q and k (half-split rotary embedding, base 10000) at absolute positions, which
makes attention depend only on position differences: a model trained on short sequences can be
sampled on longer ones through a ring-buffer cache of `window` slots (`forward_cached`).
"""
from __future__ import annotations

import numbers
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode_linear import decoding_copies, linear_for_decoding, packed_in_huge_pages
from ..ops.window_attention import _cpp_op, sliding_window_attention, sliding_window_decode

ROPE_BASE = 10000.0


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Half-split rotary embedding of x (..., T, hs) at integer positions (T,): the pair
    (x[i], x[i + hs/2]) is rotated by the angle position * base^(-2i/hs). Computed in fp32 (fp64
    for fp64 x): angles of positions in the thousands need more than half precision."""
    acc = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=acc) / half)
    angle = positions.to(device=x.device, dtype=acc)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half].to(acc), x[..., half:].to(acc)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"SlidingWindowSelfAttention: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"SlidingWindowSelfAttention: {name} must be a probability in [0, 1), got {value!r}")
    return float(value)


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
        self.attn_drop = nn.Dropout(_check_prob("attn_pdrop", attn_pdrop))
        self.resid_drop = nn.Dropout(_check_prob("resid_pdrop", resid_pdrop))
        self.proj = nn.Linear(n_embd, n_embd)

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

    # A decode step multiplies a few rows by every weight: its products go through
    # linear_for_decoding (fastvq's decode_linear kernel on CPU, torch elsewhere or with gradients),
    # on CPU query, key and value as one product on their stacked weights, all from huge-page copies.

    def _decode_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies for the CPU decode step: query, key and value's weights stacked (3 n_embd, n_embd)
        and proj's weight, packed in huge pages (packed_in_huge_pages), and the stacked biases;
        rebuilt when any of them changes (decoding_copies)."""
        parts = (self.query.weight, self.key.weight, self.value.weight, self.proj.weight,
                 self.query.bias, self.key.bias, self.value.bias)

        def build():
            qkv, proj = packed_in_huge_pages(torch.cat(parts[:3]), parts[3])
            return qkv, torch.cat(parts[4:]), proj

        return decoding_copies(self, "_decode_copies", parts, build)

    def _qkv_step(self, x: torch.Tensor, positions: torch.Tensor | None):
        # The stacked copy is outside autograd, and only the CPU kernel gains much from one product
        # (elsewhere the three products stay as they were, free of host-side bookkeeping).
        if x.device.type != "cpu" or (torch.is_grad_enabled()
                                      and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return self._qkv(x, positions)
        b, t, _ = x.shape
        qkv_weight, qkv_bias, _ = self._decode_weights()
        qkv = linear_for_decoding(x, qkv_weight, qkv_bias).view(b, t, 3, self.n_head, self.head_dim)
        q, k, v = (h.transpose(1, 2) for h in qkv.unbind(2))  # each (B, nh, T, hs)
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def _output_step(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.resid_drop.p > 0:
            return self._output(y)
        b, _, t, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t, self.n_embd)
        if y.device.type != "cpu" or (torch.is_grad_enabled() and (y.requires_grad or self.proj.weight.requires_grad)):
            return linear_for_decoding(y, self.proj.weight, self.proj.bias)
        return linear_for_decoding(y, self._decode_weights()[2], self.proj.bias)

    def _fused_step_kernel(self, x: torch.Tensor, cache_k: torch.Tensor):
        """fastvq::sliding_window_decode_qkv where it computes this step: the whole attention of a
        CPU fp32 inference step without rope (which would rotate q and k between the product and
        the ring) in one call on the stacked q/k/v product (head sizes of the cpp op's direct path:
        multiples of 16 up to 128). None elsewhere: the step then runs as separate ops (head split,
        ring writes, sliding_window_decode)."""
        fits = (not self.rope and x.device.type == "cpu" and x.dtype == torch.float32 and cache_k.dtype == x.dtype
                and self.head_dim % 16 == 0 and self.head_dim <= 128
                and not (self.training and self.resid_drop.p > 0)
                and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
                and os.environ.get("FASTVQ_BACKEND", "auto").lower() in ("auto", "cpp"))
        return _cpp_op("sliding_window_decode_qkv") if fits else None

    def _masked_attention(self, q, k, v, past_len: int) -> torch.Tensor:
        """minGPT's explicit softmax (with attn_drop on the probabilities) under the window rule;
        the n queries sit at positions past_len .. past_len + n - 1 of the S keys."""
        n, s = q.shape[2], k.shape[2]
        offset = (torch.arange(n, device=q.device)[:, None] + past_len) - torch.arange(s, device=q.device)[None, :]
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        att = att.masked_fill((offset < 0) | (offset >= self.window), float("-inf"))
        return self.attn_drop(F.softmax(att, dim=-1)) @ v

    def _attend_past(self, q, k_all, v_all) -> torch.Tensor:
        """New queries against a linear cache (past + new). A linear cache of S entries is a ring of
        S slots that has never wrapped, so the decode op applies whenever its slot rule
        S >= window + n - 1 holds, with the window capped at S (a wider one sees the same keys).
        The decode kernels have no backward, so a call that needs gradients takes the masked path."""
        n, s = q.shape[2], k_all.shape[2]
        window = min(self.window, s)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_all, v_all))
        if needs_grad or self._dropout_active() or s < window + n - 1:
            return self._masked_attention(q, k_all, v_all, s - n)
        return sliding_window_decode(q, k_all, v_all, s - n, window)

    def _dropout_active(self) -> bool:
        return self.training and self.attn_drop.p > 0

    def _positions(self, start_pos, n: int, device) -> torch.Tensor | None:
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
        q, k, v = self._qkv(x, self._positions(past_len if start_pos is None else start_pos, t, x.device))
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
        """One cached decode step: x (B, n, n_embd) holds the tokens at absolute positions
        pos .. pos + n - 1 (pos an int or a 0-dim integer tensor on x's device, which keeps the
        step free of host syncs). Their keys/values (rotated, with rope) are written IN PLACE into
        slots (pos + i) % S of cache_k / cache_v (B, n_head, S, head_dim), then the n queries attend
        through fastvq.sliding_window_decode. S >= window + n - 1 (S = window for one token a step).
        Everything is checked before the cache is touched. On CPU in fp32 without rope the
        writes and the attention are one op on the stacked q/k/v product (_fused_step_kernel).
        Meant for inference (torch.no_grad());
        no attention dropout. Returns y (B, n, n_embd).

        Feeding a sequence token by token from pos = 0 gives the same outputs as forward on the
        whole sequence, however long it is, with memory fixed at S slots.
        """
        self._check_x(x)
        b, n, _ = x.shape
        for name, c in (("cache_k", cache_k), ("cache_v", cache_v)):
            expected = (b, self.n_head, self.head_dim)
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or (c.shape[0], c.shape[1], c.shape[3]) != expected:
                raise ValueError(f"SlidingWindowSelfAttention.forward_cached: {name} must be (B={b}, n_head={self.n_head}, "
                                 f"S, head_dim={self.head_dim}), got "
                                 f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if cache_v.shape != cache_k.shape:
            raise ValueError(f"SlidingWindowSelfAttention.forward_cached: cache_v has shape {tuple(cache_v.shape)} "
                             f"but cache_k has {tuple(cache_k.shape)}; they must match")
        slots = cache_k.shape[2]
        if slots < self.window + n - 1:
            raise ValueError(f"SlidingWindowSelfAttention.forward_cached: the cache has {slots} slots but {n} new tokens "
                             f"with window {self.window} need window + n - 1 = {self.window + n - 1}")
        if cache_k.device != x.device or cache_v.device != x.device:
            raise ValueError(f"SlidingWindowSelfAttention.forward_cached: the caches must be on x's device ({x.device})")
        if isinstance(pos, torch.Tensor):
            if pos.dim() != 0 or pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
                raise TypeError(f"SlidingWindowSelfAttention.forward_cached: pos must be an int or a 0-dim integer tensor, "
                                f"got {pos.dtype} of shape {tuple(pos.shape)}")
            pos = pos.to(x.device)
        else:
            pos = _check_int("pos", pos, 0)
        fused = self._fused_step_kernel(x, cache_k)
        if fused is not None:
            qkv_weight, qkv_bias, proj_weight = self._decode_weights()
            qkv = linear_for_decoding(x, qkv_weight, qkv_bias).view(b, n, 3, self.n_head, self.head_dim)
            pos = pos if isinstance(pos, torch.Tensor) else torch.tensor(pos)
            y = fused(qkv, cache_k, cache_v, pos, self.window, self.head_dim ** -0.5)
            return linear_for_decoding(y, proj_weight, self.proj.bias)
        positions = torch.as_tensor(pos, device=x.device).long() + torch.arange(n, device=x.device)
        q, k, v = self._qkv_step(x, positions)  # nothing written yet: a dtype mismatch still leaves the cache as it was
        if cache_k.dtype != k.dtype or cache_v.dtype != k.dtype:
            raise TypeError(f"SlidingWindowSelfAttention.forward_cached: the caches are {cache_k.dtype}/{cache_v.dtype} "
                            f"but the new keys/values are {k.dtype}; they must match")
        slot_index = torch.remainder(positions, slots)
        cache_k.index_copy_(2, slot_index, k)
        cache_v.index_copy_(2, slot_index, v)
        return self._output_step(sliding_window_decode(q, cache_k, cache_v, pos, self.window))
