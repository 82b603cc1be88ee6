"""Training configurations: named presets, YAML files over them, command-line overrides.

A configuration is a dict of sections. For train-vqgan: `model` (VQGANConfig fields), `loss`
(VQGANLoss arguments) and `train`; for train-gpt: `model` (GPT arguments) and `train`. A YAML file
holds the same sections and starts from a preset: `preset: demo` (default: the preset the command
uses by default) and only the keys it changes. Unknown sections or keys are errors naming the key,
so a typo never trains silently with a default.

Presets:
  demo   what `make demo` trains on a 2-core CPU in a few minutes (32x32 crops, f = 4, 8x8 codes)
  small  a CPU-hours / small-GPU model (64x64 crops, f = 8)
  base   taming's f16 1024-code ImageNet autoencoder shape (256x256, attention at 16) and a
         24-layer GPT; for GPUs
"""
from __future__ import annotations

import copy
from pathlib import Path

VQGAN_PRESETS = {
    "demo": {
        "model": {"resolution": 32, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                  "z_channels": 32, "embed_dim": 16, "n_embed": 128, "beta": 0.25, "legacy": False,
                  "ema": True, "restart_dead": True},
        "loss": {"disc_start": 400, "disc_weight": 0.5, "perceptual_weight": 1.0, "codebook_weight": 1.0,
                 "disc_ndf": 32, "disc_num_layers": 2},
        "train": {"steps": 600, "batch_size": 16, "size": 32, "lr": 1e-3, "disc_lr": 2e-4, "betas": [0.5, 0.9],
                  "log_every": 10, "eval_every": 100, "ckpt_every": 100, "heldout": 64, "seed": 0},
    },
    "small": {
        "model": {"resolution": 64, "ch": 64, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [8],
                  "z_channels": 64, "embed_dim": 32, "n_embed": 512, "beta": 0.25, "legacy": False,
                  "ema": True, "restart_dead": True},
        "loss": {"disc_start": 5000, "disc_weight": 0.8, "perceptual_weight": 1.0, "codebook_weight": 1.0,
                 "disc_ndf": 64, "disc_num_layers": 3},
        "train": {"steps": 20000, "batch_size": 16, "size": 64, "lr": 2e-4, "disc_lr": 2e-4, "betas": [0.5, 0.9],
                  "log_every": 50, "eval_every": 1000, "ckpt_every": 1000, "heldout": 128, "seed": 0},
    },
    "base": {
        "model": {"resolution": 256, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                  "attn_resolutions": [16], "z_channels": 256, "embed_dim": 256, "n_embed": 1024, "beta": 0.25,
                  "legacy": False, "ema": False, "restart_dead": False},
        "loss": {"disc_start": 250001, "disc_weight": 0.8, "perceptual_weight": 1.0, "codebook_weight": 1.0,
                 "disc_ndf": 64, "disc_num_layers": 3},
        "train": {"steps": 500000, "batch_size": 12, "size": 256, "lr": 4.5e-6 * 12, "disc_lr": 4.5e-6 * 12,
                  "betas": [0.5, 0.9], "log_every": 100, "eval_every": 5000, "ckpt_every": 5000, "heldout": 64,
                  "seed": 0},
    },
}

GPT_PRESETS = {
    "demo": {
        # 4096 crops of three textures overlap heavily: dropout, weight decay and pkeep keep the
        # prior from memorising them (without, held-out loss rises after ~200 steps)
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "window": 32, "rope": True, "embd_pdrop": 0.1,
                  "resid_pdrop": 0.1, "attn_pdrop": 0.0},
        "train": {"steps": 400, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "pkeep": 0.9, "conditional": True, "codes": 4096, "warmup": 50, "log_every": 20,
                  "ckpt_every": 200, "seed": 0},
    },
    "small": {
        "model": {"n_layer": 8, "n_head": 8, "n_embd": 256, "window": 64, "rope": True, "embd_pdrop": 0.0,
                  "resid_pdrop": 0.0, "attn_pdrop": 0.0},
        "train": {"steps": 20000, "batch_size": 32, "lr": 4e-4, "weight_decay": 0.01, "betas": [0.9, 0.95],
                  "pkeep": 0.9, "conditional": True, "codes": 65536, "warmup": 500, "log_every": 50,
                  "ckpt_every": 1000, "seed": 0},
    },
    "base": {
        "model": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "window": 256, "rope": True, "embd_pdrop": 0.0,
                  "resid_pdrop": 0.0, "attn_pdrop": 0.0},
        "train": {"steps": 200000, "batch_size": 16, "lr": 3e-4, "weight_decay": 0.01, "betas": [0.9, 0.95],
                  "pkeep": 0.9, "conditional": True, "codes": 262144, "warmup": 2000, "log_every": 100,
                  "ckpt_every": 5000, "seed": 0},
    },
}

PRESETS = {"vqgan": VQGAN_PRESETS, "gpt": GPT_PRESETS}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key."""


def _merge(base: dict, update: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(out))})")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping, got {type(value).__name__}")
            out[key] = _merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def load_config(kind: str, spec: str | None = None, overrides: dict | None = None) -> dict:
    """The configuration for `kind` ("vqgan" or "gpt"): spec is a preset name, a YAML file or None
    (the demo preset); overrides is {"section.key": value} from the command line (None values are
    skipped, so unset flags keep the file's value)."""
    presets = PRESETS[kind]
    if spec is None or spec in presets:
        config = copy.deepcopy(presets[spec or "demo"])
    else:
        config = _from_yaml(Path(spec), presets)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        config = _merge(config, {section: {key: value}}, "command line")
    return config


def _from_yaml(path: Path, presets: dict) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"--config: {path} is neither a preset ({', '.join(presets)}) nor an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    preset = raw.pop("preset", "demo")
    if preset not in presets:
        raise ConfigError(f"{path}: preset must be one of {', '.join(presets)}, got {preset!r}")
    return _merge(presets[preset], raw, str(path))
