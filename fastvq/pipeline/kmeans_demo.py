"""The quantization demo: a codebook of image patches learnt with k-means on fastvq.nearest_code.

Photographs shipped inside scikit-image (no downloads) are cut into p x p RGB patches (D = 3 p^2,
48 for p = 4); k-means learns K codes (assignment by fastvq.nearest_code, update by per-code means
with index_add_ and bincount, empty codes re-seeded at the worst-fitting patches); every patch is
then replaced by its code. The original and the reconstruction are written side by side with the
codebook, and nearest_code's cpp backend is timed against the torch reference on the same data.

`python -m fastvq kmeans --out DIR`, or `run_demo(DIR)` from Python.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .._backend import available_backends, resolve_backend
from ..bench import median_seconds
from ..ops.quantize import nearest_code, nearest_code_reference
from .metrics import psnr

IMAGES = ("astronaut", "chelsea", "coffee", "brick")  # photographs and a texture, all inside scikit-image
DEFAULT_IMAGES = ("astronaut", "brick")
# What run_demo uses for a setting left at None: the full demo (seconds) and the tiny one for tests.
DEFAULTS = {"codes": 256, "iters": 20, "downscale": 1}
QUICK_DEFAULTS = {"codes": 64, "iters": 6, "downscale": 4}


def load_image(name: str, downscale: int = 1) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1]; grey images become three equal channels."""
    from skimage import data

    if name not in IMAGES:
        raise ValueError(f"image must be one of {IMAGES}, got {name!r}")
    img = torch.from_numpy(getattr(data, name)()).float() / 255
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    if downscale > 1:
        img = F.avg_pool2d(img.permute(2, 0, 1)[None], downscale)[0].permute(1, 2, 0)
    return img.contiguous()


def to_patches(img: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) -> (rows * cols, p * p * 3), cropping H and W down to multiples of p."""
    rows, cols = img.shape[0] // p, img.shape[1] // p
    if rows == 0 or cols == 0:
        raise ValueError(f"patch size {p} is larger than the image ({img.shape[0]} x {img.shape[1]})")
    x = img[:rows * p, :cols * p].reshape(rows, p, cols, p, 3).permute(0, 2, 1, 3, 4)
    return x.reshape(rows * cols, p * p * 3), (rows, cols)


def from_patches(x: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    rows, cols = grid
    return x.reshape(rows, cols, p, p, 3).permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, 3)


def kmeans(x: torch.Tensor, k: int, iters: int, *, backend: str | None = None, seed: int = 0, log=print):
    """Lloyd's k-means with nearest_code for the assignment. Returns (codebook, indices, distances)."""
    g = torch.Generator().manual_seed(seed)
    codebook = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for it in range(1, iters + 1):
        idx, dist = nearest_code(x, codebook, backend=backend)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(codebook).index_add_(0, idx, x)
        used = counts > 0
        log(f"iter {it:3d}  mean distance {dist.mean().item():.5f}  codes used {int(used.sum())}/{k}")
        codebook[used] = sums[used] / counts[used, None].to(x.dtype)
        empty = (~used).nonzero().squeeze(1)
        if empty.numel():
            # An empty code is wasted capacity: move it onto the patches the codebook fits worst.
            codebook[empty] = x[dist.topk(empty.numel()).indices]
    idx, dist = nearest_code(x, codebook, backend=backend)
    return codebook, idx, dist


def throughput(x: torch.Tensor, codebook: torch.Tensor, log=print) -> dict:
    """Vectors per second of nearest_code (cpp) and of the torch reference on the same data."""
    ref_s = median_seconds(lambda: nearest_code_reference(x, codebook))
    out = {"n": x.shape[0], "torch_reference_vectors_per_s": x.shape[0] / ref_s}
    cpp = available_backends()["cpp"]
    if not cpp.available:
        log(f"nearest_code throughput: cpp backend unavailable ({cpp.reason}); torch reference "
            f"{out['torch_reference_vectors_per_s']:.3g} vectors/s")
        return out
    cpp_s = median_seconds(lambda: nearest_code(x, codebook, backend="cpp"))
    out.update(cpp_vectors_per_s=x.shape[0] / cpp_s, speedup=ref_s / cpp_s)
    log(f"nearest_code throughput (N={x.shape[0]}, K={codebook.shape[0]}, D={x.shape[1]}, "
        f"{torch.get_num_threads()} threads): cpp {out['cpp_vectors_per_s']:.3g} vectors/s, torch reference "
        f"{out['torch_reference_vectors_per_s']:.3g} vectors/s, speedup {out['speedup']:.2f}x")
    return out


