"""taming-transformers' Net2NetTransformer checkpoints as fastvq models.

load_taming_transformer(ckpt, yaml) reads a taming training run of the second stage (a Lightning
checkpoint whose state dict holds transformer.*, first_stage_model.* and, for stages with weights,
cond_stage_model.*, and the project YAML that built it) and returns
  * the prior as a fastvq.GPT: minGPT's module tree and parameter names are fastvq.GPT's
    (tok_emb, pos_emb, blocks.N.{ln1, ln2, attn.{key, query, value, proj}, mlp.{0, 2}}, ln_f,
    head), so the transformer.* tensors load under the same names; taming's causal-mask buffers
    (attn.mask) are checked to be plain lower-triangular and dropped (fastvq computes the mask);
  * the first stage as a fastvq.VQGAN (the model load_taming_vqgan builds from the same params);
  * what the cond stage is, as a dict: the one-token prefix every sequence starts with.

The GPT samples at the trained size with fastvq.sample_with_past (the cached path); with
sample_logits=False it gives the tokens of taming's Net2NetTransformer.sample(sample=False).
Only what decodes the same way is accepted: a start-of-sequence token (SOSProvider, or an
unconditional run) or a class label (Labelator) as the cond stage, and the identity permuter
(raster order). Anything else is refused with an error naming the file and the key.
"""
from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .gpt import GPT
from .vqgan import TAMING_TARGET as VQMODEL_TARGET
from .vqgan import VQGAN, VQGANConfig, _safe_load

_WHERE = "load_taming_transformer"
NET2NET_TARGET = "taming.models.cond_transformer.Net2NetTransformer"
MINGPT_TARGET = "taming.modules.transformer.mingpt.GPT"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
SOS_PROVIDER = "taming.modules.util.SOSProvider"
LABELATOR = "taming.modules.util.Labelator"
UNCONDITIONAL = "__is_unconditional__"  # taming's cond_stage_config string for an SOS token
FIRST_STAGE_AS_COND = "__is_first_stage__"  # image-to-image: the cond is a crop's codes, not a prefix token

# Net2NetTransformer's arguments: the three stage configs, and the ones that only matter in training
# or for inputs fastvq does not take (images to encode, conditions to downsample).
_PARAMS_REQUIRED = {"transformer_config", "first_stage_config", "cond_stage_config"}
_PARAMS_OPTIONAL = {"permuter_config", "sos_token", "unconditional", "ckpt_path", "ignore_keys", "first_stage_key",
                    "cond_stage_key", "downsample_cond_size", "pkeep"}
# minGPT's arguments (taming.modules.transformer.mingpt.GPT); fastvq.GPT takes the same names.
_MINGPT_REQUIRED = {"vocab_size", "block_size"}
_MINGPT_OPTIONAL = {"n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop", "attn_pdrop", "n_unmasked"}
_PREFIXES = {"transformer": "transformer.", "first_stage": "first_stage_model.", "cond_stage": "cond_stage_model."}
_FIRST_STAGE_LOSS = "first_stage_model.loss."  # a VQModel's loss (LPIPS, discriminator): not the autoencoder


def load_taming_transformer(ckpt_path, config_path, map_location="cpu") -> tuple[GPT, VQGAN, dict]:
    """A taming Net2NetTransformer run as (fastvq.GPT, fastvq.VQGAN, cond).

    Args:
        ckpt_path: the run's Lightning checkpoint ({"state_dict": ..., ...}) or a bare state dict,
            read without running code from it (as load_taming_vqgan reads one).
        config_path: the run's project YAML: model.target taming's Net2NetTransformer, model.params
            with transformer_config (taming's minGPT), first_stage_config (taming's VQModel),
            cond_stage_config and optionally permuter_config (identity only).
        map_location: as torch.load's; both models go to the device the weights land on, and the
            GPT keeps the checkpoint's dtype.

    Returns:
        (gpt, vqgan, cond), both models in eval mode. cond describes the prefix that starts every
        sequence, one token long:
          {"kind": "sos", "sos_token": s, ...}: unconditional; the prefix is s for every sample;
          {"kind": "class", "n_classes": n, ...}: the prefix is the class label in [0, n);
        and both carry "prefix_length" (1), "codes" (how many codes the GPT samples at its trained
        size: block_size + 1 - prefix_length, since taming never feeds the last code back) and
        "grid" ((side, side) when that many codes form a square grid, else None). Sampling:
            x = torch.full((B, 1), cond["sos_token"])          # or labels[:, None]
            codes = fastvq.sample_with_past(x, gpt, cond["codes"], sample_logits=False)
            images = vqgan.decode_indices(codes.view(B, *cond["grid"]))

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the YAML is not a Net2NetTransformer config fastvq can run (another model,
            transformer or first stage; a cond stage other than SOS / class label; a permuter
            other than the identity; an unknown key), or the checkpoint does not hold the weights
            the YAML describes (a missing, unexpected or misshapen key, named with its file).
    """
    config_path, ckpt_path = Path(config_path), Path(ckpt_path)
    params = _read_params(config_path)
    gpt = _build_gpt(params["transformer_config"], config_path)
    vqgan_config = _first_stage_config(params["first_stage_config"], config_path)
    cond = _cond_stage(params, config_path, gpt)
    _check_permuter(params.get("permuter_config"), config_path)
    if gpt.vocab_size < vqgan_config.n_embed:
        raise ValueError(f"{_WHERE}: {config_path}: transformer_config.params.vocab_size {gpt.vocab_size} is smaller "
                         f"than the first stage's codebook (first_stage_config.params.n_embed "
                         f"{vqgan_config.n_embed}): the transformer cannot model its codes")
    vqgan = VQGAN(vqgan_config)
    parts = _split_state_dict(_read_state_dict(ckpt_path, map_location), ckpt_path)
    _load_part(gpt, parts["transformer"], "transformer", ckpt_path, config_path)
    _load_part(vqgan, parts["first_stage"], "first_stage", ckpt_path, config_path)
    if parts["cond_stage"]:  # SOSProvider and Labelator have no weights: these belong to something else
        keys = sorted(parts["cond_stage"])
        raise ValueError(f"{_WHERE}: {ckpt_path} holds cond-stage weights ({_PREFIXES['cond_stage']}{keys[0]}"
                         f"{f' and {len(keys) - 1} more' if len(keys) > 1 else ''}) but the cond stage of "
                         f"{config_path} ({cond['kind']}) has none")
    weight = parts["transformer"]["tok_emb.weight"]
    gpt = gpt.to(device=weight.device, dtype=weight.dtype).eval()
    vqgan = vqgan.to(weight.device).eval()
    return gpt, vqgan, cond


