"""BRICS tokenizer (Yang et al., "Bi-level feature Representation of Image
CollectionS"): continuous key codes that index groups of multiresolution
feature grids, decoded by a StyleGAN2-style generator.

    x -> encoder (VQGAN ``Encoder``, Cz = N_h * C_key channels) -> sigmoid
      -> key codes z in [0, 1]^(Cz, Hz, Wz)
      -> tiled to the feature size Hd x Wd (``tiling``)
      -> per group h: (C_key key values, (i + 0.5) / Hd, (j + 0.5) / Wd)
         = a point in [0, 1]^(C_key + 2), looked up in group h's grid
         (``pyvq.nn.FeatureGrid``, one MLP per group)
      -> feature block f (Cd, Hd, Wd)
      -> style w = StyleMLP(mean_{i,j} f); StyleGAN2 skip synthesis network
         on f (modulated convs, bilinear x2 upsampling) -> image

Images are (B, in_channels, H, W) in [-1, 1] (like VQGAN, the output has no
activation). H and W must be divisible by the encoder's downsampling factor
``2 ** (len(ch_mult) - 1)``; other sizes than ``resolution`` work (code and
feature sizes scale with the image).

Tiling. The feature block is ``t = feature_size // code_size`` times larger
than the code map per side. ``tiling="interleave"`` (default) repeats the
whole code map t x t times, ``torch.tile(z, (1, 1, t, t))``: feature position
(i, j) takes key (i mod Hz, j mod Wz), so each key is queried at t**2
positions spread over the image, each with its own spatial coordinates.
``tiling="nearest"`` repeats each key over a t x t block
(``repeat_interleave``): position (i, j) takes key (i // t, j // t). Either
way the source key of every position is recoverable from (i, j) alone
(``tile_sources``).

Inpainting (``known_codes``). A feature position (i, j) becomes the s x s
pixel block at (i s, j s) (s = ``2 ** (len(decoder_channels) - 1)``, the
synthesis network's upsampling), so a key owns the t**2 pixel blocks of the
positions it feeds: with ``"nearest"`` these make up its f x f block (as for
a VQ code); with ``"interleave"`` they are scattered over the image, one per
(h, w) tile. A key is known when every block it feeds lies outside the mask.

Relaxed precision (training mode only): the tiled keys get Gaussian noise of
standard deviation ``1 / (4 * max_res)`` per query (a quarter of the finest
grid cell), so that nearby keys must give similar features; the grid lookup
clamps the noisy keys to [0, 1]. In eval mode the lookup is deterministic.

KL variant (``kl=True``, appendix A.4): the encoder outputs mu and log-sigma
(2 * Cz channels); training uses ``z = sigmoid(mu + sigma * eps)``, eval
``sigmoid(mu)``; ``aux["kl"]`` is the per-sample KL to N(0, I) (summed over
the code), which the loss weights by ``kl_weight`` (1e-6).

Training is BRICS' recipe in ``pyvq.train.recipes`` (not part of the
model): L2 x 20, LPIPS x 5, Wasserstein GAN x 1 with an R1 gradient penalty
x 4 on a StyleGAN2 residual discriminator (sized by the ``disc_*`` and
``gan_penalty*`` config fields); Adam, lr 2e-3 (constant), betas (0, 0.99),
eps 1e-15 for the autoencoder and grids and 1e-8 for the discriminator, no
gradient clipping. The GAN terms start at the trainer's ``disc_start``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyvq._checks import check_image, check_int, check_positive_fields, int_tuple
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.outputs import BRICSAux, TokenizerOutput
from pyvq.models.tokenizers.autoencoder_kl import DiagonalGaussianDistribution
from pyvq.models.tokenizers.code_masks import masked_blocks
from pyvq.nn.blocks import Encoder
from pyvq.nn.feature_grid import FeatureGrid
from pyvq.nn.stylegan import StyleMLP, SynthesisNetwork
from pyvq.ops.grid import FEATURE_SIZES, INDEX_MODES, MAX_DIM

__all__ = ["BRICS", "BRICSConfig", "tile_codes", "tile_sources"]

TILINGS = ("interleave", "nearest")
_NAME = "BRICSConfig"


def tile_codes(z: torch.Tensor, factor: int, tiling: str = "interleave") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h * factor, w * factor).

    ``"interleave"``: ``out[..., i, j] = z[..., i % h, j % w]`` (``torch.tile``);
    ``"nearest"``: ``out[..., i, j] = z[..., i // factor, j // factor]``.
    """
    if tiling not in TILINGS:
        raise ValueError(f"tile_codes: argument 'tiling' must be one of {TILINGS}, got {tiling!r}")
    if factor == 1:
        return z
    if tiling == "interleave":
        return torch.tile(z, (1, 1, factor, factor))
    return z.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def tile_sources(h: int, w: int, factor: int, tiling: str = "interleave") -> torch.Tensor:
    """(h * factor, w * factor) int64: the flat index ``a * w + b`` of the key
    (a, b) that ``tile_codes`` puts at each tiled position (computed by
    tiling the indices themselves, so it follows ``tile_codes`` exactly)."""
    for name, value in (("h", h), ("w", w), ("factor", factor)):
        check_int(name, value, where="tile_sources", minimum=1)
    return tile_codes(torch.arange(h * w).view(1, 1, h, w), factor, tiling)[0, 0]


