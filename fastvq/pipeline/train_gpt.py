"""train-gpt: the transformer prior over a trained VQGAN's codes (fastvq.GPT, sliding window + rope).

The training crops are encoded once by the VQGAN into (h, w) grids of code indices, flattened in
raster order and prefixed by one conditioning token: `n_embed + class` with class conditioning
(the source image of the crop), `n_embed` without. The GPT (vocab n_embed + classes) learns
p(code_i | earlier codes, class) with cross-entropy; pkeep < 1 replaces that fraction of the input
codes by random ones (taming's corruption, targets untouched). AdamW with linear warm-up and
cosine decay. Under torchrun: DistributedDataParallel, each rank encodes its own share of crops,
rank 0 writes files.

Written to --out: metrics.csv, loss_curves.png, last.ckpt (resume) and gpt.ckpt: the GPT, its
configuration, the code layout and the VQGAN it was trained on (config and weights), so `fastvq
sample` needs this one file. Without --data the crops come from the data the VQGAN was trained on
(vqgan.ckpt records it; a line says so), so the prior learns the codes of the user's images. Batches and pkeep's corruption draw from the run's own generator,
dropout from torch's global one; last.ckpt holds both (every rank's) with the GPT and AdamW
states, and --resume restores them after the start-up seeding, so a resumed run continues bit for
bit (on a CPU) as the uninterrupted run would have (the learning rate is a function of the step).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.gpt import GPT
from . import distributed
from .checkpoint import (gather_rng_states, restore_training_rng, resume_path, resume_training, save_checkpoint,
                         seed_rng, training_state)
from .config import GPTTrainSection, TrainGPTConfig, load_config
from .data import data_source, make_dataset, num_classes
from .logs import MetricsLog, plot_curves, progress
from .train_vqgan import load_vqgan_and_data


@torch.no_grad()
def encode_dataset(vqgan, dataset, count: int, batch_size: int = 64, device="cpu", show_progress=False):
    """(codes (count, h, w) int64, labels (count,) int64) of `count` items of dataset."""
    vqgan.eval()
    codes, labels = [], []
    bar = progress(total=count, desc="encode crops", enabled=show_progress)
    for start in range(0, count, batch_size):
        items = [dataset[i % len(dataset)] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([item[0] for item in items]).to(device)
        codes.append(vqgan.encode_indices(images).cpu())
        labels.append(torch.tensor([int(item[1]) for item in items]))
        bar.update(len(items))
    bar.close()
    return torch.cat(codes), torch.cat(labels)


def sequences(codes: torch.Tensor, labels: torch.Tensor, n_embed: int, conditional: bool) -> torch.Tensor:
    """(N, 1 + h*w): the conditioning token, then the codes in raster order."""
    first = n_embed + (labels if conditional else torch.zeros_like(labels))
    return torch.cat([first[:, None], codes.flatten(1)], dim=1)


def corrupt(x: torch.Tensor, pkeep: float, n_embed: int, generator=None) -> torch.Tensor:
    """taming's pkeep: each code of the input (not the conditioning token) is replaced by a
    uniformly random code with probability 1 - pkeep."""
    if pkeep >= 1:
        return x
    keep = torch.rand(x.shape, device=x.device, generator=generator) < pkeep
    keep[:, 0] = True
    noise = torch.randint(0, n_embed, x.shape, device=x.device, generator=generator)
    return torch.where(keep, x, noise)


def lr_at(step: int, cfg: GPTTrainSection) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it at cfg.steps."""
    warmup, steps, lr = cfg.warmup, cfg.steps, cfg.lr
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def build_gpt(config, layout: dict) -> GPT:
    """The GPT of a TrainGPTConfig (or its dict) over the code layout of its VQGAN."""
    vocab = layout["n_embed"] + max(layout["classes"], 1)
    return GPT(vocab_size=vocab, block_size=1 + layout["h"] * layout["w"], **TrainGPTConfig.from_dict(config).model)


def train_gpt(config, out_dir, vqgan_path, *, data: str | None = None, resume=None, device: str | None = None,
              show_progress: bool = True, log=print) -> dict:
    """Train (or resume) the prior on the codes of the VQGAN in vqgan_path as `config` (a
    TrainGPTConfig or load_config's dict) says; returns final metrics. data None: the data the
    VQGAN was trained on, as its checkpoint records it (the embedded textures for a checkpoint
    that predates the record); a line says which."""
    config = TrainGPTConfig.from_dict(config)
    runtime = distributed.setup(device)
    try:
        return _train(config, Path(out_dir), Path(vqgan_path), data, resume, runtime, show_progress, log)
    finally:
        distributed.teardown(runtime)


def _default_data(data, vqgan_data: str | None, vqgan_path: Path, log) -> str:
    """--data when given; else the VQGAN's training data (so the prior learns the codes of the
    images the autoencoder was made for), said in a line."""
    if data is not None:
        return data_source(data)
    if vqgan_data is None:
        if log:
            log(f"train-gpt: {vqgan_path} does not record its training data (written by an older version); "
                f"training on the embedded textures (pass --data to choose)")
        return "embedded"
    if not vqgan_data.startswith("embedded") and not Path(vqgan_data).is_dir():
        raise ValueError(f"train-gpt: {vqgan_path} was trained on {vqgan_data}, which is no longer a directory; "
                         f"pass --data")
    if log:
        log(f"train-gpt: no --data given: training on the VQGAN's data, {vqgan_data} (recorded in {vqgan_path})")
    return vqgan_data


def _layout(vqgan, dataset, conditional: bool) -> dict:
    size = vqgan.config.resolution
    h, w = vqgan.latent_shape(size, size)
    classes = num_classes(dataset) if conditional else 0
    names = list(getattr(dataset, "classes", [])) if conditional else []
    return {"n_embed": vqgan.config.n_embed, "h": h, "w": w, "size": size, "classes": classes, "class_names": names}


