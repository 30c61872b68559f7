"""Efficient-VQGAN tokenizer (Cao et al., "Efficient-VQGAN: Towards
High-Resolution Image Generation with Efficient Vision Transformers"): a
Swin-style encoder and decoder (local, shifted-window attention through
``pyvq.ops.window_attention``) around a vector-quantisation bottleneck.

    x (B, in_channels, H, W)
      -> encoder: patch embed (p x p, ch channels), Swin stages of widths
         ch * 2**i with patch merging (2x down) between them, LayerNorm,
         Linear -> embed_dim                                 (B, embed_dim, H/f, W/f)
      -> quantize (pyvq.nn.VectorQuantizer, n_embed codes of embed_dim)
      -> decoder: Linear embed_dim -> widest width, the Swin stages in
         reverse with patch expanding (2x up) between them (back at H/p),
         LayerNorm, log2(p) - 1 further patch expandings (each halving the
         width; one for p = 4: H/2), the nearest-neighbour 2x upsampling
         (H) and a 3x3 conv to out_ch                        (B, out_ch, H, W)

The downsampling factor is ``f = p * 2 ** (len(depths) - 1)``: 16 for the
default p = 4 and three stages (two merges), 8 with one stage fewer. The
decoder's upsampling is the same f: 2 ** (len(depths) - 1) from its
expanding layers between stages, p / 2 from the final expandings and 2 from
the nearest upsampling. Each stage alternates unshifted and shifted
(w // 2) windows; grids that are not a multiple of the window are padded
inside the blocks (``pyvq.nn.SwinBlock``).

The modules: ``encoder`` maps images to the pre-quantisation latents (so
ReFiT's ``rebuild_codebook(model.encoder, ...)`` and
``freeze_encoder(model)`` apply as they are), ``quantize``, ``decoder``.
Images are (B, in_channels, H, W), conventionally in [-1, 1]; H and W must
be divisible by f. The loss (perceptual + L2 + VQ + adaptive-weight GAN, the
paper's eq. 1) is the training recipe's (``pyvq.train.recipes``), not the
model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pyvq._checks import check_bool, check_float, check_image, check_int, check_positive_fields, int_tuple
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.outputs import TokenizerOutput, VQAux, VQEncoding
from pyvq.models.tokenizers.code_masks import BlockKnownCodes
from pyvq.nn import NearestUpsample, PatchEmbed, PatchExpanding, PatchMerging, SwinStage, VectorQuantizer
from pyvq.nn.vector_quantizer import check_code_indices
from pyvq.ops.window_attention import MAX_WINDOW

__all__ = ["EfficientVQGAN", "EfficientVQGANConfig"]

# The VectorQuantizer keyword arguments an EfficientVQGANConfig carries.
_QUANTIZER_FIELDS = ("beta", "ema", "decay", "eps", "l2_normalize", "restart_dead_codes", "dead_code_threshold")


@dataclass(frozen=True)
class EfficientVQGANConfig:
    """Architecture and quantiser settings of an ``EfficientVQGAN``.

    The defaults are the f16 model (preset ``effvqgan_f16``): 256 px images,
    16 x 16 latents, 1024 codes.

    Attributes:
        embed_dim: code dimension (channels of the quantised latent).
        n_embed: codebook size.
        in_channels, out_ch: image channels in and out.
        patch_size: p, the patch embedding's side; a power of two >= 2.
        ch: width of the first stage; stage i has ch * 2**i channels.
        depths: Swin blocks per stage (encoder; the decoder mirrors them).
            Merges sit between stages, so f = p * 2 ** (len(depths) - 1).
        num_heads: attention heads per stage (stage i's width divisible by it).
        window_size: attention window side w (1 to 32); shifted blocks
            shift by w // 2.
        mlp_ratio: MLP hidden width / block width.
        qkv_bias: bias in the attention's qkv projections.
        drop_path: stochastic-depth rate of the deepest encoder block (and
            the first decoder one), rising linearly from 0 as in Swin.
        resolution: the image side the model is meant for (the default
            evaluation size; any size divisible by f runs).
        beta, l2_normalize, ema, decay, eps, restart_dead_codes,
        dead_code_threshold: the ``pyvq.nn.VectorQuantizer`` arguments
            (see ``VQGANConfig``). The codebook defaults to low-dimensional
            (32), l2-normalised codes, ViT-VQGAN's factorised cosine
            codebook: on the tiny preset, 8-d l2-normalised codes used
            about 9x more codes and reconstructed about 3.8 dB better than
            16-d unnormalised ones (300 Adam steps on 16 photo crops).
    """

    embed_dim: int = 32
    n_embed: int = 1024
    in_channels: int = 3
    out_ch: int = 3
    patch_size: int = 4
    ch: int = 128
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (4, 8, 16)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    resolution: int = 256
    beta: float = 0.25
    l2_normalize: bool = True
    ema: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    restart_dead_codes: bool = False
    dead_code_threshold: float = 1.0

    def __post_init__(self):
        where = "EfficientVQGANConfig"
        for name in ("depths", "num_heads"):
            object.__setattr__(self, name, int_tuple(name, getattr(self, name), where=where))
        check_positive_fields(self, ("embed_dim", "n_embed", "in_channels", "out_ch", "patch_size", "ch",
                                     "resolution"), where=where)
        check_int("window_size", self.window_size, where=where, minimum=1, maximum=MAX_WINDOW, what="field")
        p = self.patch_size
        if p < 2 or p & (p - 1):
            raise ValueError(f"{where}: field 'patch_size' must be a power of two >= 2, got {p}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"{where}: field 'depths' must be a non-empty sequence of ints >= 1, got {self.depths}")
        if len(self.num_heads) != len(self.depths) or min(self.num_heads) < 1:
            raise ValueError(f"{where}: field 'num_heads' must hold {len(self.depths)} ints >= 1 (one per stage of "
                             f"'depths'), got {self.num_heads}")
        for i, heads in enumerate(self.num_heads):
            width = self.ch * 2**i
            if width % heads:
                raise ValueError(f"{where}: field 'num_heads' must divide each stage's width ch * 2**i; stage {i} "
                                 f"has width {width} and {heads} heads")
        if self.ch % (p // 2):
            raise ValueError(f"{where}: field 'ch' must be divisible by patch_size / 2 = {p // 2} (the decoder's "
                             f"last expandings halve it {int(math.log2(p)) - 1} time(s)), got {self.ch}")
        check_float("mlp_ratio", self.mlp_ratio, where=where, low=0.0, low_open=True, high=math.inf,
                    high_open=True, what="field")
        check_float("drop_path", self.drop_path, where=where, low=0.0, high=1.0, high_open=True, what="field")
        for name in ("qkv_bias", "l2_normalize", "ema", "restart_dead_codes"):
            check_bool(name, getattr(self, name), where=where, what="field")
        for name in ("beta", "eps", "dead_code_threshold"):
            check_float(name, getattr(self, name), where=where, low=0.0, high=math.inf, high_open=True, what="field")
        check_float("decay", self.decay, where=where, low=0.0, high=1.0, what="field")

    @property
    def downsample_factor(self) -> int:
        """Side length ratio image / latent, ``patch_size * 2 ** (len(depths) - 1)``."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each stage, ``ch * 2**i``."""
        return tuple(self.ch * 2**i for i in range(len(self.depths)))


def _stage_rates(config: EfficientVQGANConfig) -> list[list[float]]:
    """Swin's stochastic depth: rates rising linearly over all blocks, per stage."""
    total = sum(config.depths)
    rates = [config.drop_path * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for depth in config.depths:
        out.append(rates[start:start + depth])
        start += depth
    return out


def _stage(config: EfficientVQGANConfig, i: int, rates: list[float]) -> SwinStage:
    return SwinStage(config.widths[i], config.depths[i], config.num_heads[i], config.window_size,
                     mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, drop_path=rates)


class SwinEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> pre-quantisation latents
    (B, embed_dim, H/f, W/f). Modules: ``patch_embed``, ``stages[i]`` (stage
    i, at H / (p * 2**i)), ``merges[i]`` (stage i -> i + 1), ``norm``,
    ``proj`` (Linear to embed_dim)."""

    def __init__(self, config: EfficientVQGANConfig):
        super().__init__()
        c, widths = config, config.widths
        rates = _stage_rates(c)
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, c.ch)
        self.stages = nn.ModuleList(_stage(c, i, rates[i]) for i in range(len(widths)))
        self.merges = nn.ModuleList(PatchMerging(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.norm = nn.LayerNorm(widths[-1])
        self.proj = nn.Linear(widths[-1], c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.merges):
                h = self.merges[i](h)
        return self.proj(self.norm(h)).permute(0, 3, 1, 2)


class SwinDecoder(nn.Module):
    """Latents (B, embed_dim, h, w) -> images (B, out_ch, h*f, w*f).
    Modules: ``proj`` (Linear from embed_dim), ``stages[i]`` (the mirror of
    encoder stage i, same resolution, run from the last to the first),
    ``expands[i]`` (stage i + 1 -> i), ``norm``, ``patch_expand`` (the
    log2(p) - 1 final expandings), ``upsample`` (nearest 2x), ``conv_out``."""

    def __init__(self, config: EfficientVQGANConfig):
        super().__init__()
        c, widths = config, config.widths
        rates = _stage_rates(c)  # mirrored: the decoder's first block has the deepest encoder block's rate
        self.proj = nn.Linear(c.embed_dim, widths[-1])
        self.stages = nn.ModuleList(_stage(c, i, rates[i][::-1]) for i in range(len(widths)))
        self.expands = nn.ModuleList(PatchExpanding(widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        self.norm = nn.LayerNorm(widths[0])
        n_final = int(math.log2(c.patch_size)) - 1
        self.patch_expand = nn.Sequential(*(PatchExpanding(c.ch // 2**j) for j in range(n_final)))
        self.upsample = NearestUpsample(2)
        self.conv_out = nn.Conv2d(c.ch // 2**n_final, c.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.proj(z.permute(0, 2, 3, 1))
        for i in reversed(range(len(self.stages))):
            h = self.stages[i](h)
            if i > 0:
                h = self.expands[i - 1](h)
        h = self.upsample(self.patch_expand(self.norm(h)))
        return self.conv_out(h.permute(0, 3, 1, 2))


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation: truncated-normal (std 0.02) linear weights,
    zero biases, unit LayerNorms (convs keep PyTorch's default)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class EfficientVQGAN(BlockKnownCodes, PretrainedModel, nn.Module):
    """Efficient-VQGAN tokenizer; see the module docstring. The API is
    ``VQGAN``'s: ``encode`` -> ``VQEncoding``, ``decode``,
    ``decode_indices``, ``forward`` -> ``TokenizerOutput`` (aux: a
    ``VQAux``), ``get_last_layer``, ``quantize``, ``downsample_factor``.

    Args:
        config: an ``EfficientVQGANConfig``.
    """

    config_class = EfficientVQGANConfig

    def __init__(self, config: EfficientVQGANConfig):
        super().__init__()
        if not isinstance(config, EfficientVQGANConfig):
            raise TypeError(f"EfficientVQGAN: argument 'config' must be an EfficientVQGANConfig, got "
                            f"{type(config).__name__}")
        self.config = config
        self.encoder = SwinEncoder(config)
        self.decoder = SwinDecoder(config)
        self.encoder.apply(_init_weights)
        self.decoder.apply(_init_weights)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim,
                                        **{name: getattr(config, name) for name in _QUANTIZER_FIELDS})

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: torch.Tensor) -> VQEncoding:
        """Quantised latents of images.

        Args:
            x: (B, in_channels, H, W), H and W divisible by ``downsample_factor``.

        Returns:
            a ``VQEncoding`` (z_q, indices, aux): z_q (B, embed_dim, H/f,
            W/f) with a straight-through gradient to the encoder, indices
            (B, H/f, W/f) int64, aux a ``VQAux``.
        """
        check_image(x, where="EfficientVQGAN.encode", channels=self.config.in_channels,
                    factor=self.downsample_factor)
        out = self.quantize(self.encoder(x))
        return VQEncoding(out.z_q, out.indices,
                          VQAux(loss=out.loss, perplexity=out.perplexity, usage=out.usage, indices=out.indices))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) quantised latents -> (B, out_ch, h*f, w*f) images."""
        if not isinstance(z_q, torch.Tensor) or z_q.dim() != 4 or z_q.shape[1] != self.config.embed_dim:
            got = tuple(z_q.shape) if isinstance(z_q, torch.Tensor) else type(z_q).__name__
            raise ValueError(f"EfficientVQGAN.decode: argument 'z_q' must have shape "
                             f"(B, {self.config.embed_dim}, h, w), got {got}")
        return self.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 code indices in [0, n_embed) -> (B, out_ch, h*f, w*f) images."""
        if isinstance(indices, torch.Tensor) and indices.dim() == 3:
            check_code_indices(indices, self.quantize.num_codes, where="EfficientVQGAN.decode_indices")
            return self.decode(self.quantize.codes_from_indices(indices))
        got = f"shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"EfficientVQGAN.decode_indices: argument 'indices' must be a (B, h, w) integer tensor, "
                         f"got {got}")

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Reconstruct ``x``: a ``TokenizerOutput`` (x_rec (B, out_ch, H, W), aux: the ``VQAux``)."""
        z_q, _, aux = self.encode(x)
        return TokenizerOutput(self.decode(z_q), aux)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, for the adaptive GAN weight."""
        return self.decoder.conv_out.weight


# The paper's tokenizers at 256 px: f16 (16 x 16 latents) and f8 (32 x 32),
# 1024 codes; w 8 divides every stage's grid (64, 32, 16 at f16).
register_preset("effvqgan_f16", EfficientVQGANConfig())
register_preset("effvqgan_f8", EfficientVQGANConfig(depths=(2, 2), num_heads=(4, 8)))
# A toy for tests and the CLI: f8 (4 x 4 latents at 32 px), window 4, about
# 0.2M parameters; 300 steps of batch 16 at 32 px take about 15 s on one core.
register_preset(
    "effvqgan_tiny",
    EfficientVQGANConfig(embed_dim=8, n_embed=256, ch=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                         mlp_ratio=2.0, resolution=32),
)
