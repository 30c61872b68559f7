"""Wasserstein GAN losses with a gradient penalty, and the reconstruction +
WGAN loss BRICS trains with (Yang et al., appendix A.3: L2 x 20, LPIPS x 5,
WGAN x 1, gradient penalty x 4, a StyleGAN2 residual discriminator).

* critic (discriminator) loss: ``mean(D(fake)) - mean(D(real))``;
* generator loss: ``-mean(D(fake))``;
* ``r1_penalty``: ``E ||grad_x D(x)||^2`` at real images (Mescheder et al.;
  StyleGAN2's ``gamma / 2`` is ``penalty_weight`` here);
* ``gradient_penalty``: ``E (||grad_x D(x_hat)||_2 - 1)^2`` at random
  interpolates of real and fake images (WGAN-GP, Gulrajani et al.).

``ReconstructionWGANLoss`` has the call signature of
``VQLPIPSWithDiscriminator`` (``loss(inputs, recs, optimizer_idx, step, ...)``
returning ``(loss, log)``) so the trainer drives either.
"""

from __future__ import annotations

import torch
from torch import nn

from pyvq._checks import check_int
from pyvq.losses.perceptual import perceptual_module, reconstruction_terms

__all__ = ["ReconstructionWGANLoss", "gradient_penalty", "r1_penalty", "wgan_d_loss", "wgan_g_loss"]

PENALTIES = ("r1", "gp", "none")


def wgan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Critic loss ``mean(logits_fake) - mean(logits_real)``."""
    return logits_fake.mean() - logits_real.mean()


def wgan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss ``-mean(logits_fake)``."""
    return -logits_fake.mean()


def _grad_sq_norm(discriminator, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-sample ||grad_x sum(D(x))||^2) with a graph for backward."""
    x = x.detach().requires_grad_(True)
    logits = discriminator(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return logits, grad.square().flatten(1).sum(dim=1)


def r1_penalty(discriminator, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R1: ``mean_b ||grad_x D(x_b)||^2`` at real images.

    Returns ``(penalty, logits_real)``: the logits come from the same forward
    pass and can be reused for the critic loss. Differentiable in the
    discriminator's parameters.
    """
    logits, sq = _grad_sq_norm(discriminator, real)
    return sq.mean(), logits


