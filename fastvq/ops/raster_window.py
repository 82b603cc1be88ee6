"""Raster-order 2-D window attention over an image's code grid.

Public:
  raster_window_attention(q, k, v, *, width, rows, left, right, n_prefix=0, scale=None, backend=None) -> out
  raster_window_attention_reference / _backward_reference: the torch oracles (out, lse) / (dq, dk, dv)
  raster_window_visible(query_pos, key_pos, *, width, rows, left, right, n_prefix): the rule as a mask
  raster_window_decode(q, k_ring, v_ring, rows_idx, cols_idx, *, width, rows, left, right, n_prefix=0,
                       scale=None, backend=None, check_positions=True) -> out: new grid queries (a
                       wavefront) against a ring
  raster_window_decode_reference: its torch oracle
  raster_window_decode_qkv(qkv, k_ring, v_ring, rows_idx, cols_idx, *, width, rows, left, right,
                           n_prefix=0, rope=None, scale=None, backend=None) -> out: a decoding
                           model's whole attention step on its stacked q/k/v product (rope, ring
                           writes, attention, output layout), as sliding_window_decode_qkv in 1-D
  raster_window_decode_qkv_reference: its torch oracle
  (its 2-D rotary embedding, axial_rope, is in fastvq.ops.rope)
  KERNELS: the per-backend entry points (unchecked)

The sequence: the first n_prefix tokens are a prefix (class / start tokens), causal among
themselves and visible to every later token. The other T - n_prefix tokens are a grid in raster
order, `width` tokens a row (the last row may be partial); grid token t is (i, j) with
i = (t - n_prefix) // width, j = (t - n_prefix) % width. Grid token (i, j) sees grid key (i', j') iff
    i - rows <= i' < i  and  j - left <= j' <= j + right      (the band of rows above)
 or i' == i             and  j - left <= j' <= j              (itself and the tokens before it in its row)
Columns outside [0, width) do not exist (the window is truncated at the borders, never wrapped).
With rows = left = 8, right = 7 this is taming's interior 16 x 16 crop context, the same rule at
every position. Every key seen comes earlier in raster order (j + right on row i - 1 precedes
(i, j)), so the rule is causal and every query sees at least itself.

Backend contract (RasterKernels): forward(q, k, v, geometry, scale) -> (out, lse fp32 (B, H, T));
backward(grad_out, q, k, v, out, lse, geometry, scale) -> (dq, dk, dv); decode(q, k_ring, v_ring,
rows_idx, cols_idx, geometry, scale) -> out (int64 indices, already checked to lie on the grid);
decode_qkv(qkv, k_ring, v_ring, rows_idx, cols_idx, geometry, scale, rope) -> out (B, n, H * Dh),
the rings written in place (rope: None or axial_rope_tables' (cos, sin));
geometry is a Geometry (width, rows, left, right, n_prefix). Work is O(T * (rows * (left + right + 1) + left + 1)) in
the fast backends; the torch reference is chunked (O(chunk * (rows + 1) * width) memory).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._backend import cpp_op, requested_backend, resolve_backend
from .._checks import check_int, check_tensor
from .masked_attention import (CHUNK, MaskedAttentionFunction, MaskRule, expand_kv, masked_attention_backward,
                               masked_attention_forward)
from .rope import apply_axial_rope
from .window_attention import _check_heads, _check_scale, _check_tensors

class Geometry(NamedTuple):
    """The window's shape on the grid (all checked ints)."""
    width: int
    rows: int
    left: int
    right: int
    n_prefix: int


# ----------------------------------------------------------------------------- checks

def _check_geometry(op: str, seq_len: int, width, rows, left, right, n_prefix) -> Geometry:
    geometry = Geometry(check_int(op, "width", width, 1), check_int(op, "rows", rows, 0),
                        check_int(op, "left", left, 0), check_int(op, "right", right, 0),
                        check_int(op, "n_prefix", n_prefix, 0))
    if geometry.n_prefix > seq_len:
        raise ValueError(f"{op}: n_prefix ({geometry.n_prefix}) must be at most the sequence length T = {seq_len}")
    return geometry