# ----------------------------------------------------------------------------- the YAML

def _read_params(path: Path) -> dict:
    """model.params of a Net2NetTransformer project YAML, its keys checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{_WHERE}: config file {str(path)!r} does not exist")
    import yaml  # fastvq[pipeline] ships pyyaml, as load_taming_vqgan needs it

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{_WHERE}: {path} is not valid YAML ({e})") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{_WHERE}: {path} has no 'model' mapping (taming's model.target / model.params)")
    if model.get("target") != NET2NET_TARGET:
        raise ValueError(f"{_WHERE}: {path}: model.target must be {NET2NET_TARGET!r}, got {model.get('target')!r}"
                         + (" (a first-stage run: use fastvq.load_taming_vqgan)" if model.get("target") == VQMODEL_TARGET
                            else ""))
    params = model.get("params")
    _check_keys(params, "model.params", _PARAMS_REQUIRED, _PARAMS_OPTIONAL, path)
    return params


def _check_keys(d, where: str, required: set, optional: set, path: Path) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{_WHERE}: {path}: {where} must be a mapping, got {type(d).__name__}")
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{_WHERE}: {path}: {where} has no {', '.join(map(repr, missing))}")
    unknown = sorted(set(d) - required - optional, key=str)
    if unknown:
        raise ValueError(f"{_WHERE}: {path}: unknown key(s) {', '.join(map(repr, unknown))} in {where} "
                         f"(known: {', '.join(sorted(required | optional))})")


def _stage(config, name: str, target: str, path: Path) -> dict:
    """The params of a {target, params} stage config whose target must be `target`."""
    where = f"model.params.{name}"
    if not isinstance(config, Mapping) or config.get("target") != target:
        got = config.get("target") if isinstance(config, Mapping) else config
        raise ValueError(f"{_WHERE}: {path}: {where}.target must be {target!r}, got {got!r}")
    params = config.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"{_WHERE}: {path}: {where}.params must be a mapping, got {type(params).__name__}")
    return dict(params)


def _build_gpt(config, path: Path) -> GPT:
    params = _stage(config, "transformer_config", MINGPT_TARGET, path)
    _check_keys(params, "model.params.transformer_config.params", _MINGPT_REQUIRED, _MINGPT_OPTIONAL, path)
    try:
        return GPT(**params)  # window None: taming's full causal attention over block_size
    except (TypeError, ValueError) as e:
        raise ValueError(f"{_WHERE}: {path}: model.params.transformer_config.params: {e}") from None


def _first_stage_config(config, path: Path) -> VQGANConfig:
    params = _stage(config, "first_stage_config", VQMODEL_TARGET, path)
    try:
        return VQGANConfig.from_taming(params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{_WHERE}: {path}: model.params.first_stage_config.params: {e}") from None


def _cond_stage(params: Mapping, path: Path, gpt: GPT) -> dict:
    """What the prefix token is, from cond_stage_config (and taming's unconditional / sos_token)."""
    config, where = params["cond_stage_config"], "model.params.cond_stage_config"
    supported = f"{SOS_PROVIDER!r}, {LABELATOR!r} or {UNCONDITIONAL!r}"
    if config == FIRST_STAGE_AS_COND:  # checked first, as taming does
        raise ValueError(f"{_WHERE}: {path}: {where} is {config!r} (the first stage's codes of a conditioning "
                         f"image, not a one-token prefix); supported cond stages: {supported}")
    # taming: unconditional=True turns any other cond stage into an SOS token (its sos_token argument)
    if params.get("unconditional") or config == UNCONDITIONAL:
        cond = {"kind": "sos", "sos_token": params.get("sos_token", 0)}
        key = "model.params.sos_token"
    elif isinstance(config, Mapping) and config.get("target") in (SOS_PROVIDER, LABELATOR):
        stage = _stage(config, "cond_stage_config", config["target"], path)
        name = "sos_token" if config["target"] == SOS_PROVIDER else "n_classes"
        _check_keys(stage, f"{where}.params", {name}, {"quantize_interface"}, path)
        if not stage.get("quantize_interface", True):
            raise ValueError(f"{_WHERE}: {path}: {where}.params.quantize_interface must be true (taming's "
                             "Net2NetTransformer reads the cond stage through it)")
        cond = {"kind": "sos" if name == "sos_token" else "class", name: stage[name]}
        key = f"{where}.params.{name}"
    else:
        got = config.get("target") if isinstance(config, Mapping) else config
        raise ValueError(f"{_WHERE}: {path}: {where} is {got!r}; supported cond stages: {supported}")
    value = next(v for k, v in cond.items() if k != "kind")
    low, high = (0, gpt.vocab_size - 1) if cond["kind"] == "sos" else (1, gpt.vocab_size)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{_WHERE}: {path}: {key} must be an integer in [{low}, {high}] (the transformer's "
                         f"vocabulary holds {gpt.vocab_size} tokens, the prefix included), got {value!r}")
    prefix_length = 1
    codes = gpt.block_size + 1 - prefix_length  # the last code is never fed back
    side = math.isqrt(codes)
    return {**cond, "prefix_length": prefix_length, "codes": codes, "grid": (side, side) if side * side == codes else None}


def _check_permuter(config, path: Path) -> None:
    if config is None:  # taming's default is the identity
        return
    target = config.get("target") if isinstance(config, Mapping) else config
    if target != IDENTITY_PERMUTER:
        raise ValueError(f"{_WHERE}: {path}: model.params.permuter_config.target is {target!r}; only "
                         f"{IDENTITY_PERMUTER!r} (raster order) is supported: fastvq samples codes in raster order")


# ----------------------------------------------------------------------------- the checkpoint

def _read_state_dict(path: Path, map_location) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{_WHERE}: checkpoint file {str(path)!r} does not exist")
    try:
        checkpoint = _safe_load(path, map_location)
    except (ValueError, pickle.UnpicklingError) as e:  # named after load_taming_vqgan, which reads the same way
        raise ValueError(f"{_WHERE}: {str(e).removeprefix('load_taming_vqgan: ')}") from None
    state_dict = checkpoint["state_dict"] if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint \
        else checkpoint
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ValueError(f"{_WHERE}: {path} holds neither a Lightning checkpoint with a 'state_dict' nor a state "
                         "dict of named tensors")
    return dict(state_dict)


def _split_state_dict(state_dict: dict, path: Path) -> dict:
    """{"transformer": ..., "first_stage": ..., "cond_stage": ...}, each without its prefix; the
    first stage's loss weights are dropped; any other key is an error."""
    parts = {name: {} for name in _PREFIXES}
    stray = []
    for key, value in state_dict.items():
        if key.startswith(_FIRST_STAGE_LOSS):
            continue
        name = next((n for n, prefix in _PREFIXES.items() if key.startswith(prefix)), None)
        if name is None:
            stray.append(key)
        else:
            parts[name][key[len(_PREFIXES[name]):]] = value
    if stray:
        raise ValueError(f"{_WHERE}: {path} holds key {stray[0]!r}{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}"
                         f" outside {', '.join(_PREFIXES.values())} (not a Net2NetTransformer state dict?)")
    if "tok_emb.weight" not in parts["transformer"]:
        raise ValueError(f"{_WHERE}: {path} has no 'transformer.tok_emb.weight' (not a Net2NetTransformer "
                         "checkpoint: its transformer's weights are missing)")
    return parts


def _load_part(model: nn.Module, state: dict, part: str, ckpt: Path, config: Path) -> None:
    """Load one stage's tensors, every key accounted for: missing, unexpected and misshapen keys are
    errors naming the first of them with its prefix."""
    prefix, expected = _PREFIXES[part], model.state_dict()
    wrong = [f"{prefix}{k} {tuple(v.shape)} (config: {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{_WHERE}: {ckpt} does not fit the {part} of {config}: {len(wrong)} tensor(s) have other "
                         f"shapes, e.g. {'; '.join(wrong[:3])}")
    try:
        result = model.load_state_dict(state, strict=False)
    except ValueError as e:  # taming's n_unmasked > 0 mask, refused by the attention's load hook
        raise ValueError(f"{_WHERE}: {ckpt}: in {prefix}*: {e}") from None
    for kind, keys in (("lacks", result.missing_keys), ("has unexpected", result.unexpected_keys)):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise ValueError(f"{_WHERE}: {ckpt} {kind} key {prefix + keys[0]!r}{more} for the {part} "
                             f"that {config} describes")
