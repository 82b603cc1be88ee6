"""VQGANLoss: VQGAN's training objective (taming's VQLPIPSWithDiscriminator, its known bugs fixed).

optimizer_idx 0, the autoencoder's step:
    nll  = pixelloss_weight * mean|x - x̂| + perceptual_weight * mean LPIPS(x, x̂)
    loss = nll + λ * disc_factor * g_loss + codebook_weight * mean(codebook_loss),  g_loss = -mean D(x̂)
    λ    = disc_weight * clamp(||∇_last nll|| / (||∇_last g_loss|| + 1e-4), 0, 1e4), detached,
the gradients taken at `last_layer` (the decoder's last weight). The GAN term, λ and its two
autograd.grad calls exist only once global_step >= disc_start; before that the discriminator is not
even run in this step and λ = g_loss = 0 are logged.
optimizer_idx 1, the discriminator's step: disc_factor * (hinge or vanilla loss) on D(x) and D(x̂),
both detached; disc_factor is 0 before disc_start, as in taming.

Differences from taming, all deliberate:
  * λ is never computed before disc_start (taming pays for two extra backward passes every step
    from the first, and multiplies the result by zero);
  * the perceptual module stays in eval mode whatever .train() a parent calls (see LPIPS);
  * pixelloss_weight multiplies the L1 term (taming accepts it and ignores it; the default 1.0
    gives taming's numbers);
  * perceptual_weight=0 builds no perceptual module (taming still loads VGG);
  * misuse raises: a training step after disc_start without last_layer, cond given to an
    unconditional discriminator (or missing for a conditional one), an optimizer_idx other than 0/1.
The submodules are `perceptual_loss` and `discriminator`, taming's names, so taming checkpoints'
"loss.*" entries load. The log dict has taming's keys ("{split}/total_loss", ...), detached tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_int
from .discriminator import NLayerDiscriminator
from .lpips import LPIPS


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||∇ nll|| / (||∇ g_loss|| + 1e-4) at last_layer, clamped to [0, 1e4] and detached: the GAN
    term's weight that gives it a gradient at the decoder's output comparable to the reconstruction's."""
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    ratio = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + ADAPTIVE_WEIGHT_EPS)
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


class VQGANLoss(nn.Module):
    """forward(codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
    cond=None, split="train") -> (loss, log). See the module doc; `perceptual` shares an existing
    perceptual module (e.g. LPIPS(fallback=True) for a quiet, cheap CPU demo), None builds LPIPS()."""

    def __init__(self, disc_start, codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False,
                 disc_conditional=False, disc_ndf=64, disc_loss="hinge", *, perceptual: nn.Module | None = None):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"VQGANLoss: disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        if perceptual is not None and not isinstance(perceptual, nn.Module):
            raise TypeError(f"VQGANLoss: perceptual must be an nn.Module (e.g. LPIPS) or None, "
                            f"got {type(perceptual).__name__}")
        self.disc_start = check_int("VQGANLoss", "disc_start", disc_start, 0)
        self.codebook_weight = check_float("VQGANLoss", "codebook_weight", codebook_weight, 0.0)
        self.pixel_weight = check_float("VQGANLoss", "pixelloss_weight", pixelloss_weight, 0.0)
        self.perceptual_weight = check_float("VQGANLoss", "perceptual_weight", perceptual_weight, 0.0)
        self.disc_factor = check_float("VQGANLoss", "disc_factor", disc_factor, 0.0)
        self.disc_weight = check_float("VQGANLoss", "disc_weight", disc_weight, 0.0)
        self.disc_conditional = bool(disc_conditional)
        self.disc_loss_name = disc_loss
        self.disc_loss = DISC_LOSSES[disc_loss]
        if perceptual is None and self.perceptual_weight > 0:
            perceptual = LPIPS()
        self.perceptual_loss = perceptual
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm)

    def extra_repr(self) -> str:
        return (f"disc_start={self.disc_start}, disc_loss={self.disc_loss_name!r}, disc_weight={self.disc_weight}, "
                f"disc_factor={self.disc_factor}, perceptual_weight={self.perceptual_weight}, "
                f"codebook_weight={self.codebook_weight}, pixelloss_weight={self.pixel_weight}")

    def disc_active(self, global_step: int) -> bool:
        return global_step >= self.disc_start

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
                cond=None, split="train"):
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"VQGANLoss: inputs and reconstructions must have the same shape, got "
                             f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
        if (cond is not None) != self.disc_conditional:
            raise ValueError(f"VQGANLoss: cond must be {'given' if self.disc_conditional else 'None'} "
                             f"with disc_conditional={self.disc_conditional}")
        if optimizer_idx == 0:
            return self._autoencoder_step(codebook_loss, inputs, reconstructions, global_step, last_layer, cond, split)
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, global_step, cond, split)
        raise ValueError(f"VQGANLoss: optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx!r}")

    def _logits(self, images, cond):
        return self.discriminator(images if cond is None else torch.cat((images, cond), dim=1))

    def _autoencoder_step(self, codebook_loss, inputs, reconstructions, global_step, last_layer, cond, split):
        pixel = (inputs - reconstructions).abs().mean()
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, reconstructions).mean()
        else:
            p_loss = torch.zeros((), device=inputs.device)
        # = taming's mean of the per-pixel |x - x̂| + w * LPIPS broadcast over pixels
        nll_loss = self.pixel_weight * pixel + self.perceptual_weight * p_loss
        codebook_loss = codebook_loss.mean()
        loss = nll_loss + self.codebook_weight * codebook_loss

        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight, disc_factor = zero, zero, 0.0
        if self.disc_active(global_step):
            disc_factor = self.disc_factor
            g_loss = -self._logits(reconstructions, cond).mean()
            d_weight = self._adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss

        log = {f"{split}/total_loss": loss.detach(), f"{split}/quant_loss": codebook_loss.detach(),
               f"{split}/nll_loss": nll_loss.detach(), f"{split}/rec_loss": nll_loss.detach(),
               f"{split}/p_loss": p_loss.detach(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor), f"{split}/g_loss": g_loss.detach()}
        return loss, log

    def _adaptive_weight(self, nll_loss, g_loss, last_layer):
        if last_layer is None or not torch.is_grad_enabled():
            if self.training:
                raise ValueError("VQGANLoss: once global_step >= disc_start a training step needs last_layer (the "
                                 "decoder's last weight, e.g. vqgan.get_last_layer()) and autograd enabled, for "
                                 f"the adaptive GAN weight; got last_layer={'None' if last_layer is None else 'a tensor'}"
                                 f", grad enabled={torch.is_grad_enabled()}")
            return torch.zeros((), device=nll_loss.device)  # evaluation without gradients: λ = 0, as in taming
        return adaptive_weight(nll_loss, g_loss, last_layer) * self.disc_weight

    def _discriminator_step(self, inputs, reconstructions, global_step, cond, split):
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        disc_factor = self.disc_factor if self.disc_active(global_step) else 0.0
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.detach(), f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log
