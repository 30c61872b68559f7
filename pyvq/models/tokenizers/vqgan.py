"""VQGAN tokenizer (Esser et al., "Taming Transformers"): a convolutional
encoder, a vector-quantisation bottleneck and a convolutional decoder.

    x -> encoder -> quant_conv (1x1, z_channels -> embed_dim)
      -> quantize (pyvq.nn.VectorQuantizer, n_embed codes of embed_dim)
      -> post_quant_conv (1x1, embed_dim -> z_channels) -> decoder -> x_rec

Module names follow taming-transformers' ``VQModel`` (``encoder``,
``decoder``, ``quant_conv``, ``post_quant_conv``, ``quantize``), so its
checkpoints map by identity except for the codebook, which taming stores as
``quantize.embedding.weight`` and pyvq as ``quantize.codebook``.

Images are (B, in_channels, H, W), conventionally in [-1, 1]; H and W must be
divisible by the downsampling factor ``2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyvq._checks import check_image
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.outputs import TokenizerOutput, VQAux, VQEncoding
from pyvq.models.tokenizers.code_masks import BlockKnownCodes
from pyvq.nn import Decoder, Encoder, VectorQuantizer
from pyvq.nn.blocks import arch_kwargs, check_arch_fields
from pyvq.nn.vector_quantizer import check_beta_term, check_code_indices

__all__ = ["VQGAN", "VQGANConfig"]


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture and quantiser settings of a ``VQGAN``.

    The defaults are taming-transformers' ImageNet f16 / 1024-code model
    (preset ``vqgan_f16_1024``).

    Attributes:
        embed_dim: code dimension (channels of the quantised latent).
        n_embed: codebook size.
        ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
        in_channels, out_ch, dropout, resamp_with_conv, norm_num_groups: the
            ``Encoder`` / ``Decoder`` arguments (see ``pyvq.nn.Encoder``); the
            encoder is built with ``double_z=False``. ``norm_num_groups``
            (GroupNorm groups, default 32) must divide ``ch`` and every
            ``ch * ch_mult[i]``; configs saved before the field existed load
            with 32, the value they were built with.
        tanh_out: tanh on the decoder output.
        beta, beta_term, ema, decay, eps, l2_normalize, restart_dead_codes,
        dead_code_threshold: the ``pyvq.nn.VectorQuantizer`` arguments.
            ``beta_term="commitment"`` (default, the VQ-VAE paper):
            ``mean((q - sg[z])^2) + beta * mean((z - sg[q])^2)``;
            ``"codebook"``: ``beta * mean((q - sg[z])^2) + mean((z - sg[q])^2)``,
            taming's default (``VectorQuantizer2(legacy=True)``), which
            ``pyvq.convert.from_taming`` selects. ``"codebook"`` with
            ``ema=True`` is refused (the codebook term has no gradient).
    """

    embed_dim: int = 256
    n_embed: int = 1024
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    resamp_with_conv: bool = True
    tanh_out: bool = False
    beta: float = 0.25
    beta_term: str = "commitment"
    l2_normalize: bool = False
    ema: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    restart_dead_codes: bool = False
    dead_code_threshold: float = 1.0
    norm_num_groups: int = 32

    def __post_init__(self):
        check_arch_fields(self, where="VQGANConfig", positive=("embed_dim", "n_embed", "in_channels", "out_ch"))
        check_beta_term(self.beta_term, self.ema, where="VQGANConfig", what="field")

    @property
    def downsample_factor(self) -> int:
        """Side length ratio image / latent, ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)


class VQGAN(BlockKnownCodes, PretrainedModel, nn.Module):
    """VQGAN tokenizer; see the module docstring.

    Args:
        config: a ``VQGANConfig``.

    ``aux`` (returned by ``encode`` and ``forward``) is a
    ``pyvq.models.outputs.VQAux``, read as ``aux.loss`` or ``aux["loss"]``:
        ``loss``: 0-d, the quantiser's VQ loss (codebook + beta *
            commitment, or beta * codebook + commitment with
            ``beta_term="codebook"``; beta * commitment only with ema) to add
            to the reconstruction / perceptual / GAN losses;
        ``perplexity``, ``usage``: 0-d code statistics of the batch;
        ``indices``: (B, H/f, W/f) int64 code indices.
    """

    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig):
        super().__init__()
        if not isinstance(config, VQGANConfig):
            raise TypeError(f"VQGAN: argument 'config' must be a VQGANConfig, got {type(config).__name__}")
        self.config = config
        arch = arch_kwargs(config)
        self.encoder = Encoder(in_channels=config.in_channels, double_z=False, **arch)
        self.decoder = Decoder(out_ch=config.out_ch, tanh_out=config.tanh_out, **arch)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(
            config.n_embed,
            config.embed_dim,
            beta=config.beta,
            beta_term=config.beta_term,
            ema=config.ema,
            decay=config.decay,
            eps=config.eps,
            l2_normalize=config.l2_normalize,
            restart_dead_codes=config.restart_dead_codes,
            dead_code_threshold=config.dead_code_threshold,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: torch.Tensor) -> VQEncoding:
        """Quantised latents of images.

        Args:
            x: (B, in_channels, H, W), H and W divisible by ``downsample_factor``.

        Returns:
            a ``VQEncoding`` (z_q, indices, aux):
            z_q: (B, embed_dim, H/f, W/f), straight-through gradient to the encoder;
            indices: (B, H/f, W/f) int64;
            aux: a ``VQAux`` (``loss``, ``perplexity``, ``usage``, ``indices``).
        """
        check_image(x, where="VQGAN.encode", channels=self.config.in_channels, factor=self.downsample_factor)
        q = self.quantize(self.quant_conv(self.encoder(x)))
        aux = VQAux(loss=q.loss, perplexity=q.perplexity, usage=q.usage, indices=q.indices)
        return VQEncoding(q.z_q, q.indices, aux)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) quantised latents -> (B, out_ch, h*f, w*f) images."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 code indices in [0, n_embed) -> (B, out_ch, h*f, w*f) images."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 3:
            raise ValueError(
                "VQGAN.decode_indices: argument 'indices' must be a (B, h, w) integer tensor, got "
                + (f"shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__)
            )
        check_code_indices(indices, self.quantize.num_codes, where="VQGAN.decode_indices")
        return self.decode(self.quantize.codes_from_indices(indices))

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Reconstruct ``x``: returns a ``TokenizerOutput`` (x_rec like x but
        out_ch channels, aux: the ``VQAux``)."""
        z_q, _, aux = self.encode(x)
        return TokenizerOutput(self.decode(z_q), aux)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight, for the VQGAN adaptive GAN weight
        (gradient-norm ratio of the reconstruction and GAN losses)."""
        return self.decoder.conv_out.weight


# taming-transformers' ImageNet f16 models (configs/imagenet_vqgan.yaml and
# the 16384-code release): 256x256 inputs, 16x16 latents.
register_preset("vqgan_f16_1024", VQGANConfig())
register_preset("vqgan_f16_16384", VQGANConfig(n_embed=16384))
# A toy for tests and the demo: 64x64 inputs, 16x16 latents (f4), about 1M
# parameters; trains at a few steps per second on 2 CPU cores at 32x32.
# GroupNorms of 8 groups (4 channels each, as taming's 32 groups at ch=128):
# 32 groups at ch=32 would be instance norms, which remove each image's mean
# colour from the first level's features.
register_preset(
    "vqgan_tiny",
    VQGANConfig(
        embed_dim=16,
        n_embed=256,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        z_channels=32,
        resolution=64,
        norm_num_groups=8,
    ),
)
