"""Training configurations: named presets, YAML files over them, command-line overrides.

A configuration is a dict of sections. For train-vqgan (TrainVQGANConfig): `model` (VQGANConfig
fields), `loss` (VQGANLossSection: VQGANLoss arguments) and `train` (VQGANTrainSection); for
train-gpt (TrainGPTConfig): `model` (GPT arguments) and `train` (GPTTrainSection). load_config
returns the plain dicts (what YAML files and checkpoints hold); the trainers read them through
TrainVQGANConfig.from_dict / TrainGPTConfig.from_dict, which also convert the dicts stored in
checkpoints. A YAML file holds the same sections and starts from a preset: `preset: demo` (default:
the preset the command uses by default) and only the keys it changes. Unknown sections or keys are
errors naming the key, so a typo never trains silently with a default.

Presets:
  demo   the smallest, what `make demo` trains on a CPU (32x32 crops, f = 4, 8x8 codes; the
         GPT2D prior on 48x48 crops, 12x12 codes)
  small  for a small GPU or a long CPU run (64x64 crops, f = 8)
  base   taming's f16 1024-code ImageNet autoencoder shape (256x256, attention at 16) and a
         24-layer GPT2D with taming's 8/8/7 window; for GPUs
  demo1d, small1d, base1d (train-gpt only): the 1-D sliding-window GPT instead of GPT2D
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .._checks import check_bool, check_float, check_int, check_positive, check_prob


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key."""


class _Section:
    """A config section as a dataclass: from_dict refuses unknown keys by name, to_dict gives plain
    types back (lists, not tuples) for YAML and checkpoints."""

    @classmethod
    def from_dict(cls, values, where: str):
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_betas(section: str, betas) -> tuple[float, float]:
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"config: {section}.betas must be two numbers in [0, 1), got {betas!r}")
    return tuple(check_prob("config", f"{section}.betas", b) for b in betas)


@dataclass
class VQGANLossSection(_Section):
    """train-vqgan's `loss` section: VQGANLoss arguments (which VQGANLoss checks). Defaults: the demo preset."""
    # steps before the GAN term and the discriminator's updates start. 200 of the demo's 600: with
    # 400 the demo VQGAN blurred grass (a classifier of the real textures called 0.3% of its grass
    # reconstructions grass; 81% with 200, brick 94%, gravel 87%; 100 lost gravel: 13%)
    disc_start: int = 200
    disc_weight: float = 0.5
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_ndf: int = 32
    disc_num_layers: int = 2


@dataclass
class VQGANTrainSection(_Section):
    """train-vqgan's `train` section. Defaults: the demo preset."""
    steps: int = 600
    batch_size: int = 16  # per process
    size: int = 32  # training crop side in pixels (the VQGAN's resolution)
    lr: float = 1e-3
    disc_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)  # Adam's, for both optimizers
    log_every: int = 10
    eval_every: int = 100  # held-out PSNR, codebook usage and a reconstruction grid
    ckpt_every: int = 100
    heldout: int = 64  # held-out crops evaluated
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "size", "log_every", "eval_every", "ckpt_every", "heldout"):
            setattr(self, name, check_int("config", f"train.{name}", getattr(self, name), 1))
        self.seed = check_int("config", "train.seed", self.seed, 0)
        self.lr = check_positive("config", "train.lr", self.lr)
        self.disc_lr = check_positive("config", "train.disc_lr", self.disc_lr)
        self.betas = _check_betas("train", self.betas)


