"""sample: images from a trained prior (gpt.ckpt from train-gpt, which carries its VQGAN).

A GPT2D prior (the default) samples at any size, --width and --height in pixels, with
fastvq.sample_grid (wavefront decoding through the raster-window ring cache; the memory of the
cache grows with the width, never with the height), steered by a spatial condition (--cond
FILE.png: a layout PNG in the checkpoint's colours, an edge map, or a low-resolution picture) and
classifier-free guidance (--cfg-scale). A layout prior without --cond draws each --class as a
uniform layout of that texture (a panorama). A JSON beside the PNG records seed, sizes, condition
and timings.

The 1-D GPT prior: codes are drawn with fastvq.sample_with_past (prefill + KVCache ring buffer + fused sampler) and
decoded by the VQGAN. Images may be taller than the training crops: the code grid keeps the
training width (the raster order, and so what "the token above" means, depends on it) and grows
downwards; with a sliding window and rope the cache stays `window` slots per layer however many
rows are sampled, so a 4x or 16x taller image costs memory like a training crop. The VQGAN then
decodes grids larger than DECODE_TILE codes a side in overlapping tiles (VQGAN.decode_tiled,
tiles of several images per call up to DECODE_MEMORY bytes), so decoding is bounded too; smaller
grids decode whole, exactly as before.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..models.gpt import GPT, sample_with_past
from ..models.gpt2d import GPT2D, sample_grid
from ..models.vqgan import DEFAULT_TILE, VQGAN, VQGANConfig
from .checkpoint import load_checkpoint, load_weights
from .config import ConfigError, TrainGPTConfig
from .logs import save_image_grid


def load_prior(path, map_location="cpu") -> tuple[GPT | GPT2D, VQGAN, dict]:
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
    index = _class_indices(layout, names, classes, n, count=layout["classes"])
    return layout["n_embed"] + torch.tensor(index, dtype=torch.int64)


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


def _pixel_size(name: str, value: int, factor: int) -> int:
    if value < factor or value % factor:
        raise ConfigError(f"--{name} must be a positive multiple of {factor} pixels (the VQGAN's downsampling), "
                          f"got {value}")
    return value // factor


def _class_indices(layout: dict, names: list, classes, n: int, count: int | None = None) -> list[int]:
    """Index of the class of each of n samples: the --class names or indices asked for, in equal
    consecutive runs (every class when none are asked for). count: the number of classes, when
    names may be missing (checkpoints without class names)."""
    count = len(names) if count is None else count
    wanted = list(classes) if classes else list(range(count))
    indices = []
    for c in wanted:
        if isinstance(c, str) and not c.isdigit():
            if c not in names:
                raise ConfigError(f"--class: unknown class {c!r}; this prior knows {', '.join(names) or 'none by name'}")
            indices.append(names.index(c))
        else:
            if not 0 <= int(c) < count:
                raise ConfigError(f"--class: class index must be in [0, {count}), got {int(c)}")
            indices.append(int(c))
    return [indices[i * len(indices) // n] for i in range(n)]


def _grid_condition(layout: dict, cond, classes, n: int, height, width, cond_map=None):
    """(cond map (n or 1, C, H, W) or None, cls (n,) or None, description, (H, W) in pixels)."""
    from .conditions import load_condition_file

    kind, size = layout.get("cond", "none"), (height or layout["size"], width or layout["size"])
    if cond_map is not None:
        if kind == "none":
            raise ConfigError("cond_map: this prior was trained without a spatial condition")
        return cond_map, None, f"{kind} map", tuple(cond_map.shape[-2:])
    if cond is not None:
        if kind == "none":
            raise ConfigError("--cond: this prior was trained without a spatial condition (train-gpt --cond)")
        if kind == "lowres" and (height is None or width is None):
            from PIL import Image

            with Image.open(cond) as im:  # the low-resolution picture: the output is lowres_factor times larger
                size = (height or im.height * layout["lowres_factor"], width or im.width * layout["lowres_factor"])
        colours = [tuple(c) for c in layout.get("cond_colours", [])] or None
        cmap = load_condition_file(kind, cond, colours=colours, lowres_factor=layout.get("lowres_factor", 8),
                                   size=size if kind == "lowres" else None)
        if (height or width) and kind != "lowres":  # a layout / edge map drawn at another size: resampled
            size = (height or cmap.shape[-2], width or cmap.shape[-1])
            cmap = torch.nn.functional.interpolate(cmap[None], size=size, mode="nearest-exact")[0]
        return cmap[None], None, f"{kind} from {cond}", tuple(cmap.shape[-2:])
    if kind == "layout" and classes:  # a uniform layout of each asked-for texture: panoramas
        names = layout["cond_classes"]
        index = torch.tensor(_class_indices(layout, names, classes, n))
        maps = torch.nn.functional.one_hot(index, len(names)).float()[:, :, None, None].expand(-1, -1, *size)
        return maps.contiguous(), None, "uniform layouts of " + ", ".join(names[i] for i in sorted(set(index.tolist()))), size
    if layout["classes"]:
        names = layout.get("class_names") or [str(i) for i in range(layout["classes"])]
        return None, torch.tensor(_class_indices(layout, names, classes, n)), "class", size
    if classes:
        raise ConfigError("--class: this prior was trained without class conditioning")
    return None, None, "none", size


def _rows_bar(rows: int, cols: int, lag: int, wavefront: bool, enabled: bool):
    """A progress bar over finished code rows, and the sample_grid callback that drives it
    (position (i, c) of the (cols + 1)-wide grid runs at step i * lag + c with the wavefront,
    i * (cols + 1) + c one token at a time)."""
    from .logs import progress

    bar = progress(total=rows, desc="sample rows", enabled=enabled)
    period = lag if wavefront else cols + 1

    def callback(step: int) -> None:
        done = min(rows, max(0, (step - cols) // period + 1))
        if done > bar.n:
            bar.update(done - bar.n)
    return bar, callback


def sample_grid_images(gpt: GPT2D, vqgan: VQGAN, layout: dict, *, n: int = 8, height: int | None = None,
                       width: int | None = None, classes=None, cond=None, cfg_scale: float | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       wavefront: bool = True, device="cpu", show_progress: bool = False,
                       cond_map: torch.Tensor | None = None) -> dict:
    """n images of height x width pixels from a GPT2D prior (sizes default to the condition's or
    the training crop's); see the module docstring. cond: a condition file; cond_map: the
    condition map itself, (n or 1, C, H, W). Returns images, codes, the condition map and
    timings."""
    factor = layout["size"] // layout["h"]
    cmap, cls, described, (height, width) = _grid_condition(layout, cond, classes, n, height, width, cond_map)
    rows, cols = _pixel_size("height", height, factor), _pixel_size("width", width, factor)
    if cfg_scale is not None and layout.get("cond", "none") == "none" and not layout["classes"]:
        raise ConfigError("--cfg-scale: this prior has neither a class nor a spatial condition to guide with")
    lag = min(gpt.right + 1, cols + 1)
    bar, callback = _rows_bar(rows, cols, lag, wavefront, show_progress)
    t0 = time.perf_counter()
    codes = sample_grid(gpt, rows, cols, batch=n, cls=None if cls is None else cls.to(device),
                        cond=None if cmap is None else cmap.to(device), temperature=temperature, top_k=top_k,
                        top_p=top_p, cfg_scale=cfg_scale, seed=seed, wavefront=wavefront, callback=callback)
    bar.close()
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = decode_codes(vqgan, codes).clamp_(-1, 1)
    t_decode = time.perf_counter() - t0
    return {"images": images, "codes": codes.cpu(), "cond_map": cmap, "condition": described, "height": height,
            "width": width, "tokens_per_image": rows * cols,
            "timings": {"sample_s": t_sample, "decode_s": t_decode, "tokens_per_s": n * rows * cols / t_sample}}


def sample_images(ckpt, out_path, *, n: int = 8, height: int | None = None, width: int | None = None, classes=None,
                  cond=None, cfg_scale: float | None = None, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, nrow: int | None = None, zoom: int = 1,
                  wavefront: bool = True, device: str = "cpu", show_progress: bool = False) -> dict:
    """Sample n images and write them as one PNG grid (pixels enlarged zoom x zoom) and a JSON
    beside it (seed, sizes, condition, timings). A GPT2D prior: any height and width (default the
    condition's size or the training crop), a condition file, CFG. A 1-D GPT prior: the training
    width, height in pixels (default the training crop). Returns the paths, the images and the
    sizes used."""
    gpt, vqgan, layout = load_prior(ckpt, map_location=device)
    if isinstance(gpt, GPT2D):
        result = sample_grid_images(gpt, vqgan, layout, n=n, height=height, width=width, classes=classes, cond=cond,
                                    cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, wavefront=wavefront, device=device, show_progress=show_progress)
    else:
        result = _sample_1d(gpt, vqgan, layout, n, height, width, classes, cond, cfg_scale, temperature, top_k,
                            top_p, seed, device)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(result["images"], out_path, nrow=nrow or min(n, 8), zoom=zoom)
    record = {"ckpt": str(ckpt), "seed": seed, "n": n, "height": result["height"], "width": result["width"],
              "codes_per_image": result["tokens_per_image"], "condition": result.get("condition", "class"),
              "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "prior": layout.get("prior", "gpt"), "timings": result.get("timings", {})}
    json_path = out_path.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    return {**result, "png": out_path, "json": json_path}


def _sample_1d(gpt, vqgan, layout, n, height, width, classes, cond, cfg_scale, temperature, top_k, top_p, seed,
               device) -> dict:
    """The 1-D prior: the training width, growing downwards."""
    factor = layout["size"] // layout["h"]
    for name, given in (("--cond", cond), ("--cfg-scale", cfg_scale)):
        if given is not None:
            raise ConfigError(f"{name}: this is a 1-D GPT prior; conditions and guidance need a GPT2D prior")
    if width is not None and width != layout["size"]:
        raise ConfigError(f"--width: a 1-D GPT prior samples at its training width, {layout['size']} pixels, got "
                          f"{width} (a GPT2D prior samples any width)")
    height = layout["size"] if height is None else height
    t0 = time.perf_counter()
    codes = sample_codes(gpt, layout, n, _pixel_size("height", height, factor), classes=classes,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, device=device)
    t_sample = time.perf_counter() - t0
    images = decode_codes(vqgan, codes.to(device)).clamp_(-1, 1)
    return {"images": images, "codes": codes, "height": height, "width": layout["size"],
            "tokens_per_image": codes[0].numel(),
            "timings": {"sample_s": t_sample, "tokens_per_s": codes.numel() / t_sample}}
