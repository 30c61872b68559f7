"""Training recipes: how each model type is trained, kept out of the models.

A recipe gives the trainers what they need beyond the model itself:

* ``train_defaults(model)``: ``TrainConfig`` values for this model, used
  wherever the run's config still holds TrainConfig's own default
  (``TrainConfig.with_model_defaults``; the resolved values are written to
  the run's config.json).
* tokenizers (``TokenizerRecipe``, used by ``Trainer``):
  ``build_loss(model, config, perceptual=None)``, the loss module (it has a
  ``discriminator`` and ``VQLPIPSWithDiscriminator``'s call signature);
  ``forward(model, batch, trainer)``, the model's ``TokenizerOutput`` on a
  batch; ``loss_inputs(batch, output)``, the generator step's keyword
  arguments taken from that output; ``metrics(output)``, extra scalars to
  log.
* priors (``PriorRecipe``, used by ``PriorTrainer``): ``loss(model, batch)
  -> (loss, logs)``, the prior's own objective.

``recipe_for(model)`` finds the recipe of a model's class, or of the nearest
base class that has one (the MRO); ``register_recipe(ModelClass, recipe)``
adds one, e.g. for a new tokenizer. The built-in recipes: ``VQGAN``
(``VQRecipe``), ``EfficientVQGAN`` (``EfficientVQRecipe``: ``VQRecipe``
with the paper's L2 pixel loss), ``AutoencoderKL`` (``KLRecipe``),
``AsymmetricVQGAN`` (``AsymmetricRecipe``), ``BRICS`` (``BRICSRecipe``),
``MultinomialDiffusion`` and ``GaussianDiffusion`` (``MultinomialRecipe``,
``GaussianRecipe``), ``MultiGrainedTransformer`` (``MultiGrainedRecipe``).
"""

from __future__ import annotations

import torch
from torch import nn

from pyvq.models import (
    BRICS,
    VQGAN,
    AsymmetricVQGAN,
    AutoencoderKL,
    EfficientVQGAN,
    GaussianDiffusion,
    MultiGrainedTransformer,
    MultinomialDiffusion,
)
from pyvq.models.outputs import TokenizerOutput, VQAux

__all__ = [
    "AsymmetricRecipe",
    "BRICSRecipe",
    "EfficientVQRecipe",
    "GaussianRecipe",
    "KLRecipe",
    "MultiGrainedRecipe",
    "MultinomialRecipe",
    "PriorRecipe",
    "Recipe",
    "TokenizerRecipe",
    "VQRecipe",
    "recipe_for",
    "register_recipe",
]


class Recipe:
    """The part every recipe has; ``trainer`` names the trainer class that
    runs it (for error messages)."""

    trainer = "a trainer"

    def train_defaults(self, model: nn.Module) -> dict:
        """``TrainConfig`` field values this model trains with by default
        (none: TrainConfig's own defaults)."""
        return {}


class TokenizerRecipe(Recipe):
    """The adversarial autoencoder recipe (taming-transformers' VQGAN):
    ``VQLPIPSWithDiscriminator`` with L1/L2 + LPIPS + PatchGAN and the
    adaptive GAN weight, configured by the ``TrainConfig`` loss fields, and
    TrainConfig's optimiser defaults. Subclasses say what the loss takes from
    the model's output."""

    trainer = "Trainer"

    def build_loss(self, model: nn.Module, config, perceptual: nn.Module | None = None) -> nn.Module:
        """The loss module for ``config`` (a ``TrainConfig``); ``perceptual``
        replaces LPIPS-VGG (tests inject a random-backbone LPIPS)."""
        from pyvq.losses import VQLPIPSWithDiscriminator

        c = config
        return VQLPIPSWithDiscriminator(
            c.disc_start,
            discriminator=self.build_discriminator(model, c),
            codebook_weight=c.codebook_weight,
            pixel_loss=c.pixel_loss,
            pixelloss_weight=c.pixel_weight,
            perceptual_weight=c.perceptual_weight,
            perceptual=perceptual,
            disc_weight=c.disc_weight,
            disc_loss=c.disc_loss,
            kl_weight=c.kl_weight,
        )

    def build_discriminator(self, model: nn.Module, config) -> nn.Module | None:
        """The discriminator ``config.disc_type`` names; None for the loss
        module's own PatchGAN."""
        if config.disc_type == "projected":
            from pyvq.losses import ProjectedDiscriminator

            return ProjectedDiscriminator(config.image_size, backbone=config.disc_backbone)
        return None

    def forward(self, model: nn.Module, batch: torch.Tensor, trainer) -> TokenizerOutput:
        """The (possibly DDP-wrapped) model's output on an image batch."""
        return model(batch)

    def loss_inputs(self, batch: torch.Tensor, output: TokenizerOutput) -> dict:
        """Keyword arguments of the loss's generator step from the output
        (besides the images, the reconstruction and the last layer)."""
        return {}

    def metrics(self, output: TokenizerOutput) -> dict:
        """Scalars to log besides the loss's own (``train/...`` names)."""
        return {}


