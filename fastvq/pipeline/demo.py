"""`fastvq demo` / `make demo`: the whole pipeline on the embedded textures, then a report.

1. train-vqgan on random crops of scikit-image's brick, grass and gravel textures;
2. train-gpt: a GPT2D prior (2-D raster window, axial rope) conditioned on texture layouts, on
   mosaics of the three textures cut along random smooth label fields (crops twice the VQGAN's);
3. train-gpt: a second, smaller GPT2D conditioned on a low-resolution copy of the image
   (stochastic super-resolution);
4. sample with the wavefront through the ring cache: (a) a panorama per texture (a uniform
   layout), wider and taller than the training crops, (b) a 512 x 512 picture from the layout
   shipped in fastvq/assets (the letters VQ in brick on grass), (c) held-out crops from their
   8x smaller copies; and the same grid one code at a time, to time the wavefront against it;
5. measure quality (fidelity.py): a small texture classifier trained on real crops labels the
   patches of the layout-to-image picture, and its agreement with the layout is set against the
   same measure on real held-out mosaics (the ceiling) and on their VQGAN reconstructions; LPIPS
   and PSNR of the super-resolution, for the sample and for the blurry input;
6. time fastvq's kernels against their torch references at the demo's shapes;
7. write report.md with the pictures (each condition beside its result), the held-out NLL with and
   without the condition, the quality figures, and the timings.
The demo preset fits 10 minutes on a 2-core CPU; on a GPU the `small` preset's larger models
are trained for a few thousand steps.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..bench import median_seconds
from .config import load_config

TIMED_CALLS = 5


def kernel_timings(device: str = "cpu") -> list[dict]:
    """fastvq's default backend against the torch reference, at the demo's sizes (the median of
    TIMED_CALLS calls after one warm-up)."""
    from .. import nearest_code, sample_logits, sliding_window_attention
    from .._backend import resolve_backend

    dev = torch.device(device)
    fast = resolve_backend(None, dev, "demo")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * 64 * 16, 16, generator=g).to(dev)  # a batch of 16 crops of 8x8 codes, 16-dim
    cb = torch.randn(128, 16, generator=g).to(dev)
    q, k, v = (torch.randn(32, 4, 64, 32, generator=g).to(dev).requires_grad_() for _ in range(3))
    logits = torch.randn(64, 131, generator=g).to(dev)

    def attn(backend):
        out = sliding_window_attention(q, k, v, 32, backend=backend)
        out.sum().backward()

    cases = [
        ("nearest_code", f"N={x.shape[0]}, K=128, D=16", lambda b: nearest_code(x, cb, backend=b)),
        ("sliding_window_attention fwd+bwd", "B=32, H=4, T=64, Dh=32, W=32", attn),
        ("sample_logits top-k 50, top-p 0.9", "B=64, vocab=131", lambda b: sample_logits(
            logits, temperature=1.0, top_k=50, top_p=0.9, backend=b)),
    ]
    rows = []
    for name, shape, fn in cases:
        t_fast = median_seconds(lambda: fn(fast), runs=TIMED_CALLS, device=dev)
        t_ref = median_seconds(lambda: fn("torch"), runs=TIMED_CALLS, device=dev)
        rows.append({"op": name, "shape": shape, "backend": fast, "fastvq_ms": t_fast * 1e3,
                     "torch_reference_ms": t_ref * 1e3, "speedup": t_ref / t_fast})
    return rows


def _configs(preset: str, quick: bool) -> tuple[dict, dict, dict]:
    """(vqgan, layout prior, low-res prior) configs of the demo."""
    vq_cfg = load_config("vqgan", preset)
    layout_cfg = load_config("gpt", preset, {"train.cond": "layout"})
    lowres_cfg = load_config("gpt", preset, {"train.cond": "lowres"})
    if preset == "small":  # the small models, trained for minutes rather than the preset's hours
        vq_cfg["train"].update(steps=4000, eval_every=1000, ckpt_every=1000)
        vq_cfg["loss"]["disc_start"] = 2500
        for cfg in (layout_cfg, lowres_cfg):
            cfg["train"].update(steps=3000, codes=8192, warmup=200, ckpt_every=1000)
    else:  # the super-resolution prior learns an easier task: fewer steps
        lowres_cfg["train"].update(steps=LOWRES_STEPS, codes=1024)
    if quick:
        vq_cfg["train"].update(steps=6, log_every=2, eval_every=3, ckpt_every=3, heldout=8, batch_size=4)
        vq_cfg["loss"]["disc_start"] = 3
        for cfg in (layout_cfg, lowres_cfg):
            cfg["train"].update(steps=4, log_every=2, ckpt_every=2, codes=16, warmup=1, batch_size=4, size=32)
    return vq_cfg, layout_cfg, lowres_cfg


LOWRES_STEPS = 150
PANORAMA = (128, 256)  # pixels (height, width) of each texture's panorama on the CPU; the crops are 64
LAYOUT_SIZE = 512  # the layout-to-image picture
SPEED_GRID = 24  # codes a side of the wavefront / one-at-a-time timing


def run_demo(out_dir, *, quick: bool = False, device: str | None = None, show_progress: bool = True,
             log=print) -> dict:
    """Everything above into out_dir; quick=True is a seconds-long smoke run for tests."""
    from .train_gpt import train_gpt
    from .train_vqgan import train_vqgan

    out = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = "small" if device.startswith("cuda") else "demo"
    vq_cfg, layout_cfg, lowres_cfg = _configs(preset, quick)
    timings, t0 = {}, time.perf_counter()

    def lap(name):
        nonlocal t0
        timings[name] = time.perf_counter() - t0
        t0 = time.perf_counter()

    log(f"[1/7] train-vqgan ({preset} preset, {vq_cfg['train']['steps']} steps) -> {out / 'vqgan'}")
    vq = train_vqgan(vq_cfg, out / "vqgan", device=device, show_progress=show_progress, log=log)
    lap("train-vqgan")
    vqgan_ckpt = out / "vqgan" / "vqgan.ckpt"
    log(f"[2/7] train-gpt, layout-conditioned GPT2D ({layout_cfg['train']['steps']} steps) -> {out / 'gpt_layout'}")
    gpt = train_gpt(layout_cfg, out / "gpt_layout", vqgan_ckpt, device=device, show_progress=show_progress, log=log)
    lap("train-gpt layout")
    log(f"[3/7] train-gpt, low-res-conditioned GPT2D ({lowres_cfg['train']['steps']} steps) -> {out / 'gpt_lowres'}")
    sr = train_gpt(lowres_cfg, out / "gpt_lowres", vqgan_ckpt, device=device, show_progress=show_progress, log=log)
    lap("train-gpt lowres")
    log("[4/7] sampling: panoramas, layout to image, low-res to high-res, wavefront vs one code at a time")
    pictures = draw_pictures(out, quick, device, show_progress)
    lap("sampling")
    log("[5/7] quality: a texture classifier for layout fidelity, LPIPS and PSNR of the super-resolution")
    quality = measure_quality(out, pictures, quick, device)
    lap("quality")
    log("[6/7] kernel timings against the torch references")
    kernels = kernel_timings(device)
    lap("kernel timings")
    report = write_report(out, vq_cfg, layout_cfg, vq, gpt, sr, pictures, quality, kernels, timings, preset)
    log(f"[7/7] wrote {report}")
    return {"report": report, "vqgan": vq, "gpt": gpt, "lowres": sr, "pictures": pictures, "quality": quality,
            "kernels": kernels, "timings": timings}


def _save_row(path: Path, images: list[torch.Tensor], zoom: int = 1, nrow: int | None = None) -> Path:
    """Images (3, H, W) of one height side by side in one PNG (nrow a row; default all in one)."""
    from .logs import save_image_grid

    return save_image_grid(torch.stack(images), path, nrow=nrow or len(images), zoom=zoom)


def layout_picture(cond_map: torch.Tensor, colours) -> torch.Tensor:
    """A one-hot layout (C, H, W) as an image (3, H, W) in [-1, 1], class k in colours[k]."""
    palette = torch.tensor(colours, dtype=torch.float32) / 127.5 - 1  # (C, 3)
    return torch.einsum("chw,cd->dhw", cond_map.float(), palette)


def draw_pictures(out: Path, quick: bool, device, show_progress: bool) -> dict:
    """The report's pictures and the sampling speeds; see the module docstring."""
    from .conditions import LayoutMosaics, condition_map, shipped_layout
    from .metrics import psnr
    from .sample import load_prior, sample_grid_images

    gpt, vqgan, layout = load_prior(out / "gpt_layout" / "gpt.ckpt", map_location=device)
    names, colours = layout["cond_classes"], layout["cond_colours"]
    scale = 4 if quick else 1
    common = {"top_k": 100, "device": device, "show_progress": show_progress}
    pano_h, pano_w = (s // scale for s in PANORAMA)
    pano = sample_grid_images(gpt, vqgan, layout, n=len(names), height=pano_h, width=pano_w, classes=names, seed=3,
                              **common)
    _save_row(out / "panoramas.png", list(pano["images"]))

    size = LAYOUT_SIZE // scale
    lay = sample_grid_images(gpt, vqgan, layout, n=1, cond=shipped_layout(), height=size, width=size, seed=4,
                             cfg_scale=CFG_SCALE, **common)
    _save_row(out / "layout_to_image.png", [layout_picture(lay["cond_map"][0], colours), lay["images"][0]])

    speed = wavefront_speed(gpt, vqgan, layout, SPEED_GRID // (2 if quick else 1), device)

    gpt_sr, vqgan_sr, layout_sr = load_prior(out / "gpt_lowres" / "gpt.ckpt", map_location=device)
    crop = 128 // scale
    real = torch.stack([LayoutMosaics(crop, "heldout", length=3)[i][0] for i in range(3)])
    lowres = condition_map("lowres", real, lowres_factor=layout_sr["lowres_factor"])
    sr = sample_grid_images(gpt_sr, vqgan_sr, layout_sr, n=3, height=crop, width=crop, cond=None, seed=5,
                            **{**common, "show_progress": False}, cond_map=lowres)
    _save_row(out / "lowres_to_highres.png", [*lowres, *sr["images"], *real], zoom=2, nrow=3)
    # images are in [-1, 1]: psnr's default range (0, 1) would clamp away every value below 0
    return {"panorama": pano, "layout": lay, "speed": speed, "superres": sr, "superres_real": real,
            "superres_lowres": lowres, "layout_classes": list(names),
            "superres_psnr": psnr(sr["images"].cpu(), real, value_range=(-1, 1)),
            "lowres_psnr": psnr(lowres, real, value_range=(-1, 1))}


CFG_SCALE = 1.5
# The texture classifier of the layout fidelity (fidelity.py): its training steps (quick: a smoke
# run, its figures mean nothing) and the number of held-out mosaics of the ceiling.
FIDELITY_STEPS = {False: 400, True: 5}
CEILING_MOSAICS = {False: 16, True: 2}


def measure_quality(out: Path, pictures: dict, quick: bool, device) -> dict:
    """Layout fidelity of the layout-to-image picture against its ceilings, and LPIPS of the
    super-resolution (see the module docstring); adds a few seconds on a CPU."""
    from .fidelity import heldout_accuracy, heldout_mosaic_fidelity, layout_fidelity, train_texture_classifier
    from .metrics import mean_lpips, report_lpips
    from .sample import load_prior

    lay = pictures["layout"]
    layout = lay["cond_map"][0].argmax(0).cpu()  # the one-hot map the picture was drawn from, as labels
    _, vqgan, _ = load_prior(out / "gpt_layout" / "gpt.ckpt", map_location=device)

    def reconstruct(images):
        return vqgan.decode_indices(vqgan.encode_indices(images.to(device))).clamp(-1, 1).cpu()

    count, steps, classes = CEILING_MOSAICS[quick], FIDELITY_STEPS[quick], pictures["layout_classes"]
    # Two judges: one that learned the real textures (does the picture look like brick here?), and
    # one that learned them as this VQGAN draws them (did the prior put each texture where the
    # layout says?): a codec that blurs grass into something the first judge calls gravel fails the
    # first and not the second.
    real = train_texture_classifier(classes, steps=steps)
    codec = train_texture_classifier(classes, steps=steps, through=reconstruct)
    picture = lay["images"][0].cpu()
    fidelity = {"classifier_accuracy": heldout_accuracy(real),
                "generated": layout_fidelity(real, picture, layout),
                "ceiling": heldout_mosaic_fidelity(real, count),
                "reconstructed": heldout_mosaic_fidelity(real, count, through=reconstruct),
                "codec_accuracy": heldout_accuracy(codec),
                "codec_generated": layout_fidelity(codec, picture, layout),
                "codec_reconstructed": heldout_mosaic_fidelity(codec, count, through=reconstruct),
                "mosaics": count, "steps": steps}
    metric = report_lpips(fallback=True if quick else None)  # quick: never load VGG16's 500 MB
    real = pictures["superres_real"]
    lpips = {"source": metric.source, "fallback": metric.fallback,
             "superres": mean_lpips(metric, pictures["superres"]["images"], real),
             "lowres": mean_lpips(metric, pictures["superres_lowres"], real)}
    return {"fidelity": fidelity, "lpips": lpips}


def wavefront_speed(gpt, vqgan, layout, side: int, device) -> dict:
    """Codes per second drawing one side x side grid with the wavefront and one code at a time
    (the same seed gives the same codes: checked)."""
    from .sample import sample_grid_images

    factor = layout["size"] // layout["h"]
    kw = {"n": 1, "height": side * factor, "width": side * factor, "classes": [layout["cond_classes"][0]],
          "seed": 6, "device": device}
    sample_grid_images(gpt, vqgan, layout, **{**kw, "height": 2 * factor, "width": 2 * factor})  # warm-up:
    # the first call packs the decode weights and starts the thread pool; neither belongs to either order
    fast = sample_grid_images(gpt, vqgan, layout, wavefront=True, **kw)
    slow = sample_grid_images(gpt, vqgan, layout, wavefront=False, **kw)
    return {"side": side, "wavefront": fast["timings"]["tokens_per_s"], "sequential": slow["timings"]["tokens_per_s"],
            "same_codes": bool(torch.equal(fast["codes"], slow["codes"]))}


def _percent(value: float, count: int | None = None) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.0%}" if count is None else f"{value:.0%} ({count})"


def _fidelity_row(name: str, result: dict) -> str:
    cells = [_percent(v, result["counted"][k]) for k, v in result["per_class"].items()]
    return f"| {name} | " + " | ".join(cells) + f" | **{_percent(result['mean'])}** |"


def quality_lines(quality: dict, pictures: dict, gpt: dict, sr: dict, uniform: float) -> list[str]:
    """The report's "Quality, measured" section: layout fidelity, super-resolution, held-out NLL."""
    fid, lp = quality["fidelity"], quality["lpips"]
    gen, acc = fid["generated"], fid["classifier_accuracy"]
    names = list(gen["per_class"])
    size = pictures["layout"]["height"]
    perceptual = "gradient distance (not LPIPS)" if lp["fallback"] else "LPIPS"
    lines = [
        "## Quality, measured", "",
        "### Layout fidelity",
        f"A small texture classifier (three 3x3 convolutions, fastvq/pipeline/fidelity.py) trained for {fid['steps']} "
        f"steps on {gen['patch']}x{gen['patch']} crops of the textures' *training* region (what the VQGAN and the "
        "priors learned from; the ceiling's mosaics come from the held-out strip, so training on that strip would "
        f"score it on its own pixels) labels every {gen['patch']}x{gen['patch']} patch, stride {gen['stride']}, "
        "of a picture. Per texture: the share of the patches the layout puts in that texture (at least "
        f"{gen['purity']:.0%} of their pixels) that the classifier calls that texture (in brackets: patches "
        f"counted). Classifier accuracy on the held-out strip: {_percent(acc['mean'])} "
        f"({', '.join(f'{k} {_percent(acc[k])}' for k in names)}; chance {_percent(1 / len(names))}).", "",
        "| picture | " + " | ".join(names) + " | mean |", "|---|" + "---:|" * (len(names) + 1),
        _fidelity_row(f"layout to image, {size}x{size}, generated", gen),
        _fidelity_row(f"ceiling: {fid['mosaics']} real held-out mosaics, their own layouts", fid["ceiling"]),
        _fidelity_row("the same mosaics through the VQGAN (encode, decode)", fid["reconstructed"]),
        "",
        "The third row is the ceiling for a prior that draws through this VQGAN: where it falls short of the "
        "second, the codec loses the texture, not the prior.", "",
    ]
    if "codec_generated" in fid:
        codec_acc = fid["codec_accuracy"]
        lines += [
            "The same measure with a classifier of the same shape trained on the textures *as this VQGAN draws "
            "them* (the training region encoded and decoded once, then cropped as above): it asks whether the "
            "prior puts each texture where the layout says, whatever detail the codec loses. Its accuracy on the "
            f"held-out strip through the VQGAN: {_percent(codec_acc['mean'])} "
            f"({', '.join(f'{k} {_percent(codec_acc[k])}' for k in names)}).", "",
            "| picture | " + " | ".join(names) + " | mean |", "|---|" + "---:|" * (len(names) + 1),
            _fidelity_row(f"layout to image, {size}x{size}, generated", fid["codec_generated"]),
            _fidelity_row(f"ceiling: {fid['mosaics']} real held-out mosaics through the VQGAN",
                          fid["codec_reconstructed"]), ""]
    lines += [
        "### Low-resolution to high-resolution",
        f"Against the real held-out crops: PSNR over [-1, 1] images, and {perceptual}, lower is closer (in use: "
        f"{lp['source']}). A sample draws detail the input does not have, so its PSNR can be lower than the blurry input's "
        "while it looks closer" + (": the fallback, like PSNR, favours blur (a detail in the wrong place costs up "
                                   "to twice a missing one)." if lp["fallback"] else "."), "",
        f"| picture | PSNR dB | {perceptual} |", "|---|---:|---:|",
        f"| sample | {pictures['superres_psnr']:.2f} | {lp['superres']:.4f} |",
        f"| low-res input, upsampled bilinearly | {pictures['lowres_psnr']:.2f} | {lp['lowres']:.4f} |", "",
        "### Held-out NLL per code",
        f"Nats per code on held-out crops, with the condition and with the null condition (the same model; "
        f"uniform over the codebook would be {uniform:.3f}).", "",
        "| prior | conditioned on | with the condition | without | gain |", "|---|---|---:|---:|---:|",
    ]
    for name, what, result in (("layout GPT2D", "the layout", gpt), ("low-res GPT2D", "an 8x smaller copy", sr)):
        with_, without = result.get("heldout_loss", math.nan), result.get("heldout_loss_uncond", math.nan)
        lines.append(f"| {name} | {what} | {with_:.3f} | {without:.3f} | {without - with_:.3f} |")
    return lines + [""]


def write_report(out: Path, vq_cfg, gpt_cfg, vq, gpt, sr, pictures, quality, kernels, timings, preset) -> Path:
    m, g = vq_cfg["model"], gpt_cfg["model"]
    recon = sorted((out / "vqgan").glob("reconstructions_*.png"))[-1]
    pano, lay, speed = pictures["panorama"], pictures["layout"], pictures["speed"]
    lines = [
        "# fastvq demo report", "",
        f"Preset `{preset}`, on {torch.get_num_threads()} CPU threads" if not torch.cuda.is_available()
        else f"Preset `{preset}`, on {torch.cuda.get_device_name()}",
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", "",
        "## VQGAN",
        f"{vq_cfg['train']['size']}x{vq_cfg['train']['size']} crops of scikit-image's brick, grass and gravel "
        f"textures; ch {m['ch']}, ch_mult {m['ch_mult']}, {m['n_embed']} codes of dimension {m['embed_dim']}; "
        f"{vq['steps']} steps of batch {vq_cfg['train']['batch_size']}; perceptual term: {vq['perceptual']}.", "",
        f"- held-out PSNR: **{vq.get('heldout_psnr', float('nan')):.2f} dB** (crops from a strip of every "
        "texture that training never sees)",
        f"- codebook usage on held-out crops: **{vq.get('codebook_usage', float('nan')):.0%}** of "
        f"{m['n_embed']} codes (perplexity {vq.get('heldout_perplexity', float('nan')):.1f})", "",
        f"Held-out crops (top) and their reconstructions (bottom):\n\n![reconstructions]({recon.relative_to(out)})", "",
        "![VQGAN loss curves](vqgan/loss_curves.png)", "",
        "## GPT2D prior, conditioned on a texture layout",
        f"{g['n_layer']} layers, width {g['n_embd']}, a raster window of {g['rows']} rows above, {g['left']} codes "
        f"left and {g['right']} right, axial rope, no position table; {gpt['steps']} steps on "
        f"{gpt_cfg['train']['size']}x{gpt_cfg['train']['size']} mosaics of the three textures cut along random "
        f"smooth label fields (held-out mosaics come from each texture's held-out strip).", "",
        f"- held-out NLL: **{gpt.get('heldout_loss', float('nan')):.3f} nats/code** with the layout, "
        f"{gpt.get('heldout_loss_uncond', float('nan')):.3f} without it (uniform would be "
        f"{math.log(m['n_embed']):.3f})", "",
        f"A panorama per texture, {pano['height']}x{pano['width']} pixels ({pano['tokens_per_image']} codes each, the "
        f"training crops are {gpt_cfg['train']['size']} a side), from a uniform layout:\n\n![panoramas](panoramas.png)",
        "",
        f"Layout to image, {lay['height']}x{lay['width']} pixels ({lay['tokens_per_image']} codes) from the layout "
        f"shipped in fastvq/assets (guidance scale {CFG_SCALE}), the layout beside the result:\n\n"
        "![layout to image](layout_to_image.png)", "",
        f"Sampling speed ({speed['side']}x{speed['side']} codes, one image): wavefront **{speed['wavefront']:.0f} "
        f"codes/s**, one code at a time {speed['sequential']:.0f} codes/s "
        f"({speed['wavefront'] / speed['sequential']:.1f}x; same codes for the same seed: {speed['same_codes']}). "
        f"The 512x512 picture: {lay['timings']['sample_s']:.1f} s to sample, {lay['timings']['decode_s']:.1f} s to "
        "decode in tiles.", "",
        "![GPT loss curves](gpt_layout/loss_curves.png)", "",
        "## Low-resolution to high-resolution",
        f"A GPT2D of the same shape conditioned on an 8x smaller copy of the image, {sr['steps']} steps. Held-out "
        f"crops: the low-resolution input (top), a sample (middle), the real crop (bottom); PSNR, LPIPS and "
        f"held-out NLL under Quality, measured.\n\n![low-res to high-res](lowres_to_highres.png)",
        "",
        *quality_lines(quality, pictures, gpt, sr, math.log(m["n_embed"])),
        f"## Kernels against their torch references (median of {TIMED_CALLS} calls)", "",
        "| op | shape | backend | fastvq ms | torch reference ms | speed-up |", "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['op']} | {r['shape']} | {r['backend']} | {r['fastvq_ms']:.2f} | {r['torch_reference_ms']:.2f} | "
              f"{r['speedup']:.1f}x |" for r in kernels]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
