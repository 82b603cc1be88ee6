"""Datasets for the VQGAN + GPT pipeline: square crops of scikit-image's built-in images or of a folder.

Every item is a tuple (image, label): image is a float32 (3, size, size) tensor in [-1, 1], label an
int, the index of the source image (EmbeddedImages) or of its top-level subfolder (ImageFolder) in
`dataset.classes`. Models that are not class-conditional ignore it; `num_classes(dataset)` sizes the
class embedding of those that are.

Train / held-out split by region, the same for both datasets: the right-most `heldout_fraction` of
every source image's width (at least `size` pixels) is held out and training crops come only from
the rest. Held-out PSNR therefore measures reconstruction of pixels the model never saw, even when
the data is a single image or a few textures.
  * split="train": a random crop with random horizontal and vertical flips. The randomness is a
    function of (seed, epoch, index) alone, not of any global RNG, so items are reproducible, do not
    depend on the DataLoader's worker count, and differ across DistributedSampler ranks (which get
    different indices). Call `set_epoch(epoch)` before each epoch, as for DistributedSampler, to get
    new crops; with persistent DataLoader workers the workers keep the epoch they started with.
    Item i comes from source image i % len(images), so classes are balanced. `len` is `length`, a
    nominal epoch; by default the number of non-overlapping crops that fit in the training regions.
  * split="heldout": a fixed grid of non-overlapping crops tiling every held-out strip, no flips;
    `length`, when given, keeps at most that many, evenly spaced over the grid.

Each source image is decoded, converted to RGB and resized by `scale` once, at construction, and kept
as a uint8 (3, H, W) tensor; an item is a slice, a conversion to float and perhaps a flip.

TrainBatches serves a training loop its batches, epoch after epoch, in an order that is a function
of (seed, epoch, rank) alone, and says where it stands (state_dict: the epoch and the position in
it), so that a run resumed from a checkpoint continues with the batches the uninterrupted run
would have drawn.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .._checks import check_int, check_positive

# The images scikit-image ships inside its package (skimage.data loads them without pooch or a
# download), restricted to natural photographs and textures of at least 300 pixels a side.
EMBEDDED_IMAGES = (
    "brick", "grass", "gravel",  # textures
    "astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket",
)
DEFAULT_IMAGES = ("brick", "grass", "gravel")  # what the demo trains on
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "heldout")


def _rgb_uint8(image, scale: float) -> torch.Tensor:
    """A PIL image or an (H, W[, C]) array -> uint8 (3, H', W') RGB, resized by `scale`."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    if scale != 1.0:
        width, height = image.size
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)  # antialiased when shrinking
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _check_arguments(owner: str, size, split, length, scale, seed, heldout_fraction) -> None:
    check_int(owner, "size", size, 1)
    if split not in SPLITS:
        raise ValueError(f"{owner}: split must be one of {SPLITS}, got {split!r}")
    if length is not None:
        check_int(owner, "length", length, 1)
    check_positive(owner, "scale", scale)
    check_int(owner, "seed", seed, 0)
    check_positive(owner, "heldout_fraction", heldout_fraction, 1.0, high_open=True)