def _train(config: TrainGPTConfig, out_dir: Path, vqgan_path: Path, data, resume, runtime, show_progress,
           log) -> dict:
    cfg = config.train
    dev = runtime.device
    vqgan, vqgan_data = load_vqgan_and_data(vqgan_path, map_location=dev)
    data = _default_data(data, vqgan_data, vqgan_path, log if runtime.is_main else None)
    train_set = make_dataset(data, vqgan.config.resolution, "train")
    layout = _layout(vqgan, train_set, cfg.conditional)
    torch.manual_seed(cfg.seed)
    gpt = build_gpt(config, layout).to(dev)
    decay = [p for n, p in gpt.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in gpt.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    start, resumed, ckpt = 0, None, resume_path(out_dir, resume)
    if ckpt is not None:
        resumed = resume_training(ckpt, "gpt-train", config.to_dict(), {"model": gpt, "opt": opt}, map_location=dev)
        start = int(resumed["step"])
        if runtime.is_main:
            log(f"resumed from {ckpt} at step {start}")

    # The generators are seeded as in a fresh run; on resume the checkpoint's states replace them
    # once everything that draws at start-up is built, just before the first step. Every rank
    # encodes its own crops (different seeds), so the code bank grows with the world size.
    seed_rng(cfg.seed * 1000 + runtime.rank)
    share = max(cfg.codes // runtime.world_size, cfg.batch_size)
    codes, labels = encode_dataset(vqgan, train_set, share, device=dev, show_progress=show_progress and runtime.is_main)
    seqs = sequences(codes, labels, layout["n_embed"], cfg.conditional).to(dev)
    heldout = make_dataset(data, vqgan.config.resolution, "heldout")
    h_codes, h_labels = encode_dataset(vqgan, heldout, len(heldout), device=dev)
    heldout_seqs = sequences(h_codes, h_labels, layout["n_embed"], cfg.conditional).to(dev)
    vqgan_record = {"config": vqgan.config.to_dict(), "model": {k: v.cpu() for k, v in vqgan.state_dict().items()}}
    del vqgan

    model = distributed.wrap(gpt, runtime)
    metrics = MetricsLog(out_dir / "metrics.csv", resume_step=start) if runtime.is_main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 7919 + runtime.rank)  # batches and pkeep
    if resumed is not None:
        warnings = restore_training_rng(resumed, {"batches": gen}, rank=runtime.rank, world_size=runtime.world_size)
        if "generators" not in resumed["rng"]:  # an older checkpoint: at least not the first steps' batches again
            gen.manual_seed(cfg.seed * 7919 + runtime.rank + start)
        for warning in warnings:
            if runtime.is_main:
                log(f"warning: --resume: {warning}")
    bar = progress(total=cfg.steps, initial=start, desc="train-gpt", enabled=show_progress and runtime.is_main)
    t0, result, step = time.perf_counter(), {}, start
    for step in range(start, cfg.steps):
        batch = seqs[torch.randint(0, seqs.shape[0], (cfg.batch_size,), device=dev, generator=gen)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            logits, _ = model(corrupt(batch[:, :-1], cfg.pkeep, layout["n_embed"], gen))
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = distributed.mean_over_ranks({"loss": loss.item(), "lr": lr_at(step, cfg)}, runtime)
            if runtime.is_main:
                row["heldout_loss"] = heldout_loss(gpt, heldout_seqs)
                row["tokens_per_s"] = ((step - start + 1) * cfg.batch_size * (seqs.shape[1] - 1)
                                       * runtime.world_size / (time.perf_counter() - t0))
                metrics.append(done, row)
                result = row
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(out_dir, config, layout, gpt, opt, gen, done, vqgan_record, runtime, data)
        bar.update(1)
    bar.close()
    if runtime.is_main:
        plot_curves(out_dir / "metrics.csv", out_dir / "loss_curves.png", title="train-gpt")
        log(f"train-gpt: {cfg.steps} steps; loss {result.get('loss', float('nan')):.3f}, held-out "
            f"{result.get('heldout_loss', float('nan')):.3f} nats/code; wrote {out_dir}")
    distributed.barrier(runtime)
    return {**result, "steps": max(step + 1, start)}


@torch.no_grad()
def heldout_loss(gpt: GPT, seqs: torch.Tensor, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats per code) of the held-out crops' codes."""
    was_training = gpt.training
    gpt.eval()
    total, count = 0.0, 0
    for chunk in seqs.split(batch_size):
        logits, _ = gpt(chunk[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    gpt.train(was_training)
    return total / max(count, 1)


def _save(out_dir: Path, config: TrainGPTConfig, layout, gpt, opt, gen, step, vqgan_record: dict, runtime,
          source: str) -> None:
    """last.ckpt (resume) and gpt.ckpt, written by rank 0; every rank calls it (RNG states are gathered)."""
    rng = gather_rng_states({"batches": gen})
    if not runtime.is_main:
        return
    config = config.to_dict()  # checkpoints hold plain dicts (TrainGPTConfig.from_dict reads them back)
    save_checkpoint(out_dir / "last.ckpt", training_state("gpt-train", config, step, {"model": gpt, "opt": opt},
                                                          rng=rng, layout=layout, data_source=source))
    save_checkpoint(out_dir / "gpt.ckpt", {"kind": "gpt", "config": config, "layout": layout, "step": step,
                                           "model": gpt.state_dict(), "vqgan": vqgan_record,
                                           "data_source": source})


def config_for(spec, overrides: dict) -> dict:
    return load_config("gpt", spec, overrides)
