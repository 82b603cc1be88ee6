"""Models: the VQGAN autoencoder and its loss (LPIPS, PatchGAN), and the GPT prior."""
from .discriminator import NLayerDiscriminator
from .gpt import GPT, sample_with_past
from .lpips import LPIPS
from .vqgan import VQGAN, VQGANConfig, load_taming_vqgan
from .vqgan_loss import VQGANLoss

__all__ = ["GPT", "sample_with_past", "VQGAN", "VQGANConfig", "load_taming_vqgan", "VQGANLoss", "LPIPS",
           "NLayerDiscriminator"]
