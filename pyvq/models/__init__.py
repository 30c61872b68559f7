"""Models built from ``pyvq.nn`` (tokenizers and the priors over their codes): ``Model(config)``, ``save_pretrained`` /
``from_pretrained``, and named presets (``list_presets()``). Tokenizers return the typed outputs of
``pyvq.models.outputs`` (``TokenizerOutput``, ``VQEncoding``, ``VQAux``, ``BRICSAux``)."""

from pyvq.models._pretrained import (
    PretrainedModel,
    get_preset,
    list_presets,
    load_pretrained,
    load_run,
    model_class_for,
    register_preset,
)
from pyvq.models.cost import (
    brics_decoder_gflops,
    brics_retrieval_gflops,
    decoder_gflops,
    decoder_parameter_count,
)
from pyvq.models.outputs import BRICSAux, TokenizerOutput, VQAux, VQEncoding
from pyvq.models.priors import (
    GaussianDiffusion,
    GaussianDiffusionConfig,
    MultinomialDiffusion,
    MultinomialDiffusionConfig,
)
from pyvq.models.tokenizers import (
    BRICS,
    VQGAN,
    AsymmetricVQGAN,
    AsymmetricVQGANConfig,
    AutoencoderKL,
    AutoencoderKLConfig,
    BRICSConfig,
    DiagonalGaussianDistribution,
    VQGANConfig,
)

__all__ = [
    "BRICS",
    "BRICSAux",
    "BRICSConfig",
    "VQGAN",
    "AsymmetricVQGAN",
    "AsymmetricVQGANConfig",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussianDistribution",
    "GaussianDiffusion",
    "GaussianDiffusionConfig",
    "MultinomialDiffusion",
    "MultinomialDiffusionConfig",
    "PretrainedModel",
    "TokenizerOutput",
    "VQAux",
    "VQEncoding",
    "VQGANConfig",
    "brics_decoder_gflops",
    "brics_retrieval_gflops",
    "decoder_gflops",
    "decoder_parameter_count",
    "get_preset",
    "list_presets",
    "load_pretrained",
    "load_run",
    "model_class_for",
    "register_preset",
]
