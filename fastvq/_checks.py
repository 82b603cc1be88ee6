"""Argument checks shared by the ops, so every op words the same mistake the same way."""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, layout: tuple[str, ...], dtypes=FLOATS) -> None:
    """t must be a tensor of rank len(layout) with a dtype in dtypes; raise TypeError/ValueError
    naming the op, the argument and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(layout):
        raise ValueError(f"{op}: {name} must be {len(layout)}-D ({', '.join(layout)}), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
