"""Image quality measures shared by the pipeline's reports (the VQGAN's held-out PSNR, the k-means
demo, the demo's super-resolution)."""
from __future__ import annotations

import math
import warnings

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Peak signal-to-noise ratio in dB of two images (or batches) whose values lie in value_range.

    Values outside the range are clamped into it first; the peak is the range's width, so images in
    [-1, 1] (value_range=(-1, 1)) give the same figure as the same images mapped to [0, 1].
    Identical images give inf.
    """
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    diff = (a.double().clamp(low, high) - b.double().clamp(low, high)) / (high - low)
    mse = diff.pow(2).mean().item()
    return math.inf if mse == 0 else -10 * math.log10(mse)


def report_lpips(fallback: bool | None = None):
    """fastvq.models.lpips.LPIPS for a report: LPIPS-VGG16 when its weight files are on this machine,
    else its gradient-distance fallback, without LPIPS's missing-file warning (a report states
    `.source` instead; fallback=True asks for the fallback, False makes missing files an error)."""
    from ..models.lpips import LPIPS

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LPIPS: no ", category=UserWarning)
        return LPIPS(fallback=fallback)


@torch.no_grad()
def mean_lpips(metric, a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean over a batch of metric(a, b), on the CPU (an LPIPS module; images (B, 3, H, W) in [-1, 1])."""
    return metric(a.detach().float().cpu(), b.detach().float().cpu()).mean().item()
