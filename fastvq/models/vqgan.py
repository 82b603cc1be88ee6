"""VQGAN: taming-transformers' autoencoder on fastvq's VectorQuantizer, and a taming checkpoint loader.

The model is taming's VQModel (taming/models/vqgan.py, over the Encoder and Decoder of
taming/modules/diffusionmodules/model.py) with the same module tree and parameter names, so a
taming state dict loads with strict=True and gives the same outputs:
  encoder.{conv_in, down.N.{block.M, attn.M, downsample}, mid.{block_1, attn_1, block_2}, norm_out, conv_out}
  quant_conv, quantize.embedding, post_quant_conv
  decoder.{conv_in, mid.{...}, up.N.{block.M, attn.M, upsample}, norm_out, conv_out}
What differs:
  * GroupNorm has min(32, channels) groups, so narrow demo models (ch = 8, 16) work; with every
    channel count a multiple of 32 (all of taming's configs) it is taming's GroupNorm(32);
  * the bottleneck is fastvq.VectorQuantizer: taming's indices, z_q and loss from the fused VQ op,
    plus opt-in EMA codebook, dead-code restart, cosine metric and factorised codes (VQGANConfig);
  * attention goes through torch's scaled_dot_product_attention (same math, fused where available);
  * inputs are checked, and a wrong shape is an error naming the expected one.

load_taming_vqgan(ckpt, yaml) builds the model from a taming Lightning checkpoint and its YAML
config without running code from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pickle
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .._checks import check_bool, check_float, check_int, check_prob
from ..nn.quantize import METRICS, VectorQuantizer

TAMING_TARGET = "taming.models.vqgan.VQModel"


# ----------------------------------------------------------------------------- configuration

def _check_ints(name: str, value, allow_empty: bool) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        what = "a sequence" if allow_empty else "a non-empty sequence"
        raise ValueError(f"VQGANConfig: {name} must be {what} of positive integers, got {value!r}")
    return tuple(int(v) for v in value)


@dataclass
class VQGANConfig:
    """Shape of a VQGAN. The defaults are taming's f16, 1024-code ImageNet model.

    The first group is taming's `ddconfig`, the second its VQModel/VectorQuantizer2 arguments, the
    third fastvq.VectorQuantizer's extras (all off by default, so the defaults compute what taming
    does). `resolution` is the training size and decides at which levels attention sits; images of
    any size divisible by downsample_factor = 2 ** (len(ch_mult) - 1) run.
    """
    # encoder / decoder (taming's ddconfig)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True  # False: average pooling and plain nearest upsampling, no conv
    z_channels: int = 256
    double_z: bool = False  # only False (True is taming's KL autoencoder); kept so ddconfig maps 1:1
    # bottleneck (taming's VQModel)
    n_embed: int = 1024
    embed_dim: int = 256
    beta: float = 0.25
    legacy: bool = True  # taming's default: beta weighs the codebook term, not the commitment term
    remap: str | None = None  # .npy of used code indices (taming's remap)
    sane_index_shape: bool = False  # encode returns indices as (B, h, w) instead of (B*h*w,)
    # fastvq.VectorQuantizer extras
    metric: str = "l2"  # or "cosine"
    codebook_dim: int | None = None  # factorised codes: search in this many dimensions
    ema: bool = False  # codebook = EMA of assigned vectors instead of a learned parameter
    decay: float = 0.99  # EMA decay
    restart_dead: bool = False  # in training, re-seed codes whose (EMA) count is below restart_threshold
    restart_threshold: float = 1.0

    def __post_init__(self):
        for name in ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "n_embed",
                     "embed_dim"):
            setattr(self, name, check_int("VQGANConfig", name, getattr(self, name), 1))
        if self.codebook_dim is not None:
            self.codebook_dim = check_int("VQGANConfig", "codebook_dim", self.codebook_dim, 1)
        self.ch_mult = _check_ints("ch_mult", self.ch_mult, allow_empty=False)
        self.attn_resolutions = _check_ints("attn_resolutions", self.attn_resolutions, allow_empty=True)
        self.dropout = check_prob("VQGANConfig", "dropout", self.dropout)
        self.beta = check_float("VQGANConfig", "beta", self.beta, 0.0)
        self.decay = check_prob("VQGANConfig", "decay", self.decay)
        self.restart_threshold = check_float("VQGANConfig", "restart_threshold", self.restart_threshold, 0.0)
        for name in ("resamp_with_conv", "double_z", "legacy", "sane_index_shape", "ema", "restart_dead"):
            check_bool("VQGANConfig", name, getattr(self, name))
        if self.metric not in METRICS:
            raise ValueError(f"VQGANConfig: metric must be one of {METRICS}, got {self.metric!r}")
        if isinstance(self.remap, os.PathLike):
            self.remap = os.fspath(self.remap)
        if self.remap is not None and not isinstance(self.remap, str):
            raise ValueError(f"VQGANConfig: remap must be None or the path of a .npy file, got {self.remap!r}")
        if self.double_z:
            raise ValueError("VQGANConfig: double_z must be False (double_z=True is taming's KL autoencoder; "
                             "its VQModel cannot run with it)")
        if self.restart_dead and self.restart_threshold == 0:
            raise ValueError("VQGANConfig: restart_dead=True needs restart_threshold > 0 (no count is below 0)")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"VQGANConfig: resolution must be a multiple of the downsampling factor "
                             f"2 ** (len(ch_mult) - 1) = {self.downsample_factor}, got {self.resolution}")
        for channels in (self.ch,) + tuple(self.ch * m for m in self.ch_mult):
            if channels % min(32, channels):
                raise ValueError(f"VQGANConfig: GroupNorm needs every level's channel count (ch * m for m in ch_mult, "
                                 f"and ch) to be below 32 or a multiple of 32; ch={self.ch}, ch_mult={self.ch_mult} "
                                 f"gives {channels}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples), for checkpoints and YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "VQGANConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"VQGANConfig.from_dict: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VQGANConfig.from_dict: unknown field(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**d)

    @classmethod
    def from_taming(cls, params: Mapping) -> "VQGANConfig":
        """The model taming's VQModel(**params) builds; params is model.params of a taming YAML config.

        Required: ddconfig (with taming's required ch, out_ch, num_res_blocks, attn_resolutions,
        in_channels, resolution, z_channels), n_embed, embed_dim. Optional ddconfig keys take taming's
        defaults (ch_mult (1, 2, 4, 8), dropout 0, resamp_with_conv True, double_z True, which its
        VQModel cannot run, so configs set it to false). remap and sane_index_shape pass through;
        training-only keys (lossconfig, ckpt_path, ignore_keys, image_key, colorize_nlabels,
        monitor) are ignored. Unknown keys are errors. beta and legacy are taming's fixed 0.25, True.
        """
        if not isinstance(params, Mapping):
            raise ValueError(f"VQGANConfig.from_taming: params must be a mapping, got {type(params).__name__}")
        _check_keys("params", params, required=_TAMING_REQUIRED, optional=_TAMING_OPTIONAL | _TAMING_IGNORED)
        ddconfig = params["ddconfig"]
        if not isinstance(ddconfig, Mapping):
            raise ValueError(f"VQGANConfig.from_taming: ddconfig must be a mapping, got {type(ddconfig).__name__}")
        _check_keys("ddconfig", ddconfig, required=_DDCONFIG_REQUIRED, optional=set(_DDCONFIG_DEFAULTS))
        ddconfig = {**_DDCONFIG_DEFAULTS, **ddconfig}
        if ddconfig.pop("give_pre_end"):
            raise ValueError("VQGANConfig.from_taming: ddconfig.give_pre_end must be false (with it taming's "
                             "decoder returns features, not images)")
        extras = {k: params[k] for k in _TAMING_OPTIONAL if k in params}
        return cls(**ddconfig, n_embed=params["n_embed"], embed_dim=params["embed_dim"], **extras)


_TAMING_REQUIRED = {"ddconfig", "n_embed", "embed_dim"}
_TAMING_OPTIONAL = {"remap", "sane_index_shape"}
_TAMING_IGNORED = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor"}
_DDCONFIG_REQUIRED = {"ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
                      "z_channels"}
_DDCONFIG_DEFAULTS = {"ch_mult": (1, 2, 4, 8), "dropout": 0.0, "resamp_with_conv": True, "double_z": True,
                      "give_pre_end": False}


def _check_keys(where: str, d: Mapping, required: set, optional: set) -> None:
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"VQGANConfig.from_taming: {where} is missing {', '.join(map(repr, missing))}")
    unknown = sorted(set(d) - required - optional, key=str)
    if unknown:
        raise ValueError(f"VQGANConfig.from_taming: unknown key(s) {', '.join(map(repr, unknown))} in {where} "
                         f"(known: {', '.join(sorted(required | optional))})")


# ----------------------------------------------------------------------------- building blocks

def group_norm(channels: int) -> nn.GroupNorm:
    """taming's Normalize (GroupNorm(32), eps 1e-6) with min(32, channels) groups, so that narrow
    models work too; VQGANConfig checks that the groups divide the channels."""
    return nn.GroupNorm(min(32, channels), channels, eps=1e-6)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResnetBlock(nn.Module):
    """x + conv(drop(swish(norm(conv(swish(norm(x)))))), the shortcut a 1x1 conv when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the grid, channels as the head dimension."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W positions, C)
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, taming's scale
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, height, width))


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv after padding one row/column at the bottom/right
    (taming's asymmetric padding), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then (with_conv) a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, each followed by attention when
    the level has it, then an optional down- or upsampling (taming's down.N / up.N)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float,
                 resample: str | None, resamp_with_conv: bool):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout)
                                    for i in range(num_blocks)])
        self.attn = nn.ModuleList([AttnBlock(out_channels) for _ in range(num_blocks)] if attention else [])
        # taming's names; the level that does not resample has neither (None adds no state).
        self.downsample = Downsample(out_channels, resamp_with_conv) if resample == "down" else None
        self.upsample = Upsample(out_channels, resamp_with_conv) if resample == "up" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class Middle(nn.Module):
    """The bottom of the U: residual block, attention, residual block (taming's mid)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, z_channels, H / f, W / f), f = downsample_factor."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        c = config
        self.conv_in = conv3x3(c.in_channels, c.ch)
        self.down = nn.ModuleList()
        channels, resolution = c.ch, c.resolution
        for i, mult in enumerate(c.ch_mult):
            last = i == len(c.ch_mult) - 1
            self.down.append(Level(channels, c.ch * mult, c.num_res_blocks, resolution in c.attn_resolutions,
                                   c.dropout, None if last else "down", c.resamp_with_conv))
            channels = c.ch * mult
            resolution = resolution if last else resolution // 2
        self.mid = Middle(channels, c.dropout)
        self.norm_out = group_norm(channels)
        self.conv_out = conv3x3(channels, c.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, out_ch, h * f, w * f), f = downsample_factor."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        c = config
        channels, resolution = c.ch * c.ch_mult[-1], c.resolution // c.downsample_factor
        self.conv_in = conv3x3(c.z_channels, channels)
        self.mid = Middle(channels, c.dropout)
        levels = []  # built from the deepest level up, the order they run in
        for i in reversed(range(len(c.ch_mult))):
            levels.append(Level(channels, c.ch * c.ch_mult[i], c.num_res_blocks + 1, resolution in c.attn_resolutions,
                                c.dropout, "up" if i > 0 else None, c.resamp_with_conv))
            channels = c.ch * c.ch_mult[i]
            resolution = resolution * 2 if i > 0 else resolution
        # taming numbers the levels like the encoder's: up[i] works at resolution / 2 ** i
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(channels)
        self.conv_out = conv3x3(channels, c.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the model

class VQGAN(nn.Module):
    """taming's VQModel on fastvq.VectorQuantizer: x -> encoder -> quant_conv -> quantize ->
    post_quant_conv -> decoder.

    taming's interface: encode(x) -> (z_q, loss, (perplexity, None, indices)), decode(z_q),
    decode_code(indices, shape), forward(x) -> (xrec, qloss), get_last_layer(). For the GPT
    pipeline: encode_indices(x) -> (B, h, w) codes, decode_indices(codes) -> images, latent_shape.
    Large grids: decode_tiled(codes or z_q) decodes overlapping tiles and blends the seams, so peak
    memory is one tile's whatever the image size.
    In training mode an ema / restart_dead quantizer updates its codebook on every encode.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        if not isinstance(config, VQGANConfig):
            raise TypeError(f"VQGAN: config must be a VQGANConfig, got {type(config).__name__}")
        # A private, re-validated copy: later edits to the caller's object cannot desynchronise it
        # from the modules built here.
        self.config = c = VQGANConfig.from_dict(config.to_dict())
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, beta=c.beta, remap=c.remap,
                                        sane_index_shape=c.sane_index_shape, legacy=c.legacy, metric=c.metric,
                                        codebook_dim=c.codebook_dim, ema=c.ema, decay=c.decay,
                                        restart_threshold=c.restart_threshold if c.restart_dead else 0.0)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the code grid for images of height x width."""
        f = self.downsample_factor
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < f or size % f:
                raise ValueError(f"VQGAN: {name} must be a positive multiple of the downsampling factor {f} "
                                 f"(2 ** (len(ch_mult) - 1)), got {size!r}")
        return int(height) // f, int(width) // f

    # ------------------------------------------------------------------------- checks

    def _check_grid(self, t, name: str, channels: int, what: str) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != channels or t.numel() == 0:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"VQGAN: {name} must be a non-empty (B, {channels}, H, W) {what}, got {got}")
        if not t.is_floating_point():
            raise TypeError(f"VQGAN: {name} must be a floating-point tensor, got {t.dtype}")

    def _check_images(self, x) -> None:
        self._check_grid(x, "x", self.config.in_channels, "image batch")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VQGAN: x must have height and width divisible by the downsampling factor {f} "
                             f"(2 ** (len(ch_mult) - 1)), got shape {tuple(x.shape)}")

    def _check_codes(self, indices, name: str) -> None:
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise TypeError(f"VQGAN: {name} must be an int64 or int32 tensor of code indices, got {got}")
        n = self.quantize.re_embed  # the number of indices encode can return (n_embed unless remapped)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"VQGAN: {name} must lie in [0, {n}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")

    # ------------------------------------------------------------------------- taming's interface

    def encode(self, x: torch.Tensor):
        """x (B, in_channels, H, W) -> (z_q (B, embed_dim, h, w), vq loss, (perplexity, None, indices));
        indices as taming's: (B*h*w,), (B*h*w, 1) with remap, (B, h, w) with sane_index_shape."""
        self._check_images(x)
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        self._check_grid(z_q, "z_q", self.config.embed_dim, "grid of code vectors")
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, indices: torch.Tensor, shape) -> torch.Tensor:
        """Images from code indices; shape = (B, h, w, embed_dim), as taming's get_codebook_entry takes."""
        if len(shape) != 4 or shape[3] != self.config.embed_dim:
            raise ValueError(f"VQGAN: shape must be (B, h, w, embed_dim={self.config.embed_dim}), got {tuple(shape)}")
        self._check_codes(indices, "indices")
        if indices.numel() != shape[0] * shape[1] * shape[2]:
            raise ValueError(f"VQGAN: indices must hold B*h*w = {shape[0] * shape[1] * shape[2]} codes for "
                             f"shape {tuple(shape)}, got {indices.numel()}")
        return self.decode(self.quantize.get_codebook_entry(indices.reshape(-1), tuple(shape)))

    def forward(self, x: torch.Tensor):
        """x -> (reconstruction, vq loss); gradients reach the encoder through the straight-through z_q."""
        z_q, qloss, _ = self.encode(x)
        return self.decode(z_q), qloss

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------------- codes for the GPT

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) -> code indices (B, H / f, W / f), int64."""
        z_q, _, (_, _, indices) = self.encode(x)
        return indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images (B, out_ch, h * f, w * f)."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.numel() == 0:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"VQGAN: indices must be a non-empty (B, h, w) grid of code indices, got {got}")
        return self.decode_code(indices, (*indices.shape, self.config.embed_dim))

    # ------------------------------------------------------------------------- large grids

    def decode_tiled(self, codes: torch.Tensor, *, tile=None, overlap: int | None = None,
                     memory_budget: int | None = None, tiles_per_call: int = 1,
                     callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images from a code grid of any size, decoded in overlapping tiles with blended seams.

        codes: code indices (B, h, w) (int64 / int32, as decode_indices takes) or code vectors
        z_q (B, embed_dim, h, w) (as decode takes). Returns (B, out_ch, h * f, w * f).

        The grid is cut into windows of at most `tile` codes per side (an int, or (rows, cols)),
        evenly spaced so that neighbours share at least `overlap` codes. Each window is decoded
        on its own; in a shared band the two windows' pixels are mixed with linear weights (one
        ramping 1 -> 0 across the band, the other 0 -> 1), so a window's border pixels, the ones
        its zero padding spoils, weigh almost nothing and the picture stays continuous.

        Exactness. The decoder is not local: GroupNorm normalises with statistics over the whole
        window and the mid block's attention (and any attn_resolutions level's) is global over it,
        so a tile's pixels depend on everything in the tile. When one window covers the grid
        (h <= rows and w <= cols) this *is* decode(z_q), bit for bit. With several windows the
        result differs from the untiled decode by a measured, not a zero, error, which shrinks as
        tiles grow; the blending keeps the seams invisible. Measured (images in [-1, 1]): a demo
        VQGAN trained 600 steps, tile 32, overlap 4: mean |error| 0.007 (max 0.07) on a 48 x 48
        grid, 0.012 (max 0.065) on a 128 x 8 strip, with the seams' gradient energy within 2% of
        the untiled image's; a random tiny VQGAN is far more sensitive (tests/test_vqgan_tiled.py).
        Nearly all of it is GroupNorm's per-tile statistics (in the random tiny VQGAN, zeroing
        attention leaves the error as it is; removing GroupNorm makes it vanish).

        tile: None -> from memory_budget if given, else DEFAULT_TILE (32) codes per side.
        overlap: codes shared by neighbouring windows, 0 <= overlap < tile; None -> DEFAULT_OVERLAP
            (4) or less for small tiles (at most (tile - 1) // 2).
        memory_budget: bytes one tile's decode may hold in tensors (the decoder's activations for
            the whole batch, not the returned image). The decoder's bytes per code are measured once
            per device and dtype by decoding two small probes (tensor bytes; allocator workspaces
            and caching come on top: the process's resident memory grew by about 1.7x the budget
            on CPU, so leave headroom), and the tile is the largest that fits:
            full-width strips when the grid is narrow enough, else squares. Give tile or
            memory_budget, not both.
        tiles_per_call: windows decoded together as one batch (they all have the same shape).
            Fewer, larger calls run faster, above all on a busy machine, where every one of the
            decoder's ~100 small parallel ops per call can wait for a descheduled thread; memory
            grows with it (memory_budget divides by it). The result is the same (up to rounding).
        callback: called as callback(done, total) after each call, done counting tiles.

        Under torch.no_grad() the peak memory is one tile's activations plus the output; with
        autograd on, every tile's activations are kept for the backward, as for decode.

        Raises: ValueError naming the argument for tile < 1, overlap < 0, overlap >= tile, a
        memory_budget too small for one tile; the input errors of decode / decode_indices.
        """
        z_q = self._tiled_input(codes)
        batch, _, h, w = z_q.shape
        tiles_per_call = check_int("VQGAN.decode_tiled", "tiles_per_call", tiles_per_call, 1)
        rows, cols, overlap = self._tile_plan(z_q, tile, overlap, memory_budget, tiles_per_call)
        if callback is not None and not callable(callback):
            raise ValueError(f"VQGAN.decode_tiled: callback must be callable or None, got {type(callback).__name__}")
        row_starts, col_starts = _window_starts(h, rows, overlap), _window_starts(w, cols, overlap)
        total = len(row_starts) * len(col_starts)
        if total == 1:
            out = self.decode(z_q)
            if callback is not None:
                callback(1, 1)
            return out
        f = self.downsample_factor
        rows, cols = min(rows, h), min(cols, w)
        row_weights = _blend_weights(row_starts, rows, h, f, z_q.device)
        col_weights = _blend_weights(col_starts, cols, w, f, z_q.device)
        windows = [(y, wy, x, wx) for y, wy in zip(row_starts, row_weights) for x, wx in zip(col_starts, col_weights)]
        out = None
        for first in range(0, total, tiles_per_call):
            chunk = windows[first:first + tiles_per_call]
            z = torch.cat([z_q[:, :, y:y + rows, x:x + cols] for y, _, x, _ in chunk])
            images = self.decoder(self.post_quant_conv(z))
            del z
            if out is None:
                out = images.new_zeros(batch, images.shape[1], h * f, w * f)
            for (y, wy, x, wx), image in zip(chunk, images.split(batch)):
                weight = (wy[:, None] * wx[None, :]).to(image.dtype)
                out[:, :, y * f:(y + rows) * f, x * f:(x + cols) * f].addcmul_(image, weight)
            del images, image
            if callback is not None:
                callback(first + len(chunk), total)
        return out

    def decode_memory_per_code(self, device=None, dtype=None) -> tuple[float, float]:
        """(fixed bytes, bytes per code per image) the decoder holds in tensors at its peak, measured
        once per (device, dtype) on two small probe grids (4x4 and 8x8 codes) and cached.
        decode_tiled(memory_budget=...) sizes its tiles with it."""
        param = self.post_quant_conv.weight
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        cache = self.__dict__.setdefault("_decode_memory_cache", {})
        key = (str(device), dtype)
        if key not in cache:
            peaks = []
            for side in _PROBE_SIDES:
                z = torch.zeros(1, self.config.embed_dim, side, side, device=device, dtype=dtype)
                with torch.no_grad(), _LiveTensorBytes() as meter:
                    self.decoder(self.post_quant_conv(z))
                peaks.append(meter.peak)
            (a, b), (n_a, n_b) = peaks, (_PROBE_SIDES[0] ** 2, _PROBE_SIDES[1] ** 2)
            per_code = (b - a) / (n_b - n_a) if b > a else b / n_b  # activations grow with the grid
            cache[key] = (max(a - per_code * n_a, 0.0), per_code)
        return cache[key]

    def _tiled_input(self, codes) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) from indices (B, h, w) or z_q itself, with decode's checks."""
        if isinstance(codes, torch.Tensor) and codes.dim() == 3 and not codes.is_floating_point():
            self._check_codes(codes, "indices")
            if codes.numel() == 0:
                raise ValueError(f"VQGAN: indices must be a non-empty (B, h, w) grid of code indices, "
                                 f"got {tuple(codes.shape)}")
            shape = (*codes.shape, self.config.embed_dim)
            return self.quantize.get_codebook_entry(codes.reshape(-1), shape)
        if isinstance(codes, torch.Tensor) and codes.dim() == 4:
            self._check_grid(codes, "z_q", self.config.embed_dim, "grid of code vectors")
            return codes
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"VQGAN.decode_tiled: codes must be code indices (B, h, w) or code vectors "
                         f"(B, {self.config.embed_dim}, h, w), got {got}")

    def _tile_plan(self, z_q: torch.Tensor, tile, overlap, memory_budget,
                   tiles_per_call: int = 1) -> tuple[int, int, int]:
        """(rows, cols, overlap) of the windows, from the arguments (checked here)."""
        where = "VQGAN.decode_tiled"
        if tile is not None and memory_budget is not None:
            raise ValueError(f"{where}: give tile or memory_budget, not both (tile={tile!r}, "
                             f"memory_budget={memory_budget!r})")
        if overlap is not None:
            overlap = check_int(where, "overlap", overlap, 0)
        if memory_budget is None:
            rows, cols = _tile_sides(DEFAULT_TILE if tile is None else tile)
        else:
            if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real) \
                    or not memory_budget > 0 or memory_budget == float("inf"):
                raise ValueError(f"{where}: memory_budget must be a positive number of bytes, got {memory_budget!r}")
            rows, cols = self._tile_for_budget(z_q, float(memory_budget), overlap, tiles_per_call)
        if overlap is None:
            overlap = min(DEFAULT_OVERLAP, (min(rows, cols) - 1) // 2)
        elif overlap >= min(rows, cols):
            raise ValueError(f"{where}: overlap must be smaller than the tile ({rows} x {cols} codes), got {overlap}")
        return rows, cols, overlap

    def _tile_for_budget(self, z_q: torch.Tensor, budget: float, overlap: int | None,
                         tiles_per_call: int) -> tuple[int, int]:
        batch, _, h, w = z_q.shape
        batch *= tiles_per_call  # images decoded together
        fixed, per_code = self.decode_memory_per_code(z_q.device, z_q.dtype)
        area = int((budget - fixed) // (per_code * batch)) if budget > fixed else 0  # codes per tile
        side = math.isqrt(area)
        cols = w if side >= w else side  # narrow grids: full-width strips, only horizontal seams
        rows = area // cols if cols else 0
        smallest = 1 if overlap is None else overlap + 1
        if min(rows, cols) < smallest:
            need = fixed + per_code * batch * smallest * min(smallest, w)
            raise ValueError(f"VQGAN.decode_tiled: memory_budget of {budget:.0f} bytes is too small: the "
                             f"decoder holds about {per_code:.0f} bytes per code per image ({batch} images a "
                             f"call), so a tile of {smallest} x {min(smallest, w)} codes needs {need:.0f} bytes")
        return rows, cols


# ----------------------------------------------------------------------------- tiled decoding helpers

DEFAULT_TILE = 32  # codes per side of a decode_tiled window (512 pixels at f = 16)
DEFAULT_OVERLAP = 4  # codes neighbouring windows share
_PROBE_SIDES = (4, 8)  # code grids decode_memory_per_code measures


def _tile_sides(tile) -> tuple[int, int]:
    where = "VQGAN.decode_tiled"
    if isinstance(tile, (tuple, list)):
        if len(tile) != 2:
            raise ValueError(f"{where}: tile must be an int >= 1 or a pair (rows, cols) of them, got {tile!r}")
        return check_int(where, "tile", tile[0], 1), check_int(where, "tile", tile[1], 1)
    side = check_int(where, "tile", tile, 1)
    return side, side


def _window_starts(n: int, size: int, overlap: int) -> list[int]:
    """First codes of the windows of `size` codes covering [0, n): evenly spaced, neighbours sharing
    at least `overlap` codes (size > overlap)."""
    if n <= size:
        return [0]
    count = -(-(n - overlap) // (size - overlap))  # ceil: (count - 1) steps of at most size - overlap
    steps = count - 1
    return [(i * (n - size) + steps // 2) // steps for i in range(count)]


def _blend_weights(starts: list[int], size: int, n: int, f: int, device) -> list[torch.Tensor]:
    """Per window, its 1-D weights over its size * f pixels: linear ramps across the bands it shares
    with its neighbours (down to ~0 at its own border, the pixels its zero padding spoils), normalised
    so that at every pixel the windows' weights sum to 1. The 2-D weight of a tile is the product of
    its row and column weights; those sum to 1 too, as the tiles are every (row window, column
    window) pair."""
    centres = torch.arange(size * f, dtype=torch.float64) + 0.5
    weights, total = [], torch.zeros(n * f, dtype=torch.float64)
    for i, s in enumerate(starts):
        w = torch.ones(size * f, dtype=torch.float64)
        if i > 0 and starts[i - 1] + size > s:  # band shared with the previous window: ramp up
            w *= (centres / ((starts[i - 1] + size - s) * f)).clamp(max=1)
        if i + 1 < len(starts) and s + size > starts[i + 1]:  # with the next one: ramp down
            w *= ((size * f - centres) / ((s + size - starts[i + 1]) * f)).clamp(max=1)
        weights.append(w)
        total[s * f:(s + size) * f] += w
    return [(w / total[s * f:(s + size) * f]).to(device) for w, s in zip(weights, starts)]


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes held by the tensors created inside the `with` block, and their peak (.peak): every op
    output that allocates new storage counts until its last tensor is freed. Views of, and
    in-place writes into, memory from before the block (inputs, weights) do not count."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._refs: dict = {}
        self._bytes: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        before = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key in self._refs:
                self._refs[key] += 1
            elif key[1] in before or storage.nbytes() == 0:
                continue
            else:
                self._refs[key], self._bytes[key] = 1, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.current -= self._bytes.pop(key)


# ----------------------------------------------------------------------------- taming checkpoints

# Keys of taming's VQModel that are not the autoencoder's: the loss module (LPIPS, discriminator)
# and the colour map of segmentation models (colorize_nlabels), used only to draw logs.
_LOSS_PREFIX = "loss."
_LOGGING_KEYS = ("colorize",)


def load_taming_vqgan(ckpt_path, config_path, map_location="cpu", *, return_loss_state: bool = False):
    """A VQGAN with the weights of a taming-transformers VQModel checkpoint.

    ckpt_path: a Lightning checkpoint ({"state_dict": ..., "global_step": ..., ...}) or a bare state
    dict, read with torch.load(weights_only=True). Lightning stores objects besides tensors (the
    ModelCheckpoint callback class, hyper-parameter objects); each class or function the safe
    loader refuses is read as an inert placeholder instead, so nothing named in the file is
    imported or run, and only the state dict is used. Modules torch blocks outright (os, sys) stay
    an error.
    config_path: the run's YAML config (model.target taming.models.vqgan.VQModel, model.params with
    ddconfig, n_embed, embed_dim, ...; see VQGANConfig.from_taming).
    map_location: as torch.load's; the model is moved to the device the weights land on.

    Keys under "loss." (LPIPS and discriminator) are not part of the model: with
    return_loss_state=True they come back as a second value, prefix removed, ready for the loss
    module's load_state_dict; otherwise they are dropped. Any other key the model lacks, or a
    model key the checkpoint lacks, or a shape that differs from the config's, is a ValueError.
    The model is in training mode, like any new module; call .eval() for inference.
    """
    config = _read_taming_config(Path(config_path))
    state_dict = _read_state_dict(Path(ckpt_path), map_location)
    loss_state = {k[len(_LOSS_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_LOSS_PREFIX)}
    model_state = {k: v for k, v in state_dict.items() if not k.startswith(_LOSS_PREFIX) and k not in _LOGGING_KEYS}
    model = VQGAN(config)
    _load_model_state(model, model_state, ckpt_path)
    if model_state:
        model.to(next(iter(model_state.values())).device)
    return (model, loss_state) if return_loss_state else model


def _read_taming_config(path: Path) -> VQGANConfig:
    if not path.is_file():
        raise FileNotFoundError(f"load_taming_vqgan: config file {str(path)!r} does not exist")
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with fastvq[pipeline]
        raise ImportError("load_taming_vqgan needs pyyaml to read the config (pip install pyyaml)") from None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"load_taming_vqgan: {path} is not valid YAML ({e})") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"load_taming_vqgan: {path} has no 'model' mapping (taming's model.target / model.params)")
    if model.get("target") != TAMING_TARGET:
        raise ValueError(f"load_taming_vqgan: {path}: model.target must be {TAMING_TARGET!r}, "
                         f"got {model.get('target')!r}")
    try:
        return VQGANConfig.from_taming(model.get("params"))
    except ValueError as e:
        raise ValueError(f"load_taming_vqgan: {path}: model.params: {e}") from None


def _read_state_dict(path: Path, map_location) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"load_taming_vqgan: checkpoint file {str(path)!r} does not exist")
    checkpoint = _safe_load(path, map_location)
    state_dict = checkpoint["state_dict"] if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint \
        else checkpoint
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ValueError(f"load_taming_vqgan: {path} holds neither a Lightning checkpoint with a 'state_dict' "
                         "nor a state dict of named tensors")
    return dict(state_dict)


class _Placeholder:
    """Stands in for a class or function a checkpoint names: calling, constructing or restoring it
    only records the arguments (in .args / .state), so nothing from the file runs."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self._qualified_name}>"


def _safe_load(path: Path, map_location):
    """torch.load(weights_only=True), retried with placeholders for the globals it refused."""
    not_readable = f"load_taming_vqgan: {path} is not a checkpoint torch.load can read"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as e:  # torch's legacy reader raises assorted errors on a file it cannot parse
        raise ValueError(f"{not_readable} ({e!r})") from e
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError as e:  # only torch.save's zip format can be scanned (legacy files are older than taming's)
        raise ValueError(f"{not_readable} safely ({e})") from e
    placeholders = [(type(name.rsplit(".", 1)[-1], (_Placeholder,), {"_qualified_name": name}), name)
                    for name in names]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"load_taming_vqgan: {path} cannot be read without running code from it: {e}") from None


def _load_model_state(model: VQGAN, state: dict, path) -> None:
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config: {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"load_taming_vqgan: {path} does not fit its config: {len(wrong)} tensor(s) have other "
                         f"shapes, e.g. {'; '.join(wrong[:3])}")
    result = model.load_state_dict(state, strict=False)
    problems = [f"{len(keys)} {kind} key(s), e.g. {', '.join(keys[:4])}"
                for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise ValueError(f"load_taming_vqgan: {path} does not match the VQGAN of its config: {'; '.join(problems)}")
