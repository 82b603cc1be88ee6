"""train-vqgan: the VQGAN autoencoder (fastvq.models.VQGAN) with its GAN + perceptual loss.

One step: the autoencoder reconstructs a batch and takes an Adam step on L1 + perceptual + VQ
(+ the adaptive-weight hinge GAN term once global_step >= disc_start); then, after disc_start, the
PatchGAN takes its own step on the detached reconstructions. Under torchrun the autoencoder and the
loss are one module inside one DistributedDataParallel (both optimizer steps are forward calls of
it), the quantizer's EMA and usage statistics are all-reduced by the quantizer itself, and only
rank 0 evaluates and writes files.

Written to --out: metrics.csv and loss_curves.png, reconstructions_<step>.png (held-out crops on
top, reconstructions below), last.ckpt (everything needed to --resume) and vqgan.ckpt (the model
and its config, what train-gpt and sample read). Saves are atomic. A run resumed from last.ckpt
continues bit for bit (on a CPU) as the uninterrupted run would have: the checkpoint holds the
models, the loss (discriminator), both Adam states, the data position (TrainBatches: epoch and
place in it) and every rank's RNG states, which are restored after the start-up seeding.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from ..models.vqgan import VQGAN, VQGANConfig
from ..models.vqgan_loss import VQGANLoss
from ..threads import FairThreads
from . import distributed
from .checkpoint import (gather_rng_states, load_checkpoint, load_weights, restore_training_rng, resume_path,
                         resume_training, save_checkpoint, seed_rng, training_state)
from .config import ConfigError, TrainVQGANConfig, load_config
from .data import TrainBatches, data_source, make_dataset
from .logs import MetricsLog, plot_curves, progress, save_image_grid
from .metrics import psnr


class VQGANTrainingStep(nn.Module):
    """The autoencoder and its loss as one module, so that a single DistributedDataParallel
    covers both optimizer steps: optimizer_idx 0 is the autoencoder's step, 1 the discriminator's."""

    def __init__(self, vqgan: VQGAN, loss: VQGANLoss):
        super().__init__()
        self.vqgan, self.loss = vqgan, loss

    def forward(self, x, optimizer_idx: int, global_step: int, xrec=None):
        if optimizer_idx == 0:
            xrec, qloss = self.vqgan(x)
            total, log = self.loss(qloss, x, xrec, 0, global_step, last_layer=self.vqgan.get_last_layer(),
                                   split="train")
            return total, log, xrec
        zero = torch.zeros((), device=x.device)
        total, log = self.loss(zero, x, xrec, 1, global_step, split="train")
        return total, log, xrec


def build_vqgan(config) -> VQGAN:
    """The VQGAN of a TrainVQGANConfig (or its dict): the model section at resolution train.size."""
    config = TrainVQGANConfig.from_dict(config)
    return VQGAN(VQGANConfig(**{**config.model, "resolution": config.train.size}))


@torch.no_grad()
def evaluate(vqgan: VQGAN, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Held-out PSNR, codebook usage (fraction of codes chosen at least once) and perplexity."""
    was_training = vqgan.training
    vqgan.eval()
    recons, counts = [], torch.zeros(vqgan.config.n_embed, dtype=torch.float64)
    device = next(vqgan.parameters()).device
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        idx = vqgan.encode_indices(chunk)
        recons.append(vqgan.decode_indices(idx).cpu())
        counts += torch.bincount(idx.flatten().cpu(), minlength=vqgan.config.n_embed).double()
    vqgan.train(was_training)
    recon = torch.cat(recons)
    p = counts / counts.sum()
    perplexity = math.exp(-float(torch.special.xlogy(p, p).sum()))
    return {"heldout_psnr": psnr(recon, images, value_range=(-1, 1)),
            "codebook_usage": float((counts > 0).double().mean()), "heldout_perplexity": perplexity, "recon": recon}


def _heldout_images(data, size: int, count: int) -> torch.Tensor:
    heldout = make_dataset(data, size, "heldout", length=count)  # evenly spaced over every image
    return torch.stack([heldout[i][0] for i in range(len(heldout))])


def _scalars(log: dict) -> dict:
    """Loss-log entries as plain floats with short names ('train/rec_loss' -> 'rec_loss')."""
    out = {}
    for key, value in log.items():
        name = key.split("/")[-1]
        out[name] = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
    return out


