"""fastvq.load_taming_transformer against taming's own second stage: a tiny taming minGPT and VQModel
written as a Net2NetTransformer run (Lightning checkpoint + project YAML), loaded, and sampled
greedily with fastvq.sample_with_past; the tokens must be taming's Net2NetTransformer.sample
(sample=False) tokens and the decoded images taming's. Then every way a run can be refused."""
import re
import sys
import types

import pytest
import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

import fastvq
from fastvq import GPT, VQGAN, load_taming_transformer, sample_with_past
from helpers import assert_close, backend_params


def _taming_mingpt():
    """taming's mingpt imports `transformers` only for top_k_top_p_filtering, which greedy sampling
    never calls: stub it when absent."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("transformers")

        def top_k_top_p_filtering(*args, **kwargs):
            raise AssertionError("the transformers stub was called: these tests use no top-k in taming")

        stub.top_k_top_p_filtering = top_k_top_p_filtering
        sys.modules["transformers"] = stub
    from taming.modules.transformer import mingpt

    return mingpt


mingpt = _taming_mingpt()

# A 4 x 4 code grid: 8 x 8 images, one downsampling (f = 2), attention at 4 x 4.
DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
N_EMBED, EMBED_DIM, SIDE = 32, 4, 4
CODES = SIDE * SIDE
GPT_PARAMS = {"vocab_size": N_EMBED, "block_size": CODES, "n_layer": 2, "n_head": 2, "n_embd": 32}
CONDS = {  # cond_stage_config (and extra Net2NetTransformer params) -> what load_taming_transformer says
    "unconditional": ("__is_unconditional__", {"sos_token": 7}, {"kind": "sos", "sos_token": 7}),
    "sos_provider": ({"target": "taming.modules.util.SOSProvider", "params": {"sos_token": 3}}, {},
                     {"kind": "sos", "sos_token": 3}),
    "class_label": ({"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}, {},
                    {"kind": "class", "n_classes": 10}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; one keeps the runtime steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TamingVQModel(nn.Module):
    """taming's VQModel minus Lightning and the loss (taming.models.vqgan imports pytorch_lightning):
    its submodules under its names, and what Net2NetTransformer.decode_to_img calls."""

    def __init__(self):
        super().__init__()
        self.encoder = TamingEncoder(**DDCONFIG)
        self.decoder = TamingDecoder(**DDCONFIG)
        self.quantize = VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)

    def decode_to_img(self, index, batch):
        """Net2NetTransformer.decode_to_img with the identity permuter."""
        quant = self.quantize.get_codebook_entry(index.reshape(-1), shape=(batch, SIDE, SIDE, EMBED_DIM))
        return self.decoder(self.post_quant_conv(quant))


class HyperParameters:
    """Stands for the hyper-parameter objects Lightning pickles into a checkpoint."""

    def __init__(self, **values):
        self.__dict__.update(values)


def taming_models(seed=0, **gpt_params):
    """taming's minGPT and VQModel with every parameter perturbed (positions, biases and norms matter)."""
    torch.manual_seed(seed)
    gpt = mingpt.GPT(**{**GPT_PARAMS, **gpt_params}).eval()
    vq = TamingVQModel().eval()
    with torch.no_grad():
        for p in (*gpt.parameters(), *vq.parameters()):
            p.add_(0.05 * torch.randn_like(p))
        gpt.pos_emb.normal_(std=0.5)
    return gpt, vq


def net2net_state(gpt, vq) -> dict:
    return {**{f"transformer.{k}": v for k, v in gpt.state_dict().items()},
            **{f"first_stage_model.{k}": v for k, v in vq.state_dict().items()}}


def project_yaml(cond_stage="__is_unconditional__", gpt_params=None, **params) -> dict:
    """A taming Net2NetTransformer project config of these models (as taming's configs write it)."""
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": {"first_stage_key": "image", "cond_stage_key": "class_label",
                                 "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                                        "params": {**GPT_PARAMS, **(gpt_params or {})}},
                                 "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                                                        "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED,
                                                                   "ddconfig": DDCONFIG,
                                                                   "lossconfig": {"target": "torch.nn.Identity"}}},
                                 "cond_stage_config": cond_stage, **params}},
            "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 2}}}


def write_run(dir_path, state_dict, config, lightning=True):
    """The run's files: the checkpoint (Lightning's layout unless lightning=False) and the YAML."""
    dir_path.mkdir(exist_ok=True)
    ckpt, path = dir_path / "last.ckpt", dir_path / "project.yaml"
    checkpoint = ({"state_dict": state_dict, "epoch": 2, "global_step": 345, "pytorch-lightning_version": "1.0.8",
                   "hyper_parameters": HyperParameters(sos_token=0)} if lightning else state_dict)
    torch.save(checkpoint, ckpt)
    path.write_text(yaml.safe_dump(config))
    return ckpt, path


