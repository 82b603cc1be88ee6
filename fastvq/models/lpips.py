"""LPIPS: the learned perceptual distance (Zhang et al. 2018, VGG16 variant) that VQGAN trains with.

d(x, y) = sum over the VGG16 stages l = relu1_2 .. relu5_3 of mean_{h,w} w_l . (f̂_l(x) - f̂_l(y))²,
where f̂_l are the stage's features unit-normalised over channels and w_l (lin0 .. lin4) are the
learned 1x1 heads; inputs are images in [-1, 1], the result has shape (B, 1, 1, 1).

Nothing is downloaded. The two weight files are looked up locally:
  * VGG16: `vgg_weights=PATH`, else $FASTVQ_VGG16_WEIGHTS, else torchvision's file in the torch hub
    cache (torch.hub.get_dir()/checkpoints/vgg16-*.pth). The file is a torchvision state dict
    ("features.N.weight"); the layers here keep torchvision's indices, so it loads key for key.
  * heads: `lin_weights=PATH`, else the file the `lpips` package ships (lpips/weights/v0.1/vgg.pth),
    found without importing lpips (which imports torchvision). taming's vgg_lpips checkpoint works too.
Parameter names are taming's (net.sliceK.N.*, lin0.model.1.weight, scaling_layer.*), so taming
checkpoints' "loss.perceptual_loss.*" entries load unchanged.

Without one of the files the module warns and uses a fallback instead (`fallback=True` asks for it
quietly, `fallback=False` makes a missing file an error): the multi-scale image-gradient distance
`gradient_distance`, which is deterministic, has no weights, and is NOT LPIPS. `.fallback` and
`.source` say which term is in use.

The module is a fixed metric: its parameters never require gradients and it stays in eval mode even
when a parent calls .train() (taming's LPIPS is switched back to training there, dropout included).
Gradients do flow to the images.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENV_VGG_WEIGHTS = "FASTVQ_VGG16_WEIGHTS"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torchvision's vgg16 `features` (configuration "D"): conv widths, "M" = 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index one past relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in that `features` list.
_SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
FALLBACK_SCALES = 5  # one per VGG stage: strides 1, 2, 4, 8, 16


def _vgg16_features() -> list[nn.Module]:
    layers, c_in = [], 3
    for width in _VGG16_LAYOUT:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = width
    return layers


class VGG16Features(nn.Module):
    """torchvision's vgg16().features cut into the five LPIPS slices; returns the five stage outputs.
    Each layer keeps its torchvision index as its name (slice2.5 is features.5)."""

    def __init__(self):
        super().__init__()
        layers = _vgg16_features()
        for k, (start, end) in enumerate(zip((0,) + _SLICE_ENDS[:-1], _SLICE_ENDS), start=1):
            block = nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), layers[index])
            self.add_module(f"slice{k}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for k in range(1, len(_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            outputs.append(x)
        return outputs

    def torchvision_names(self) -> dict[str, str]:
        """{torchvision key ('features.5.weight'): own key ('slice2.5.weight')} for every parameter."""
        return {"features." + name.split(".", 1)[1]: name for name, _ in self.named_parameters()}


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet-normalised input VGG was trained on (LPIPS's constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LinearHead(nn.Module):
    """A 1x1 convolution C -> 1 without bias. The Identity sits where LPIPS has a dropout (never
    active in a fixed metric), so the weight is named model.1.weight as in LPIPS's files."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def gradient_distance(x: torch.Tensor, y: torch.Tensor, scales: int = FALLBACK_SCALES) -> torch.Tensor:
    """The fallback perceptual term: mean over scales s of mean |∂h d_s| + mean |∂w d_s|, where d_s is
    x - y average-pooled 2^s times (finite differences of a difference = difference of the images'
    gradients). It compares edges and texture at VGG's five strides, is zero for identical images,
    symmetric, and blind to constant offsets (the L1 pixel term sees those). Shape (B, 1, 1, 1)."""
    d = x - y
    terms = []
    for s in range(scales):
        if s:
            d = F.avg_pool2d(d, 2)
        terms.append((d[:, :, 1:] - d[:, :, :-1]).abs().mean((1, 2, 3))
                     + (d[..., 1:] - d[..., :-1]).abs().mean((1, 2, 3)))
        if min(d.shape[-2:]) < 4:  # the next scale would have no neighbours to difference
            break
    return torch.stack(terms).mean(0).view(-1, 1, 1, 1)


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # vector_norm's backward is 0 (not NaN) where a feature vector is all zeros after ReLU.
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


def _hub_vgg16_files() -> list[Path]:
    return sorted((Path(torch.hub.get_dir()) / "checkpoints").glob("vgg16-*.pth"))


