"""Stage-1 image tokenizers: VQGAN (discrete codes) and AutoencoderKL
(continuous Gaussian latents)."""

from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from pyvq.models.tokenizers.vqgan import VQGAN, VQGANConfig

__all__ = ["VQGAN", "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution", "VQGANConfig"]