@dataclass
class GPTTrainSection(_Section):
    """train-gpt's `train` section. Defaults: the demo preset."""
    steps: int = 400
    batch_size: int = 32  # per process
    lr: float = 1e-3  # peak, after `warmup` steps; cosine decay to 10% of it at `steps`
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    pkeep: float = 0.9  # fraction of input codes kept; the others are replaced by random codes
    conditional: bool = True  # a class token (the crop's source image) before the codes
    cond: str = "none"  # spatial condition (GPT2D only): none, layout, edges or lowres
    cond_drop: float = 0.1  # fraction of training crops shown with the null condition (CFG needs it)
    lowres_factor: int = 8  # cond lowres: how much the low-resolution input is shrunk
    size: int = 0  # pixel side of the crops encoded for the prior; 0: the VQGAN's training crop
    codes: int = 4096  # crops encoded into the training bank (shared out among the processes)
    warmup: int = 50
    log_every: int = 20
    ckpt_every: int = 200
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "codes", "log_every", "ckpt_every"):
            setattr(self, name, check_int("config", f"train.{name}", getattr(self, name), 1))
        self.warmup = check_int("config", "train.warmup", self.warmup, 0)
        self.seed = check_int("config", "train.seed", self.seed, 0)
        self.lr = check_positive("config", "train.lr", self.lr)
        self.weight_decay = check_float("config", "train.weight_decay", self.weight_decay, 0.0)
        self.betas = _check_betas("train", self.betas)
        self.pkeep = check_positive("config", "train.pkeep", self.pkeep, 1.0)  # 0 would train on noise alone
        check_bool("config", "train.conditional", self.conditional)
        if self.cond not in SPATIAL_CONDITIONS:
            raise ConfigError(f"config: train.cond must be one of {', '.join(SPATIAL_CONDITIONS)}, got {self.cond!r}")
        self.cond_drop = check_prob("config", "train.cond_drop", self.cond_drop)
        self.lowres_factor = check_int("config", "train.lowres_factor", self.lowres_factor, 1)
        self.size = check_int("config", "train.size", self.size, 0)


SPATIAL_CONDITIONS = ("none", "layout", "edges", "lowres")
PRIORS = ("gpt2d", "gpt")  # model.prior: the 2-D raster-window prior (default) or the 1-D sliding-window GPT


def _sections(config, names: tuple[str, ...], where: str) -> Mapping:
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(config).__name__}")
    for name in config:
        if name not in names:
            raise ConfigError(f"{where}: unknown section {name!r} (known: {', '.join(names)})")
    missing = [name for name in names if name not in config]
    if missing:
        raise ConfigError(f"{where}: missing section(s) {', '.join(missing)}")
    if not isinstance(config["model"], Mapping):
        raise ConfigError(f"{where}.model: expected a mapping, got {type(config['model']).__name__}")
    return config


@dataclass
class TrainVQGANConfig:
    """train-vqgan's configuration: `model` VQGANConfig fields (resolution comes from train.size)."""
    model: dict
    loss: VQGANLossSection = field(default_factory=VQGANLossSection)
    train: VQGANTrainSection = field(default_factory=VQGANTrainSection)

    @classmethod
    def from_dict(cls, config, where: str = "config") -> "TrainVQGANConfig":
        """From load_config's dict or a checkpoint's (an instance is returned as it is)."""
        if isinstance(config, cls):
            return config
        sections = _sections(config, ("model", "loss", "train"), where)
        result = cls(dict(sections["model"]), VQGANLossSection.from_dict(sections["loss"], f"{where}.loss"),
                     VQGANTrainSection.from_dict(sections["train"], f"{where}.train"))
        from ..models.vqgan import VQGANConfig

        try:  # the model section checked with the rest (beta: nan), not when the model is built
            VQGANConfig.from_dict({**result.model, "resolution": result.train.size})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.model: {e}") from None
        return result

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "loss": self.loss.to_dict(), "train": self.train.to_dict()}


@dataclass
class TrainGPTConfig:
    """train-gpt's configuration: `model` the prior's arguments (vocab, classes and sizes come from the
    VQGAN and the data), with `prior`: gpt2d (fastvq.GPT2D, the default) or gpt (the 1-D fastvq.GPT)."""
    model: dict
    train: GPTTrainSection = field(default_factory=GPTTrainSection)

    @classmethod
    def from_dict(cls, config, where: str = "config") -> "TrainGPTConfig":
        """From load_config's dict or a checkpoint's (an instance is returned as it is)."""
        if isinstance(config, cls):
            return config
        sections = _sections(config, ("model", "train"), where)
        result = cls(dict(sections["model"]), GPTTrainSection.from_dict(sections["train"], f"{where}.train"))
        if result.prior not in PRIORS:
            raise ConfigError(f"{where}.model.prior must be one of {', '.join(PRIORS)}, got {result.prior!r}")
        if result.prior == "gpt" and result.train.cond != "none":
            raise ConfigError(f"{where}.train.cond: a spatial condition needs model.prior gpt2d "
                              f"(the 1-D GPT has no grid to add it to), got cond {result.train.cond!r}")
        return result

    @property
    def prior(self) -> str:
        # checkpoints written before GPT2D have no `prior` key: they hold a 1-D GPT
        return self.model.get("prior", "gpt")

    @property
    def model_args(self) -> dict:
        """The model section without `prior`: the keyword arguments of GPT2D / GPT."""
        return {k: v for k, v in self.model.items() if k != "prior"}

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "train": self.train.to_dict()}


