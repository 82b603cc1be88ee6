"""ConditionEncoder: a small convolutional net from a spatial condition map at pixel resolution
(a one-hot label layout, an edge map, a low-resolution image, ...) to features on the code grid.

GPT2D adds these features to its token embeddings at the same (i, j). The net is fully
convolutional with zero padding and no normalisation over space, so it works at any size and is
translation equivariant away from the borders: shifting the map by `factor` pixels shifts the
features by one code. It is not causal: each code's features see the map around it, below and to
the right included (that is the point of a condition given up front).

Shape of the net, for factor = 2^L: L stride-2 3x3 convolutions (the first ones narrow, so a
1024 x 1024 map stays cheap: most of the pixels are handled by the fewest channels), then two 3x3
convolutions at code resolution and a 1x1 output projection to n_embd. Receptive field: about
2 + 3 codes either side (two 3x3 convs at code level, plus the downsampling stack's reach).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int

_WHERE = "ConditionEncoder"
_NARROWEST = 16  # channels of the first, full-resolution layers (they see the most pixels)


def _check_factor(factor) -> int:
    factor = check_int(_WHERE, "factor", factor, 1)
    if factor & (factor - 1):
        raise ValueError(f"{_WHERE}: factor must be a power of two (the VQGAN's downsampling), got {factor}")
    return factor


class ConditionEncoder(nn.Module):
    """cond (B, in_channels, H, W) -> features (B, n_embd, H // factor, W // factor).

    Args:
        in_channels: channels of the condition map (classes of a one-hot layout, 1 for edges, 3 for
            an RGB low-resolution image, ...).
        n_embd: channels of the output (the GPT's embedding size).
        factor: the VQGAN's downsampling factor, a power of two (1: no downsampling).
        hidden: channels at code resolution.

    Raises:
        ValueError naming the argument (not a positive int, factor not a power of two).
    """

    def __init__(self, in_channels: int, n_embd: int, factor: int, *, hidden: int = 64):
        super().__init__()
        self.in_channels = check_int(_WHERE, "in_channels", in_channels, 1)
        self.n_embd = check_int(_WHERE, "n_embd", n_embd, 1)
        self.factor = _check_factor(factor)
        self.hidden = check_int(_WHERE, "hidden", hidden, 1)
        levels = self.factor.bit_length() - 1
        layers: list[nn.Module] = []
        channels = self.in_channels
        for level in range(1, levels + 1):  # widths double down the stack and reach `hidden` at the code grid
            out = max(self.hidden >> (levels - level), min(_NARROWEST, self.hidden))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.SiLU()]
            channels = out
        for _ in range(2):  # context at code resolution: +-2 codes
            layers += [nn.Conv2d(channels, self.hidden, 3, padding=1), nn.SiLU()]
            channels = self.hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(self.hidden, self.n_embd, 1)
        # Zero output projection: the features start at exactly 0, so an untrained condition path
        # leaves the GPT's logits unchanged (a conditioned prior starts as the unconditional one and
        # can be fine-tuned from one). The projection still gets gradients (its input, the body's
        # activations, is not zero), so the path switches on at the first optimiser step.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, n_embd={self.n_embd}, factor={self.factor}, hidden={self.hidden}"

    def check(self, cond, name: str = "cond", where: str = _WHERE) -> None:
        """Raise ValueError naming `name` unless cond is a floating (B, in_channels, H, W) map with
        H and W multiples of factor."""
        if not isinstance(cond, torch.Tensor) or cond.dim() != 4 or cond.shape[1] != self.in_channels:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"{where}: {name} must be a (B, {self.in_channels}, H, W) condition map, got {got}")
        if not cond.dtype.is_floating_point:
            raise ValueError(f"{where}: {name} must be a floating-point map (one-hot layouts as float), got {cond.dtype}")
        h, w = cond.shape[2:]
        if h % self.factor or w % self.factor or h == 0 or w == 0:
            raise ValueError(f"{where}: {name}'s height and width must be positive multiples of factor "
                             f"{self.factor} (one code per factor x factor pixels), got {h} x {w}")

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Features (B, n_embd, H // factor, W // factor) of a condition map cond (B, in_channels, H, W).

        Raises:
            ValueError naming cond: wrong channels or rank, not floating point, H or W not a
            positive multiple of factor.
        """
        self.check(cond)
        return self.out(self.body(cond))