def train_vqgan(config, out_dir, *, data: str | None = None, resume=None, device: str | None = None,
                show_progress: bool = True, log=print, fair_threads: bool = False) -> dict:
    """Train (or resume) a VQGAN as `config` (a TrainVQGANConfig or load_config's dict) says; returns
    the final metrics. See the module doc."""
    config = TrainVQGANConfig.from_dict(config)
    runtime = distributed.setup(device)
    fair = FairThreads(enabled=fair_threads and runtime.device.type == "cpu")
    try:
        return _train(config, Path(out_dir), data, resume, runtime, show_progress, log, fair)
    finally:
        fair.restore()
        distributed.teardown(runtime)


def _train(config: TrainVQGANConfig, out_dir: Path, data, resume, runtime, show_progress, log,
           fair: FairThreads) -> dict:
    train_cfg = config.train
    dev = runtime.device
    source = data_source(data)  # recorded in the checkpoints: train-gpt's default data
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    vqgan = build_vqgan(config).to(dev)
    loss = VQGANLoss(**config.loss.to_dict()).to(dev)
    opt_ae = torch.optim.Adam([p for p in vqgan.parameters() if p.requires_grad], lr=train_cfg.lr,
                              betas=train_cfg.betas)
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=train_cfg.disc_lr, betas=train_cfg.betas)

    size, steps = train_cfg.size, train_cfg.steps
    # every epoch new crops in a new order, a function of (seed, epoch, rank) alone; the position is saved
    batches = TrainBatches(make_dataset(data, size, "train"), train_cfg.batch_size, seed=train_cfg.seed,
                           rank=runtime.rank, world_size=runtime.world_size)

    parts = {"model": vqgan, "loss": loss, "opt_ae": opt_ae, "opt_d": opt_d, "data": batches}
    start, resumed, ckpt = 0, None, resume_path(out_dir, resume)
    if ckpt is not None:
        resumed = resume_training(ckpt, "vqgan-train", config.to_dict(), parts, map_location=dev, optional=("data",))
        start = int(resumed["step"])
        if runtime.is_main:
            log(f"resumed from {ckpt} at step {start}")
        if "data" not in resumed:  # written before the data position was saved
            batches.load_state_dict(batches.position_at(start))
            if runtime.is_main:
                log(f"warning: --resume: {ckpt} predates the saved data position; the data continues where step "
                    f"{start} would be in this version's order, so batches differ from the uninterrupted run")
    # The global generators: seeded as in a fresh run, and (on resume) restored from the checkpoint
    # only once everything that draws at start-up is built, just before the first step.
    seed_rng(train_cfg.seed * 1000 + runtime.rank)

    heldout = _heldout_images(data, size, train_cfg.heldout) if runtime.is_main else None
    stepper = distributed.wrap(VQGANTrainingStep(vqgan, loss), runtime, find_unused_parameters=True)
    metrics = MetricsLog(out_dir / "metrics.csv", resume_step=start) if runtime.is_main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    disc_start = config.loss.disc_start
    if resumed is not None:
        for warning in restore_training_rng(resumed, rank=runtime.rank, world_size=runtime.world_size):
            if runtime.is_main:
                log(f"warning: --resume: {warning}")

    bar = progress(total=steps, initial=start, desc="train-vqgan", enabled=show_progress and runtime.is_main)
    last_eval, t0, step = {}, time.perf_counter(), start
    for step in range(start, steps):
        fair()  # give way to lasting load from other processes (--fair-threads; a time check otherwise)
        x = next(batches)[0].to(dev, non_blocking=True)
        with autocast:
            ae_loss, ae_log, xrec = stepper(x, 0, step)
        opt_ae.zero_grad(set_to_none=True)
        ae_loss.backward()
        opt_ae.step()
        row = _scalars(ae_log)
        if step >= disc_start:
            with autocast:
                d_loss, d_log, _ = stepper(x, 1, step, xrec=xrec.detach())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            row.update(_scalars(d_log))
        row.update(perplexity=float(vqgan.quantize.perplexity), codebook_usage_batch=float(vqgan.quantize.codebook_usage))
        done = step + 1
        if done % train_cfg.log_every == 0 or done == steps:
            row = distributed.mean_over_ranks(row, runtime)
            if metrics is not None:
                metrics.append(done, {**row, "images_per_s": _rate(t0, step - start + 1, train_cfg.batch_size, runtime)})
            bar.set_postfix(rec=f"{row.get('rec_loss', float('nan')):.3f}", usage=f"{row['codebook_usage_batch']:.2f}")
        if runtime.is_main and (done % train_cfg.eval_every == 0 or done == steps):
            last_eval = _evaluate_and_draw(vqgan, heldout, out_dir, done, metrics)
        if done % train_cfg.ckpt_every == 0 or done == steps:
            _save(out_dir, config, parts, done, runtime, source)
        bar.update(1)
    bar.close()
    # the persistent state (codebook, EMA statistics); perplexity is per batch, and rank 0's eval changed it
    distributed.check_same_on_every_rank(vqgan.quantize.state_dict(), runtime)
    if runtime.is_main and metrics is not None:
        plot_curves(out_dir / "metrics.csv", out_dir / "loss_curves.png", title="train-vqgan")
        log(f"train-vqgan: {steps} steps; held-out PSNR {last_eval.get('heldout_psnr', float('nan')):.2f} dB, "
            f"codebook usage {last_eval.get('codebook_usage', float('nan')):.1%}; wrote {out_dir}")
    distributed.barrier(runtime)
    perceptual = loss.perceptual_loss.source if loss.perceptual_loss is not None else "none (perceptual_weight 0)"
    return {k: v for k, v in last_eval.items() if k != "recon"} | {"steps": max(step + 1, start), "perceptual": perceptual}