class _RegionCrops(Dataset):
    """Train / held-out crops of a list of uint8 (3, H, W) images; see the module docstring."""

    def __init__(self, images: list[torch.Tensor], sources: list[str], labels: list[int], classes: list[str],
                 size: int, split: str, length: int | None, seed: int, heldout_fraction: float, flips: bool,
                 scale: float):
        owner = type(self).__name__
        self.images, self.sources, self.labels, self.classes = images, sources, labels, classes
        self.size, self.split, self.seed, self.flips = int(size), split, int(seed), bool(flips)
        self.epoch = 0
        self.train_widths = [self._train_width(owner, image, source, heldout_fraction, scale)
                             for image, source in zip(images, sources)]
        if split == "train":
            fits = sum((image.shape[1] // size) * (width // size) for image, width in zip(images, self.train_widths))
            self.length = int(length) if length is not None else fits
            self.crops = None
        else:
            self.crops = self._heldout_grid(length)
            self.length = len(self.crops)

    def _train_width(self, owner, image, source, heldout_fraction, scale) -> int:
        """Width of the training region: everything left of the held-out strip."""
        height, width = image.shape[1:]
        strip = max(self.size, math.ceil(heldout_fraction * width))
        if height < self.size or width - strip < self.size:
            raise ValueError(
                f"{owner}: image {source} is {height} x {width} pixels (after scale={scale}); crops of size "
                f"{self.size} need at least {self.size} x {self.size + strip} (a training region of width "
                f"{self.size} plus the held-out strip of width {strip}); use a smaller size or a larger scale")
        return width - strip

    def _heldout_grid(self, length: int | None) -> list[tuple[int, int, int]]:
        grid = []
        for i, (image, left0) in enumerate(zip(self.images, self.train_widths)):
            height, width = image.shape[1:]
            for top in range(0, height - self.size + 1, self.size):
                for left in range(left0, width - self.size + 1, self.size):
                    grid.append((i, top, left))
        if length is not None and length < len(grid):
            keep = torch.linspace(0, len(grid) - 1, length).round().long().tolist()
            grid = [grid[k] for k in keep]
        return grid

    def set_epoch(self, epoch: int) -> None:
        """Choose the training crops of this epoch (no effect on the held-out split)."""
        self.epoch = check_int(f"{type(self).__name__}.set_epoch", "epoch", epoch, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {self.length} items")
        if self.crops is not None:
            i, top, left = self.crops[index]
            crop = self.images[i][:, top:top + self.size, left:left + self.size]
        else:
            i, crop = self._random_crop(index)
        return crop.float().div_(127.5).sub_(1.0), self.labels[i]

    def _random_crop(self, index: int) -> tuple[int, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        i = index % len(self.images)
        image = self.images[i]
        top = int(rng.integers(0, image.shape[1] - self.size + 1))
        left = int(rng.integers(0, self.train_widths[i] - self.size + 1))
        crop = image[:, top:top + self.size, left:left + self.size]
        if self.flips:
            horizontal, vertical = rng.random(2) < 0.5
            dims = [d for d, flip in ((2, horizontal), (1, vertical)) if flip]
            if dims:
                crop = crop.flip(dims)
        return i, crop


class EmbeddedImages(_RegionCrops):
    """Crops of images shipped inside scikit-image (EMBEDDED_IMAGES); label = index in `names`.

    names defaults to DEFAULT_IMAGES (the textures brick, grass, gravel). scale resizes each image
    once at load (0.5 halves it). heldout_fraction and flips as in the module docstring.
    """

    def __init__(self, size: int = 32, split: str = "train", names=None, length: int | None = None,
                 scale: float = 1.0, seed: int = 0, *, heldout_fraction: float = 0.2, flips: bool = True):
        _check_arguments("EmbeddedImages", size, split, length, scale, seed, heldout_fraction)
        names = list(DEFAULT_IMAGES if names is None else names)
        unknown = [name for name in names if name not in EMBEDDED_IMAGES]
        if not names or unknown:
            raise ValueError(f"EmbeddedImages: names must be a non-empty selection of {EMBEDDED_IMAGES}, "
                             f"got {names!r}" + (f" (unknown: {unknown})" if unknown else ""))
        if len(set(names)) != len(names):
            raise ValueError(f"EmbeddedImages: names must not repeat, got {names!r}")
        from skimage import data

        images = [_rgb_uint8(getattr(data, name)(), scale) for name in names]
        super().__init__(images, names, list(range(len(names))), names, size, split, length, seed,
                         heldout_fraction, flips, scale)


class ImageFolder(_RegionCrops):
    """Crops of the images under `root` (png, jpg, jpeg, bmp, webp; searched recursively).

    label = index in `classes`, the sorted names of root's subfolders that hold images, a file's class
    being the first folder of its path below root; files directly in root form the class "" (so a flat
    folder is one class, label 0). Split by region like EmbeddedImages: every image contributes its
    right-most strip to the held-out split, so even a single image is a valid dataset. All images are
    decoded at construction; a folder of many large images costs their size in memory as uint8.
    """

    def __init__(self, root, size: int = 32, split: str = "train", length: int | None = None,
                 scale: float = 1.0, seed: int = 0, *, heldout_fraction: float = 0.2, flips: bool = True):
        _check_arguments("ImageFolder", size, split, length, scale, seed, heldout_fraction)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {root} is not an existing directory")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"ImageFolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        relative = [p.relative_to(root) for p in files]
        folder_of = [rel.parts[0] if len(rel.parts) > 1 else "" for rel in relative]
        classes = sorted(set(folder_of))
        labels = [classes.index(folder) for folder in folder_of]
        images = [_load_file(p, scale) for p in files]
        super().__init__(images, [str(p) for p in files], labels, classes, size, split, length, seed,
                         heldout_fraction, flips, scale)


def _load_file(path: Path, scale: float) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return _rgb_uint8(image, scale)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"ImageFolder: cannot decode image {path}: {e}") from e


def make_dataset(data: str | None, size: int, split: str, **kw) -> _RegionCrops:
    """The dataset a `--data` option names; keywords go to the dataset class.

    None or "embedded": EmbeddedImages with DEFAULT_IMAGES; "embedded:brick,grass": those images of
    EMBEDDED_IMAGES; an existing directory: ImageFolder over it.
    """
    if data is None or data == "embedded":
        return EmbeddedImages(size, split, **kw)
    if isinstance(data, str) and data.startswith("embedded:"):
        names = [name.strip() for name in data[len("embedded:"):].split(",") if name.strip()]
        return EmbeddedImages(size, split, names=names, **kw)
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        return ImageFolder(data, size, split, **kw)
    raise _bad_data(data)


def _bad_data(data) -> ValueError:
    return ValueError(f"data must be None, 'embedded', 'embedded:NAME,NAME,...' with names from "
                      f"{EMBEDDED_IMAGES}, or an existing directory of images; got {data!r}")


def data_source(data) -> str:
    """The `--data` spec a run records in its checkpoints, so that a later command can use the same
    data: "embedded" for None, "embedded:..." as given, a directory as an absolute path (the
    next command may run elsewhere). Checked as make_dataset checks it."""
    if data is None or data == "embedded" or (isinstance(data, str) and data.startswith("embedded:")):
        return data or "embedded"
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        return str(Path(data).resolve())
    raise _bad_data(data)


def num_classes(dataset) -> int:
    """Number of labels a dataset from this module (possibly wrapped in Subset) produces."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError(f"num_classes: {type(dataset).__name__} has no `classes` attribute")
    return len(classes)


class TrainBatches:
    """Endless training batches of `dataset`, epoch after epoch, that a resumed run continues exactly.

    Epoch e: the dataset's set_epoch(e) (its crops), then a permutation of range(len(dataset))
    drawn from numpy's generator seeded by (seed, e), never a global RNG (a shuffling DataLoader
    draws its order and its workers' seeds from torch's global generator, which then depends on
    everything else the run drew). Its first world_size * (len // world_size) indices are dealt out
    among the processes, rank r taking every world_size-th from the r-th (as DistributedSampler
    does); each process yields the full batches of its share (the rest of the share is dropped).
    DataLoader workers (num_workers > 0) are seeded from (seed, epoch, rank) too.

    state_dict() is the position of the next batch: {"epoch": e, "sample": i, "world_size": n},
    i the number of indices of epoch e's share already used. load_state_dict(state) continues from
    there; a position saved by a run with another number of processes is mapped to the same
    fraction of the epoch (approximate). position_at(step) is the position after `step` batches from
    the start, for checkpoints that did not record one.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        owner = "TrainBatches"
        self.dataset = dataset
        self.batch_size = check_int(owner, "batch_size", batch_size, 1)
        self.seed = check_int(owner, "seed", seed, 0)
        self.world_size = check_int(owner, "world_size", world_size, 1)
        self.rank = check_int(owner, "rank", rank, 0, self.world_size - 1)
        self.num_workers = check_int(owner, "num_workers", num_workers, 0)
        self.share = len(dataset) // self.world_size
        if self.share < self.batch_size:
            raise ValueError(f"{owner}: an epoch of {len(dataset)} items gives each of {self.world_size} "
                             f"process(es) {self.share}, fewer than one batch of {self.batch_size}; use a smaller "
                             f"batch size or more data")
        self.batches_per_epoch = self.share // self.batch_size
        self.epoch, self.sample = 0, 0
        self._batches = None

    def _indices(self, epoch: int) -> list[int]:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
        return order[self.rank:self.share * self.world_size:self.world_size].tolist()

    def _start_epoch(self):
        end = self.batches_per_epoch * self.batch_size
        if self.sample + self.batch_size > end:  # this epoch's batches are used up
            self.epoch, self.sample = self.epoch + 1, 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        indices = self._indices(self.epoch)[self.sample:end]
        workers_seed = int(np.random.default_rng((self.seed, self.epoch, self.rank)).integers(2 ** 62))
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=True,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(workers_seed))
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self._start_epoch()
        try:
            batch = next(self._batches)
        except StopIteration:
            self.sample = self.batches_per_epoch * self.batch_size
            self._batches = self._start_epoch()
            batch = next(self._batches)
        self.sample += self.batch_size
        return batch

    def state_dict(self) -> dict:
        if self.sample + self.batch_size > self.batches_per_epoch * self.batch_size:  # the next batch opens an epoch
            return {"epoch": self.epoch + 1, "sample": 0, "world_size": self.world_size}
        return {"epoch": self.epoch, "sample": self.sample, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        epoch = check_int("TrainBatches.load_state_dict", "epoch", state["epoch"], 0)
        sample = check_int("TrainBatches.load_state_dict", "sample", state["sample"], 0)
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size:  # the same fraction of the epoch, in whole batches
            sample = sample * saved_world // self.world_size // self.batch_size * self.batch_size
        self.epoch, self.sample, self._batches = epoch, sample, None

    def position_at(self, step: int) -> dict:
        epoch, batch = divmod(check_int("TrainBatches.position_at", "step", step, 0), self.batches_per_epoch)
        return {"epoch": epoch, "sample": batch * self.batch_size, "world_size": self.world_size}