def _lpips_package_heads() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def _explicit_file(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS: {what} file {str(path)!r} does not exist")
    return path


def find_vgg16_weights(vgg_weights=None) -> tuple[Path | None, str]:
    """The VGG16 file to use (or None) and a description of where it was looked for."""
    if vgg_weights is not None:
        return _explicit_file(vgg_weights, "vgg_weights"), "the vgg_weights argument"
    if os.environ.get(ENV_VGG_WEIGHTS):
        return _explicit_file(os.environ[ENV_VGG_WEIGHTS], f"${ENV_VGG_WEIGHTS}"), f"${ENV_VGG_WEIGHTS}"
    searched = f"vgg_weights=None, ${ENV_VGG_WEIGHTS} unset, {Path(torch.hub.get_dir()) / 'checkpoints' / 'vgg16-*.pth'}"
    found = _hub_vgg16_files()
    return (found[0] if found else None), searched


def find_lin_weights(lin_weights=None) -> tuple[Path | None, str]:
    """The linear-head file to use (or None) and a description of where it was looked for."""
    if lin_weights is not None:
        return _explicit_file(lin_weights, "lin_weights"), "the lin_weights argument"
    return _lpips_package_heads(), "lin_weights=None, the lpips package's weights/v0.1/vgg.pth"


def _load(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS: {path} does not hold a state dict, got {type(state).__name__}")
    return state


def _pick(state: dict, names: dict[str, str], path: Path, expected: dict[str, torch.Size], kind: str) -> dict:
    """{own name: tensor} for every {file key: own name}; every key present with the right shape."""
    missing = [key for key in names if key not in state]
    if missing:
        raise KeyError(f"LPIPS: {path} is not a {kind} state dict: it lacks {missing[:3]}"
                       f"{' and more' if len(missing) > 3 else ''} (has e.g. {list(state)[:3]})")
    picked = {own: state[key] for key, own in names.items()}
    for own, tensor in picked.items():
        if tuple(tensor.shape) != tuple(expected[own]):
            raise ValueError(f"LPIPS: {path}: {kind} weight for {own} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[own])}")
    return picked


def _missing_files_message(vgg_path, vgg_searched, lin_path, lin_searched) -> str:
    problems = []
    if vgg_path is None:
        problems.append(f"LPIPS: no VGG16 weights found (searched: {vgg_searched}). Download torchvision's "
                        f"{VGG16_URL} yourself and pass vgg_weights=PATH, set ${ENV_VGG_WEIGHTS}=PATH, or put it in "
                        f"{Path(torch.hub.get_dir()) / 'checkpoints'}.")
    if lin_path is None:
        problems.append(f"LPIPS: no linear-head weights found (searched: {lin_searched}). Install them with "
                        "`pip install --no-deps lpips` or pass lin_weights=PATH (lpips' weights/v0.1/vgg.pth).")
    return " ".join(problems)


class LPIPS(nn.Module):
    """forward(input, target) -> (B, 1, 1, 1) perceptual distance of two (B, 3, H, W) images in [-1, 1].

    LPIPS(vgg_weights=None, lin_weights=None, *, fallback=None); see the module doc for the search
    and the fallback. H and W should be at least 16 for VGG (its fifth stage has stride 16).
    """

    def __init__(self, vgg_weights=None, lin_weights=None, *, fallback: bool | None = None):
        super().__init__()
        if fallback not in (None, True, False):
            raise ValueError(f"LPIPS: fallback must be None (automatic), True or False, got {fallback!r}")
        self.fallback = bool(fallback)
        if fallback:
            self.source = "fallback: multi-scale image-gradient L1 (asked for with fallback=True)"
        else:
            vgg_path, vgg_searched = find_vgg16_weights(vgg_weights)
            lin_path, lin_searched = find_lin_weights(lin_weights)
            problem = _missing_files_message(vgg_path, vgg_searched, lin_path, lin_searched)
            if problem and fallback is False:
                raise FileNotFoundError(problem)
            if problem:
                warnings.warn(problem + " Using the fallback perceptual term instead (multi-scale image-gradient "
                              "L1, fastvq.models.lpips.gradient_distance), which is NOT LPIPS.", stacklevel=2)
                self.fallback = True
                self.source = "fallback: multi-scale image-gradient L1 (LPIPS weight files not found)"
            else:
                self._build_lpips(vgg_path, lin_path)
                self.source = f"LPIPS-VGG16 (VGG16 from {vgg_path}, heads from {lin_path})"
        self.requires_grad_(False)
        self.train(False)

    def _build_lpips(self, vgg_path: Path, lin_path: Path) -> None:
        self.scaling_layer = ScalingLayer()
        with torch.device("meta"):  # the weights are loaded below; skip initialising them
            self.net = VGG16Features()
            for k, channels in enumerate(CHANNELS):
                setattr(self, f"lin{k}", LinearHead(channels))
        expected = {name: p.shape for name, p in self.named_parameters()}
        vgg = _pick(_load(vgg_path), {key: "net." + own for key, own in self.net.torchvision_names().items()},
                    vgg_path, expected, "torchvision vgg16")
        heads = {f"lin{k}.model.1.weight": f"lin{k}.model.1.weight" for k in range(len(CHANNELS))}
        heads = _pick(_load(lin_path), heads, lin_path, expected, "LPIPS linear-head")
        self.load_state_dict({**vgg, **heads, **self.scaling_layer.state_dict(prefix="scaling_layer.")},
                             strict=True, assign=True)

    def train(self, mode: bool = True) -> "LPIPS":
        # A fixed metric: a parent's .train() must not switch anything here into training behaviour.
        return super().train(False)

    def extra_repr(self) -> str:
        return f"source={self.source!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != 3 or input.shape != target.shape:
            raise ValueError(f"LPIPS: input and target must both have shape (batch, 3, height, width), got "
                             f"{tuple(input.shape)} and {tuple(target.shape)}")
        if self.fallback:
            return gradient_distance(input, target)
        # One VGG pass over both images (no batch statistics inside, so this equals two passes).
        features = self.net(self.scaling_layer(torch.cat([input, target])))
        total = 0
        for k, f in enumerate(features):
            f_input, f_target = f.chunk(2)
            diff = (_unit_channels(f_input) - _unit_channels(f_target)).square()
            total = total + getattr(self, f"lin{k}")(diff).mean((2, 3), keepdim=True)
        return total

