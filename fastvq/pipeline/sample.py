"""sample: images from a trained prior (gpt.ckpt from train-gpt, which carries its VQGAN).

Codes are drawn with fastvq.sample_with_past (prefill + KVCache ring buffer + fused sampler) and
decoded by the VQGAN. Images may be taller than the training crops: the code grid keeps the
training width (the raster order, and so what "the token above" means, depends on it) and grows
downwards; with a sliding window and rope the cache stays `window` slots per layer however many
rows are sampled, so a 4x or 16x taller image costs memory like a training crop. The VQGAN then
decodes grids larger than DECODE_TILE codes a side in overlapping tiles (VQGAN.decode_tiled,
tiles of several images per call up to DECODE_MEMORY bytes), so decoding is bounded too; smaller
grids decode whole, exactly as before.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.gpt import GPT, sample_with_past
from ..models.vqgan import DEFAULT_TILE, VQGAN, VQGANConfig
from .checkpoint import load_checkpoint, load_weights
from .config import ConfigError, TrainGPTConfig
from .logs import save_image_grid


def load_prior(path, map_location="cpu") -> tuple[GPT, VQGAN, dict]:
    """(gpt, vqgan, layout) from a gpt.ckpt written by train-gpt."""
    from .train_gpt import build_gpt

    state = load_checkpoint(path, map_location=map_location)
    if state.get("kind") != "gpt" or not state.get("vqgan"):
        raise ConfigError(f"{path}: not a fastvq gpt.ckpt from train-gpt (kind {state.get('kind')!r})")
    layout = state["layout"]
    gpt = build_gpt(TrainGPTConfig.from_dict(state["config"], f"{path}: config"), layout)  # a dict in every version
    load_weights(gpt, state["model"], path, "GPT")
    vqgan = VQGAN(VQGANConfig.from_dict(state["vqgan"]["config"]))
    load_weights(vqgan, state["vqgan"]["model"], path, "VQGAN")
    return gpt.to(map_location).eval(), vqgan.to(map_location).eval(), layout


def _class_tokens(layout: dict, classes, n: int) -> torch.Tensor:
    """The conditioning token of every sample: the classes asked for (names or indices) in equal
    consecutive runs, so a grid of n = rows x 8 images shows one class after another."""
    if layout["classes"] == 0:
        if classes:
            raise ConfigError("--class: this prior was trained without class conditioning")
        return torch.full((n,), layout["n_embed"], dtype=torch.int64)
    names = layout.get("class_names") or []
    wanted = list(classes) if classes else list(range(layout["classes"]))
    indices = []
    for c in wanted:
        if isinstance(c, str) and not c.isdigit():
            if c not in names:
                raise ConfigError(f"--class: unknown class {c!r}; this prior knows {', '.join(names) or 'none by name'}")
            indices.append(names.index(c))
        else:
            i = int(c)
            if not 0 <= i < layout["classes"]:
                raise ConfigError(f"--class: class index must be in [0, {layout['classes']}), got {i}")
            indices.append(i)
    return layout["n_embed"] + torch.tensor([indices[i * len(indices) // n] for i in range(n)], dtype=torch.int64)


@torch.no_grad()
def sample_codes(gpt: GPT, layout: dict, n: int, rows: int, *, classes=None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, device="cpu") -> torch.Tensor:
    """(n, rows, w) code grids, w the training width; rows beyond the training height need rope."""
    w = layout["w"]
    tokens = rows * w
    if tokens + 1 > gpt.block_size and not gpt.rope:
        raise ConfigError(f"--height: {rows} code rows need {tokens + 1} positions but this prior has block_size "
                          f"{gpt.block_size} and no rope; it can only sample up to {(gpt.block_size - 1) // w} rows")
    prefix = _class_tokens(layout, classes, n)[:, None].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = sample_with_past(prefix, gpt, tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return codes.clamp_(max=layout["n_embed"] - 1).view(n, rows, w)  # class tokens are never drawn in practice


DECODE_TILE = DEFAULT_TILE  # code grids with a side above this decode in tiles
DECODE_MEMORY = 512 * 2 ** 20  # bytes of decoder activations one tiled decode call may hold


@torch.no_grad()
def decode_codes(vqgan: VQGAN, codes: torch.Tensor, *, tile: int = DECODE_TILE, memory: int = DECODE_MEMORY,
                 callback=None) -> torch.Tensor:
    """Images (n, 3, h * f, w * f) on the CPU from code grids (n, h, w).

    A grid within tile x tile codes decodes whole (decode_indices, the batch at once, as before).
    A larger one decodes in overlapping tiles (VQGAN.decode_tiled with this tile, so the images
    do not depend on `memory`), as many tiles of as many images per call as fit in `memory`
    bytes by the VQGAN's measured bytes per code (decode_memory_per_code), at least one: peak
    memory stays near `memory` (or one tile, if larger) however tall and however many the samples
    are, and calls stay large enough to keep a busy machine efficient. callback(done, total)
    counts the tiles over all images.
    """
    n, h, w = codes.shape
    if h <= tile and w <= tile:
        return vqgan.decode_indices(codes).cpu()
    fixed, per_code = vqgan.decode_memory_per_code()
    per_call = max(1, int((memory - fixed) // (per_code * min(h, tile) * min(w, tile))))  # image-tiles a call
    group = min(n, per_call)
    starts = range(0, n, group)
    images = []
    for k, i in enumerate(starts):
        progress = None if callback is None else (
            lambda done, total, k=k, size=len(codes[i:i + group]): callback(k * group * total + size * done,
                                                                              n * total))
        images.append(vqgan.decode_tiled(codes[i:i + group], tile=tile, tiles_per_call=max(1, per_call // group),
                                         callback=progress).cpu())
    return torch.cat(images)


def sample_images(ckpt, out_path, *, n: int = 8, height: int | None = None, classes=None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, nrow: int | None = None,
                  zoom: int = 1, device: str = "cpu") -> dict:
    """Sample n images (height in pixels, default the training crop; width always the training
    crop) and write them as one PNG grid (pixels enlarged zoom x zoom). Returns the path, the
    images and the sizes used."""
    gpt, vqgan, layout = load_prior(ckpt, map_location=device)
    factor = layout["size"] // layout["h"]
    height = layout["size"] if height is None else height
    if height < factor or height % factor:
        raise ConfigError(f"--height must be a positive multiple of {factor} pixels (the VQGAN's downsampling), "
                          f"got {height}")
    codes = sample_codes(gpt, layout, n, height // factor, classes=classes, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, device=device)
    images = decode_codes(vqgan, codes.to(device)).clamp_(-1, 1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, out_path, nrow=nrow or min(n, 8), zoom=zoom)
    return {"png": out_path, "images": images, "codes": codes, "height": height, "width": layout["size"],
            "tokens_per_image": codes[0].numel()}
