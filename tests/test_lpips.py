"""LPIPS: weight discovery and strict key mapping, the formula against a plain re-computation with the
same (random) weights, metric properties, frozen eval mode, and the warned fallback."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvq.models.lpips import CHANNELS, ENV_VGG_WEIGHTS, LPIPS, gradient_distance
from helpers import assert_close

# torchvision's vgg16().features: conv indices and widths (the classifier is irrelevant here).
VGG_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
             17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
POOLS = (4, 9, 16, 23)
TAPS = (3, 8, 15, 22, 29)  # relu1_2 .. relu5_3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VGG_WEIGHTS, raising=False)


def random_vgg16_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (c_in, c_out) in VGG_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(c_out, generator=g) * 0.01
    state["classifier.0.weight"] = torch.randn(4, 8, generator=g)  # present in torchvision files, ignored
    return state


def random_heads(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    vgg, heads = random_vgg16_state(), random_heads()
    torch.save(vgg, root / "vgg16-test.pth")
    torch.save(heads, root / "heads.pth")
    return {"vgg": root / "vgg16-test.pth", "heads": root / "heads.pth", "vgg_state": vgg, "heads_state": heads}


@pytest.fixture(scope="module")
def lpips(files):
    return LPIPS(vgg_weights=files["vgg"], lin_weights=files["heads"])


def images(seed, n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_lpips(x, y, vgg, heads):
    """The LPIPS formula written out with functional ops on the raw state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(h):
        h, taps = (h - shift) / scale, []
        for index in range(30):
            if index in VGG_CONVS:
                h = F.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"], padding=1)
            elif index in POOLS:
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(h)
            if index in TAPS:
                taps.append(h)
        return taps

    total = 0
    for k, (fx, fy) in enumerate(zip(features(x), features(y))):
        fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weighted = ((fx - fy) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1, keepdim=True)
        total = total + weighted.mean((2, 3), keepdim=True)
    return total


def test_matches_plain_formula(lpips, files):
    x, y = images(0), images(1)
    assert not lpips.fallback and str(files["vgg"]) in lpips.source
    out = lpips(x, y)
    assert out.shape == (2, 1, 1, 1)
    assert_close(out, reference_lpips(x, y, files["vgg_state"], files["heads_state"]),
                 rtol=1e-4, atol=1e-6)
    assert (out > 0).all()


def test_identical_zero_symmetric_and_gradient(lpips):
    x, y = images(2), images(3)
    assert torch.equal(lpips(x, x), torch.zeros(2, 1, 1, 1))
    assert_close(lpips(x, y), lpips(y, x))
    x.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())


def test_frozen_and_eval_after_parent_train(lpips):
    parent = nn.ModuleDict({"p": lpips, "conv": nn.Conv2d(3, 3, 1)})
    parent.train()
    assert parent["conv"].training and not any(m.training for m in lpips.modules())
    assert not any(p.requires_grad for p in lpips.parameters())


def test_state_dict_names_are_taming_lpips_names(lpips):
    keys = set(lpips.state_dict())
    assert {"scaling_layer.shift", "scaling_layer.scale", "net.slice1.0.weight", "net.slice2.5.bias",
            "net.slice5.28.weight", "lin0.model.1.weight", "lin4.model.1.weight"} <= keys
    assert len(keys) == 2 + 2 * len(VGG_CONVS) + len(CHANNELS)


def test_missing_vgg_key_is_a_clear_error(files, tmp_path):
    state = dict(files["vgg_state"])
    del state["features.17.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match=r"torchvision vgg16.*features\.17\.weight"):
        LPIPS(vgg_weights=tmp_path / "broken.pth", lin_weights=files["heads"])


def test_wrong_shape_is_a_clear_error(files, tmp_path):
    state = dict(files["vgg_state"])
    state["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"net\.slice1\.2\.weight has shape \(64, 32, 3, 3\)"):
        LPIPS(vgg_weights=tmp_path / "wrong.pth", lin_weights=files["heads"])


def test_explicit_missing_file_raises(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg_weights"):
        LPIPS(vgg_weights=tmp_path / "nope.pth", lin_weights=files["heads"])


def test_found_through_env_var_and_hub_cache(files, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VGG_WEIGHTS, str(files["vgg"]))
    assert not LPIPS(lin_weights=files["heads"]).fallback
    monkeypatch.delenv(ENV_VGG_WEIGHTS)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").symlink_to(files["vgg"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    found = LPIPS(lin_weights=files["heads"])
    assert not found.fallback and "vgg16-397923af.pth" in found.source


def test_heads_from_the_lpips_package(files):
    # The real heads the lpips package ships, found without importing lpips (it needs torchvision).
    spec = importlib.util.find_spec("lpips")
    assert spec is not None, "the lpips package (weights only) is a test dependency"
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    model = LPIPS(vgg_weights=files["vgg"])
    assert str(path) in model.source
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    for k in range(len(CHANNELS)):
        assert torch.equal(getattr(model, f"lin{k}").model[1].weight, shipped[f"lin{k}.model.1.weight"])
    x, y = images(4), images(5)
    assert_close(model(x, y), reference_lpips(x, y, files["vgg_state"], shipped), rtol=1e-4, atol=1e-6)


def test_fallback_warns_and_works(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.warns(UserWarning, match=r"no VGG16 weights found.*vgg16-\*\.pth.*vgg_weights=PATH.*NOT LPIPS"):
        model = LPIPS()
    assert model.fallback and "fallback" in model.source and not list(model.parameters())
    with pytest.raises(FileNotFoundError, match="no VGG16 weights found"):
        LPIPS(fallback=False)
    x, y = images(6), images(7)
    out = model(x, y)
    assert out.shape == (2, 1, 1, 1) and (out > 0).all()
    assert_close(out, gradient_distance(x, y))
    assert_close(out, model(y, x))
    assert torch.equal(model(x, x), torch.zeros(2, 1, 1, 1))
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad.abs().sum() > 0


def test_fallback_on_request_is_quiet(recwarn):
    model = LPIPS(fallback=True)
    assert model.fallback and not recwarn.list
    model.train()
    assert not model.training


def test_gradient_distance_by_hand():
    # d = x - y = a horizontal ramp 0, 1, 2, 3 on channel 0 of a 3 x 4 x 4 image; ∂h d = 0 throughout.
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = torch.arange(4.0)
    per_scale_0 = 12 / 36  # ∂w d: 3 x 4 x 3 entries, the 12 of channel 0 equal to 1
    per_scale_1 = 4 / 6  # pooled to 2 x 2, ramp 0.5, 2.5: ∂w d has 3 x 2 x 1 entries, 2 of them equal to 2
    # pooling the 2 x 2 grid again would leave a single pixel with no neighbours: two scales only
    assert_close(gradient_distance(x, torch.zeros_like(x)).flatten(),
                 torch.tensor([(per_scale_0 + per_scale_1) / 2]))


def test_bad_input_shapes(lpips):
    with pytest.raises(ValueError, match="input and target"):
        lpips(images(0), images(1, size=16))
    with pytest.raises(ValueError, match="fallback must be"):
        LPIPS(fallback="yes")
