"""Stage-1 image tokenizers: VQGAN and Efficient-VQGAN (discrete codes; a
conv and a Swin encoder/decoder), AutoencoderKL (continuous Gaussian
latents), BRICS (continuous key codes indexing feature grids), and the
asymmetric (frozen-encoder, mask-conditioned decoder) tokenizer on VQGAN or
AutoencoderKL."""

from pyvq.models.tokenizers.asymmetric import AsymmetricVQGAN, AsymmetricVQGANConfig
from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from pyvq.models.tokenizers.brics import BRICS, BRICSConfig
from pyvq.models.tokenizers.efficient_vqgan import EfficientVQGAN, EfficientVQGANConfig
from pyvq.models.tokenizers.vqgan import VQGAN, VQGANConfig
from pyvq.nn.mask_decoder import MaskConditionDecoder, mask_guided_blend  # moved to pyvq.nn, still importable here

__all__ = [
    "BRICS",
    "BRICSConfig",
    "VQGAN",
    "AsymmetricVQGAN",
    "AsymmetricVQGANConfig",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussianDistribution",
    "EfficientVQGAN",
    "EfficientVQGANConfig",
    "MaskConditionDecoder",
    "VQGANConfig",
    "decoder_gflops",
    "decoder_parameter_count",
    "mask_guided_blend",
]


def __getattr__(name: str):
    # The decoder cost helpers moved to pyvq.models.cost, which imports this
    # package, so they are looked up on first use rather than imported above.
    if name in ("decoder_gflops", "decoder_parameter_count"):
        from pyvq.models import cost

        return getattr(cost, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
