"""The VQGAN training loss: pixel + LPIPS reconstruction, PatchGAN with an
adaptive weight, and the codebook (VQ) or KL (Gaussian autoencoder) term.

One module serves both the generator (autoencoder) step and the discriminator
step, selected by ``optimizer_idx``, as in taming-transformers'
``VQLPIPSWithDiscriminator`` and latent-diffusion's ``LPIPSWithDiscriminator``.

Differences from taming, on purpose:

* ``pixelloss_weight`` is applied (taming stores it and never uses it; the
  default 1.0 gives taming's loss);
* before ``disc_start`` (or whenever the discriminator factor is 0) the
  generator step does not run the discriminator at all, so it costs nothing
  and the loss is exactly the reconstruction + codebook/KL terms;
* the generator loss can be the non-saturating one (default for
  ``disc_loss="vanilla"``); ``gen_loss="hinge"`` reproduces taming, which uses
  ``-mean(logits_fake)`` with either discriminator loss;
* the LPIPS network stays in eval mode (taming's LPIPS heads run their dropout
  whenever the loss module is in training mode).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pyvq.losses.gan import (
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)
from pyvq.losses.perceptual import perceptual_module, reconstruction_terms

__all__ = ["VQLPIPSWithDiscriminator"]

_D_LOSSES: dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
_G_LOSSES: dict[str, Callable] = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}
_G_FOR_D = {"hinge": "hinge", "vanilla": "non_saturating"}


def _choice(value, options, arg: str):
    if value not in options:
        raise ValueError(
            f"VQLPIPSWithDiscriminator: argument '{arg}' must be one of {sorted(options)}, got {value!r}"
        )
    return value


class VQLPIPSWithDiscriminator(nn.Module):
    """Autoencoder + discriminator loss of VQGAN (and of KL autoencoders).

    Args:
        disc_start: global step from which the GAN terms are on.
        codebook_weight: weight of the ``codebook_loss`` given to ``forward``.
        pixel_loss: ``"l1"`` (taming) or ``"l2"``, elementwise.
        pixelloss_weight: weight of the pixel loss.
        perceptual_weight: weight of the LPIPS term; 0 skips it and no LPIPS
            network is built or kept.
        perceptual: the perceptual module, called as ``perceptual(x, y)`` on
            images in [-1, 1] and returning per-image distances (any shape
            whose mean is the batch mean). Default :func:`build_lpips` (VGG,
            real weights from the torch hub cache, else MissingWeightsError).
        disc_num_layers, disc_in_channels, disc_ndf, use_actnorm: the
            :class:`NLayerDiscriminator`, built unless ``discriminator`` is given.
        discriminator: a module mapping (B, C, H, W) images to logits of any
            shape (e.g. ``ProjectedDiscriminator``), used instead of the PatchGAN.
        disc_factor: the GAN factor after ``disc_start``.
        disc_weight: multiplies the adaptive weight; it is the whole GAN
            weight when ``forward`` gets no ``last_layer``.
        disc_loss: ``"hinge"`` or ``"vanilla"`` (binary cross-entropy).
        gen_loss: ``"hinge"`` (``-mean(logits_fake)``) or ``"non_saturating"``;
            default the partner of ``disc_loss`` (hinge -> hinge, vanilla ->
            non_saturating).
        kl_weight: weight of the mean per-sample KL, ``posterior.kl().mean()``.
            Note the reconstruction terms here are per-element means, while
            latent-diffusion sums them per image: its ``kl_weight`` (1e-6)
            corresponds to ``1e-6 / (C * H * W)`` here (the adaptive GAN weight
            is unaffected by that rescaling).
        max_adaptive_weight: clamp of the adaptive weight (taming: 1e4).
    """

    def __init__(
        self,
        disc_start: int,
        *,
        codebook_weight: float = 1.0,
        pixel_loss: str = "l1",
        pixelloss_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual: nn.Module | None = None,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        use_actnorm: bool = False,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        disc_loss: str = "hinge",
        gen_loss: str | None = None,
        kl_weight: float = 1e-6,
        max_adaptive_weight: float = 1e4,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        self.pixel_loss = _choice(pixel_loss, ("l1", "l2"), "pixel_loss")
        self.disc_loss_name = _choice(disc_loss, _D_LOSSES, "disc_loss")
        self.gen_loss_name = _choice(_G_FOR_D[disc_loss] if gen_loss is None else gen_loss, _G_LOSSES, "gen_loss")
        for name, v in (
            ("codebook_weight", codebook_weight),
            ("pixelloss_weight", pixelloss_weight),
            ("perceptual_weight", perceptual_weight),
            ("disc_factor", disc_factor),
            ("disc_weight", disc_weight),
            ("kl_weight", kl_weight),
            ("max_adaptive_weight", max_adaptive_weight),
        ):
            if not v >= 0:
                raise ValueError(f"VQLPIPSWithDiscriminator: argument '{name}' must be >= 0, got {v}")
        self.disc_start = int(disc_start)
        self.codebook_weight = float(codebook_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.kl_weight = float(kl_weight)
        self.max_adaptive_weight = float(max_adaptive_weight)

        self.perceptual = perceptual_module(self.perceptual_weight, perceptual)
        if discriminator is None:
            discriminator = NLayerDiscriminator(
                input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
            )
        elif not isinstance(discriminator, nn.Module):
            raise TypeError(f"VQLPIPSWithDiscriminator: argument 'discriminator' must be an nn.Module, got "
                            f"{type(discriminator).__name__}")
        self.discriminator = discriminator
        self.d_loss_fn = _D_LOSSES[self.disc_loss_name]
        self.g_loss_fn = _G_LOSSES[self.gen_loss_name]

    # ----------------------------------------------------------------- parts
    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor):
        """``(nll, pixel, perceptual)`` scalars: ``nll = pixelloss_weight *
        pixel + perceptual_weight * perceptual``, each term a mean."""
        return reconstruction_terms(inputs, reconstructions, pixel_loss=self.pixel_loss,
                                    pixel_weight=self.pixel_weight, perceptual=self.perceptual,
                                    perceptual_weight=self.perceptual_weight)

    def _d_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        if last_layer is None:
            return torch.tensor(self.disc_weight, dtype=g_loss.dtype, device=g_loss.device)
        if not (torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad):
            # Evaluation under no_grad: no gradient to balance, so (as taming)
            # the GAN term is left out of the logged total.
            return torch.zeros((), dtype=g_loss.dtype, device=g_loss.device)
        return adaptive_weight(nll, g_loss, last_layer, max=self.max_adaptive_weight) * self.disc_weight

    # --------------------------------------------------------------- forward
    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        *,
        codebook_loss: torch.Tensor | None = None,
        posterior=None,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One loss of the two-optimizer GAN step.

        Args:
            inputs, reconstructions: (B, C, H, W) images in [-1, 1].
            optimizer_idx: 0 for the autoencoder (generator) loss, 1 for the
                discriminator loss (computed on detached images: it never
                reaches the autoencoder).
            global_step: the training step, compared with ``disc_start``.
            codebook_loss: the quantizer's loss (VQ autoencoders; its mean is
                used), or
            posterior: an object with ``.kl()`` (KL autoencoders); at most one
                of the two.
            last_layer: weight of the decoder's last layer, for the adaptive
                GAN weight; without it the GAN weight is ``disc_weight``.
            split: prefix of the log keys.

        Returns:
            ``(loss, log)``: a scalar, and detached 0-dim tensors under
            ``"{split}/<name>"``. Generator step: total_loss, nll_loss,
            rec_loss (unweighted pixel loss), p_loss, g_loss, d_weight,
            disc_factor, and quant_loss or kl_loss. Discriminator step:
            d_loss, logits_real, logits_fake, disc_factor.

        The generator step also gives the discriminator's parameters gradients
        (through ``logits_fake``): zero them before the discriminator step.
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                "VQLPIPSWithDiscriminator: 'inputs' and 'reconstructions' must have the same shape, "
                f"got {tuple(inputs.shape)} and {tuple(reconstructions.shape)}"
            )
        if optimizer_idx not in (0, 1):
            raise ValueError(f"VQLPIPSWithDiscriminator: argument 'optimizer_idx' must be 0 or 1, got {optimizer_idx!r}")
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)
        if optimizer_idx == 0:
            return self._generator_step(
                inputs, reconstructions, disc_factor, codebook_loss, posterior, last_layer, split
            )
        return self._discriminator_step(inputs, reconstructions, disc_factor, split)

    def _generator_step(self, inputs, reconstructions, disc_factor, codebook_loss, posterior, last_layer, split):
        if codebook_loss is not None and posterior is not None:
            raise ValueError("VQLPIPSWithDiscriminator: pass 'codebook_loss' or 'posterior', not both")
        nll, pix, p = self.reconstruction_loss(inputs, reconstructions)
        zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
        loss = nll
        log = {}
        if codebook_loss is not None:
            q = codebook_loss.mean()
            loss = loss + self.codebook_weight * q
            log["quant_loss"] = q
        elif posterior is not None:
            kl = posterior.kl().mean()
            loss = loss + self.kl_weight * kl
            log["kl_loss"] = kl

        if disc_factor > 0:
            logits_fake = self.discriminator(reconstructions)
            g_loss = self.g_loss_fn(logits_fake)
            d_weight = self._d_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss
        else:
            # Discriminator not started: not run at all, the loss is exactly
            # the reconstruction (+ codebook / KL) terms.
            g_loss, d_weight = zero, zero

        log.update(
            total_loss=loss,
            nll_loss=nll,
            rec_loss=pix,
            p_loss=p,
            g_loss=g_loss,
            d_weight=d_weight,
            disc_factor=torch.tensor(float(disc_factor), device=nll.device),
        )
        return loss, {f"{split}/{k}": v.detach().clone() for k, v in log.items()}

    def _discriminator_step(self, inputs, reconstructions, disc_factor, split):
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = disc_factor * self.d_loss_fn(logits_real, logits_fake)
        log = {
            "d_loss": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "disc_factor": torch.tensor(float(disc_factor), device=d_loss.device),
        }
        return d_loss, {f"{split}/{k}": v.detach().clone() for k, v in log.items()}
