"""KL-regularised autoencoder of latent diffusion / Stable Diffusion
(Rombach et al.): the VQGAN encoder and decoder with a diagonal Gaussian
posterior instead of a codebook.

    x -> encoder (double_z: mean and log-variance, 2 * z_channels)
      -> quant_conv (1x1, 2 * z_channels -> 2 * embed_dim) -> posterior
      -> z (sample or mode, embed_dim channels)
      -> post_quant_conv (1x1, embed_dim -> z_channels) -> decoder -> x_rec

Module names follow latent-diffusion's ``AutoencoderKL`` (``encoder``,
``decoder``, ``quant_conv``, ``post_quant_conv``), so its checkpoints (the
``first_stage_model.*`` keys of a Stable Diffusion checkpoint, prefix
stripped) map by identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pyvq._checks import check_image
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.outputs import TokenizerOutput
from pyvq.nn import Decoder, Encoder
from pyvq.nn.blocks import arch_kwargs, check_arch_fields

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution"]

_LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussianDistribution:
    """N(mean, diag(var)) over (C, H, W) per batch element.

    Args:
        parameters: (B, 2C, H, W): mean in the first C channels, log-variance
            in the last C. The log-variance is clamped to [-30, 20].
        deterministic: a point mass at the mean (std = var = 0; ``sample``
            returns the mean, ``kl`` and ``nll`` return zeros).

    Attributes: ``mean``, ``logvar``, ``std``, ``var``, all (B, C, H, W).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if not isinstance(parameters, torch.Tensor) or parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(
                "DiagonalGaussianDistribution: argument 'parameters' must be a (B, 2C, ...) tensor, got "
                + (f"shape {tuple(parameters.shape)}" if isinstance(parameters, torch.Tensor) else type(parameters).__name__)
            )
        self.parameters = parameters
        self.deterministic = bool(deterministic)
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        if self.deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def _dims(self) -> list[int]:
        return list(range(1, self.mean.dim()))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn with ``generator``; (B, C, H, W),
        differentiable in the parameters (reparameterisation)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The mean, (B, C, H, W)."""
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) summed over all but the batch dimension, (B,).

        ``other=None`` is the standard normal:
        0.5 * sum(mean^2 + var - 1 - logvar).
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._dims()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: list[int] | tuple[int, ...] | None = None) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` (like mean), summed over
        ``dims`` (default all but the batch dimension): (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._dims() if dims is None else list(dims)
        return 0.5 * torch.sum(_LOG_2PI + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture of an ``AutoencoderKL``. Defaults: Stable Diffusion's
    VAE (kl-f8, preset ``sd_kl_f8``).

    Attributes:
        embed_dim: latent channels (4 for SD).
        ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution,
        in_channels, out_ch, dropout, resamp_with_conv, tanh_out,
        norm_num_groups: the ``Encoder`` / ``Decoder`` arguments.
            ``norm_num_groups`` (GroupNorm groups, default 32) must divide
            ``ch`` and every ``ch * ch_mult[i]``; configs saved before the
            field existed load with 32, the value they were built with.
        double_z: must be True (the encoder outputs mean and log-variance).
        scaling_factor: the factor a latent-diffusion model multiplies the
            latents by (0.18215 for SD v1/v2); stored for the prior's use,
            not applied by the autoencoder.
    """

    embed_dim: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    resamp_with_conv: bool = True
    tanh_out: bool = False
    double_z: bool = True
    scaling_factor: float = 1.0
    norm_num_groups: int = 32

    def __post_init__(self):
        name = "AutoencoderKLConfig"
        check_arch_fields(self, where=name, positive=("embed_dim", "in_channels", "out_ch"))
        if not self.double_z:
            raise ValueError(f"{name}: field 'double_z' must be True (the posterior needs mean and log-variance)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class AutoencoderKL(PretrainedModel, nn.Module):
    """KL autoencoder; see the module docstring.

    Args:
        config: an ``AutoencoderKLConfig``.
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        if not isinstance(config, AutoencoderKLConfig):
            raise TypeError(
                f"AutoencoderKL: argument 'config' must be an AutoencoderKLConfig, got {type(config).__name__}"
            )
        self.config = config
        arch = arch_kwargs(config)
        self.encoder = Encoder(in_channels=config.in_channels, double_z=True, **arch)
        self.decoder = Decoder(out_ch=config.out_ch, tanh_out=config.tanh_out, **arch)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior of images x (B, in_channels, H, W): a Gaussian over
        (B, embed_dim, H/f, W/f)."""
        check_image(x, where="AutoencoderKL.encode", channels=self.config.in_channels, factor=self.downsample_factor)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) latents -> (B, out_ch, h*f, w*f) images."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> TokenizerOutput:
        """Reconstruct x from a posterior sample (or its mode); returns a
        ``TokenizerOutput`` (x_rec, aux = the posterior, a
        ``DiagonalGaussianDistribution``). The KL term is ``aux.kl()``, (B,)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return TokenizerOutput(self.decode(z), posterior)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight


# Stable Diffusion v1/v2's VAE (latent-diffusion kl-f8): 256 -> 32x32x4.
register_preset("sd_kl_f8", AutoencoderKLConfig(scaling_factor=0.18215))
# A toy for tests: 64x64 inputs, f4, 4 latent channels.
register_preset(
    "kl_tiny",
    AutoencoderKLConfig(
        embed_dim=4,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        z_channels=4,
        resolution=64,
    ),
)