def _rate(t0: float, steps_done: int, batch_size: int, runtime) -> float:
    return steps_done * batch_size * runtime.world_size / max(time.perf_counter() - t0, 1e-9)


def _evaluate_and_draw(vqgan, heldout, out_dir: Path, step: int, metrics) -> dict:
    result = evaluate(vqgan, heldout)
    n = min(8, heldout.shape[0])
    pick = torch.linspace(0, heldout.shape[0] - 1, n).round().long()  # crops from every image, not just the first
    save_image_grid(torch.cat([heldout[pick], result["recon"][pick]]), out_dir / f"reconstructions_{step:06d}.png",
                    nrow=n, zoom=max(1, 96 // heldout.shape[-1]))
    if metrics is not None:
        metrics.append(step, {k: v for k, v in result.items() if k != "recon"})
    return result


def _save(out_dir: Path, config: TrainVQGANConfig, parts: dict, step: int, runtime, source: str) -> None:
    """last.ckpt (resume) and vqgan.ckpt (model only), written by rank 0, both atomic; every rank
    calls it (the RNG states of all ranks are gathered into last.ckpt). Both record the training
    data (`data_source`: the --data spec, a folder as an absolute path), train-gpt's default."""
    rng = gather_rng_states()
    if not runtime.is_main:
        return
    vqgan = parts["model"]
    save_checkpoint(out_dir / "last.ckpt", training_state("vqgan-train", config.to_dict(), step, parts, rng=rng,
                                                          data_source=source))
    save_checkpoint(out_dir / "vqgan.ckpt", {"kind": "vqgan", "config": vqgan.config.to_dict(), "step": step,
                                             "model": vqgan.state_dict(), "data_source": source})


def load_vqgan(path, map_location="cpu") -> VQGAN:
    """A VQGAN from a vqgan.ckpt (or a train-vqgan last.ckpt) written by train-vqgan."""
    return load_vqgan_and_data(path, map_location)[0]


def load_vqgan_and_data(path, map_location="cpu") -> tuple[VQGAN, str | None]:
    """(the VQGAN, the data it was trained on as a --data spec) from a vqgan.ckpt or a train-vqgan
    last.ckpt; the data is None for checkpoints written before it was recorded."""
    state = load_checkpoint(path, map_location=map_location)
    kind = state.get("kind")
    if kind == "vqgan":
        model = VQGAN(VQGANConfig.from_dict(state["config"]))
    elif kind == "vqgan-train":  # its config a dict, as the checkpoints of every version store it
        model = build_vqgan(TrainVQGANConfig.from_dict(state["config"], f"{path}: config"))
    else:
        raise ConfigError(f"{path}: not a fastvq VQGAN checkpoint (kind {kind!r}); train one with train-vqgan "
                          "or load a taming checkpoint with fastvq.load_taming_vqgan")
    load_weights(model, state["model"], path, "VQGAN")
    source = state.get("data_source")
    return model.to(map_location).eval(), source if isinstance(source, str) else None


def config_for(spec, overrides: dict) -> dict:
    return load_config("vqgan", spec, overrides)