def _check_positions(op: str, rows_idx: torch.Tensor, cols_idx: torch.Tensor, width: int) -> None:
    """Every query on the grid: row >= 0, column in [0, width). Checked here for every backend (the
    kernels trust it); on a GPU this one reduction is a sync with the host, which a caller that
    checked the positions on the host already skips (raster_window_decode's check_positions)."""
    bad = (rows_idx < 0) | (cols_idx < 0) | (cols_idx >= width)
    if bad.numel() and bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: query {t} is at (rows_idx, cols_idx) = ({int(rows_idx[t])}, {int(cols_idx[t])}); "
                         f"rows_idx must be >= 0 and cols_idx in [0, width = {width})")


def _check_ring_and_indices(op: str, k_ring, rows_idx, cols_idx, n: int, device, per: str, on: str,
                            width, rows, left, right, n_prefix) -> Geometry:
    """The decode ops' checks of the ring's slot count and of the (n,) index tensors (one per
    `per` on `on`'s device); returns the checked Geometry."""
    geometry = _check_geometry(op, k_ring.shape[2], width, rows, left, right, n_prefix)
    ring_rows, rest = divmod(k_ring.shape[2] - geometry.n_prefix, geometry.width)
    if rest or ring_rows <= geometry.rows:
        raise ValueError(f"{op}: k_ring must hold n_prefix + ring_rows * width slots with ring_rows > rows = "
                         f"{geometry.rows}, got {k_ring.shape[2]} slots for n_prefix {geometry.n_prefix}, width {geometry.width}")
    for name, idx in (("rows_idx", rows_idx), ("cols_idx", cols_idx)):
        check_tensor(op, name, idx, ("n",), (torch.int64, torch.int32))
        if idx.shape[0] != n or idx.device != device:
            raise ValueError(f"{op}: {name} must hold one index per {per} ({n}) on {on}'s device, got "
                             f"{tuple(idx.shape)} on {idx.device}")
    return geometry


# ----------------------------------------------------------------------------- the rule and the torch reference

def raster_window_visible(query_pos: torch.Tensor, key_pos: torch.Tensor, *, width: int, rows: int, left: int,
                          right: int, n_prefix: int = 0) -> torch.Tensor:
    """(queries, keys) boolean mask of the rule from absolute positions (int64 tensors)."""
    q, k = query_pos[:, None], key_pos[None, :]
    qg, kg = q - n_prefix, k - n_prefix
    q_grid, k_grid = qg >= 0, kg >= 0
    qi, qj = torch.div(qg, width, rounding_mode="floor"), torch.remainder(qg, width)
    ki, kj = torch.div(kg, width, rounding_mode="floor"), torch.remainder(kg, width)
    cols_left = kj >= qj - left
    band = (ki >= qi - rows) & (ki < qi) & cols_left & (kj <= qj + right)
    own_row = (ki == qi) & cols_left & (kj <= qj)
    grid_sees = ~k_grid | band | own_row             # a grid query sees the whole prefix
    prefix_sees = ~k_grid & (k <= q)                 # a prefix query: causal among the prefix
    return torch.where(q_grid, grid_sees, prefix_sees)


def _rule(g: Geometry) -> MaskRule:
    def keys_for(a: int, b: int) -> torch.Tensor:
        prefix = torch.arange(min(g.n_prefix, b))
        first_row = max(a - g.n_prefix, 0) // g.width
        lo = g.n_prefix + max(first_row - g.rows, 0) * g.width
        return torch.cat((prefix, torch.arange(max(lo, g.n_prefix), b)))

    return MaskRule(lambda rows, keys: raster_window_visible(rows, keys, **g._asdict()), keys_for)


def raster_window_attention_reference(q, k, v, geometry: Geometry, scale: float, chunk: int = CHUNK):
    """The oracle: (out, lse), masked softmax in fp32 a chunk of queries at a time against the
    prefix and the rows their window can reach (runs at T = 16384)."""
    return masked_attention_forward(q, k, v, scale, _rule(geometry), chunk)


def raster_window_attention_backward_reference(grad_out, q, k, v, out, lse, geometry: Geometry, scale: float,
                                               chunk: int = CHUNK):
    return masked_attention_backward(grad_out, q, k, v, out, lse, scale, _rule(geometry), chunk)


# ----------------------------------------------------------------------------- decode against a ring of image rows

# The decode ring: slots [0, n_prefix) hold the prefix, then ring_rows image rows of `width` slots:
# grid token (i, j) lives in slot n_prefix + (i % ring_rows) * width + j, written in place.

