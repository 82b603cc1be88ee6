"""Spatial conditions for the prior: layout mosaics to train on, condition maps, layout PNG files.

A spatial condition is an image-like map aligned with the picture (DESIGN.md, "Conditioning"); the
pipeline's condition encoder takes it at full pixel resolution, float32 (C, H, W):
  * "layout": one-hot class labels, C = number of classes; a layout is an int64 (H, W) label map.
  * "edges":  C = 1, Canny edges (scikit-image) of the grayscale picture, 1.0 on an edge, else 0.0.
  * "lowres": C = 3, the picture averaged over lowres_factor x lowres_factor blocks and upsampled
    back bilinearly, values in [-1, 1] (stochastic super-resolution).

Training data for layouts: LayoutMosaics cuts the embedded textures (brick, grass, gravel, ...)
along a random smooth label field, so every picture comes with its layout. Each class's pixels come
from a crop of that texture's training region (split="train") or of its held-out strip
(split="heldout") as data.py defines them, so held-out pixels stay held out; the edges and lowres
maps are computed from the picture (condition_map).

Files: a layout PNG has one colour per class (palette(n)[k] for class k unless a checkpoint lists
others); save_layout_png / read_layout_png write and read them, load_condition_file turns a file
given to `fastvq sample --cond` into the map. The repository ships layouts under fastvq/assets/
(shipped_layout); `python -m fastvq.pipeline.conditions` redraws them.
"""
from __future__ import annotations

import colorsys
import inspect
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._checks import check_int, check_positive
from .data import DEFAULT_IMAGES, EMBEDDED_IMAGES, EmbeddedImages, _check_arguments

CONDITION_KINDS = ("layout", "edges", "lowres")

# Gaussian smoothing of Canny's gradient, in pixels. The embedded textures have nearly the same mean
# grey (brick 111, grass 118, gravel 127 of 255), so no sigma makes Canny trace the boundary between
# two of them: measured on 96-pixel mosaics, the share of edge pixels within 4 px of a boundary is
# 0.19-0.20 for sigma 1-4, the boundary band's share of the area. A region shows instead through
# its own edge pattern, and sigma 2 keeps that pattern: brick's mortar outlines unbroken, and edge
# density 0.07 (brick) vs 0.17 (grass, gravel) on 64-pixel crops, with grass as short strokes and
# gravel as closed stone outlines. Smaller sigmas add grain (0.27 of grass pixels at sigma 1); at 3
# grass and gravel thin out to fragments (0.09, 0.11) and at 4 nearly vanish. Where the brightness
# does step (a user's picture, a two-tone mosaic) sigma 2 traces the step and nothing else.
EDGE_SIGMA = 2.0

# Which textures the colours of a shipped layout mean: colour palette(n)[k] is the k-th name.
SHIPPED_LAYOUT_CLASSES = {"vq_letters": ("brick", "grass")}
ASSETS = Path(__file__).resolve().parent.parent / "assets"

# LayoutMosaics takes scale and heldout_fraction with the defaults of the pipeline's embedded data
# (EmbeddedImages), read from its signature so that the two cannot drift apart.
_EMBEDDED_DEFAULTS = inspect.signature(EmbeddedImages.__init__).parameters
# How many classes a mosaic's label field mixes (at most), with these probabilities: mostly two or
# three, so most crops show a boundary, sometimes one, so the prior also sees plain texture.
_MIXED_CLASSES = (1, 2, 3)
_MIXED_WEIGHTS = (0.2, 0.4, 0.4)
# The held-out split's random stream: a fourth seed word that no training key (seed, epoch, index)
# has (numpy pads short seeds with zeros, so it must be non-zero), and no dependence on the epoch.
_HELDOUT_STREAM = 1


def _check_kind(where: str, kind) -> str:
    if kind not in CONDITION_KINDS:
        raise ValueError(f"{where}: kind must be one of {CONDITION_KINDS}, got {kind!r}")
    return kind


def cond_channels(kind: str, n_classes: int) -> int:
    """Channels of a condition map of this kind.

    Args:
        kind: one of CONDITION_KINDS.
        n_classes: number of layout classes (read for "layout" only).
    Returns:
        n_classes for "layout", 1 for "edges", 3 for "lowres".
    Raises:
        ValueError: unknown kind, or n_classes not an integer >= 1 for "layout".
    """
    _check_kind("cond_channels", kind)
    if kind == "layout":
        return check_int("cond_channels", "n_classes", n_classes, 1)
    return 1 if kind == "edges" else 3


