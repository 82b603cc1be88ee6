"""`fastvq demo` / `make demo`: the whole pipeline on the embedded textures, then a report.

1. train-vqgan on random crops of scikit-image's brick, grass and gravel textures;
2. train-gpt on the VQGAN's codes, conditioned on the texture, sliding window + rope;
3. sample a grid per texture and one image 4x taller than the training crops (4x the tokens,
   through the ring-buffer cache);
4. time fastvq's kernels against their torch references at the demo's shapes;
5. write report.md with the pictures, held-out PSNR, codebook usage and the timings.
The demo preset fits a few minutes on a 2-core CPU; on a GPU the `small` preset's larger models
(64x64 crops, f = 8, 512 codes; an 8-layer GPT) are trained for a few thousand steps.
"""
from __future__ import annotations

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


def run_demo(out_dir, *, quick: bool = False, device: str | None = None, show_progress: bool = True,
             log=print) -> dict:
    """Everything above into out_dir; quick=True is a seconds-long smoke run for tests."""
    from .sample import sample_images
    from .train_gpt import train_gpt
    from .train_vqgan import train_vqgan

    out = Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = "small" if device.startswith("cuda") else "demo"
    vq_cfg, gpt_cfg = load_config("vqgan", preset), load_config("gpt", preset)
    if preset == "small":  # the small models, trained for minutes rather than the preset's hours
        vq_cfg["train"].update(steps=4000, eval_every=1000, ckpt_every=1000)
        vq_cfg["loss"]["disc_start"] = 2500
        gpt_cfg["train"].update(steps=3000, codes=16384, warmup=200, ckpt_every=1000)
    if quick:
        vq_cfg["train"].update(steps=6, log_every=2, eval_every=3, ckpt_every=3, heldout=8, batch_size=4)
        vq_cfg["loss"]["disc_start"] = 3
        gpt_cfg["train"].update(steps=6, log_every=2, ckpt_every=3, codes=64, warmup=2, batch_size=8)
    timings = {}
    t0 = time.perf_counter()
    log(f"[1/4] train-vqgan ({preset} preset, {vq_cfg['train']['steps']} steps) -> {out / 'vqgan'}")
    vq = train_vqgan(vq_cfg, out / "vqgan", device=device, show_progress=show_progress, log=log)
    timings["train-vqgan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[2/4] train-gpt ({gpt_cfg['train']['steps']} steps) -> {out / 'gpt'}")
    gpt = train_gpt(gpt_cfg, out / "gpt", out / "vqgan" / "vqgan.ckpt", device=device, show_progress=show_progress,
                    log=log)
    timings["train-gpt"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[3/4] sampling")
    ckpt = out / "gpt" / "gpt.ckpt"
    zoom = max(1, 96 // vq_cfg["train"]["size"])
    grid = sample_images(ckpt, out / "samples.png", n=8 if quick else 24, seed=1, zoom=zoom, device=device)
    tall = sample_images(ckpt, out / "sample_tall.png", n=6, height=4 * grid["height"], seed=2, nrow=6, zoom=zoom,
                         device=device)  # two of every texture
    timings["sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[4/4] kernel timings against the torch references")
    kernels = kernel_timings(device)
    timings["kernel timings"] = time.perf_counter() - t0
    report = write_report(out, vq_cfg, gpt_cfg, vq, gpt, grid, tall, kernels, timings, preset)
    log(f"wrote {report}")
    return {"report": report, "vqgan": vq, "gpt": gpt, "kernels": kernels, "timings": timings}


def write_report(out: Path, vq_cfg, gpt_cfg, vq, gpt, grid, tall, kernels, timings, preset) -> Path:
    m = vq_cfg["model"]
    recon = sorted((out / "vqgan").glob("reconstructions_*.png"))[-1]
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
        "## GPT prior",
        f"{gpt_cfg['model']['n_layer']} layers, width {gpt_cfg['model']['n_embd']}, sliding window "
        f"{gpt_cfg['model']['window']}, rope, conditioned on the texture; {gpt['steps']} steps.", "",
        f"- held-out loss: **{gpt.get('heldout_loss', float('nan')):.3f} nats/code** (uniform would be "
        f"{torch.log(torch.tensor(float(m['n_embed']))).item():.3f})", "",
        "Samples, one texture after another (brick, grass, gravel):\n\n![samples](samples.png)", "",
        f"Six images {tall['height']}x{tall['width']} pixels: {tall['tokens_per_image']} codes each, 4x the "
        "tokens of a training crop, sampled through the ring-buffer cache:\n\n![tall samples](sample_tall.png)", "",
        "![GPT loss curves](gpt/loss_curves.png)", "",
        f"## Kernels against their torch references (median of {TIMED_CALLS} calls)", "",
        "| op | shape | backend | fastvq ms | torch reference ms | speed-up |", "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['op']} | {r['shape']} | {r['backend']} | {r['fastvq_ms']:.2f} | {r['torch_reference_ms']:.2f} | "
              f"{r['speedup']:.1f}x |" for r in kernels]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
