"""Rotary position embeddings: 1-D (rotary, the windowed GPT's) and 2-D (axial_rope, the raster
window's). Plain torch: a few elementwise products per call, nothing worth a kernel."""
from __future__ import annotations

import torch

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


def axial_rope_tables(rows_idx: torch.Tensor, cols_idx: torch.Tensor, head_dim: int, *, dtype=torch.float32,
                      device=None, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables of axial_rope at positions (rows_idx[t], cols_idx[t]), each (T, 2, head_dim / 4):
    [:, 0] the row half's angles, [:, 1] the column half's. A decode step computes them once and
    every layer's queries and keys reuse them (apply_axial_rope): recomputing them per layer and per
    tensor was a third of a small model's decode step. dtype: the math's (fp32, or fp64 for fp64 x)."""
    quarter = head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, device=device, dtype=dtype) / quarter)
    pos = torch.stack((rows_idx, cols_idx), dim=1).to(device=device, dtype=dtype)  # (T, 2)
    angle = pos[:, :, None] * inv_freq  # (T, 2, quarter)
    return angle.cos(), angle.sin()


def apply_axial_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """axial_rope of x (..., T, hs) with precomputed axial_rope_tables (arguments unchecked)."""
    cos, sin = tables
    shape = x.shape
    parts = x.to(cos.dtype).unflatten(-1, (2, 2, shape[-1] // 4))  # (..., T, half: row/col, pair, quarter)
    x1, x2 = parts[..., 0, :], parts[..., 1, :]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-2).flatten(-3).to(x.dtype)


def axial_rope(x: torch.Tensor, rows_idx: torch.Tensor, cols_idx: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """2-D rotary embedding of x (..., T, hs): the first half of each head's dims rotated by the
    token's row index, the second half by its column index (each half a half-split rotary), so a
    score depends only on the (row, column) offset between query and key and a cached key stays
    valid wherever the window moves. rows_idx, cols_idx: (T,) integer tensors (tensors, so nothing
    recompiles as positions advance). hs must be a multiple of 4. fp32 math (fp64 for fp64 x).

    Example:
        >>> q = torch.randn(1, 8, 6, 64)
        >>> rows_idx, cols_idx = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> q = fastvq.axial_rope(q, rows_idx, cols_idx)
    """
    op = "axial_rope"
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating (..., T, head_dim) tensor, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    hs, t = x.shape[-1], x.shape[-2]
    if hs % 4:
        raise ValueError(f"{op}: head_dim must be a multiple of 4 (two rotary halves of even size), got {hs}")
    for name, idx in (("rows_idx", rows_idx), ("cols_idx", cols_idx)):
        if not isinstance(idx, torch.Tensor) or idx.shape != (t,) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must be an integer tensor of shape ({t},), got "
                             f"{(idx.dtype, tuple(idx.shape)) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    acc = torch.promote_types(x.dtype, torch.float32)
    return apply_axial_rope(x, axial_rope_tables(rows_idx, cols_idx, hs, dtype=acc, device=x.device, base=base))
