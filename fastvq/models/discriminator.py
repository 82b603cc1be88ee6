"""NLayerDiscriminator: the PatchGAN discriminator VQGAN trains against (pix2pix's, as taming ships it).

A stack of stride-2 4x4 convolutions (widths ndf, 2ndf, 4ndf, ... capped at 8ndf) with LeakyReLU(0.2),
one stride-1 convolution, and a 1-channel stride-1 output: one logit per overlapping image patch.
The module tree is taming's (a single nn.Sequential `main`), so taming's state dicts load strict and
give the same logits. Normalisation is BatchNorm2d, or ActNorm with use_actnorm=True (then the
convolutions have biases, as in taming). The constructor applies `weights_init` (taming applies it
in its loss module instead).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02) and shift 0.
    Use with Module.apply; other modules (ActNorm included) keep their initialisation."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc), initialised from the first training batch so that y
    has zero mean and unit variance per channel (Glow's activation normalisation, taming's names)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-per_channel.mean(1).view_as(self.loc))
        self.scale.copy_(1.0 / (per_channel.std(1).view_as(self.scale) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """forward(x) -> (B, 1, h, w) patch logits of (B, input_nc, H, W) images.

    n_layers stride-2 convolutions halve the resolution n_layers times; with the two stride-1 4x4
    convolutions at the end, H and W must be at least 2^n_layers * 4 or so to leave any patch.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        input_nc = check_int("NLayerDiscriminator", "input_nc", input_nc, 1)
        ndf = check_int("NLayerDiscriminator", "ndf", ndf, 1)
        n_layers = check_int("NLayerDiscriminator", "n_layers", n_layers, 1)
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        bias = bool(use_actnorm)  # a conv bias before BatchNorm is cancelled by its mean; taming keeps it for ActNorm

        def conv(c_in, c_out, stride, with_bias=bias):
            return nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1, bias=with_bias)

        layers = [conv(input_nc, ndf, 2, with_bias=True), nn.LeakyReLU(0.2, True)]
        widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last hidden convolution keeps the resolution
            layers += [conv(widths[n - 1], widths[n], stride), norm(widths[n]), nn.LeakyReLU(0.2, True)]
        layers.append(conv(widths[-1], 1, 1, with_bias=True))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
