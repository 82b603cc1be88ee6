"""RasterWindowSelfAttention and RasterKVCache: 2-D window attention over a code grid in raster
order (fastvq.raster_window_attention), with a cached decode that advances several rows at once.

A sequence is n_prefix prefix tokens (class / start) followed by a grid, `width` tokens a row.
Grid token (i, j) sees the prefix, the `rows` rows above it between columns j - left and j + right,
and its own row from j - left to itself. Queries and keys of grid tokens are turned by a 2-D
rotary embedding (fastvq.axial_rope: half the dims by the row, half by the column), so a score
depends only on the 2-D offset and a key computed once stays valid wherever the window moves.
Prefix tokens are not rotated (a grid token's score against them depends on its own position).

Decoding (forward_cached): keys and values live in a RasterKVCache, a ring of `ring_rows` image
rows x width per layer (+ the prefix), row i in ring row i % ring_rows: memory proportional to the
width, independent of the image height. The tokens of one step may sit on different rows (the
wavefront: row i runs right + 1 columns behind row i - 1), and the cache checks on the host, before
anything is written, that every key a new token needs is in the ring and that no row still needed
is overwritten; that host check stands in for fastvq.raster_window_decode's own position check,
which would read the index tensors back from the device every layer. A model's decode step (GPT2D.step) uses _step instead: the same ring writes and
attention, with q/k/v in one product on stacked weight copies and the output projection through
fastvq's decode_linear (decode_weights(), as SlidingWindowSelfAttention's).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .._checks import check_int, check_prob
from ..ops.raster_window import Geometry, decode_qkv_kernel, raster_window_attention
from ..ops.rope import apply_axial_rope, axial_rope_tables
from .decode_state import AttentionDecodeWeights, attention_decode_weights

_WHERE = "RasterWindowSelfAttention"


class RasterStep(NamedTuple):
    """What every layer of one decode step shares, computed once for the step (step_context):
    the positions on the device, the axial rope tables and the kernels."""
    rows_idx: torch.Tensor
    cols_idx: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor]
    linear: Callable | None  # a decode_linear KERNELS entry (_step), None for forward_cached
    decode_qkv: Callable     # raster_window's decode_qkv entry, on checked arguments


class RasterKVCache:
    """Per-layer rings for raster decoding: k and v (n_layer, B, n_kv_head, n_prefix + ring_rows *
    width, head_dim), and on the host which image row each ring row holds and how many of its
    columns are written (columns are written left to right)."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, *, width: int, ring_rows: int,
                 n_prefix: int = 0, device=None, dtype: torch.dtype = torch.float32):
        where = "RasterKVCache"
        self.width = check_int(where, "width", width, 1)
        self.ring_rows = check_int(where, "ring_rows", ring_rows, 1)
        self.n_prefix = check_int(where, "n_prefix", n_prefix, 0)
        shape = (check_int(where, "n_layer", n_layer, 1), check_int(where, "batch_size", batch_size, 1),
                 check_int(where, "n_head", n_head, 1), self.n_prefix + self.ring_rows * self.width,
                 check_int(where, "head_dim", head_dim, 1))
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.reset()

    def reset(self) -> None:
        """Forget what was written (the buffers keep their values: unwritten slots are never read)."""
        self.prefix_written = 0
        self.row_held = [-1] * self.ring_rows      # image row in each ring row
        self.columns_written = [0] * self.ring_rows

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def _filled(self, row: int) -> int:
        """Columns of image row `row` present in the ring (0 when another row occupies its ring row)."""
        r = row % self.ring_rows
        return self.columns_written[r] if self.row_held[r] == row else 0

    def check_step(self, positions: list[tuple[int, int]], *, rows: int, left: int, right: int) -> None:
        """Raise ValueError (writing nothing) unless the grid tokens `positions` [(i, j), ...], in
        raster order within each row, can be decoded now: the prefix is written; each row's new
        columns continue where it stopped; every token finds the columns up to j + right of the
        rows above it; no ring row still needed by a token of this step is taken by a new row."""
        where = "RasterKVCache"
        if self.prefix_written < self.n_prefix:
            raise ValueError(f"{where}: the prefix ({self.n_prefix} tokens) must be written first (prefill), "
                             f"{self.prefix_written} are")
        if not positions:
            return
        lowest = min(i for i, _ in positions)
        next_col: dict[int, int] = {}
        for i, j in positions:
            if not (0 <= j < self.width) or i < 0:
                raise ValueError(f"{where}: position ({i}, {j}) is outside a grid of width {self.width}")
            expected = next_col.get(i, self._filled(i))
            if j != expected:
                raise ValueError(f"{where}: row {i} continues at column {expected}, got column {j} "
                                 "(each row is decoded left to right)")
            next_col[i] = j + 1
            if j == 0 and i - self.ring_rows >= lowest - rows and i >= self.ring_rows:
                raise ValueError(f"{where}: starting row {i} would overwrite row {i - self.ring_rows}, which row "
                                 f"{lowest} still needs (ring_rows = {self.ring_rows}; this wavefront needs at least "
                                 f"{i - lowest + rows + 1})")
            for above in range(max(0, i - rows), i):
                need = min(self.width, j + right + 1)
                if self._filled(above) < need:
                    raise ValueError(f"{where}: token ({i}, {j}) needs row {above} up to column {need - 1}, but only "
                                     f"{self._filled(above)} of its columns are in the ring (the wavefront must lag "
                                     f"right + 1 = {right + 1} columns behind the row above)")

    def commit(self, positions: list[tuple[int, int]]) -> None:
        """Record that the tokens at `positions` were written (after check_step and the writes)."""
        for i, j in positions:
            r = i % self.ring_rows
            if j == 0:
                self.row_held[r], self.columns_written[r] = i, 0
            self.columns_written[r] = j + 1

    def __repr__(self) -> str:
        n, b, h, s, d = self.k.shape
        return (f"RasterKVCache(n_layer={n}, batch_size={b}, n_head={h}, width={self.width}, ring_rows={self.ring_rows}, "
                f"n_prefix={self.n_prefix}, head_dim={d}, dtype={self.k.dtype})")