def ring_slots(rows_idx: torch.Tensor, cols_idx: torch.Tensor, width: int, ring_rows: int, n_prefix: int) -> torch.Tensor:
    """The ring slot of each grid token (i, j)."""
    return n_prefix + torch.remainder(rows_idx, ring_rows) * width + cols_idx


def ring_visible(rows_idx: torch.Tensor, cols_idx: torch.Tensor, slots: int, g: Geometry) -> torch.Tensor:
    """(n, slots) mask: which ring slots each query (i, j) reads. A grid slot in ring row r holds
    the latest image row i' <= i with i' % ring_rows == r (the caller keeps that invariant: rows
    i - rows .. i never share a ring row, and what a query needs was written before it attends)."""
    ring_rows = (slots - g.n_prefix) // g.width
    s = torch.arange(slots, device=rows_idx.device)
    r, c = torch.div(s - g.n_prefix, g.width, rounding_mode="floor"), torch.remainder(s - g.n_prefix, g.width)
    i, j = rows_idx[:, None], cols_idx[:, None]
    held = i - torch.remainder(i - r[None, :], ring_rows)  # the image row slot s holds, as seen from row i
    cols_left = c[None, :] >= j - g.left
    band = (held >= i - g.rows) & (held < i) & cols_left & (c[None, :] <= j + g.right)
    own_row = (held == i) & cols_left & (c[None, :] <= j)
    return (s[None, :] < g.n_prefix) | ((s[None, :] >= g.n_prefix) & (held >= 0) & (band | own_row))