@dataclass(frozen=True)
class BRICSConfig:
    """Architecture of a ``BRICS`` tokenizer (defaults: preset ``brics_16x16x8``).

    Attributes:
        resolution: nominal image side length.
        in_channels, out_channels: image channels.
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
        resamp_with_conv: the VQGAN ``Encoder``; ``code_size`` must equal
            ``resolution / 2**(len(ch_mult) - 1)``. ``attn_resolutions``
            default (None): attention at the code resolution only.
        code_size: Hz = Wz, the key-code side length at ``resolution``.
        code_channels: Cz = N_h * C_key, key-code channels.
        key_dim: C_key, key channels per group; N_h = Cz / C_key groups.
        kl: the KL-regularised variant (encoder outputs mu and log-sigma).
        kl_weight: weight of the KL term (training; the trainer's default).
        key_noise: relaxed-precision noise on the keys in training mode.
        feature_size: Hd = Wd, a multiple of ``code_size``.
        feature_channels: Cd, channels of the feature block (divisible by
            N_h: each group's MLP gives Cd / N_h of them).
        levels, features, log2_table_size, min_res, max_res, index: the
            grids (N_r levels, C_v features per entry, T = 2**log2_table_size
            rows per level, resolutions from min_res to max_res = r_max).
        grid_hidden_dim: hidden width of each group's MLP (0: one Linear).
        tiling: ``"interleave"`` or ``"nearest"`` (module docstring).
        decoder_channels: synthesis-network channels per resolution, from
            the feature size up; ``resolution`` must equal
            ``feature_size * 2**(len(decoder_channels) - 1)``.
        style_dim, style_layers: the style MLP on the pooled features.
        disc_channels, disc_max_channels, disc_mbstd_group: the residual
            discriminator BRICS' training recipe makes (0 group: no
            minibatch stddev).
        gan_penalty, gan_penalty_weight: the critic's gradient penalty
            (``"r1"``, ``"gp"`` or ``"none"``) and its weight.
    """

    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float = 0.0
    resamp_with_conv: bool = True
    code_size: int = 16
    code_channels: int = 8
    key_dim: int = 1
    kl: bool = False
    kl_weight: float = 1e-6
    key_noise: bool = True
    feature_size: int = 64
    feature_channels: int = 512
    levels: int = 16
    features: int = 4
    log2_table_size: int = 18
    min_res: int = 4
    max_res: int = 32
    grid_hidden_dim: int = 64
    index: str = "dense_mod"
    tiling: str = "interleave"
    decoder_channels: tuple[int, ...] = (512, 256, 128)
    style_dim: int = 512
    style_layers: int = 2
    disc_channels: int = 64
    disc_max_channels: int = 512
    disc_mbstd_group: int = 4
    gan_penalty: str = "r1"
    gan_penalty_weight: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", int_tuple("ch_mult", self.ch_mult, where=_NAME))
        object.__setattr__(self, "decoder_channels", int_tuple("decoder_channels", self.decoder_channels, where=_NAME))
        if self.attn_resolutions is not None:
            object.__setattr__(self, "attn_resolutions", int_tuple("attn_resolutions", self.attn_resolutions, where=_NAME))
        check_positive_fields(self, where=_NAME, names=(
            "resolution", "in_channels", "out_channels", "ch", "num_res_blocks", "code_size", "code_channels",
            "key_dim", "feature_size", "feature_channels", "levels", "min_res", "max_res", "style_dim",
            "style_layers", "disc_channels", "disc_max_channels",
        ))
        for name in ("log2_table_size", "grid_hidden_dim", "disc_mbstd_group"):
            check_int(name, getattr(self, name), where=_NAME, minimum=0, what="field")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"{_NAME}: field 'ch_mult' must be non-empty with entries >= 1, got {self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"{_NAME}: fields 'ch' * 'ch_mult' must be multiples of 32 (GroupNorm(32)), got {bad}")
        if not self.decoder_channels or min(self.decoder_channels) < 1:
            raise ValueError(f"{_NAME}: field 'decoder_channels' must be non-empty with entries >= 1, "
                             f"got {self.decoder_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{_NAME}: field 'dropout' must be in [0, 1), got {self.dropout!r}")
        f = self.downsample_factor
        if self.resolution != self.code_size * f:
            raise ValueError(
                f"{_NAME}: field 'code_size' ({self.code_size}) must equal resolution / 2**(len(ch_mult) - 1) "
                f"= {self.resolution} / {f}"
            )
        if self.feature_size % self.code_size:
            raise ValueError(
                f"{_NAME}: field 'feature_size' ({self.feature_size}) must be a multiple of 'code_size' "
                f"({self.code_size})"
            )
        up = 2 ** (len(self.decoder_channels) - 1)
        if self.resolution != self.feature_size * up:
            raise ValueError(
                f"{_NAME}: 'resolution' ({self.resolution}) must equal feature_size * 2**(len(decoder_channels) - 1) "
                f"= {self.feature_size} * {up}"
            )
        if self.code_channels % self.key_dim:
            raise ValueError(
                f"{_NAME}: field 'code_channels' ({self.code_channels}) must be divisible by 'key_dim' "
                f"({self.key_dim}): the code splits into code_channels / key_dim key groups"
            )
        if self.key_dim + 2 > MAX_DIM:
            raise ValueError(f"{_NAME}: field 'key_dim' must be at most {MAX_DIM - 2} (grids of key_dim + 2 <= "
                             f"{MAX_DIM} dimensions), got {self.key_dim}")
        if self.feature_channels % self.num_groups:
            raise ValueError(
                f"{_NAME}: field 'feature_channels' ({self.feature_channels}) must be divisible by the number of "
                f"key groups code_channels / key_dim = {self.num_groups}"
            )
        if self.features not in FEATURE_SIZES:
            raise ValueError(f"{_NAME}: field 'features' must be one of {FEATURE_SIZES}, got {self.features!r}")
        if self.max_res < self.min_res:
            raise ValueError(f"{_NAME}: field 'max_res' ({self.max_res}) must be >= 'min_res' ({self.min_res})")
        if self.log2_table_size > 30:
            raise ValueError(f"{_NAME}: field 'log2_table_size' must be <= 30, got {self.log2_table_size}")
        for name, value, options in (("index", self.index, INDEX_MODES), ("tiling", self.tiling, TILINGS),
                                     ("gan_penalty", self.gan_penalty, ("r1", "gp", "none"))):
            if value not in options:
                raise ValueError(f"{_NAME}: field {name!r} must be one of {options}, got {value!r}")
        for name in ("kl_weight", "gan_penalty_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_NAME}: field {name!r} must be >= 0, got {getattr(self, name)!r}")

    @property
    def downsample_factor(self) -> int:
        """Image side / code side, ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def encoder_attn_resolutions(self) -> tuple[int, ...]:
        """``attn_resolutions``, or ``(code_size,)`` when it is None."""
        return (self.code_size,) if self.attn_resolutions is None else self.attn_resolutions

    @property
    def num_groups(self) -> int:
        """N_h = code_channels / key_dim."""
        return self.code_channels // self.key_dim

    @property
    def tile_factor(self) -> int:
        """feature_size / code_size."""
        return self.feature_size // self.code_size

    @property
    def key_noise_std(self) -> float:
        """Relaxed-precision noise, 1 / (4 * max_res)."""
        return 1.0 / (4 * self.max_res)


class BRICS(PretrainedModel, nn.Module):
    """BRICS tokenizer; see the module docstring.

    Args:
        config: a ``BRICSConfig``.

    Submodules: ``encoder`` (``pyvq.nn.Encoder``), ``grid``
    (``pyvq.nn.FeatureGrid``), ``mapping`` (``StyleMLP``), ``synthesis``
    (``SynthesisNetwork``).

    ``aux`` (from ``forward``) is a ``pyvq.models.outputs.BRICSAux``:
    ``keys`` (B, Cz, Hz, Wz), and with ``kl=True`` ``kl`` (B,), the
    per-sample KL term (None otherwise); also read as ``aux["keys"]``,
    ``aux["kl"]``, ``"kl" in aux``.
    """

    config_class = BRICSConfig

    def __init__(self, config: BRICSConfig):
        super().__init__()
        if not isinstance(config, BRICSConfig):
            raise TypeError(f"BRICS: argument 'config' must be a BRICSConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = Encoder(
            in_channels=c.in_channels, ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
            attn_resolutions=c.encoder_attn_resolutions, z_channels=c.code_channels, resolution=c.resolution,
            dropout=c.dropout, resamp_with_conv=c.resamp_with_conv, double_z=c.kl,
        )
        self.grid = FeatureGrid(
            c.num_groups, key_dim=c.key_dim, levels=c.levels, features=c.features,
            log2_table_size=c.log2_table_size, min_res=c.min_res, max_res=c.max_res,
            out_dim=c.feature_channels, hidden_dim=c.grid_hidden_dim, index=c.index,
        )
        self.mapping = StyleMLP(c.feature_channels, c.style_dim, c.style_layers)
        self.synthesis = SynthesisNetwork(c.feature_channels, c.decoder_channels, c.style_dim, c.out_channels)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # ------------------------------------------------------------ encoding
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution | None]:
        check_image(x, where="BRICS.encode", channels=self.config.in_channels, factor=self.downsample_factor)
        h = self.encoder(x)
        if not self.config.kl:
            return torch.sigmoid(h), None
        mu, log_sigma = h.chunk(2, dim=1)
        posterior = DiagonalGaussianDistribution(torch.cat([mu, 2.0 * log_sigma], dim=1))
        z = posterior.sample() if self.training else posterior.mode()
        return torch.sigmoid(z), posterior

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Key codes of images: (B, in_channels, H, W) -> (B, Cz, H/f, W/f)
        in [0, 1] (KL variant: a posterior sample in training mode, the mean
        in eval mode)."""
        return self._encode(x)[0]

    # ------------------------------------------------------------ inpainting
    def known_codes(self, mask: torch.Tensor) -> torch.Tensor:
        """Which key codes an inpainting mask leaves known: ``mask`` (H, W),
        (1, H, W) or (B, 1, H, W), non-zero / True = region to generate, H
        and W multiples of the downsampling factor f -> bool (H / f, W / f)
        (or (B, H / f, W / f)), True where the key is kept from the image
        (the shapes of every tokenizer's ``known_codes``).

        Key (a, b) is queried at every feature position (i, j) that
        ``tile_codes`` gives it, and position (i, j) is decoded into the
        s x s pixel block at (i s, j s), s = f / tile_factor. The key is
        known only if every such block lies outside the mask. With
        ``tiling="nearest"`` that is its own f x f block (the VQ block
        rule); with ``"interleave"`` the t x t blocks it feeds sit one per
        tile, ``(code_size * s)`` pixels apart, so a mask over one tile
        (a quarter of the image at t = 2) leaves no key known.

        What holds exactly: the features of a known key never sit over
        the mask, and every unknown key feeds at least one masked block.
        In decoded pixels each key also reaches a few pixels around its
        blocks (the synthesis convolutions) and, weakly, every pixel (the
        style is computed from the mean feature); and the encoder (its
        attention at the code resolution) made every key from the whole
        image, masked pixels included.
        """
        c = self.config
        t = c.tile_factor
        s = self.downsample_factor // t  # pixels per feature position
        touched = masked_blocks(mask, s, where="BRICS.known_codes", multiple=self.downsample_factor)
        Hd, Wd = touched.shape[-2:]  # the feature grid's size
        h, w = Hd // t, Wd // t
        src = tile_sources(h, w, t, c.tiling).to(touched.device).flatten()
        flat = touched.reshape(-1, Hd * Wd).float()
        unknown = torch.zeros(flat.shape[0], h * w, device=flat.device)
        unknown = unknown.scatter_reduce(1, src.expand_as(flat), flat, reduce="amax") > 0
        return ~unknown.reshape(*touched.shape[:-2], h, w)

    # ------------------------------------------------------------ decoding
    def query_points(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid queries of key codes (B, Cz, h, w): the tiled keys
        (B, H_d, W_d, N_h, C_key) (noisy in training mode) and the spatial
        coordinates (H_d, W_d, 2), ``((i + 0.5) / H_d, (j + 0.5) / W_d)``,
        with H_d = h * tile_factor."""
        c = self.config
        if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
            raise TypeError("BRICS.decode: argument 'keys' must be a floating-point tensor")
        if keys.dim() != 4 or keys.shape[1] != c.code_channels:
            raise ValueError(
                f"BRICS.decode: argument 'keys' must have shape (B, {c.code_channels}, h, w), got {tuple(keys.shape)}"
            )
        B, _, h, w = keys.shape
        t = c.tile_factor
        tiled = tile_codes(keys, t, c.tiling)
        if self.training and c.key_noise:
            tiled = tiled + c.key_noise_std * torch.randn_like(tiled)
        Hd, Wd = h * t, w * t
        tiled = tiled.reshape(B, c.num_groups, c.key_dim, Hd, Wd).permute(0, 3, 4, 1, 2)
        ii = (torch.arange(Hd, device=keys.device, dtype=keys.dtype) + 0.5) / Hd
        jj = (torch.arange(Wd, device=keys.device, dtype=keys.dtype) + 0.5) / Wd
        coords = torch.stack(torch.meshgrid(ii, jj, indexing="ij"), dim=-1)
        return tiled, coords

    def features(self, keys: torch.Tensor) -> torch.Tensor:
        """The feature block f (B, Cd, H_d, W_d) of key codes (B, Cz, h, w)."""
        tiled, coords = self.query_points(keys)
        return self.grid(tiled, coords).permute(0, 3, 1, 2)

    def decode(self, keys: torch.Tensor) -> torch.Tensor:
        """Key codes (B, Cz, h, w) -> images (B, out_channels, h*f, w*f)."""
        f = self.features(keys)
        style = self.mapping(f.mean(dim=(2, 3)))
        return self.synthesis(f, style)

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Reconstruct ``x``: returns a ``TokenizerOutput`` (x_rec, aux: a
        ``BRICSAux``)."""
        keys, posterior = self._encode(x)
        aux = BRICSAux(keys=keys, kl=None if posterior is None else posterior.kl())
        return TokenizerOutput(self.decode(keys), aux)

    def get_last_layer(self) -> torch.Tensor:
        """The last ToRGB conv weight (for an adaptive GAN weight)."""
        return self.synthesis.last_layer()

    @torch.no_grad()
    def grid_usage(self, images) -> float:
        """``FeatureGrid.usage`` of the (noise-free) queries of images: one
        (B, C, H, W) tensor or an iterable of them (or of (images, ...)
        tuples, as data loaders give)."""
        if isinstance(images, torch.Tensor):
            images = [images]
        def pairs():
            for batch in images:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                yield self.query_points(self.encode(x.to(self.grid.tables.device)))

        was_training = self.training
        self.eval()
        try:
            return self.grid.usage(pairs())
        finally:
            self.train(was_training)


# The paper's configurations, named by code size Hz x Wz x Cz (256x256
# images, Hd = Wd = 64, Cd = 512, 16 levels of 4 features, C_key = 1,
# T = 2**18). r_max: 64 for 64x64 codes, 32 for the smaller ones.
register_preset("brics_16x16x8", BRICSConfig(code_size=16, code_channels=8, ch_mult=(1, 1, 2, 2, 4), max_res=32))
register_preset("brics_16x16x16", BRICSConfig(code_size=16, code_channels=16, ch_mult=(1, 1, 2, 2, 4), max_res=32))
register_preset("brics_32x32x4", BRICSConfig(code_size=32, code_channels=4, ch_mult=(1, 2, 2, 4), max_res=32))
register_preset("brics_64x64x4", BRICSConfig(code_size=64, code_channels=4, ch_mult=(1, 2, 4), max_res=64))
# A toy for tests and demos: 64x64 nominal images (32x32 work too), f4 codes
# of 4 channels (4 key groups; 16x16 at 64x64), features at twice the code
# size (tiling x2), 4 levels of 2**12 rows; about 0.1 s per step of 8 32x32
# images on one CPU core.
register_preset(
    "brics_tiny",
    BRICSConfig(
        resolution=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, code_size=16, code_channels=4,
        feature_size=32, feature_channels=64, levels=4, features=4, log2_table_size=12, min_res=4, max_res=16,
        grid_hidden_dim=32, decoder_channels=(64, 32), style_dim=64, style_layers=2,
        disc_channels=16, disc_max_channels=64,
    ),
)
