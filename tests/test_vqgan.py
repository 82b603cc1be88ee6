"""VQGAN against taming-transformers' own Encoder, Decoder and VectorQuantizer2 (same weights), the
taming checkpoint loader, and the config and input checks."""
import os

import numpy as np
import pytest
import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from fastvq.models.vqgan import VQGAN, Decoder, Encoder, VQGANConfig, load_taming_vqgan
from helpers import assert_close

# Tiny but complete: two levels (one downsampling), attention at 8x8 in both encoder and decoder
# (besides mid), a 1x1 shortcut where the width doubles.
DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
N_EMBED, EMBED_DIM = 32, 4
PARAMS = {"ddconfig": DDCONFIG, "n_embed": N_EMBED, "embed_dim": EMBED_DIM}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; one keeps the runtime steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TamingVQModel(nn.Module):
    """taming's VQModel minus Lightning and the loss (taming.models.vqgan imports pytorch_lightning):
    the same submodules under the same names, and its encode / decode / forward."""

    def __init__(self, ddconfig, n_embed, embed_dim, remap=None, sane_index_shape=False):
        super().__init__()
        self.encoder = TamingEncoder(**ddconfig)
        self.decoder = TamingDecoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x):
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


def images(seed, shape=(2, 3, 16, 16), dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_reference(dtype=torch.float64, **params):
    """taming's model with every parameter perturbed (so GroupNorm affines and biases matter) and a
    codebook drawn near actual encoder outputs (so the indices are spread over many codes)."""
    torch.manual_seed(0)
    ref = TamingVQModel(**{**PARAMS, **params}).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        h = ref.quant_conv(ref.encoder(images(1, (4, 3, 16, 16), dtype)))
        vectors = h.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        picked = vectors[torch.randperm(len(vectors))[:N_EMBED]]
        ref.quantize.embedding.weight.copy_(picked + 0.1 * vectors.std() * torch.randn_like(picked))
    return ref


def ours_from(ref, dtype=torch.float64, **params):
    ours = VQGAN(VQGANConfig.from_taming({**PARAMS, **params})).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def tiny_config(**overrides):
    return VQGANConfig(**{**{"resolution": 16, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1,
                             "attn_resolutions": (8,), "z_channels": 8, "n_embed": N_EMBED, "embed_dim": EMBED_DIM},
                          **overrides})


# ----------------------------------------------------------------------------- against taming

def test_state_dict_names_and_shapes_are_taming():
    ref, ours = TamingVQModel(**PARAMS), VQGAN(VQGANConfig.from_taming(PARAMS))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back


def test_encoder_and_decoder_match_taming():
    ref = make_reference()
    config = VQGANConfig.from_taming(PARAMS)
    encoder, decoder = Encoder(config).double(), Decoder(config).double()
    encoder.load_state_dict(ref.encoder.state_dict(), strict=True)
    decoder.load_state_dict(ref.decoder.state_dict(), strict=True)
    x = images(2)
    with torch.no_grad():
        h = ref.encoder(x)
        assert h.shape == (2, 8, 8, 8)
        assert_close(encoder(x), h)
        assert_close(decoder(h), ref.decoder(h))


@pytest.mark.parametrize("variant", ["plain", "sane_index_shape", "remap"])
def test_vqgan_matches_taming_vqmodel(variant, tmp_path):
    params = {}
    if variant == "sane_index_shape":
        params = {"sane_index_shape": True}
    elif variant == "remap":  # a permutation of all codes: no unknown index, so nothing random
        np.save(tmp_path / "used.npy", np.random.RandomState(0).permutation(N_EMBED))
        params = {"remap": str(tmp_path / "used.npy")}
    ref = make_reference(**params)
    ours = ours_from(ref, **params)
    x = images(2)

    z_ref, loss_ref, (_, _, idx_ref) = ref.encode(x)
    z_q, loss, (perplexity, _, idx) = ours.encode(x)
    assert idx.shape == idx_ref.shape
    assert torch.equal(idx, idx_ref)
    assert idx.unique().numel() > 8  # the comparison is not between two constant grids
    assert_close(z_q, z_ref)
    # the fused op accumulates the loss in float32 whatever the input dtype
    assert_close(loss.double(), loss_ref, rtol=1e-6, atol=1e-9)
    assert 1.0 < float(perplexity) <= N_EMBED

    assert_close(ours.decode(z_q), ref.decode(z_ref))
    shape = (2, 8, 8, EMBED_DIM)
    from_codes_ref = ref.decode(ref.quantize.get_codebook_entry(idx_ref, shape))
    assert_close(ours.decode_code(idx, shape), from_codes_ref)

    codes = ours.encode_indices(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert torch.equal(codes.reshape(-1), idx_ref.reshape(-1))
    assert_close(ours.decode_indices(codes), from_codes_ref)

    # forward and the straight-through backward of the same loss
    for model in (ref, ours):
        xrec, qloss = model(x)
        ((xrec - x).abs().mean() + qloss).backward()
    assert_close(ours(x)[0], ref(x)[0])
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        assert_close(p.grad, grads_ref[name], rtol=1e-8, atol=1e-10, msg=name)


def test_backward_gives_finite_grads_to_encoder_and_decoder():
    torch.manual_seed(0)
    model = VQGAN(tiny_config())
    x = torch.randn(2, 3, 16, 16)
    xrec, qloss = model(x)
    assert xrec.shape == x.shape and qloss.dim() == 0
    ((xrec - x).abs().mean() + qloss).backward()
    for name in ("encoder.conv_in.weight", "encoder.down.1.attn.0.q.weight", "quant_conv.weight",
                 "quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_out.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.get_last_layer() is model.decoder.conv_out.weight


# ----------------------------------------------------------------------------- the checkpoint loader

class ModelCheckpoint:
    """Stands for Lightning's callback class, which taming's checkpoints hold as a dict key."""


class HyperParameters:
    """Stands for the hyper-parameter objects Lightning pickles (built by NEWOBJ, then BUILD)."""

    def __init__(self, **values):
        self.__dict__.update(values)


class Payload:
    """An object whose unpickling would run code: it would create the file at `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


class SystemCall:
    def __reduce__(self):
        return os.system, ("true",)


def write_run(tmp_path, checkpoint, params=PARAMS, target="taming.models.vqgan.VQModel"):
    """A taming training run's files: the checkpoint (any object) and the project YAML."""
    tmp_path.mkdir(exist_ok=True)
    ckpt = tmp_path / "last.ckpt"
    torch.save(checkpoint, ckpt)
    config = {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": {
        **params, "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                 "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000}}}},
              "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 2}}}
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(config))
    return ckpt, path


