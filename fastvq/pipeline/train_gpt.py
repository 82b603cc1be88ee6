"""train-gpt: the transformer prior over a trained VQGAN's codes.

Two priors (config `model.prior`):
  gpt2d (default) fastvq.GPT2D, the 2-D raster window with axial rope: code grids of crops of
        `train.size` pixels, a class prefix (the crop's source image, or the null class), and an
        optional spatial condition (`train.cond`: layout, edges or lowres) encoded by the model's
        ConditionEncoder and added at every code; with probability `train.cond_drop` a crop is
        shown with the null condition, so one model also gives the unconditional prior that
        classifier-free guidance needs. Samples at any size (fastvq sample --width/--height).
  gpt   the 1-D fastvq.GPT (sliding window + rope): the grids flattened in raster order and
        prefixed by one conditioning token, `n_embed + class` with class conditioning, `n_embed`
        without (vocab n_embed + classes).
Both learn p(code | earlier codes, condition) with cross-entropy; pkeep < 1 replaces that fraction
of the input codes by random ones (taming's corruption, targets untouched). With cond layout the
data are mosaics of the embedded textures cut along random smooth label fields
(conditions.LayoutMosaics), image and layout together; edges and lowres maps are computed from
the training images. AdamW with linear warm-up and
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.gpt import GPT
from ..models.gpt2d import GPT2D
from ..threads import FairThreads
from . import distributed
from .checkpoint import (gather_rng_states, restore_training_rng, resume_path, resume_training, save_checkpoint,
                         seed_rng, training_state)
from .config import ConfigError, GPTTrainSection, TrainGPTConfig, load_config
from .data import DEFAULT_IMAGES, data_source, make_dataset, num_classes
from .logs import MetricsLog, plot_curves, progress
from .train_vqgan import load_vqgan_and_data


@dataclass
class CodeBank:
    """The encoded training (or held-out) crops: codes (N, h, w) int64, labels (N,) int64 (the
    class of each crop; zeros where there is none) and cond (N, C, H, W) float16 condition maps at
    pixel resolution, or None."""
    codes: torch.Tensor
    labels: torch.Tensor
    cond: torch.Tensor | None = None

    def to(self, device) -> "CodeBank":
        return CodeBank(self.codes.to(device), self.labels.to(device),
                        None if self.cond is None else self.cond.to(device))

    def __len__(self) -> int:
        return self.codes.shape[0]


def _item_condition(item, cond: str, n_classes: int, lowres_factor: int) -> torch.Tensor | None:
    """The condition map of one dataset item (image, label or layout)."""
    if cond == "none":
        return None
    from .conditions import condition_map

    image, second = item
    layout = second if cond == "layout" else None
    return condition_map(cond, image, layout, n_classes, lowres_factor=lowres_factor).half()


@torch.no_grad()
def encode_dataset(vqgan, dataset, count: int, batch_size: int = 64, device="cpu", show_progress=False, *,
                   cond: str = "none", cond_classes: int = 0, lowres_factor: int = 8) -> CodeBank:
    """The CodeBank of `count` items of dataset (cycled), encoded by vqgan, with each item's
    condition map when cond is not "none"."""
    vqgan.eval()
    codes, labels, maps = [], [], []
    bar = progress(total=count, desc="encode crops", enabled=show_progress)
    for start in range(0, count, batch_size):
        items = [dataset[i % len(dataset)] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([item[0] for item in items]).to(device)
        codes.append(vqgan.encode_indices(images).cpu())
        labels.append(torch.tensor([0 if cond == "layout" else int(item[1]) for item in items]))
        if cond != "none":
            maps.append(torch.stack([_item_condition(item, cond, cond_classes, lowres_factor) for item in items]))
        bar.update(len(items))
    bar.close()
    return CodeBank(torch.cat(codes), torch.cat(labels), torch.cat(maps) if maps else None)


def sequences(codes: torch.Tensor, labels: torch.Tensor, n_embed: int, conditional: bool) -> torch.Tensor:
    """(N, 1 + h*w): the conditioning token, then the codes in raster order."""
    first = n_embed + (labels if conditional else torch.zeros_like(labels))
    return torch.cat([first[:, None], codes.flatten(1)], dim=1)


def corrupt(x: torch.Tensor, pkeep: float, n_embed: int, generator=None, *, first_is_condition: bool = True
            ) -> torch.Tensor:
    """taming's pkeep: each code of the input (not the conditioning token x[:, 0] of a 1-D
    sequence) is replaced by a uniformly random code with probability 1 - pkeep."""
    if pkeep >= 1:
        return x
    keep = torch.rand(x.shape, device=x.device, generator=generator) < pkeep
    if first_is_condition:
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


def build_gpt(config, layout: dict) -> GPT | GPT2D:
    """The prior of a TrainGPTConfig (or its dict) over the code layout of its VQGAN."""
    config = TrainGPTConfig.from_dict(config)
    if config.prior == "gpt2d":
        return GPT2D(vocab_size=layout["n_embed"], n_classes=layout["classes"],
                     cond_channels=layout.get("cond_channels", 0), cond_factor=layout["size"] // layout["h"],
                     **config.model_args)
    vocab = layout["n_embed"] + max(layout["classes"], 1)
    return GPT(vocab_size=vocab, block_size=1 + layout["h"] * layout["w"], **config.model_args)


def train_gpt(config, out_dir, vqgan_path, *, data: str | None = None, resume=None, device: str | None = None,
              show_progress: bool = True, log=print, fair_threads: bool = False) -> dict:
    """Train (or resume) the prior on the codes of the VQGAN in vqgan_path as `config` (a
    TrainGPTConfig or load_config's dict) says; returns final metrics. data None: the data the
    VQGAN was trained on, as its checkpoint records it (the embedded textures for a checkpoint
    that predates the record); a line says which."""
    config = TrainGPTConfig.from_dict(config)
    runtime = distributed.setup(device)
    fair = FairThreads(enabled=fair_threads and runtime.device.type == "cpu")
    try:
        return _train(config, Path(out_dir), Path(vqgan_path), data, resume, runtime, show_progress, log, fair)
    finally:
        fair.restore()
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


def _datasets(config: TrainGPTConfig, data: str, vqgan) -> tuple:
    """(train, held-out) datasets of the prior's crops: the VQGAN's crop size for the 1-D GPT (its
    block size is one crop), train.size for GPT2D; mosaics of the embedded textures for cond layout."""
    cfg = config.train
    size = cfg.size or vqgan.config.resolution
    vqgan.latent_shape(size, size)  # a crop size the VQGAN cannot encode fails here, naming it
    if config.prior == "gpt" and size != vqgan.config.resolution:
        raise ConfigError(f"config: train.size {size} needs model.prior gpt2d (the 1-D GPT's block is one "
                          f"{vqgan.config.resolution}-pixel crop of the VQGAN)")
    if cfg.cond != "layout":
        return make_dataset(data, size, "train"), make_dataset(data, size, "heldout")
    from .conditions import LayoutMosaics

    if data == "embedded":
        textures = DEFAULT_IMAGES
    elif data.startswith("embedded:"):
        textures = tuple(name.strip() for name in data[len("embedded:"):].split(",") if name.strip())
    else:
        raise ConfigError(f"train-gpt: cond layout trains on mosaics of the embedded textures (--data embedded or "
                          f"embedded:NAME,...); a folder of images has no layouts, got --data {data}")
    return (LayoutMosaics(size, "train", textures=textures, seed=cfg.seed),
            LayoutMosaics(size, "heldout", textures=textures, seed=cfg.seed))


def _layout(config: TrainGPTConfig, vqgan, dataset) -> dict:
    """What a checkpoint records about the codes and conditions the prior was trained on."""
    cfg = config.train
    size = cfg.size or vqgan.config.resolution
    h, w = vqgan.latent_shape(size, size)
    class_prefix = cfg.conditional and cfg.cond != "layout"  # a layout already says which texture goes where
    names = list(getattr(dataset, "classes", []))
    layout = {"prior": config.prior, "n_embed": vqgan.config.n_embed, "h": h, "w": w, "size": size,
              "classes": num_classes(dataset) if class_prefix else 0, "class_names": names if class_prefix else [],
              "cond": cfg.cond}
    if cfg.cond != "none":
        from .conditions import cond_channels, palette

        layout.update(cond_channels=cond_channels(cfg.cond, len(names)), lowres_factor=cfg.lowres_factor)
        if cfg.cond == "layout":
            layout.update(cond_classes=names, cond_colours=[list(c) for c in palette(len(names))])
    return layout


def _encode_banks(config, vqgan, train_set, heldout, layout, runtime, show_progress, dev) -> tuple:
    """(training bank, held-out bank) on dev. Every rank encodes its own crops (different seeds),
    so the bank grows with the world size."""
    cfg = config.train
    share = max(cfg.codes // runtime.world_size, cfg.batch_size)
    kw = {"cond": cfg.cond, "cond_classes": len(layout.get("cond_classes", [])), "lowres_factor": cfg.lowres_factor}
    bank = encode_dataset(vqgan, train_set, share, device=dev, show_progress=show_progress and runtime.is_main, **kw)
    held = encode_dataset(vqgan, heldout, len(heldout), device=dev, **kw)
    return bank.to(dev), held.to(dev)


def _train(config: TrainGPTConfig, out_dir: Path, vqgan_path: Path, data, resume, runtime, show_progress,
           log, fair: FairThreads) -> dict:
    cfg = config.train
    dev = runtime.device
    vqgan, vqgan_data = load_vqgan_and_data(vqgan_path, map_location=dev)
    data = _default_data(data, vqgan_data, vqgan_path, log if runtime.is_main else None)
    train_set, heldout = _datasets(config, data, vqgan)
    layout = _layout(config, vqgan, train_set)
    if cfg.conditional and cfg.cond == "layout" and runtime.is_main and log:
        log("train-gpt: cond layout: no class prefix (the layout says which texture goes where)")
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
    # once everything that draws at start-up is built, just before the first step.
    seed_rng(cfg.seed * 1000 + runtime.rank)
    bank, held = _encode_banks(config, vqgan, train_set, heldout, layout, runtime, show_progress, dev)
    vqgan_record = {"config": vqgan.config.to_dict(), "model": {k: v.cpu() for k, v in vqgan.state_dict().items()}}
    del vqgan
    task = Task2D(layout, cfg) if config.prior == "gpt2d" else Task1D(layout, cfg)

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
        fair()  # give way to lasting load from other processes (--fair-threads; a time check otherwise)
        index = torch.randint(0, len(bank), (cfg.batch_size,), device=dev, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            loss = task.loss(model, bank, index, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = distributed.mean_over_ranks({"loss": loss.item(), "lr": lr_at(step, cfg)}, runtime)
            if runtime.is_main:
                row.update(task.heldout(gpt, held))
                row["tokens_per_s"] = ((step - start + 1) * cfg.batch_size * bank.codes[0].numel()
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
    return {**result, "steps": max(step + 1, start), "layout": layout}


class Task1D:
    """The 1-D GPT's batches: flattened grids after the conditioning token, next-token loss."""

    def __init__(self, layout: dict, cfg):
        self.n_embed, self.cfg, self.conditional = layout["n_embed"], cfg, layout["classes"] > 0

    def _sequences(self, bank: CodeBank, index=None) -> torch.Tensor:
        codes, labels = (bank.codes, bank.labels) if index is None else (bank.codes[index], bank.labels[index])
        return sequences(codes, labels, self.n_embed, self.conditional)

    def loss(self, model, bank: CodeBank, index, gen) -> torch.Tensor:
        batch = self._sequences(bank, index)
        logits, _ = model(corrupt(batch[:, :-1], self.cfg.pkeep, self.n_embed, gen))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def heldout(self, gpt, held: CodeBank) -> dict:
        return {"heldout_loss": heldout_loss(gpt, self._sequences(held))}


class Task2D:
    """GPT2D's batches: code grids with their class and condition maps; with probability
    cond_drop a crop gets the null condition (and the null class), which trains the
    unconditional prior classifier-free guidance needs."""

    def __init__(self, layout: dict, cfg):
        self.n_embed, self.cfg, self.classes = layout["n_embed"], cfg, layout["classes"] > 0
        self.spatial = layout.get("cond", "none") != "none"

    def loss(self, model, bank: CodeBank, index, gen) -> torch.Tensor:
        codes = bank.codes[index]
        keep = torch.rand(codes.shape[0], device=codes.device, generator=gen) >= self.cfg.cond_drop
        cls = torch.where(keep, bank.labels[index], model_classes(model)) if self.classes else None
        cond = bank.cond[index].float() if self.spatial else None
        noisy = corrupt(codes, self.cfg.pkeep, self.n_embed, gen, first_is_condition=False)
        logits = model(noisy, cls, cond, cond_keep=keep if self.spatial else None)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))

    def heldout(self, gpt, held: CodeBank) -> dict:
        row = {"heldout_loss": heldout_loss_2d(gpt, held, self.classes, True)}
        if self.spatial or self.classes:  # what the condition is worth: the same crops without it
            row["heldout_loss_uncond"] = heldout_loss_2d(gpt, held, self.classes, False)
        return row


def model_classes(model) -> int:
    """The null class index of a (possibly DDP-wrapped) GPT2D."""
    return getattr(model, "module", model).n_classes


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


@torch.no_grad()
def heldout_loss_2d(gpt: GPT2D, held: CodeBank, classes: bool, conditioned: bool, batch_size: int = 32) -> float:
    """Mean cross-entropy (nats per code) of the held-out grids, with their class and condition
    (conditioned) or with the null class and null condition."""
    was_training = gpt.training
    gpt.eval()
    total, count = 0.0, 0
    for start in range(0, len(held), batch_size):
        codes = held.codes[start:start + batch_size]
        keep = torch.full((codes.shape[0],), conditioned, dtype=torch.bool, device=codes.device)
        cls = held.labels[start:start + batch_size] if classes and conditioned else None
        cond = None if held.cond is None else held.cond[start:start + batch_size].float()
        logits = gpt(codes, cls, cond, cond_keep=keep if cond is not None else None)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1),
                                 reduction="sum").item()
        count += codes.numel()
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