def wavefront_steps(height: int, width: int, lag: int):
    """Decode steps for a height x width grid where row i runs `lag` columns behind row i - 1
    (lag = right + 1 is the smallest the window allows), one list a step, made as they are needed
    (a 4096-row grid's schedule is never held whole): step s holds (i, s - i * lag) for every row
    with that column inside the grid, in raster order. width + (height - 1) * lag steps in all
    (lag >= width degenerates to one token a step)."""
    lag = max(1, min(lag, width))
    for s in range(width + (height - 1) * lag):
        first = max(0, -(-(s - width + 1) // lag))  # rows whose column s - i * lag is still < width
        last = min(height - 1, s // lag)  # rows that have started
        yield [(i, s - i * lag) for i in range(first, last + 1)]


def wavefront_schedule(height: int, width: int, lag: int) -> list[list[tuple[int, int]]]:
    """wavefront_steps as a list."""
    return list(wavefront_steps(height, width, lag))


def wavefront_lanes(height: int, width: int, lag: int) -> int:
    """The most positions any wavefront step holds: rows in flight at once."""
    lag = max(1, min(lag, width))
    return min(height, -(-width // lag))


def grid_positions(seq_len: int, width: int, n_prefix: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_idx, cols_idx) of the grid tokens of a sequence of seq_len tokens (the prefix excluded)."""
    g = torch.arange(max(seq_len - n_prefix, 0), device=device)
    return torch.div(g, width, rounding_mode="floor"), torch.remainder(g, width)


class RasterWindowSelfAttention(nn.Module):
    """Multi-head 2-D window self-attention over a raster-order code grid: x (B, T, n_embd) ->
    (B, T, n_embd), T = n_prefix + grid tokens. Parameters named as SlidingWindowSelfAttention's
    (query, key, value, proj), key/value with n_kv_head heads (grouped-query attention)."""

    def __init__(self, n_embd: int, n_head: int, *, rows: int, left: int, right: int, n_kv_head: int | None = None,
                 attn_pdrop: float = 0.0, resid_pdrop: float = 0.0):
        super().__init__()
        n_embd, n_head = check_int(_WHERE, "n_embd", n_embd, 1), check_int(_WHERE, "n_head", n_head, 1)
        n_kv_head = n_head if n_kv_head is None else check_int(_WHERE, "n_kv_head", n_kv_head, 1)
        if n_embd % n_head or n_head % n_kv_head:
            raise ValueError(f"{_WHERE}: n_embd ({n_embd}) must be a multiple of n_head ({n_head}) and n_head a "
                             f"multiple of n_kv_head ({n_kv_head})")
        if (n_embd // n_head) % 4:
            raise ValueError(f"{_WHERE}: the head size n_embd // n_head must be a multiple of 4 (2-D rotary), got "
                             f"{n_embd // n_head}")
        self.n_embd, self.n_head, self.n_kv_head, self.head_dim = n_embd, n_head, n_kv_head, n_embd // n_head
        self.rows, self.left, self.right = (check_int(_WHERE, name, value, 0)
                                            for name, value in (("rows", rows), ("left", left), ("right", right)))
        kv = n_kv_head * self.head_dim
        self.query = nn.Linear(n_embd, n_embd)
        self.key = nn.Linear(n_embd, kv)
        self.value = nn.Linear(n_embd, kv)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_pdrop = check_prob(_WHERE, "attn_pdrop", attn_pdrop)
        self.resid_drop = nn.Dropout(check_prob(_WHERE, "resid_pdrop", resid_pdrop))
        self._decode_weights = attention_decode_weights(self)

    def extra_repr(self) -> str:
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, rows={self.rows}, "
                f"left={self.left}, right={self.right}")

    def _window(self) -> dict:
        return dict(rows=self.rows, left=self.left, right=self.right)

    def _heads(self, linear: nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return linear(x).view(b, t, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hs)

    def _qkv(self, x: torch.Tensor, n_prefix: int, rows_idx: torch.Tensor, cols_idx: torch.Tensor):
        """q, k, v of x's tokens, the grid ones (after n_prefix) turned by axial rope at (rows_idx, cols_idx)."""
        q, k = self._heads(self.query, x, self.n_head), self._heads(self.key, x, self.n_kv_head)
        v = self._heads(self.value, x, self.n_kv_head)
        if rows_idx.numel():
            tables = self.rope_tables(rows_idx, cols_idx, q.dtype, q.device)
            q = torch.cat((q[:, :, :n_prefix], apply_axial_rope(q[:, :, n_prefix:], tables)), dim=2)
            k = torch.cat((k[:, :, :n_prefix], apply_axial_rope(k[:, :, n_prefix:], tables)), dim=2)
        return q, k, v

    def rope_tables(self, rows_idx: torch.Tensor, cols_idx: torch.Tensor, dtype: torch.dtype, device):
        """axial_rope's tables for this module's heads at these positions, for tensors of `dtype`
        (the same for every layer of a model: a decode step computes them once)."""
        return axial_rope_tables(rows_idx, cols_idx, self.head_dim, dtype=torch.promote_types(dtype, torch.float32),
                                 device=device)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, self.n_embd)))

    def _check_x(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.n_embd:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{_WHERE}: x must be (B, T, n_embd={self.n_embd}), got {shape}")

    def forward(self, x: torch.Tensor, *, width: int, n_prefix: int = 0) -> torch.Tensor:
        """x (B, T, n_embd), T = n_prefix + grid tokens in raster order, `width` a row -> (B, T, n_embd).

        With attn_pdrop > 0 in training, dropout on the attention probabilities needs them
        materialised: not supported by the fused op (set attn_pdrop = 0; resid_pdrop works)."""
        self._check_x(x)
        if self.training and self.attn_pdrop > 0:
            raise ValueError(f"{_WHERE}: attn_pdrop > 0 is not supported in training (the fused kernels never "
                             "materialise the probabilities); use resid_pdrop")
        width, n_prefix = check_int(_WHERE, "width", width, 1), check_int(_WHERE, "n_prefix", n_prefix, 0)
        rows_idx, cols_idx = grid_positions(x.shape[1], width, n_prefix, x.device)
        q, k, v = self._qkv(x, n_prefix, rows_idx, cols_idx)
        y = raster_window_attention(q, k, v, width=width, n_prefix=min(n_prefix, x.shape[1]), **self._window())
        return self._output(y)

    # ------------------------------------------------------------------------- decoding

    def new_cache(self, batch_size: int, width: int, *, ring_rows: int | None = None, n_prefix: int = 0,
                  n_layer: int = 1, device=None, dtype=None) -> RasterKVCache:
        """A RasterKVCache for this module: ring_rows defaults to rows + 1 + rows of lag room (enough
        for a wavefront of up to rows + 1 rows at once)."""
        p = self.key.weight
        ring_rows = 2 * self.rows + 2 if ring_rows is None else ring_rows
        return RasterKVCache(n_layer, batch_size, self.n_kv_head, self.head_dim, width=width, ring_rows=ring_rows,
                             n_prefix=n_prefix, device=device or p.device, dtype=dtype or p.dtype)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, cache: RasterKVCache, layer: int = 0) -> torch.Tensor:
        """Run the prefix x (B, n_prefix, n_embd) (causal among itself), write its keys/values into
        the cache's prefix slots, and return its outputs. Record it with cache.prefix_written =
        n_prefix after every layer has run (GPT2D does)."""
        self._check_x(x)
        if x.shape[1] != cache.n_prefix:
            raise ValueError(f"{_WHERE}.prefill: x must hold the cache's {cache.n_prefix} prefix tokens, got {x.shape[1]}")
        empty = torch.empty(0, dtype=torch.long, device=x.device)
        q, k, v = self._qkv(x, x.shape[1], empty, empty)
        ring_k, ring_v = cache[layer]
        ring_k[:, :, :cache.n_prefix] = k
        ring_v[:, :, :cache.n_prefix] = v
        y = raster_window_attention(q, k, v, width=cache.width, n_prefix=x.shape[1], **self._window())
        return self._output(y)

    @torch.no_grad()
    def forward_cached(self, x: torch.Tensor, cache: RasterKVCache, rows_idx: torch.Tensor, cols_idx: torch.Tensor,
                       layer: int = 0) -> torch.Tensor:
        """One decode step of n grid tokens x (B, n, n_embd) at (rows_idx[t], cols_idx[t]), possibly on
        different rows (a wavefront). Checks the step against the cache first (nothing is written
        on a refused call), writes the tokens' rotated keys and values into their ring slots, then
        attends (fastvq.raster_window_decode_qkv's kernel). Call cache.commit(positions) once every layer has run
        the step. Returns (B, n, n_embd)."""
        self._check_x(x)
        for name, idx in (("rows_idx", rows_idx), ("cols_idx", cols_idx)):  # before anything is written
            if (not isinstance(idx, torch.Tensor) or idx.shape != (x.shape[1],) or idx.dtype.is_floating_point
                    or idx.dtype.is_complex or idx.dtype == torch.bool):
                got = (idx.dtype, tuple(idx.shape)) if isinstance(idx, torch.Tensor) else type(idx).__name__
                raise ValueError(f"{_WHERE}.forward_cached: {name} must be an integer tensor of shape "
                                 f"({x.shape[1]},), one index per token of x, got {got}")
        positions = list(zip(rows_idx.tolist(), cols_idx.tolist()))
        cache.check_step(positions, **self._window())
        ring_k, ring_v = cache[layer]
        if ring_k.shape[0] != x.shape[0] or ring_k.dtype != x.dtype or ring_k.device != x.device:
            raise ValueError(f"{_WHERE}.forward_cached: the cache is batch {ring_k.shape[0]}, {ring_k.dtype} on "
                             f"{ring_k.device}; x is batch {x.shape[0]}, {x.dtype} on {x.device}")
        step = self.step_context(rows_idx, cols_idx, x.dtype, x.device, None)
        b, n, _ = x.shape
        qkv = torch.cat([lin(x).unflatten(-1, (-1, self.head_dim)) for lin in (self.query, self.key, self.value)],
                        dim=2)
        return self.resid_drop(self.proj(self._write_and_attend(qkv, cache, step, layer)))

    def step_context(self, rows_idx: torch.Tensor, cols_idx: torch.Tensor, dtype: torch.dtype, device,
                     linear: Callable | None) -> RasterStep:
        """The RasterStep of positions the cache has checked (cache.check_step), for tensors of
        `dtype` on `device`: every layer of a model with this module's head size and window shares it."""
        rows_idx, cols_idx = rows_idx.to(device), cols_idx.to(device)
        return RasterStep(rows_idx, cols_idx, self.rope_tables(rows_idx, cols_idx, dtype, device), linear,
                          decode_qkv_kernel(device, _WHERE))

    def _write_and_attend(self, qkv: torch.Tensor, cache: RasterKVCache, step: RasterStep, layer: int) -> torch.Tensor:
        """The step's attention on its stacked product qkv (B, n, H + 2 H_kv, hs), not yet turned:
        queries and keys turned by the step's rope tables, keys and values written into their ring
        slots, attention over the ring (fastvq.raster_window_decode_qkv's kernel). Returns
        (B, n, H * hs).

        Every argument was checked once for the step: the positions on the host by cache.check_step
        (on the grid, in the ring), shapes, dtype and device against the cache by the caller. So the
        kernel runs without raster_window_decode_qkv's checks (whose position check reads the index
        tensors back, a GPU sync every layer)."""
        ring_k, ring_v = cache[layer]
        geometry = Geometry(cache.width, self.rows, self.left, self.right, cache.n_prefix)
        return step.decode_qkv(qkv, ring_k, ring_v, step.rows_idx, step.cols_idx, geometry, self.head_dim ** -0.5,
                               step.tables)

    # ------------------------------------------------------------------------- decode step on decode_linear

    def decode_weights(self) -> AttentionDecodeWeights:
        """The tensors _step reads: query/key/value weights stacked ((n_embd + 2 kv) x n_embd) and
        the output projection, copies (on CPU in huge pages) rebuilt when a parameter changes
        (fastvq.nn.decode_state); `self._decode_weights.invalidate()` frees them."""
        return self._decode_weights.get()

    def _step(self, x: torch.Tensor, cache: RasterKVCache, step: RasterStep, layer: int,
              weights: AttentionDecodeWeights, residual: torch.Tensor | None = None) -> torch.Tensor:
        """forward_cached's step on arguments the caller checked once for every layer (cache.check_step,
        the cache's batch, dtype and device), its products through `linear` (a fastvq decode_linear
        KERNELS entry: the step's tokens as one small batch, each weight read once): q/k/v in one
        product on the stacked weights, then residual + proj(attention). x (B, n, n_embd); `step` from
        step_context on x's dtype and device. Returns (B, n, n_embd)."""
        qkv = step.linear(x, weights.qkv_weight, weights.qkv_bias, None, None)
        y = self._write_and_attend(qkv.unflatten(-1, (-1, self.head_dim)), cache, step, layer)
        return step.linear(y, weights.proj_weight, weights.proj_bias, residual, None)