def _vq_loss_inputs(aux: VQAux) -> dict:
    return {"codebook_loss": aux.loss.float()}


def _vq_metrics(aux: VQAux) -> dict:
    return {"train/perplexity": float(aux.perplexity), "train/usage": float(aux.usage)}


class VQRecipe(TokenizerRecipe):
    """VQGAN: the quantiser's VQ loss enters the loss (``codebook_weight``);
    the batch's code perplexity and usage are logged."""

    def loss_inputs(self, batch, output):
        return _vq_loss_inputs(output.aux)

    def metrics(self, output):
        return _vq_metrics(output.aux)


class EfficientVQRecipe(VQRecipe):
    """EfficientVQGAN (the paper's eq. 1): perceptual + L2 + VQ +
    adaptive-weight GAN, i.e. ``VQRecipe`` with an L2 pixel loss; the
    discriminator is the default PatchGAN."""

    def train_defaults(self, model):
        return {"pixel_loss": "l2"}


class KLRecipe(TokenizerRecipe):
    """AutoencoderKL: the posterior's KL term enters the loss (``kl_weight``)."""

    def loss_inputs(self, batch, output):
        return {"posterior": output.aux}


class AsymmetricRecipe(TokenizerRecipe):
    """AsymmetricVQGAN (decoder-only training on a frozen base): each step
    the decoder is conditioned on the trainer's ``step_masks`` (random masks
    and the full mask on alternate steps). A VQ base's VQ loss enters the
    loss as a constant (no gradient reaches the frozen side) and its code
    statistics are logged; a KL base's KL term is left out."""

    def forward(self, model, batch, trainer):
        return model(batch, trainer.step_masks(batch))

    def loss_inputs(self, batch, output):
        return _vq_loss_inputs(output.aux) if isinstance(output.aux, VQAux) else {}

    def metrics(self, output):
        return _vq_metrics(output.aux) if isinstance(output.aux, VQAux) else {}


class BRICSRecipe(TokenizerRecipe):
    """BRICS (appendix A.3): L2 x 20, LPIPS x 5, Wasserstein GAN x 1 with an
    R1 gradient penalty x 4 (``gan_penalty``, ``gan_penalty_weight`` of the
    model config) on a StyleGAN2 residual discriminator
    (``ReconstructionWGANLoss``); Adam, lr 2e-3 (constant, no warm-up),
    betas (0, 0.99), eps 1e-15 for the autoencoder and grids and 1e-8 for
    the discriminator, no gradient clipping; the KL variant's KL term weighted
    by the model config's ``kl_weight``.

    ``disc_start`` is not among the defaults: the GAN terms start at the
    trainer's default step (500), after a reconstruction-only warm-up (a
    WGAN critic switched on at step 0 destabilised the tiny preset)."""

    def train_defaults(self, model):
        return {
            "lr": 2e-3,
            "betas": (0.0, 0.99),
            "adam_eps": 1e-15,
            "disc_adam_eps": 1e-8,
            "warmup_steps": 0,
            "min_lr_ratio": 1.0,
            "grad_clip": 0.0,
            "disc_weight": 1.0,
            "pixel_loss": "l2",
            "pixel_weight": 20.0,
            "perceptual_weight": 5.0,
            "kl_weight": model.config.kl_weight,
        }

    def build_loss(self, model, config, perceptual=None):
        """``ReconstructionWGANLoss`` with a ``ResidualDiscriminator`` at
        ``config.image_size``, sized by the model config's ``disc_*`` fields."""
        from pyvq.losses.wgan import ReconstructionWGANLoss
        from pyvq.nn.stylegan import ResidualDiscriminator

        c, t = model.config, config
        if t.disc_type != "patchgan":
            raise ValueError(f"TrainConfig: field 'disc_type' must be 'patchgan' for BRICS (its discriminator is "
                             f"the StyleGAN2 residual one), got {t.disc_type!r}")
        disc = ResidualDiscriminator(
            t.image_size, in_channels=c.out_channels, channels=c.disc_channels,
            max_channels=c.disc_max_channels, mbstd_group=c.disc_mbstd_group,
        )
        return ReconstructionWGANLoss(
            disc, pixel_loss=t.pixel_loss, pixel_weight=t.pixel_weight, perceptual_weight=t.perceptual_weight,
            perceptual=perceptual, gan_weight=t.disc_weight, penalty=c.gan_penalty,
            penalty_weight=c.gan_penalty_weight, disc_start=t.disc_start, kl_weight=t.kl_weight,
        )

    def loss_inputs(self, batch, output):
        """The KL variant's per-sample KL term (``kl``), nothing otherwise."""
        return {"kl": output.aux.kl} if output.aux.kl is not None else {}