# ----------------------------------------------------------------------------- training data

class LayoutMosaics(Dataset):
    """Mosaics of embedded textures cut along random smooth label fields, with their layouts.

    Item i is (image, layout): image float32 (3, size, size) in [-1, 1], layout int64 (size, size)
    with values in [0, len(classes)); class k is the texture `classes[k] = textures[k]`.

    A label field mixes 1-3 of the classes (at most all of them): each mixed class gets a
    low-frequency Gaussian noise field, its values on a grid of nodes `region_size` pixels apart
    (shifted by a random sub-node offset) interpolated bicubically, and every pixel takes the class
    whose field is largest. Regions are therefore blobs about region_size across; the default,
    size / 2, makes most crops show a boundary. Each class present then fills its pixels from its
    own random size x size crop of that texture, taken from the texture's training region with
    random flips (split="train") or from its held-out strip without flips (split="heldout"); the
    regions are EmbeddedImages' (data.py), for the same size, scale and heldout_fraction.

    Randomness: item i of a training epoch is a function of (seed, epoch, i) alone, as in data.py;
    call set_epoch(epoch) for new items. Held-out items depend on (seed, i) only, not on the epoch,
    so a held-out score is comparable across epochs. len is `length`, by default the number of
    non-overlapping crops in the regions of this split (as EmbeddedImages).

    Args:
        size: side of the square items in pixels.
        split: "train" or "heldout".
        textures: names from data.EMBEDDED_IMAGES, one class each, in this order.
        length: items per epoch (see above).
        seed: the seed of every item's random stream (integer >= 0).
        scale: resize factor applied to each texture at load (EmbeddedImages' scale).
        heldout_fraction: share of each texture's width held out (EmbeddedImages').
        region_size: typical blob size in pixels (> 0); None for size / 2.
    Raises:
        ValueError: a bad argument (named), or a texture too small for the crops.
    """

    def __init__(self, size: int, split: str = "train", *, textures=DEFAULT_IMAGES, length: int | None = None,
                 seed: int = 0, scale: float = _EMBEDDED_DEFAULTS["scale"].default,
                 heldout_fraction: float = _EMBEDDED_DEFAULTS["heldout_fraction"].default,
                 region_size: float | None = None):
        owner = "LayoutMosaics"
        _check_arguments(owner, size, split, length, scale, seed, heldout_fraction)
        names = [] if isinstance(textures, str) else list(textures)  # a lone string is not a list of names
        if not names or any(name not in EMBEDDED_IMAGES for name in names) or len(set(names)) != len(names):
            raise ValueError(f"{owner}: textures must be a non-empty list of distinct names from {EMBEDDED_IMAGES}, "
                             f"got {textures!r}")
        self.region_size = float(size) / 2 if region_size is None else check_positive(owner, "region_size",
                                                                                      region_size)
        # The textures, their regions and the default length come from the embedded dataset itself.
        try:
            source = EmbeddedImages(size, split, names=names, scale=scale, seed=seed, heldout_fraction=heldout_fraction)
        except ValueError as e:  # a texture too small for the crops: say whose arguments they were
            raise ValueError(str(e).replace("EmbeddedImages:", f"{owner}:", 1)) from e
        self.images, self.classes = source.images, list(source.classes)
        self.size, self.split, self.seed, self.epoch = int(size), split, int(seed), 0
        self.length = len(source) if length is None else int(length)
        # per class, the columns [left, right) crops may come from
        self.columns = [(0, tw) if split == "train" else (tw, image.shape[2])
                        for image, tw in zip(self.images, source.train_widths)]

    def set_epoch(self, epoch: int) -> None:
        """Choose the training items of this epoch (no effect on the held-out split)."""
        self.epoch = check_int("LayoutMosaics.set_epoch", "epoch", epoch, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"LayoutMosaics: index {index} out of range for {self.length} items")
        if self.split == "train":
            rng = np.random.default_rng((self.seed, self.epoch, index))
        else:
            rng = np.random.default_rng((self.seed, 0, index, _HELDOUT_STREAM))
        layout = self._label_field(rng)
        image = torch.empty(3, self.size, self.size, dtype=torch.uint8)
        for k in layout.unique().tolist():
            where = layout == k
            image[:, where] = self._texture_crop(rng, k)[:, where]
        return image.float().div_(127.5).sub_(1.0), layout

    def _label_field(self, rng: np.random.Generator) -> torch.Tensor:
        """An int64 (size, size) label map: the argmax of smooth noise fields of 1-3 classes."""
        n = len(self.classes)
        choices = [m for m in _MIXED_CLASSES if m <= n]
        weights = np.array(_MIXED_WEIGHTS[:len(choices)])
        mixed = int(rng.choice(choices, p=weights / weights.sum()))
        active = np.sort(rng.choice(n, size=mixed, replace=False))
        if mixed == 1:
            return torch.full((self.size, self.size), int(active[0]), dtype=torch.int64)
        # nodes region_size apart; one node of margin before the crop (the random offset) and two
        # after, so bicubic interpolation (4 nodes wide) never reads past the grid
        nodes = math.ceil(self.size / self.region_size) + 4
        noise = torch.from_numpy(rng.standard_normal((1, mixed, nodes, nodes)).astype(np.float32))
        offset = 1.0 + rng.random(2)  # (rows, cols), in node units
        pixels = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.region_size
        rows, cols = [(pixels + o) * (2.0 / (nodes - 1)) - 1.0 for o in offset]  # align_corners=True units
        grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[None]  # (1, H, W, (x, y))
        fields = F.grid_sample(noise, grid, mode="bicubic", align_corners=True)[0]
        return torch.from_numpy(active)[fields.argmax(0)]

    def _texture_crop(self, rng: np.random.Generator, k: int) -> torch.Tensor:
        """A uint8 (3, size, size) crop of texture k from this split's region (flipped at random in training)."""
        image, (left0, right) = self.images[k], self.columns[k]
        top = int(rng.integers(0, image.shape[1] - self.size + 1))
        left = int(rng.integers(left0, right - self.size + 1))
        crop = image[:, top:top + self.size, left:left + self.size]
        if self.split == "train":
            horizontal, vertical = rng.random(2) < 0.5
            dims = [d for d, flip in ((2, horizontal), (1, vertical)) if flip]
            if dims:
                crop = crop.flip(dims)
        return crop


