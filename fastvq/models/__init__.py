"""Models: the VQGAN autoencoder and its loss (LPIPS, PatchGAN), the GPT priors (1-D GPT, 2-D GPT2D)
and the spatial condition encoder."""
from .cond_encoder import ConditionEncoder
from .discriminator import NLayerDiscriminator
from .gpt import GPT, sample_with_past
from .gpt2d import GPT2D, sample_grid
from .lpips import LPIPS
from .taming import load_taming_transformer
from .vqgan import VQGAN, VQGANConfig, load_taming_vqgan
from .vqgan_loss import VQGANLoss

__all__ = ["GPT", "sample_with_past", "GPT2D", "sample_grid", "ConditionEncoder", "VQGAN", "VQGANConfig", "load_taming_vqgan",
           "load_taming_transformer", "VQGANLoss", "LPIPS", "NLayerDiscriminator"]
