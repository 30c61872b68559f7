"""Training losses: LPIPS, PatchGAN discriminator and GAN losses, the
VQGAN loss that combines them (``VQLPIPSWithDiscriminator``), and the
Wasserstein GAN losses of BRICS (``ReconstructionWGANLoss``), and the
Projected GAN discriminator of Efficient-VQGAN (``ProjectedDiscriminator``).

``lpips`` (and through it torchvision) is imported only when an LPIPS module
is built, so ``import pyvq.losses`` stays light.
"""

from pyvq.losses import gan, perceptual, projected_gan, vqperceptual, wgan
from pyvq.losses.gan import *  # noqa: F401,F403
from pyvq.losses.perceptual import LPIPS, MissingWeightsError, backbone_weights, build_lpips  # noqa: F401
from pyvq.losses.projected_gan import *  # noqa: F401,F403
from pyvq.losses.vqperceptual import *  # noqa: F401,F403
from pyvq.losses.wgan import *  # noqa: F401,F403

__all__ = [
    "LPIPS",
    "build_lpips",
    "backbone_weights",
    "MissingWeightsError",
    *gan.__all__,
    *projected_gan.__all__,
    *vqperceptual.__all__,
    *wgan.__all__,
]