def gradient_penalty(discriminator, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: ``mean_b (||grad D(x_hat_b)|| - 1)^2`` at ``x_hat = a real + (1 - a) fake``,
    ``a ~ U(0, 1)`` per sample."""
    if real.shape != fake.shape:
        raise ValueError(
            f"gradient_penalty: 'real' and 'fake' shapes differ: {tuple(real.shape)} vs {tuple(fake.shape)}"
        )
    a = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=generator, device=real.device,
                   dtype=real.dtype)
    x_hat = a * real.detach() + (1 - a) * fake.detach()
    _, sq = _grad_sq_norm(discriminator, x_hat)
    return (sq.add(1e-12).sqrt() - 1.0).square().mean()


class ReconstructionWGANLoss(nn.Module):
    """Pixel + perceptual reconstruction loss, WGAN loss with a gradient
    penalty, and an optional KL term.

    Args:
        discriminator: the critic, e.g. ``pyvq.nn.stylegan.ResidualDiscriminator``.
        pixel_loss: ``"l2"`` (BRICS) or ``"l1"``, elementwise mean.
        pixel_weight: its weight (BRICS: 20).
        perceptual_weight: weight of the perceptual term (BRICS: 5); 0 turns
            it off and builds no network.
        perceptual: the perceptual module (``perceptual(x, y)`` on images in
            [-1, 1], per-image distances); default ``build_lpips()`` (needs
            the VGG weights in the torch hub cache).
        gan_weight: weight of the generator's WGAN term (BRICS: 1).
        penalty: ``"r1"`` (default), ``"gp"`` or ``"none"``.
        penalty_weight: its weight (BRICS: 4).
        penalty_every: compute the penalty every this many steps, scaled by
            it (StyleGAN2's lazy regularisation); 1 = every step.
        drift_weight: weight of ``mean(D(real)^2)`` in the critic loss
            (ProGAN's drift term, keeps the unbounded WGAN logits near 0);
            0 = off.
        disc_start: global step from which the GAN terms are on.
        kl_weight: weight of the mean per-sample KL passed as ``kl``.

    The generator step's ``last_layer`` argument is accepted and ignored:
    the weights are fixed (no adaptive GAN weight).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        *,
        pixel_loss: str = "l2",
        pixel_weight: float = 20.0,
        perceptual_weight: float = 5.0,
        perceptual: nn.Module | None = None,
        gan_weight: float = 1.0,
        penalty: str = "r1",
        penalty_weight: float = 4.0,
        penalty_every: int = 1,
        drift_weight: float = 0.0,
        disc_start: int = 0,
        kl_weight: float = 1e-6,
    ):
        super().__init__()
        name = "ReconstructionWGANLoss"
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"{name}: argument 'pixel_loss' must be 'l1' or 'l2', got {pixel_loss!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"{name}: argument 'penalty' must be one of {PENALTIES}, got {penalty!r}")
        for arg, v in (("pixel_weight", pixel_weight), ("perceptual_weight", perceptual_weight),
                       ("gan_weight", gan_weight), ("penalty_weight", penalty_weight),
                       ("drift_weight", drift_weight), ("kl_weight", kl_weight)):
            if not v >= 0:
                raise ValueError(f"{name}: argument '{arg}' must be >= 0, got {v}")
        check_int("penalty_every", penalty_every, where=name, minimum=1)
        self.discriminator = discriminator
        self.pixel_loss = pixel_loss
        self.pixel_weight = float(pixel_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.gan_weight = float(gan_weight)
        self.penalty = penalty
        self.penalty_weight = float(penalty_weight)
        self.penalty_every = penalty_every
        self.drift_weight = float(drift_weight)
        self.disc_start = int(disc_start)
        self.kl_weight = float(kl_weight)
        self.perceptual = perceptual_module(self.perceptual_weight, perceptual)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.perceptual is not None:  # LPIPS stays deterministic
            self.perceptual.eval()
        return self

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        *,
        kl: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator (``optimizer_idx=0``) or critic (1) loss.

        Args:
            inputs, reconstructions: (B, C, H, W) images in [-1, 1].
            optimizer_idx: 0 or 1.
            global_step: compared with ``disc_start``.
            kl: per-sample KL, any shape (its mean is used); generator step.
            last_layer: ignored.
            split: prefix of the log keys.

        Returns:
            ``(loss, log)``; log has detached 0-dim tensors ``{split}/...``:
            generator: total_loss, nll_loss, rec_loss (unweighted pixel
            loss), p_loss, g_loss, disc_factor and (with ``kl``) kl_loss;
            critic: d_loss, wgan_loss, penalty, logits_real, logits_fake,
            disc_factor.
        """
        del last_layer
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                f"ReconstructionWGANLoss: 'inputs' and 'reconstructions' must have the same shape, got "
                f"{tuple(inputs.shape)} and {tuple(reconstructions.shape)}"
            )
        if optimizer_idx not in (0, 1):
            raise ValueError(f"ReconstructionWGANLoss: argument 'optimizer_idx' must be 0 or 1, got {optimizer_idx!r}")
        on = global_step >= self.disc_start
        if optimizer_idx == 0:
            log = self._generator(inputs, reconstructions, on, kl)
        else:
            log = self._critic(inputs, reconstructions, on, global_step)
        log["disc_factor"] = torch.tensor(float(on), device=inputs.device)
        loss = log["total_loss" if optimizer_idx == 0 else "d_loss"]
        return loss, {f"{split}/{k}": v.detach().clone() for k, v in log.items()}

    def _generator(self, inputs, recs, on, kl):
        nll, pix, p = reconstruction_terms(inputs, recs, pixel_loss=self.pixel_loss, pixel_weight=self.pixel_weight,
                                           perceptual=self.perceptual, perceptual_weight=self.perceptual_weight)
        zero = torch.zeros((), dtype=pix.dtype, device=pix.device)
        loss = nll
        log = {}
        if kl is not None:
            kl_mean = kl.mean()
            loss = loss + self.kl_weight * kl_mean
            log["kl_loss"] = kl_mean
        g = zero
        if on and self.gan_weight > 0:
            g = wgan_g_loss(self.discriminator(recs))
            loss = loss + self.gan_weight * g
        log.update(total_loss=loss, nll_loss=nll, rec_loss=pix, p_loss=p, g_loss=g)
        return log

    def _critic(self, inputs, recs, on, global_step):
        zero = torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        if not on:
            # Not started: a zero loss that still touches every parameter
            # (so a DDP-wrapped critic sees a gradient for all of them).
            d = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return {"d_loss": d, "wgan_loss": zero, "penalty": zero, "logits_real": zero, "logits_fake": zero}
        lazy = self.penalty != "none" and self.penalty_weight > 0 and global_step % self.penalty_every == 0
        penalty = zero
        if lazy and self.penalty == "r1":
            penalty, logits_real = r1_penalty(self.discriminator, inputs)
        else:
            logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(recs.detach())
        if lazy and self.penalty == "gp":
            penalty = gradient_penalty(self.discriminator, inputs, recs)
        wgan = wgan_d_loss(logits_real, logits_fake)
        d = wgan + self.penalty_weight * self.penalty_every * penalty
        if self.drift_weight > 0:
            d = d + self.drift_weight * logits_real.square().mean()
        return {"d_loss": d, "wgan_loss": wgan, "penalty": penalty, "logits_real": logits_real.mean(),
                "logits_fake": logits_fake.mean()}
