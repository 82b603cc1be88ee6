"""KVCache: preallocated key/value buffers for cached decoding, one ring per layer.

Every layer owns a (B, n_head, slots, head_dim) key buffer and a value buffer of the same shape,
views into two (n_layer, B, n_head, slots, head_dim) tensors allocated once. A decode step writes
the keys/values of absolute position p IN PLACE into slot p % slots
(SlidingWindowSelfAttention.forward_cached): no torch.cat and no reallocation per step, so the
memory is fixed however long the sequence grows, and every step sees tensors of the same shapes at
the same addresses with the position a tensor - what torch.compile / CUDA graph capture need.

How many slots:
  * a sliding window of W: W slots (one new token a step; n new tokens at once need W + n - 1);
    the ring keeps exactly the keys a query can still see;
  * full causal attention over block_size positions: block_size slots (the window is block_size).
Slots that were never written (or hold another sequence's keys) are masked by position in the
decode op, so a cache can be reused for a new sequence without zeroing it. Stale slots holding NaN
or inf (a sequence that diverged, a cache from torch.empty) are kept out of the result by the torch
decode, the Triton decode kernel and both cpp decode paths (a masked slot's value enters as zeros,
never as 0 * NaN; tests/test_nonfinite.py checks every backend).
"""
from __future__ import annotations

import torch

from .._checks import check_int


class KVCache:
    """Per-layer ring buffers: cache[i] is layer i's (k, v), each (B, n_head, slots, head_dim)."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, slots: int, *,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = tuple(check_int("KVCache", name, value, 1) for name, value in
                      (("n_layer", n_layer), ("batch_size", batch_size), ("n_head", n_head),
                       ("slots", slots), ("head_dim", head_dim)))
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"KVCache: dtype must be a floating torch.dtype, got {dtype!r}")
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def n_layer(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def __len__(self) -> int:
        return self.n_layer

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def __iter__(self):
        return (self[i] for i in range(self.n_layer))

    def reset(self) -> None:
        """Zero the buffers in place (not needed for finite stale slots, which are masked by position;
        see the module docstring for stale NaN)."""
        self.k.zero_()
        self.v.zero_()

    def __repr__(self) -> str:
        n, b, h, s, d = self.k.shape
        return (f"KVCache(n_layer={n}, batch_size={b}, n_head={h}, slots={s}, head_dim={d}, "
                f"dtype={self.k.dtype}, device={self.k.device})")