def codebook_mosaic(codebook: torch.Tensor, p: int, gap: int = 1) -> torch.Tensor:
    """The codes, darkest first, as a square grid of p x p RGB tiles on white."""
    codebook = codebook[codebook.mean(1).argsort()]
    k = codebook.shape[0]
    side = math.ceil(math.sqrt(k))
    cell = p + gap
    mosaic = torch.ones(side * cell + gap, side * cell + gap, 3)
    tiles = codebook.clamp(0, 1).reshape(k, p, p, 3)
    for i in range(k):
        r, c = divmod(i, side)
        mosaic[gap + r * cell:gap + r * cell + p, gap + c * cell:gap + c * cell + p] = tiles[i]
    return mosaic


def save_figure(path: Path, originals, recons, psnrs, codebook, p, title):
    from matplotlib.figure import Figure

    n = len(originals)
    fig = Figure(figsize=(11, 4.2 * n + 0.6))
    grid = fig.add_gridspec(n, 3, width_ratios=[1, 1, 0.8])
    for row, (name, img, rec, db) in enumerate(zip(psnrs, originals, recons, psnrs.values())):
        for col, (im, label) in enumerate(((img, f"{name}: original"), (rec, f"{name}: quantized, PSNR {db:.2f} dB"))):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(im.clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(label, fontsize=10)
            ax.axis("off")
    ax = fig.add_subplot(grid[:, 2])
    ax.imshow(codebook_mosaic(codebook, p).numpy(), interpolation="nearest")
    ax.set_title(f"the {codebook.shape[0]} codes ({p}x{p} RGB)", fontsize=10)
    ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_demo(out_dir, *, codes: int | None = None, patch: int = 4, iters: int | None = None, images=DEFAULT_IMAGES,
             downscale: int | None = None, backend: str | None = None, seed: int = 0, quick: bool = False,
             log=print) -> dict:
    """Learn the codebook, write out_dir/quantize_demo.png, report PSNR and nearest_code throughput.

    Settings left at None come from DEFAULTS, or with quick=True from QUICK_DEFAULTS (a tiny setting
    for tests: images 4x smaller, 64 codes, 6 iterations).
    """
    given = {"codes": codes, "iters": iters, "downscale": downscale}
    defaults = QUICK_DEFAULTS if quick else DEFAULTS
    codes, iters, downscale = (defaults[k] if v is None else v for k, v in given.items())
    for name, value in (("codes", codes), ("patch", patch), ("iters", iters), ("downscale", downscale)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if not images:
        raise ValueError("at least one image is needed")
    name = resolve_backend(backend, torch.device("cpu"), "demo")
    originals, grids, parts = [], [], []
    for image in images:
        img = load_image(image, downscale)
        x, grid = to_patches(img, patch)
        originals.append(img[:grid[0] * patch, :grid[1] * patch])
        grids.append(grid)
        parts.append(x)
    x = torch.cat(parts)
    if codes > x.shape[0]:
        raise ValueError(f"codes ({codes}) must not exceed the number of patches ({x.shape[0]}); "
                         "use fewer codes, smaller patches or less downscaling")
    log(f"{x.shape[0]} patches of {patch}x{patch} RGB (D={x.shape[1]}) from {', '.join(images)}; "
        f"k-means with K={codes}, {iters} iterations, nearest_code backend {name}")
    t0 = time.perf_counter()
    codebook, idx, _ = kmeans(x, codes, iters, backend=name, seed=seed, log=log)
    log(f"k-means took {time.perf_counter() - t0:.2f} s")

    recon_x = codebook[idx]
    recons, psnrs, start = [], {}, 0
    for image, img, grid, part in zip(images, originals, grids, parts):
        rec = from_patches(recon_x[start:start + part.shape[0]], grid, patch)
        start += part.shape[0]
        recons.append(rec)
        psnrs[image] = psnr(rec, img)
    overall = psnr(recon_x, x)  # the mean squared error over every pixel of every image
    log("PSNR " + ", ".join(f"{k} {v:.2f} dB" for k, v in psnrs.items()) + f"; all {overall:.2f} dB")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "quantize_demo.png"
    title = (f"fastvq k-means codebook: K = {codes} codes of {patch}x{patch} RGB patches (D = {x.shape[1]}), "
             f"{iters} iterations, PSNR {overall:.2f} dB")
    save_figure(png, originals, recons, psnrs, codebook, patch, title)
    log(f"wrote {png}")
    speed = throughput(x, codebook, log=log)
    return {"png": png, "psnr": overall, "psnr_per_image": psnrs, "codes_used": int(torch.unique(idx).numel()),
            "n_vectors": x.shape[0], "dim": x.shape[1], "backend": name, "throughput": speed}
