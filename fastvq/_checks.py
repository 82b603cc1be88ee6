"""Argument checks shared by the ops, modules and models, so every layer words the same mistake the
same way: "<where>: <argument> must be <what was expected>, got <what came>"."""
from __future__ import annotations

import math
import numbers

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
        names = [str(d).replace("torch.", "") for d in dtypes]
        allowed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{op}: {name} must be {allowed}, got {t.dtype}")


def check_int(where: str, name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """value must be an integer (not a bool) in [minimum, maximum]; returns it as an int."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            bound = f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            bound = f" >= {minimum}"
        elif maximum is not None:
            bound = f" <= {maximum}"
        else:
            bound = ""
        raise ValueError(f"{where}: {name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_float(where: str, name: str, value, low: float | None = None, high: float | None = None, *,
                high_open: bool = False) -> float:
    """value must be a finite real number (not a bool) in [low, high] ([low, high) with high_open)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and (value >= high if high_open else value > high):
        ok = False
    if not ok:
        parts = []
        if low is not None:
            parts.append(f">= {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        bound = f" {' and '.join(parts)}" if parts else ""
        raise ValueError(f"{where}: {name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_positive(where: str, name: str, value, high: float | None = None, *, high_open: bool = False) -> float:
    """value must be a finite real number (not a bool) > 0 and <= high (< high with high_open): an
    epsilon, a scale, a fraction that cannot be zero."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and high is not None and (value >= high if high_open else value > high):
        ok = False
    if not ok:
        bound = "> 0" if high is None else f"> 0 and {'<' if high_open else '<='} {high}"
        raise ValueError(f"{where}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_prob(where: str, name: str, value) -> float:
    """A dropout-style probability in [0, 1)."""
    return check_float(where, name, value, 0.0, 1.0, high_open=True)


def check_bool(where: str, name: str, value) -> bool:
    if not isinstance(value, bool):  # a YAML string "False" would otherwise read as true
        raise ValueError(f"{where}: {name} must be True or False, got {value!r}")
    return value


def check_pos(where: str, pos, device: torch.device):
    """A position: a Python int >= 0, or a 0-dim integer tensor on `device` (trusted to be >= 0: it is
    read only on the device, so a decode step needs no host sync). Returns it unchanged (int as int)."""
    if isinstance(pos, torch.Tensor):
        if pos.dim() != 0 or pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
            raise TypeError(f"{where}: pos must be an int or a 0-dim integer tensor, got {pos.dtype} of shape {tuple(pos.shape)}")
        if pos.device != device:
            raise ValueError(f"{where}: pos is on {pos.device} but the inputs are on {device}; they must be on the same device")
        return pos
    if isinstance(pos, bool) or not isinstance(pos, numbers.Integral):
        raise TypeError(f"{where}: pos must be an int or a 0-dim integer tensor, got {type(pos).__name__}")
    if pos < 0:
        raise ValueError(f"{where}: pos (the absolute position of the first new token) must be >= 0, got {pos}")
    return int(pos)


# ----------------------------------------------------------------------------- non-finite values
# One reduction over the tensor, one host sync; only a refused call pays for finding the first bad row.

def _nonfinite_kinds(values: torch.Tensor) -> str:
    """Which of NaN, +inf, -inf occur in values, e.g. "NaN and +inf"."""
    kinds = [label for label, hit in (("NaN", torch.isnan(values)), ("+inf", values == math.inf),
                                      ("-inf", values == -math.inf)) if bool(hit.any())]
    return " and ".join(kinds)


def check_finite(where: str, name: str, t: torch.Tensor, *, vector_dim: int = -1, row: str = "row") -> None:
    """Every element of t must be finite (no NaN, no +inf or -inf).

    The rows are t's vectors along vector_dim, in row-major order of the other dims: a refusal names
    the first row holding a non-finite value (its index, a tuple above 2-D) and what it holds.
    One min/max pass over t and one host sync when every value is finite.

    Raises:
        ValueError: "<where>: <name> must be finite, but <row> <index> holds NaN" (or +inf, -inf).
    """
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if all(math.isfinite(v) for v in torch.stack((lo, hi)).tolist()):
        return
    first = (~torch.isfinite(t)).any(vector_dim).nonzero()[0].tolist()
    index = first[0] if len(first) == 1 else tuple(first)
    values = t.movedim(vector_dim, -1)[tuple(first)]
    raise ValueError(f"{where}: {name} must be finite, but {row} {index} holds {_nonfinite_kinds(values)}")


def check_logits(where: str, name: str, logits: torch.Tensor) -> None:
    """Every row of a (B, V) logits tensor must hold no NaN, no +inf and at least one finite value;
    -inf entries beside finite ones are masked tokens and allowed.

    One max per row (NaN propagates through it) and one host sync when every row is valid.

    Raises:
        ValueError: "<where>: <name> row <i> holds NaN" (or +inf, or is -inf everywhere), i the first bad row.
    """
    if logits.numel() == 0:
        return
    top = logits.amax(1)
    bad = ~torch.isfinite(top)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0])
    values = logits[i]
    if bool(torch.isnan(values).any()):
        what = "holds NaN"
    elif bool((values == math.inf).any()):
        what = "holds +inf"
    else:
        what = "is -inf everywhere (every token masked: nothing to draw)"
    raise ValueError(f"{where}: {name} row {i} {what}; a row must be finite where it is not masked by -inf, "
                     "with at least one finite logit")