# ----------------------------------------------------------------------------- condition maps

def _check_image(where: str, image) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) float -> (B, 3, H, W) float32."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{where}: image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3 or not image.dtype.is_floating_point:
        raise ValueError(f"{where}: image must be a float (3, H, W) or (B, 3, H, W) tensor in [-1, 1], "
                         f"got {image.dtype} of shape {tuple(image.shape)}")
    return (image if image.dim() == 4 else image[None]).float()


def _check_layout(where: str, layout, n_classes: int, name: str = "layout") -> torch.Tensor:
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(layout).__name__}")
    if layout.dim() not in (2, 3) or layout.dtype != torch.int64:
        raise ValueError(f"{where}: {name} must be an int64 (H, W) or (B, H, W) tensor, "
                         f"got {layout.dtype} of shape {tuple(layout.shape)}")
    if layout.numel() and (layout.min() < 0 or layout.max() >= n_classes):
        raise ValueError(f"{where}: {name} values must be in [0, {n_classes}), "
                         f"got values in [{int(layout.min())}, {int(layout.max())}]")
    return layout


def condition_map(kind: str, image: torch.Tensor | None, layout: torch.Tensor | None = None,
                  n_classes: int | None = None, *, lowres_factor: int = 8,
                  edge_sigma: float = EDGE_SIGMA) -> torch.Tensor:
    """The condition map of a picture (and its layout) at full pixel resolution.

    Args:
        kind: one of CONDITION_KINDS.
        image: float (3, H, W) or (B, 3, H, W) in [-1, 1]. For "layout" it may be None; when given
            its size must match the layout's.
        layout: int64 (H, W) or (B, H, W) class labels; "layout" only.
        n_classes: number of classes (the one-hot width); "layout" only.
        lowres_factor: block size of the low-resolution picture; must divide H and W ("lowres").
        edge_sigma: Gaussian sigma of the Canny detector in pixels ("edges"; see EDGE_SIGMA).
    Returns:
        float32 (C, H, W), or (B, C, H, W) for batched input, C = cond_channels(kind, n_classes):
        one-hot layout (sums to 1 over C); edges 1.0 / 0.0; lowres in [-1, 1].
    Raises:
        ValueError / TypeError: a bad kind, image, layout, n_classes, lowres_factor or edge_sigma (named).
    """
    where = "condition_map"
    _check_kind(where, kind)
    if kind == "layout":
        return _layout_map(where, image, layout, n_classes)
    batched = isinstance(image, torch.Tensor) and image.dim() == 4
    images = _check_image(where, image)
    if kind == "edges":
        out = _edges(images, check_positive(where, "edge_sigma", edge_sigma)).to(images.device)
    else:
        factor = check_int(where, "lowres_factor", lowres_factor, 1)
        height, width = images.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(f"{where}: lowres_factor must divide the image size {height} x {width}, got {factor}")
        small = F.interpolate(images, size=(height // factor, width // factor), mode="area")
        out = _upsample(small, (height, width))
    return out if batched else out[0]


def _layout_map(where, image, layout, n_classes) -> torch.Tensor:
    n_classes = check_int(where, "n_classes", n_classes, 1)
    if layout is None:
        raise ValueError(f"{where}: layout must be given for kind 'layout'")
    layout = _check_layout(where, layout, n_classes)
    if image is not None:
        images = _check_image(where, image)
        if image.dim() != layout.dim() + 1 or images.shape[-2:] != layout.shape[-2:] or (
                layout.dim() == 3 and images.shape[0] != layout.shape[0]):
            raise ValueError(f"{where}: layout of shape {tuple(layout.shape)} does not match image of shape "
                             f"{tuple(image.shape)}")
    return F.one_hot(layout, n_classes).movedim(-1, -3).float()


def _edges(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) Canny edges of the luminance."""
    from skimage.feature import canny

    # skimage's rgb2gray weights (Rec. 709 luma), on [0, 1]
    weights = torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)
    gray = ((images.detach().cpu().clamp(-1, 1) + 1) / 2 * weights).sum(1).double().numpy()
    # mode="nearest": the borders extend the picture instead of meeting a black frame, so a crop's
    # edge map does not depend on where the crop ends
    edges = [canny(g, sigma=sigma, mode="nearest") for g in gray]
    return torch.from_numpy(np.stack(edges)).float()[:, None]


def _upsample(small: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # bilinear weights are convex, so [-1, 1] stays [-1, 1]; the clamp only absorbs rounding
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False).clamp_(-1.0, 1.0)


# ----------------------------------------------------------------------------- colours and files

# Fixed class colours: brick red, grass green, gravel grey first (the demo's textures), then
# well-separated hues; palette(n) is a prefix of palette(m) for n < m.
_BASE_COLOURS = (
    (178, 34, 34), (34, 139, 34), (128, 128, 128), (31, 119, 180), (255, 127, 14), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 215, 0), (0, 0, 128),
    (0, 0, 0), (255, 255, 255),
)
_MAX_COLOURS = 4096


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, fixed RGB colours; class k of a layout PNG is palette(n)[k].

    Args:
        n: number of colours, 1 to 4096.
    Returns:
        list of n (r, g, b) tuples of ints in [0, 255], all different; palette(n) == palette(m)[:n].
    Raises:
        ValueError: n not an integer in [1, 4096].
    """
    n = check_int("palette", "n", n, 1, _MAX_COLOURS)
    colours = list(_BASE_COLOURS[:n])
    seen, step = set(colours), 0
    while len(colours) < n:  # golden-ratio hues over a few saturation / value levels
        hue = (step * 0.6180339887498949) % 1.0
        saturation, value = (0.55, 0.75, 0.95)[step % 3], (0.95, 0.7, 0.45, 0.85)[(step // 3) % 4]
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        step += 1
        if colour not in seen:
            seen.add(colour)
            colours.append(colour)
    return colours


def _is_channel(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= 255


def _check_colours(where: str, colours) -> list[tuple[int, int, int]]:
    ok = isinstance(colours, (list, tuple)) and 0 < len(colours) <= _MAX_COLOURS
    checked = []
    for colour in colours if ok else ():
        if not isinstance(colour, (list, tuple)) or len(colour) != 3 or not all(map(_is_channel, colour)):
            ok = False
            break
        checked.append(tuple(int(c) for c in colour))
    if not ok:
        raise ValueError(f"{where}: colours must be a list of 1 to {_MAX_COLOURS} (r, g, b) tuples of integers "
                         f"in [0, 255], got {colours!r}")
    if len(set(checked)) != len(checked):
        raise ValueError(f"{where}: colours must be distinct (one per class), got {colours!r}")
    return checked


def save_layout_png(layout: torch.Tensor, path, colours) -> None:
    """Write a layout as a PNG, class k in colours[k] (a palette image when there are <= 256 colours).

    Args:
        layout: int64 (H, W) class labels in [0, len(colours)).
        path: the file to write.
        colours: list of distinct (r, g, b) tuples, e.g. palette(n_classes).
    Raises:
        ValueError / TypeError: a bad layout or colours (named).
    """
    from PIL import Image

    colours = _check_colours("save_layout_png", colours)
    layout = _check_layout("save_layout_png", layout, len(colours))
    if layout.dim() != 2:
        raise ValueError(f"save_layout_png: layout must be 2-D (H, W), got shape {tuple(layout.shape)}")
    labels = layout.cpu().numpy()
    if len(colours) <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette([c for colour in colours for c in colour])
    else:
        image = Image.fromarray(np.asarray(colours, dtype=np.uint8)[labels], mode="RGB")
    image.save(Path(path), optimize=True)


def _open_image(where: str, path, mode: str | None = None):
    """The decoded image at path (converted to mode); ValueError naming the file when it is not one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {path} is not an existing file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot decode image {path}: {e}") from e


def read_layout_png(path, colours) -> torch.Tensor:
    """Read a layout PNG: the class of each pixel is the index of its colour in colours.

    Args:
        path: an image file (PNG, or anything PIL reads; alpha is ignored).
        colours: list of distinct (r, g, b) tuples, class k = colours[k].
    Returns:
        int64 (H, W) labels in [0, len(colours)).
    Raises:
        ValueError: bad colours, an undecodable file, or a pixel whose colour is not in colours
            (the message names the file, the colour and the first such pixel, row and column).
        FileNotFoundError: no such file.
    """
    colours = _check_colours("read_layout_png", colours)
    pixels = np.asarray(_open_image("read_layout_png", path, "RGB"), dtype=np.int64)
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    known = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int64)
    order = np.argsort(known)
    slot = np.searchsorted(known[order], codes).clip(0, len(known) - 1)
    found = known[order][slot] == codes
    if not found.all():
        row, col = np.unravel_index(np.argmin(found), found.shape)  # first unknown pixel in raster order
        colour = tuple(int(c) for c in pixels[row, col])
        raise ValueError(f"read_layout_png: {path} has colour {colour} at row {row}, column {col}, which is "
                         f"not one of the {len(colours)} class colours {colours}")
    return torch.from_numpy(order[slot])


def _check_size(where: str, size, actual: tuple[int, int], path) -> None:
    if size is not None and tuple(size) != tuple(actual):
        raise ValueError(f"{where}: size must equal the size of {path}, {actual[0]} x {actual[1]} (height x width), "
                         f"got {tuple(size)}")


def load_condition_file(kind: str, path, *, colours=None, size: tuple[int, int] | None = None,
                        lowres_factor: int = 8) -> torch.Tensor:
    """The condition map (C, H, W) of a file, for `fastvq sample --cond FILE.png`.

    Args:
        kind: one of CONDITION_KINDS.
        path: the file. "layout": a layout PNG in `colours`; "edges": a grayscale or binary image,
            a pixel brighter than half scale is an edge; "lowres": the low-resolution RGB picture itself.
        colours: the class colours ("layout", required), e.g. palette(n_classes).
        size: (height, width) of the picture to draw. Required for "lowres": the file is first
            resampled to (height / lowres_factor, width / lowres_factor) (area averaging when it is
            larger, bilinear when smaller, untouched when it already has that size) and then
            upsampled as condition_map does, so it matches what training saw. For "layout" and
            "edges" optional, and then it must equal the file's size.
        lowres_factor: as in condition_map ("lowres").
    Returns:
        float32 (C, H, W): one-hot layout, 1.0 / 0.0 edges, or a [-1, 1] picture.
    Raises:
        ValueError: a bad kind, colours, size or lowres_factor (named), a size that differs from the
            file's, an undecodable file, an unknown layout colour (read_layout_png).
        FileNotFoundError: no such file.
    """
    where = "load_condition_file"
    _check_kind(where, kind)
    if size is not None:
        ok = isinstance(size, (tuple, list)) and len(size) == 2
        if not ok or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
            raise ValueError(f"{where}: size must be (height, width), two integers >= 1, got {size!r}")
    if kind == "layout":
        if colours is None:
            raise ValueError(f"{where}: colours must be given for a layout file (one (r, g, b) per class)")
        colours = _check_colours(where, colours)
        layout = read_layout_png(path, colours)
        _check_size(where, size, tuple(layout.shape), path)
        return F.one_hot(layout, len(colours)).permute(2, 0, 1).float()
    if kind == "edges":
        image = _open_image(where, path)
        scale = 65535.0 if image.mode.startswith("I") else 255.0  # 16-bit grayscale PNGs
        pixels = np.asarray(image if scale > 255 else image.convert("L"), dtype=np.float64) / scale
        _check_size(where, size, pixels.shape, path)
        return torch.from_numpy(pixels > 0.5).float()[None]
    return _lowres_file(where, path, size, lowres_factor)


def _lowres_file(where, path, size, lowres_factor) -> torch.Tensor:
    if size is None:
        raise ValueError(f"{where}: size (height, width) must be given for a lowres file")
    factor = check_int(where, "lowres_factor", lowres_factor, 1)
    height, width = (int(s) for s in size)
    if height % factor or width % factor:
        raise ValueError(f"{where}: lowres_factor must divide size {height} x {width}, got {factor}")
    pixels = np.asarray(_open_image(where, path, "RGB"))
    small = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)
    target = (height // factor, width // factor)
    if tuple(small.shape[-2:]) != target:
        shrink = small.shape[-2] >= target[0] and small.shape[-1] >= target[1]
        small = F.interpolate(small, size=target, mode="area") if shrink else _upsample(small, target)
    return _upsample(small, (height, width))[0]


# ----------------------------------------------------------------------------- shipped layouts

def shipped_layout(name: str = "vq_letters") -> Path:
    """The path of a layout PNG shipped with fastvq (fastvq/assets/layout_<name>.png).

    Its colours are palette(len(SHIPPED_LAYOUT_CLASSES[name])), colour k meaning the texture
    SHIPPED_LAYOUT_CLASSES[name][k].

    Args:
        name: a key of SHIPPED_LAYOUT_CLASSES.
    Returns:
        the file's path.
    Raises:
        ValueError: unknown name.
        FileNotFoundError: the file is missing from this installation.
    """
    if name not in SHIPPED_LAYOUT_CLASSES:
        raise ValueError(f"shipped_layout: name must be one of {tuple(SHIPPED_LAYOUT_CLASSES)}, got {name!r}")
    path = ASSETS / f"layout_{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"shipped_layout: {path} is missing (redraw it with "
                                f"`python -m fastvq.pipeline.conditions`)")
    return path


def _segment_distance(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance from the points (x, y) to the segment a-b."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy)


def vq_letters_layout(size: int = 512) -> torch.Tensor:
    """The letters "VQ" in thick strokes, class 0 (brick), on class 1 (grass): int64 (size, size).

    Drawn from exact geometry on the pixel centres (numpy, no font or rasteriser), so the same on
    every machine and Pillow version. The shipped layout_vq_letters.png is vq_letters_layout(512).

    Args:
        size: side in pixels (>= 16).
    Returns:
        int64 (size, size) labels in {0, 1}.
    """
    size = check_int("vq_letters_layout", "size", size, 16)
    centres = (np.arange(size) + 0.5) / size  # coordinates as fractions of the side
    y, x = np.meshgrid(centres, centres, indexing="ij")
    half = 0.06  # half the stroke width
    letter = np.zeros((size, size), dtype=bool)
    # V: two strokes meeting at the bottom
    for top in ((0.08, 0.2), (0.42, 0.2)):
        letter |= _segment_distance(x, y, top, (0.25, 0.8)) <= half
    # Q: an elliptic ring and a tail from its midline at 50 degrees below the centre, out to the lower right
    cx, cy, rx, ry = 0.7, 0.47, 0.17, 0.26
    outer = ((x - cx) / (rx + half)) ** 2 + ((y - cy) / (ry + half)) ** 2 <= 1.0
    inner = ((x - cx) / (rx - half)) ** 2 + ((y - cy) / (ry - half)) ** 2 < 1.0
    letter |= outer & ~inner
    letter |= _segment_distance(x, y, (0.81, 0.67), (0.92, 0.86)) <= half
    return torch.from_numpy(np.where(letter, 0, 1).astype(np.int64))


def write_shipped_layouts(folder=None) -> list[Path]:
    """Redraw every shipped layout PNG into folder (default fastvq/assets); returns the paths."""
    folder = ASSETS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    drawings = {"vq_letters": vq_letters_layout}
    paths = []
    for name, classes in SHIPPED_LAYOUT_CLASSES.items():
        path = folder / f"layout_{name}.png"
        save_layout_png(drawings[name](), path, palette(len(classes)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_shipped_layouts():
        print(written)
