"""Inference cost of the tokenizers' decoders: parameter counts and GFLOPs.

GFLOPs count 2 per multiply-add, as ``torch.utils.flop_counter.FlopCounterMode``
does (convs, matmuls, attention; norms and activations are not counted). The
models are built on the meta device: no memory, no weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pyvq.models.tokenizers.asymmetric import AsymmetricVQGAN, AsymmetricVQGANConfig
from pyvq.models.tokenizers.brics import BRICS, BRICSConfig
from pyvq.nn.mask_decoder import MaskConditionDecoder

__all__ = ["brics_decoder_gflops", "brics_retrieval_gflops", "decoder_gflops", "decoder_parameter_count"]


def _counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` under ``FlopCounterMode``, without autograd."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------- asymmetric VQGAN
def decoder_parameter_count(model_or_config) -> int:
    """Parameters of the new decoder (condition encoder and fuse convs
    included) of an ``AsymmetricVQGAN`` or ``AsymmetricVQGANConfig`` (built
    on the meta device, no memory)."""
    if isinstance(model_or_config, AsymmetricVQGANConfig):
        with torch.device("meta"):
            dec = MaskConditionDecoder(**model_or_config.decoder_kwargs())
    elif isinstance(model_or_config, AsymmetricVQGAN):
        dec = model_or_config.decoder
    else:
        raise TypeError(f"decoder_parameter_count: expected an AsymmetricVQGAN or its config, got {type(model_or_config).__name__}")
    return sum(p.numel() for p in dec.parameters())


def decoder_gflops(config: AsymmetricVQGANConfig, height: int, width: int, conditioned: bool = True) -> float:
    """GFLOPs of one pass of an ``AsymmetricVQGANConfig``'s decoder
    (post_quant_conv included) for an (height, width) image, batch 1.
    ``conditioned``: include the condition encoder and blends."""
    f = config.downsample_factor
    if height % f or width % f:
        raise ValueError(f"decoder_gflops: height and width must be divisible by {f}, got {(height, width)}")
    base = config.base()
    with torch.device("meta"):
        dec = MaskConditionDecoder(**config.decoder_kwargs())
        pqc = nn.Conv2d(base.embed_dim, base.z_channels, kernel_size=1)
        z = torch.empty(1, base.embed_dim, height // f, width // f)
        args = (torch.empty(1, base.in_channels, height, width), torch.empty(1, 1, height, width)) if conditioned else ()
    return _counted_flops(lambda: dec(pqc(z), *args)) / 1e9


# ------------------------------------------------------------------ BRICS
def _retrieval_flops(config: BRICSConfig, where: str) -> int:
    if not isinstance(config, BRICSConfig):
        raise TypeError(f"{where}: argument 'config' must be a BRICSConfig, got {type(config).__name__}")
    # per query point, group and level: 2**d corner weights (d - 1
    # multiplications each) and F multiply-adds per corner
    d = config.key_dim + 2
    points = config.feature_size**2 * config.num_groups
    return points * config.levels * 2**d * ((d - 1) + 2 * config.features)


def brics_retrieval_gflops(config: BRICSConfig) -> float:
    """GFLOPs of a ``BRICS`` decoder's feature-grid retrieval for one image,
    counted by hand (the grid lookup is a custom op ``FlopCounterMode``
    cannot see): per query point, group and level, ``2**d`` corner weights
    (``d - 1`` multiplications each) and ``features`` multiply-adds per
    corner, ``d = key_dim + 2``."""
    return _retrieval_flops(config, "brics_retrieval_gflops") / 1e9


def brics_decoder_gflops(config: BRICSConfig) -> float:
    """GFLOPs of ``BRICS.decode`` for one image of ``config``'s resolution:
    the convs and linears counted by ``FlopCounterMode`` plus the feature
    retrieval (``brics_retrieval_gflops``)."""
    retrieval = _retrieval_flops(config, "brics_decoder_gflops")
    with torch.device("meta"):
        model = BRICS(config).eval()
        keys = torch.empty(1, config.code_channels, config.code_size, config.code_size)
    return (_counted_flops(lambda: model.decode(keys)) + retrieval) / 1e9