def lightning_checkpoint(ref):
    loss_state = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    return {"state_dict": {**ref.state_dict(), **loss_state}, "epoch": 3, "global_step": 1234,
            "pytorch-lightning_version": "1.0.8",
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}],
            "hyper_parameters": HyperParameters(n_embed=N_EMBED, ddconfig=DDCONFIG)}


def test_load_taming_vqgan_reconstructs_like_taming(tmp_path):
    ref = make_reference(torch.float32)
    ckpt, config = write_run(tmp_path, lightning_checkpoint(ref))
    model, loss_state = load_taming_vqgan(ckpt, config, return_loss_state=True)
    assert isinstance(model, VQGAN) and model.config == VQGANConfig.from_taming(PARAMS)
    assert set(loss_state) == {"logvar", "discriminator.main.0.weight"}
    x = images(2, dtype=torch.float32)
    with torch.no_grad():
        assert_close(model(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
        assert torch.equal(model.encode_indices(x).reshape(-1), ref.encode(x)[2][2])
    assert isinstance(load_taming_vqgan(str(ckpt), str(config)), VQGAN)  # str paths, model alone


def test_load_taming_vqgan_accepts_a_bare_state_dict(tmp_path):
    ref = make_reference(torch.float32)
    ckpt, config = write_run(tmp_path, ref.state_dict())
    model = load_taming_vqgan(ckpt, config)
    x = images(3, dtype=torch.float32)
    with torch.no_grad():
        assert_close(model(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)


def test_load_taming_vqgan_runs_no_code_from_the_checkpoint(tmp_path):
    ref = make_reference(torch.float32)
    marker = tmp_path / "ran"
    ckpt, config = write_run(tmp_path, {"state_dict": ref.state_dict(), "hparams": Payload(marker)})
    load_taming_vqgan(ckpt, config)
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_load_taming_vqgan_errors(tmp_path):
    ref = make_reference(torch.float32)
    state = ref.state_dict()
    ckpt, config = write_run(tmp_path, {"state_dict": state})
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_taming_vqgan(tmp_path / "nope.ckpt", config)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_taming_vqgan(ckpt, tmp_path / "nope.yaml")

    def run_with(sub, state_dict, **kwargs):
        return write_run(tmp_path / sub, {"state_dict": state_dict}, **kwargs)

    no_ddconfig = {k: v for k, v in PARAMS.items() if k != "ddconfig"}
    with pytest.raises(ValueError, match="ddconfig"):
        load_taming_vqgan(*run_with("a", state, params=no_ddconfig))
    with pytest.raises(ValueError, match="model.target"):
        load_taming_vqgan(*run_with("b", state, target="taming.models.vqgan.GumbelVQ"))
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.weight"}
    with pytest.raises(ValueError, match="1 missing key.*decoder.conv_out.weight"):
        load_taming_vqgan(*run_with("c", missing))
    with pytest.raises(ValueError, match="unexpected key.*encoder.extra"):
        load_taming_vqgan(*run_with("d", {**state, "encoder.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match="other shapes.*quantize.embedding.weight"):
        load_taming_vqgan(*run_with("e", state, params={**PARAMS, "n_embed": 2 * N_EMBED}))
    with pytest.raises(ValueError, match="blocked"):  # torch refuses os.system outright
        load_taming_vqgan(*write_run(tmp_path / "f", {"state_dict": state, "hparams": SystemCall()}))
    with pytest.raises(ValueError, match="neither"):
        load_taming_vqgan(*write_run(tmp_path / "g", {"global_step": 3}))

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_taming_vqgan(ckpt, bad_yaml)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_taming_vqgan(garbage, config)


# ----------------------------------------------------------------------------- config

def test_config_from_taming_and_round_trip():
    config = VQGANConfig.from_taming({**PARAMS, "sane_index_shape": True, "monitor": "val/rec_loss",
                                      "image_key": "image", "ckpt_path": None, "ignore_keys": []})
    assert config == tiny_config(sane_index_shape=True)
    d = config.to_dict()
    assert d["ch_mult"] == [1, 2] and d["attn_resolutions"] == [8]
    assert VQGANConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == config
    assert VQGANConfig().downsample_factor == 16 and config.downsample_factor == 2


@pytest.mark.parametrize("params, match", [
    ({k: v for k, v in PARAMS.items() if k != "n_embed"}, "missing 'n_embed'"),
    ({**PARAMS, "beta": 0.5}, "unknown key.*'beta'"),
    ({**PARAMS, "ddconfig": {k: v for k, v in DDCONFIG.items() if k != "z_channels"}},
     "ddconfig is missing 'z_channels'"),
    ({**PARAMS, "ddconfig": {k: v for k, v in DDCONFIG.items() if k != "double_z"}}, "double_z"),
    ({**PARAMS, "ddconfig": {**DDCONFIG, "give_pre_end": True}}, "give_pre_end"),
    ({**PARAMS, "ddconfig": {**DDCONFIG, "attn_type": "vanilla"}}, "unknown key.*'attn_type'"),
    ({**PARAMS, "ddconfig": [1, 2]}, "ddconfig must be a mapping"),
])
def test_config_from_taming_errors(params, match):
    with pytest.raises(ValueError, match=match):
        VQGANConfig.from_taming(params)


@pytest.mark.parametrize("overrides, match", [
    ({"ch_mult": ()}, "ch_mult"),
    ({"ch_mult": (1, 0)}, "ch_mult"),
    ({"attn_resolutions": 8}, "attn_resolutions"),
    ({"ch": 48}, "GroupNorm.*48"),
    ({"ch": 24, "ch_mult": (1, 2)}, "GroupNorm.*48"),
    ({"resolution": 18, "ch_mult": (1, 2, 2)}, "resolution.*4"),
    ({"double_z": True}, "double_z"),
    ({"metric": "dot"}, "metric"),
    ({"dropout": 1.0}, "dropout"),
    ({"legacy": "False"}, "legacy"),
    ({"n_embed": 0}, "n_embed"),
    ({"embed_dim": 2.5}, "embed_dim"),
    ({"decay": 1.0}, "decay"),
    ({"restart_dead": True, "restart_threshold": 0.0}, "restart_threshold"),
])
def test_config_rejects_bad_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*'chmult'"):
        VQGANConfig.from_dict({"chmult": [1, 2]})


def test_narrow_model_and_quantizer_extras():
    """ch=8: GroupNorm with 8 and 16 groups; the VectorQuantizer extras reach the quantizer."""
    config = tiny_config(ch=8, ch_mult=(1, 2, 2), resolution=32, metric="cosine", ema=True, decay=0.9,
                         restart_dead=True, restart_threshold=0.5, codebook_dim=2)
    model = VQGAN(config)
    q = model.quantize
    assert (q.metric, q.ema, q.decay, q.restart_threshold, q.codebook_dim) == ("cosine", True, 0.9, 0.5, 2)
    assert model.encoder.conv_in.out_channels == 8 and model.encoder.norm_out.num_groups == 16
    assert model.latent_shape(32, 48) == (8, 12)
    x = torch.randn(1, 3, 32, 48)
    assert model.encode_indices(x).shape == (1, 8, 12)
    assert model(x)[0].shape == x.shape
    assert VQGAN(tiny_config(restart_dead=False, restart_threshold=3.0)).quantize.restart_threshold == 0.0


# ----------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("x, error, match", [
    (torch.zeros(2, 1, 16, 16), ValueError, r"\(B, 3, H, W\)"),
    (torch.zeros(3, 16, 16), ValueError, r"\(B, 3, H, W\)"),
    (torch.zeros(2, 3, 15, 16), ValueError, "divisible by the downsampling factor 2"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.int64), TypeError, "floating-point"),
    ([[1.0]], ValueError, "got list"),
])
def test_encode_checks_its_input(x, error, match):
    model = VQGAN(tiny_config())
    for method in (model.encode, model.forward, model.encode_indices):
        with pytest.raises(error, match=match):
            method(x)


def test_decode_checks_its_input():
    model = VQGAN(tiny_config())
    with pytest.raises(ValueError, match=r"z_q must be a non-empty \(B, 4, H, W\)"):
        model.decode(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"lie in \[0, 32\)"):
        model.decode_indices(torch.full((1, 4, 4), N_EMBED))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode_indices(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        model.decode_indices(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="B\\*h\\*w = 32"):
        model.decode_code(torch.zeros(16, dtype=torch.long), (2, 4, 4, EMBED_DIM))
    with pytest.raises(ValueError, match="embed_dim=4"):
        model.decode_code(torch.zeros(16, dtype=torch.long), (1, 4, 4, 3))
    with pytest.raises(ValueError, match="height must be a positive multiple of .* 2"):
        model.latent_shape(15, 16)