VQGAN_PRESETS = {
    "demo": {
        "model": {"resolution": 32, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                  "z_channels": 32, "embed_dim": 16, "n_embed": 128, "beta": 0.25, "legacy": False,
                  "ema": True, "restart_dead": True},
        "loss": VQGANLossSection().to_dict(),
        "train": VQGANTrainSection().to_dict(),
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

GPT_1D_PRESETS = {
    "demo1d": {
        # 4096 crops of three textures overlap heavily: dropout, weight decay and pkeep keep the
        # prior from memorising them (without, held-out loss rises after ~200 steps)
        "model": {"prior": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "window": 32, "rope": True,
                  "embd_pdrop": 0.1, "resid_pdrop": 0.1, "attn_pdrop": 0.0},
        "train": GPTTrainSection().to_dict(),
    },
    "small1d": {
        "model": {"prior": "gpt", "n_layer": 8, "n_head": 8, "n_embd": 256, "window": 64, "rope": True,
                  "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0},
        "train": {"steps": 20000, "batch_size": 32, "lr": 4e-4, "weight_decay": 0.01, "betas": [0.9, 0.95],
                  "pkeep": 0.9, "conditional": True, "codes": 65536, "warmup": 500, "log_every": 50,
                  "ckpt_every": 1000, "seed": 0},
    },
    "base1d": {
        "model": {"prior": "gpt", "n_layer": 24, "n_head": 16, "n_embd": 1024, "window": 256, "rope": True,
                  "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0},
        "train": {"steps": 200000, "batch_size": 16, "lr": 3e-4, "weight_decay": 0.01, "betas": [0.9, 0.95],
                  "pkeep": 0.9, "conditional": True, "codes": 262144, "warmup": 2000, "log_every": 100,
                  "ckpt_every": 5000, "seed": 0},
    },
}

# The 2-D raster-window prior (GPT2D): trained on crops of `train.size` pixels (larger than the
# VQGAN's, so the window's interior is seen), sampled at any size. rows/left/right: taming's crop
# context is 8/8/7; the demo's is smaller to fit its 12 x 12 code crops and a CPU.
GPT_2D_PRESETS = {
    "demo": {
        "model": {"prior": "gpt2d", "n_layer": 4, "n_head": 4, "n_embd": 128, "rows": 4, "left": 4, "right": 3,
                  "embd_pdrop": 0.1, "resid_pdrop": 0.1},
        "train": {**GPTTrainSection().to_dict(), "size": 48, "codes": 2048, "batch_size": 16},
    },
    "small": {
        "model": {"prior": "gpt2d", "n_layer": 8, "n_head": 8, "n_embd": 256, "rows": 8, "left": 8, "right": 7,
                  "embd_pdrop": 0.0, "resid_pdrop": 0.0},
        "train": {**GPT_1D_PRESETS["small1d"]["train"], "size": 128, "codes": 32768, "batch_size": 16},
    },
    "base": {
        "model": {"prior": "gpt2d", "n_layer": 24, "n_head": 16, "n_embd": 1024, "rows": 8, "left": 8, "right": 7,
                  "embd_pdrop": 0.0, "resid_pdrop": 0.0},
        "train": {**GPT_1D_PRESETS["base1d"]["train"], "size": 256},
    },
}
GPT_PRESETS = {**GPT_2D_PRESETS, **GPT_1D_PRESETS}

PRESETS = {"vqgan": VQGAN_PRESETS, "gpt": GPT_PRESETS}
CONFIGS = {"vqgan": TrainVQGANConfig, "gpt": TrainGPTConfig}


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
    """The configuration for `kind` ("vqgan" or "gpt") as a dict of sections, checked by its
    dataclasses (CONFIGS[kind]): spec is a preset name, a YAML file or None (the demo preset);
    overrides is {"section.key": value} from the command line (None values are skipped, so unset
    flags keep the file's value)."""
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
    CONFIGS[kind].from_dict(config, spec or "config")
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