@torch.no_grad()
def taming_greedy(transformer, c, steps):
    """Net2NetTransformer.sample(x=empty, c, steps, sample=False) (taming's loop, pkeep = 1): the
    whole sequence through the transformer for every token, the argmax appended."""
    x = c
    for _ in range(steps):
        assert x.size(1) <= transformer.get_block_size()
        logits, _ = transformer(x)
        x = torch.cat((x, torch.topk(torch.softmax(logits[:, -1], dim=-1), k=1, dim=-1)[1]), dim=1)
    return x[:, c.shape[1]:]


# ----------------------------------------------------------------------------- against taming

@pytest.mark.parametrize("backend", backend_params(("torch", "cpp")))
@pytest.mark.parametrize("cond_name", list(CONDS))
def test_greedy_tokens_and_images_match_taming(cond_name, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", backend)
    cond_stage, extra, expected = CONDS[cond_name]
    ref_gpt, ref_vq = taming_models()
    ckpt, config = write_run(tmp_path, net2net_state(ref_gpt, ref_vq), project_yaml(cond_stage, **extra))
    gpt, vqgan, cond = load_taming_transformer(ckpt, config)

    assert isinstance(gpt, GPT) and isinstance(vqgan, VQGAN) and not gpt.training and not vqgan.training
    assert cond == {**expected, "prefix_length": 1, "codes": CODES, "grid": (SIDE, SIDE)}
    assert (gpt.block_size, gpt.window, gpt.n_layer, gpt.n_head) == (CODES, CODES, 2, 2)
    if cond["kind"] == "sos":
        c = torch.full((3, 1), cond["sos_token"])
    else:
        c = torch.tensor([[0], [4], [9]])
    with torch.no_grad():  # the same weights under the same names: the same logits
        seq = torch.cat((c, torch.randint(0, N_EMBED, (3, CODES - 1))), dim=1)
        assert_close(gpt(seq)[0], ref_gpt(seq)[0], rtol=1e-4, atol=1e-5)

    ours = sample_with_past(c, gpt, cond["codes"], sample_logits=False)
    theirs = taming_greedy(ref_gpt, c, cond["codes"])
    assert ours.shape == (3, CODES) and torch.equal(ours, theirs)
    assert len(ours.unique()) > 2  # the tokens vary: the comparison is not of constant sequences
    with torch.no_grad():
        images = vqgan.decode_indices(ours.view(3, *cond["grid"]))
        assert_close(images, ref_vq.decode_to_img(theirs, 3), rtol=1e-4, atol=1e-5)


def test_bare_state_dict_and_stray_first_stage_loss_keys(tmp_path):
    """A state dict saved on its own loads too; the first stage's loss weights (a VQModel trained
    with its LPIPS / discriminator loss) are not the autoencoder's and are dropped."""
    ref_gpt, ref_vq = taming_models(seed=1)
    state = {**net2net_state(ref_gpt, ref_vq), "first_stage_model.loss.logvar": torch.zeros(())}
    ckpt, config = write_run(tmp_path, state, project_yaml(), lightning=False)
    gpt, vqgan, cond = load_taming_transformer(str(ckpt), str(config))
    assert cond["kind"] == "sos" and cond["sos_token"] == 0  # taming's default sos_token
    assert torch.equal(gpt.tok_emb.weight, ref_gpt.tok_emb.weight)
    assert torch.equal(vqgan.quantize.embedding.weight, ref_vq.quantize.embedding.weight)


def test_exported_from_fastvq():
    assert fastvq.load_taming_transformer is load_taming_transformer
    assert "load_taming_transformer" in fastvq.__all__


# ----------------------------------------------------------------------------- refused runs

def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


def _config_with(path_in_params, value, cond_stage="__is_unconditional__"):
    config = project_yaml(cond_stage)
    node = config["model"]["params"]
    *parents, last = path_in_params
    for name in parents:
        node = node[name]
    node[last] = value
    return config


# (name, state dict change, config, what the message must name besides the file)
REFUSED = [
    ("missing_key", lambda s: _without(s, "transformer.blocks.1.attn.key.weight"), project_yaml(),
     "ckpt", "transformer.blocks.1.attn.key.weight"),
    ("missing_first_stage_key", lambda s: _without(s, "first_stage_model.decoder.conv_out.bias"), project_yaml(),
     "ckpt", "first_stage_model.decoder.conv_out.bias"),
    ("unexpected_key", lambda s: {**s, "transformer.blocks.0.attn.extra": torch.zeros(1)}, project_yaml(),
     "ckpt", "transformer.blocks.0.attn.extra"),
    ("stray_key", lambda s: {**s, "optimizer.lr": torch.zeros(())}, project_yaml(), "ckpt", "optimizer.lr"),
    ("cond_stage_weights", lambda s: {**s, "cond_stage_model.embedding.weight": torch.zeros(2, 2)},
     project_yaml(), "ckpt", "cond_stage_model.embedding.weight"),
    ("no_transformer", lambda s: {k: v for k, v in s.items() if not k.startswith("transformer.")}, project_yaml(),
     "ckpt", "transformer.tok_emb.weight"),
    ("misshapen", lambda s: {**s, "transformer.head.weight": torch.zeros(N_EMBED, 16)}, project_yaml(),
     "ckpt", "transformer.head.weight"),
    ("unknown_cond_stage", None,
     project_yaml({"target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 4}}),
     "yaml", "model.params.cond_stage_config"),
    ("image_cond_stage", None, project_yaml("__is_first_stage__"), "yaml", "model.params.cond_stage_config"),
    ("permuter", None, project_yaml(permuter_config={"target": "taming.modules.transformer.permuter.Subsample",
                                                     "params": {"H": 4, "W": 4}}),
     "yaml", "model.params.permuter_config"),
    ("transformer_target", None, _config_with(("transformer_config", "target"), "taming.modules.transformer.mingpt.CodeGPT"),
     "yaml", "model.params.transformer_config.target"),
    ("n_unmasked", None, project_yaml(gpt_params={"n_unmasked": 2}), "yaml", "model.params.transformer_config.params"),
    ("unknown_gpt_key", None, project_yaml(gpt_params={"n_kv_head": 1}), "yaml", "n_kv_head"),
    ("first_stage_target", None, _config_with(("first_stage_config", "target"), "taming.models.vqgan.GumbelVQ"),
     "yaml", "model.params.first_stage_config.target"),
    ("first_stage_params", None, _config_with(("first_stage_config", "params", "n_embed"), "many"),
     "yaml", "model.params.first_stage_config.params"),
    ("sos_out_of_vocab", None, project_yaml(sos_token=N_EMBED), "yaml", "model.params.sos_token"),
    ("classes_past_vocab", None,
     project_yaml({"target": "taming.modules.util.Labelator", "params": {"n_classes": N_EMBED + 1}}),
     "yaml", "model.params.cond_stage_config.params.n_classes"),
    ("vocab_below_codebook", None, project_yaml(gpt_params={"vocab_size": N_EMBED - 1}), "yaml", "vocab_size"),
    ("unknown_param", None, project_yaml(learning_rate=1.0), "yaml", "learning_rate"),
    ("model_target", None, {"model": {"target": "taming.models.vqgan.VQModel", "params": {}}}, "yaml",
     "load_taming_vqgan"),
]


@pytest.mark.parametrize("name, change, config, file, key", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_runs_name_the_file_and_the_key(name, change, config, file, key, tmp_path):
    ref_gpt, ref_vq = taming_models()
    state = net2net_state(ref_gpt, ref_vq)
    ckpt, path = write_run(tmp_path, change(state) if change else state, config)
    named = ckpt if file == "ckpt" else path
    with pytest.raises(ValueError, match=rf"^load_taming_transformer: .*{re.escape(str(named))}.*{re.escape(key)}"):
        load_taming_transformer(ckpt, path)


def test_n_unmasked_mask_in_the_checkpoint_is_refused(tmp_path):
    """A checkpoint whose masks are not plain causal (taming's n_unmasked > 0) under a YAML that
    says n_unmasked 0 cannot be reproduced: refused by the attention's load check."""
    ref_gpt, ref_vq = taming_models(n_unmasked=2)
    ckpt, path = write_run(tmp_path, net2net_state(ref_gpt, ref_vq), project_yaml())
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt))}.*transformer\..*lower-triangular"):
        load_taming_transformer(ckpt, path)


def test_missing_and_unreadable_files(tmp_path):
    ref_gpt, ref_vq = taming_models()
    ckpt, path = write_run(tmp_path, net2net_state(ref_gpt, ref_vq), project_yaml())
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_taming_transformer(tmp_path / "nope.ckpt", path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_taming_transformer(ckpt, tmp_path / "nope.yaml")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^load_taming_transformer: .*garbage\.ckpt"):
        load_taming_transformer(garbage, path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        load_taming_transformer(ckpt, bad_yaml)