class PriorRecipe(Recipe):
    """A prior trained on cached codes by its own objective: ``model(codes)
    -> (loss, logs)`` (the prior's ``training_loss``)."""

    trainer = "PriorTrainer"

    def loss(self, model: nn.Module, batch: torch.Tensor):
        """(0-d loss, dict of scalars to log) of the (possibly DDP-wrapped)
        prior on a batch of code maps."""
        return model(batch)


class MultinomialRecipe(PriorRecipe):
    """VQ-DDM (multinomial diffusion): DDPM-style training."""

    def train_defaults(self, model):
        """Adam(W) lr 2e-4, betas (0.9, 0.999), no weight decay, no warm-up,
        gradient norm clipped at 1.0 (DDPM's; note the loss is on the
        sum-over-T scale, T times improved DDPM's mean-over-t loss, which
        Adam's update ignores but the clip threshold does not).
        ``ema_decay`` is 0 (off) because short runs cannot warm an EMA up;
        full-length runs should set 0.9999 as DDPM does."""
        return {
            "lr": 2e-4,
            "betas": (0.9, 0.999),
            "weight_decay": 0.0,
            "warmup_steps": 0,
            "grad_clip": 1.0,
            "ema_decay": 0.0,
        }


class GaussianRecipe(PriorRecipe):
    """Key-code (Gaussian) diffusion: the DDPM / ADM recipe."""

    def train_defaults(self, model):
        """Adam betas (0.9, 0.999), no weight decay, a short warm-up and
        gradient clipping at 1. The learning rate is ADM's 1e-4 for
        paper-sized UNets (model_channels >= 128) and 2e-4 for the small
        ones, which are trained for few steps. EMA is off by default (0.0):
        with ADM's 0.9999 the average of a run of a few thousand steps is
        still close to the random initialisation; set ``ema_decay`` (e.g.
        0.9999) for long runs."""
        return {
            "lr": 1e-4 if model.config.model_channels >= 128 else 2e-4,
            "betas": (0.9, 0.999),
            "weight_decay": 0.0,
            "warmup_steps": 100,
            "grad_clip": 1.0,
            "ema_decay": 0.0,
        }


class MultiGrainedRecipe(PriorRecipe):
    """Efficient-VQGAN's multi-grained transformer: masked visual token
    modelling (the prior's ``training_loss``), MaskGIT's optimiser."""

    def train_defaults(self, model):
        """AdamW betas (0.9, 0.96), weight decay 0.045 (MaskGIT's),
        gradient norm clipped at 1, a short warm-up, EMA off (short runs
        cannot warm it up). The learning rate is MaskGIT's 1e-4 for
        paper-sized transformers (width >= 256) and 1e-3 for the small ones,
        which are trained for few steps."""
        return {
            "lr": 1e-4 if model.config.width >= 256 else 1e-3,
            "betas": (0.9, 0.96),
            "weight_decay": 0.045,
            "warmup_steps": 20,
            "grad_clip": 1.0,
            "ema_decay": 0.0,
        }


# ------------------------------------------------------------------ registry
_RECIPES: dict[type, Recipe] = {}


def register_recipe(model_type: type, recipe: Recipe) -> None:
    """Train models of class ``model_type`` (and of its subclasses without a
    recipe of their own) with ``recipe``; replaces an earlier registration."""
    if not isinstance(model_type, type):
        raise TypeError(f"register_recipe: argument 'model_type' must be a class, got {type(model_type).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe: argument 'recipe' must be a pyvq.train.recipes.Recipe, got "
                        f"{type(recipe).__name__}")
    _RECIPES[model_type] = recipe


def recipe_for(model) -> Recipe:
    """The recipe of ``model`` (a model or a model class): the one registered
    for its class or the nearest base class in its MRO.

    Raises:
        TypeError: no class in the MRO has a recipe.
    """
    cls = model if isinstance(model, type) else type(model)
    for klass in cls.__mro__:
        if klass in _RECIPES:
            return _RECIPES[klass]
    known = ", ".join(sorted(k.__name__ for k in _RECIPES))
    raise TypeError(
        f"recipe_for: argument 'model' must be a model type with a training recipe ({known}, or a subclass), "
        f"got a {cls.__name__}; add one with pyvq.train.recipes.register_recipe({cls.__name__}, recipe)"
    )


register_recipe(VQGAN, VQRecipe())
register_recipe(EfficientVQGAN, EfficientVQRecipe())
register_recipe(AutoencoderKL, KLRecipe())
register_recipe(AsymmetricVQGAN, AsymmetricRecipe())
register_recipe(BRICS, BRICSRecipe())
register_recipe(MultinomialDiffusion, MultinomialRecipe())
register_recipe(GaussianDiffusion, GaussianRecipe())
register_recipe(MultiGrainedTransformer, MultiGrainedRecipe())
