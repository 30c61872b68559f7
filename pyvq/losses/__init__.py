"""Training losses: LPIPS, PatchGAN discriminator and GAN losses, the
VQGAN loss that combines them (``VQLPIPSWithDiscriminator``), and the
Wasserstein GAN losses of BRICS (``ReconstructionWGANLoss``).

``lpips`` (and through it torchvision) is imported only when an LPIPS module
is built, so ``import pyvq.losses`` stays light.
"""

from pyvq._weights import MissingWeightsError
from pyvq.losses.gan import (
    ActNorm,
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
    weights_init,
)
from pyvq.losses.perceptual import LPIPS, backbone_weights, build_lpips
from pyvq.losses.vqperceptual import VQLPIPSWithDiscriminator
from pyvq.losses.wgan import ReconstructionWGANLoss, gradient_penalty, r1_penalty, wgan_d_loss, wgan_g_loss

__all__ = [
    "LPIPS",
    "build_lpips",
    "backbone_weights",
    "MissingWeightsError",
    "ActNorm",
    "NLayerDiscriminator",
    "weights_init",
    "hinge_d_loss",
    "vanilla_d_loss",
    "hinge_g_loss",
    "non_saturating_g_loss",
    "adopt_weight",
    "adaptive_weight",
    "VQLPIPSWithDiscriminator",
    "ReconstructionWGANLoss",
    "wgan_d_loss",
    "wgan_g_loss",
    "r1_penalty",
    "gradient_penalty",
]