def raster_window_decode_reference(q, k_ring, v_ring, rows_idx, cols_idx, geometry: Geometry, scale: float):
    """The decode oracle: dense masked softmax of the n queries over every ring slot (fp32)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    heads = q.shape[1]
    kf, vf = expand_kv(k_ring, heads).to(acc), expand_kv(v_ring, heads).to(acc)
    s = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~ring_visible(rows_idx, cols_idx, k_ring.shape[2], geometry), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vf).to(q.dtype)


def _decode_qkv_with(decode: Callable) -> Callable:
    """decode_qkv composed of torch ops and a backend's decode: split the heads, turn queries and
    keys by the rope tables, write keys and values into their ring slots, attend."""
    def run(qkv, k_ring, v_ring, rows_idx, cols_idx, geometry: Geometry, scale: float, rope):
        b, n, _, d = qkv.shape
        hk = k_ring.shape[1]
        q, k, v = qkv.split((qkv.shape[2] - 2 * hk, hk, hk), dim=2)  # (B, n, heads, Dh)
        if rope is not None:
            cos, sin = rope
            q, k = (apply_axial_rope(x, (cos[:, None], sin[:, None])) for x in (q, k))
        ring_rows = (k_ring.shape[2] - geometry.n_prefix) // geometry.width
        slots = ring_slots(rows_idx, cols_idx, geometry.width, ring_rows, geometry.n_prefix)
        k_ring.index_copy_(2, slots, k.transpose(1, 2))
        v_ring.index_copy_(2, slots, v.transpose(1, 2))
        out = decode(q.transpose(1, 2), k_ring, v_ring, rows_idx, cols_idx, geometry, scale)
        return out.transpose(1, 2).reshape(b, n, q.shape[2] * d)  # no -1: B or n may be 0
    return run


raster_window_decode_qkv_reference = _decode_qkv_with(raster_window_decode_reference)
raster_window_decode_qkv_reference.__doc__ = (
    "The decode_qkv oracle: apply_axial_rope, index_copy_ into the rings, raster_window_decode_reference.")


# ----------------------------------------------------------------------------- backends

class RasterKernels(NamedTuple):
    forward: Callable
    backward: Callable
    decode: Callable
    decode_qkv: Callable


def _triton(name: str) -> Callable:
    """fastvq.kernels.raster_window.<name>, imported at the first call (triton is optional)."""
    def run(*args):
        from fastvq.kernels import raster_window

        return getattr(raster_window, name)(*args)
    return run


def _cpp(name: str) -> Callable:
    """torch.ops.fastvq.<name> (csrc/raster_window.cpp) with the Geometry spread into its ints."""
    def run(*args):
        *tensors, geometry, scale = args
        return cpp_op(name)(*tensors, *geometry, scale)
    return run


_EMPTY = torch.empty(0)


def _decode_qkv_cpp(qkv, k_ring, v_ring, rows_idx, cols_idx, geometry: Geometry, scale: float, rope):
    """The cpp kernel's one-call step for fp32 with head sizes that are multiples of 16 on contiguous
    rings; other steps compose the ring writes with the general cpp decode."""
    if (qkv.dtype == torch.float32 and k_ring.dtype == torch.float32 and qkv.shape[3] % 16 == 0
            and k_ring.is_contiguous() and v_ring.is_contiguous()):
        cos, sin = rope if rope is not None else (_EMPTY, _EMPTY)
        return cpp_op("raster_window_decode_qkv")(qkv, k_ring, v_ring, rows_idx, cols_idx, cos, sin, *geometry, scale)
    return _decode_qkv_cpp_composed(qkv, k_ring, v_ring, rows_idx, cols_idx, geometry, scale, rope)


_decode_qkv_cpp_composed = _decode_qkv_with(_cpp("raster_window_decode"))

KERNELS = {"torch": RasterKernels(raster_window_attention_reference, raster_window_attention_backward_reference,
                                  raster_window_decode_reference, raster_window_decode_qkv_reference),
           "cpp": RasterKernels(_cpp("raster_window_attention_fwd"), _cpp("raster_window_attention_bwd"),
                                _cpp("raster_window_decode"), _decode_qkv_cpp),
           "triton": RasterKernels(_triton("attention_forward"), _triton("attention_backward"), _triton("decode"),
                                   _decode_qkv_with(_triton("decode")))}


def _backend_for(op: str, backend: str | None, device: torch.device) -> str:
    name = resolve_backend(backend, device, op)
    if name in KERNELS:
        return name
    if requested_backend(backend) == "auto":
        return "torch"
    raise NotImplementedError(f"{op}: backend {name!r} has no kernel for this op yet (available: {sorted(KERNELS)})")


def decode_qkv_kernel(device: torch.device, where: str) -> Callable:
    """The decode_qkv entry the dispatch rule picks on `device` (FASTVQ_BACKEND applies), called as
    kernel(qkv, k_ring, v_ring, rows_idx, cols_idx, geometry, scale, rope) on arguments the caller
    checked as raster_window_decode_qkv would (RasterKVCache.check_step and the module's shape
    checks, once per model step): a small model's decode step is bound by per-call overhead, and
    these checks were a tenth of it when every layer repeated them."""
    return KERNELS[_backend_for(where, None, device)].decode_qkv


# ----------------------------------------------------------------------------- public

def raster_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, width: int, rows: int, left: int,
                            right: int, n_prefix: int = 0, scale: float | None = None,
                            backend: str | None = None) -> torch.Tensor:
    """Causal attention over a code grid in raster order, each token seeing a 2-D window.

    See the module docstring for the rule: `rows` rows above, `left` columns to the left and `right`
    to the right of the token's column, and the tokens before it in its own row; a prefix of
    n_prefix tokens is visible to all. Softmax and accumulation in fp32.

    Args:
        q: (B, H, T, Dh) float32, float16 or bfloat16, any strides; T = n_prefix + grid tokens.
        k, v: (B, H_kv, T, Dh), q's dtype and device, H a multiple of H_kv.
        width: tokens per grid row (>= 1). rows, left, right: the window (>= 0 each).
        n_prefix: prefix tokens before the grid (class / start tokens), 0 <= n_prefix <= T.
        scale: default Dh ** -0.5.
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        (B, H, T, Dh) in q's dtype, differentiable in q, k and v.

    Raises:
        TypeError / ValueError naming the argument; RuntimeError / NotImplementedError when the
        backend asked for cannot run this op here.

    Example:
        >>> q = k = v = torch.randn(1, 8, 32 * 32, 64)
        >>> out = fastvq.raster_window_attention(q, k, v, width=32, rows=8, left=8, right=7)
    """
    op = "raster_window_attention"
    _check_tensors(op, q=q, k=k, v=v)
    _check_heads(op, q, k, v, "k", "v")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: q has {q.shape[2]} positions but k has {k.shape[2]}; they must match")
    geometry = _check_geometry(op, q.shape[2], width, rows, left, right, n_prefix)
    scale = _check_scale(scale, q.shape[3], op)
    name = _backend_for(op, backend, q.device)
    out, _ = MaskedAttentionFunction.apply(q, k, v, geometry, scale, KERNELS[name], KERNELS["torch"])
    return out


def raster_window_decode(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor, rows_idx: torch.Tensor,
                         cols_idx: torch.Tensor, *, width: int, rows: int, left: int, right: int, n_prefix: int = 0,
                         scale: float | None = None, backend: str | None = None,
                         check_positions: bool = True) -> torch.Tensor:
    """Attention of n new grid queries, each at its own (i, j), against a ring of image rows.

    The ring (see ring_slots) holds the prefix in slots [0, n_prefix) and image row i in ring row
    i % ring_rows, `width` slots a row, written in place; the new queries' own keys/values are
    already written. Queries may sit at different rows and columns (a wavefront): token (i, j)
    needs row i - 1 only up to column j + right, so rows advance together with a lag of right + 1.
    The caller keeps the ring's invariant (fastvq.RasterKVCache checks it): what a query needs is
    written and not yet overwritten, which needs ring_rows >= rows + 1 + (max row - min row).

    Args:
        q: (B, H, n, Dh) float32, float16 or bfloat16.
        k_ring, v_ring: (B, H_kv, n_prefix + ring_rows * width, Dh), q's dtype and device.
        rows_idx, cols_idx: (n,) integer tensors on q's device: each query's grid row and column.
        width, rows, left, right, n_prefix: the window, as in raster_window_attention.
        scale: default Dh ** -0.5.
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".
        check_positions: True (default) checks that every (row, column) lies on the grid, which
            reads the indices on the host (on a GPU a sync every call). False skips it, for a
            caller that checked the same positions as host ints (RasterKVCache.check_step does,
            for RasterWindowSelfAttention and GPT2D.step); off-grid positions are then unchecked
            and the kernels would read outside the ring.

    Returns:
        (B, H, n, Dh) in q's dtype. Inference only.

    Raises:
        TypeError / ValueError naming the argument (shapes, a ring whose slot count is not
        n_prefix + ring_rows * width, ring_rows <= rows, indices of the wrong shape or dtype, a
        position off the grid: a row < 0 or a column outside [0, width), unless check_positions
        is False). The ring is only read.

    Example:
        >>> ring = torch.zeros(1, 8, 1 + 10 * 64, 64)   # prefix 1, 10 ring rows of width 64
        >>> q = torch.randn(1, 8, 3, 64)                 # a wavefront of three tokens
        >>> rows_idx, cols_idx = torch.tensor([2, 1, 0]), torch.tensor([0, 9, 18])
        >>> out = fastvq.raster_window_decode(q, ring, ring, rows_idx, cols_idx, width=64, rows=8, left=8,
        ...                                   right=8, n_prefix=1)
    """
    op = "raster_window_decode"
    _check_tensors(op, q=q, k_ring=k_ring, v_ring=v_ring)
    _check_heads(op, q, k_ring, v_ring, "k_ring", "v_ring")
    geometry = _check_ring_and_indices(op, k_ring, rows_idx, cols_idx, q.shape[2], q.device, "query", "q",
                                       width, rows, left, right, n_prefix)
    if check_positions:
        _check_positions(op, rows_idx, cols_idx, geometry.width)
    scale = _check_scale(scale, q.shape[3], op)
    name = _backend_for(op, backend, q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_ring, v_ring)):
        name = "torch"  # only the reference is differentiable
    return KERNELS["torch" if q.numel() == 0 else name].decode(q, k_ring, v_ring, rows_idx.long(), cols_idx.long(),
                                                             geometry, scale)


def raster_window_decode_qkv(qkv: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor, rows_idx: torch.Tensor,
                             cols_idx: torch.Tensor, *, width: int, rows: int, left: int, right: int,
                             n_prefix: int = 0, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                             scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """A decoding model's whole attention step on the stacked q/k/v product of n new grid tokens.

    The queries and keys are turned by the axial rope tables (if given), the keys and values are
    written IN PLACE into the ring slots of their (row, column) (see ring_slots), then every query
    attends as in raster_window_decode; the result is laid out as the output projection takes it.
    One call in place of the head split, the rope, two index_copy_ and the decode op: the cpp
    backend does it in one pass for fp32 with head sizes that are multiples of 16. Everything is
    checked before a ring is written. Inference only.

    Args:
        qkv: (B, n, H + 2 H_kv, Dh): each new token's H query heads, then H_kv key heads, then H_kv
            value heads, e.g. (x @ cat(Wq, Wk, Wv).T).unflatten(-1, (H + 2 H_kv, Dh)); float32,
            float16 or bfloat16.
        k_ring, v_ring: (B, H_kv, n_prefix + ring_rows * width, Dh), qkv's dtype and device.
        rows_idx, cols_idx: (n,) integer tensors on qkv's device: each token's grid row and column.
        width, rows, left, right, n_prefix: the window, as in raster_window_attention.
        rope: None, or (cos, sin) = fastvq.ops.rope.axial_rope_tables(rows_idx, cols_idx, Dh) in
            fp32 ((n, 2, Dh / 4) each): the axial rope of the queries and keys (keys are cached turned).
        scale: default Dh ** -0.5.
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        (B, n, H * Dh) in qkv's dtype.

    Raises:
        TypeError / ValueError naming the argument (shapes, dtypes, a ring whose slot count is not
        n_prefix + ring_rows * width, a position off the grid, rope tables of the wrong shape); the
        rings are untouched then. RuntimeError under grad mode with an input that requires grad.

    Example:
        >>> ring_k, ring_v = torch.zeros(1, 2, 1 + 10 * 64, 32), torch.zeros(1, 2, 1 + 10 * 64, 32)
        >>> qkv = torch.randn(1, 3, 8 + 2 * 2, 32)       # three tokens, 8 query heads, 2 kv heads
        >>> rows_idx, cols_idx = torch.tensor([2, 1, 0]), torch.tensor([0, 9, 18])
        >>> rope = fastvq.ops.rope.axial_rope_tables(rows_idx, cols_idx, 32)
        >>> out = fastvq.raster_window_decode_qkv(qkv, ring_k, ring_v, rows_idx, cols_idx, width=64, rows=8,
        ...                                       left=8, right=8, n_prefix=1, rope=rope)   # (1, 3, 256)
    """
    op = "raster_window_decode_qkv"
    check_tensor(op, "qkv", qkv, ("B", "n", "heads", "head_dim"))
    _check_tensors(op, k_ring=k_ring, v_ring=v_ring)
    if qkv.dtype != k_ring.dtype or qkv.device != k_ring.device:
        raise TypeError(f"{op}: qkv is {qkv.dtype} on {qkv.device} but k_ring is {k_ring.dtype} on {k_ring.device}; "
                        "they must match")
    b, n, heads, d = qkv.shape
    hk = k_ring.shape[1]
    if hk < 1 or heads <= 2 * hk or (heads - 2 * hk) % hk:
        raise ValueError(f"{op}: qkv's {heads} heads must be H query heads (a multiple of k_ring's {hk}) followed "
                         f"by {hk} key and {hk} value heads, got qkv of shape {tuple(qkv.shape)}")
    if v_ring.shape != k_ring.shape or k_ring.shape[0] != b or k_ring.shape[3] != d or d == 0:
        raise ValueError(f"{op}: k_ring and v_ring must both be (B={b}, H_kv, slots, Dh={d}) with Dh >= 1, got "
                         f"{tuple(k_ring.shape)} and {tuple(v_ring.shape)}")
    geometry = _check_ring_and_indices(op, k_ring, rows_idx, cols_idx, n, qkv.device, "new token", "qkv",
                                       width, rows, left, right, n_prefix)
    _check_positions(op, rows_idx, cols_idx, geometry.width)
    if rope is not None:
        if d % 4:
            raise ValueError(f"{op}: rope needs a head_dim that is a multiple of 4, got {d}")
        want = (n, 2, d // 4)
        if (not isinstance(rope, tuple) or len(rope) != 2
                or any(not isinstance(t, torch.Tensor) or t.shape != want or t.dtype != torch.float32
                       or t.device != qkv.device for t in rope)):
            raise ValueError(f"{op}: rope must be None or (cos, sin) fp32 tensors of shape {want} on qkv's device "
                             "(fastvq.ops.rope.axial_rope_tables)")
    scale = _check_scale(scale, d, op)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, k_ring, v_ring)):
        raise RuntimeError(f"{op}: inference only (no backend has a backward); call it under torch.no_grad()")
    name = _backend_for(op, backend, qkv.device)
    return KERNELS[name].decode_qkv(qkv, k_ring, v_ring, rows_idx.long(), cols_idx.long(), geometry, scale, rope)
