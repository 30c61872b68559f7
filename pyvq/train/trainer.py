"""The tokenizer trainer: one loop for VQGAN, KL, BRICS and asymmetric autoencoders.

Per step: the autoencoder (generator) step with reconstruction, perceptual,
codebook/KL and (after ``disc_start``) adaptive-weighted GAN losses, then the
discriminator step. AdamW, warm-up + cosine schedule, gradient clipping,
optional bf16 autocast and weight EMA; DistributedDataParallel under torchrun
(rank 0 logs and checkpoints, metrics are all-reduced); checkpoints
every ``ckpt_every`` steps or ``ckpt_minutes`` minutes and at the end;
``resume=True`` continues from the last one with the same data order
(``pyvq.train.base.BaseTrainer``).

What is model-specific is the model's recipe (``pyvq.train.recipes``,
looked up by model type): its ``TrainConfig`` defaults, its loss module,
how the model runs on a batch and what the loss takes from its typed
output (``pyvq.models.outputs.TokenizerOutput``).
"""

from __future__ import annotations

import dataclasses

import torch

from pyvq.train.base import BaseTrainer, trainable_params
from pyvq.train.config import TrainConfig
from pyvq.train.recipes import TokenizerRecipe

__all__ = ["Trainer", "build_model", "trainable_params"]


def build_model(name: str, overrides: dict | None = None, base: str | None = None):
    """A tokenizer with random weights from a registered preset; with
    ``base`` (a run directory or a saved model), an asymmetric model on that
    trained tokenizer (encoder side frozen) whose decoder is the preset's
    relative to the preset's own base (``AsymmetricVQGANConfig.scaled_to``:
    e.g. twice the width for ``asym_vqgan_tiny``); ``overrides`` set decoder
    fields on top."""
    from pyvq.models import get_preset, load_run, model_class_for  # importing pyvq.models registers the presets

    config = get_preset(name)
    if base is not None:
        from pyvq.models.tokenizers import AsymmetricVQGAN, AsymmetricVQGANConfig

        if not isinstance(config, AsymmetricVQGANConfig):
            raise ValueError(f"build_model: 'base' applies to asymmetric presets, and {name!r} is a "
                             f"{type(config).__name__}")
        base_model = load_run(base)
        return AsymmetricVQGAN.from_base(base_model, **{**config.scaled_to(base_model.config), **(overrides or {})})
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return model_class_for(config)(config)


class Trainer(BaseTrainer):
    """Train a tokenizer preset on a dataset into ``out_dir``.

    Args:
        config: a ``TrainConfig``.
        out_dir: the run directory (config.json, log.jsonl, tensorboard/,
            images/, checkpoints/, and the final model in model/).
        resume: continue from ``out_dir``'s latest checkpoint.
        overwrite: start afresh into a non-empty ``out_dir`` (its contents
            are moved aside; ``BaseTrainer``).
        perceptual: a perceptual-loss module to use instead of LPIPS-VGG
            (tests inject a random-backbone LPIPS).
        dataset: a dataset to use instead of ``config.data``.
        model: a model to train instead of a new ``config.model`` preset
            (fine-tuning); parameters with ``requires_grad=False`` (a frozen
            encoder, say) are left out of the optimizer.

    Besides ``BaseTrainer``'s attributes: ``loss`` (the recipe's loss
    module), ``disc`` (its discriminator), ``opt_d`` and ``sched_d``.
    """

    progress_key = "train/rec_loss"  # the scalar the progress bar shows
    recipe_kind = TokenizerRecipe

    def __init__(self, config: TrainConfig, out_dir: str, *, resume: bool = False, overwrite: bool = False,
                 perceptual: torch.nn.Module | None = None, dataset=None,
                 model: torch.nn.Module | None = None):
        self.perceptual = perceptual  # read by _setup_optimization
        super().__init__(config, out_dir, resume=resume, overwrite=overwrite, model=model, dataset=dataset)

    def _new_model(self) -> torch.nn.Module:
        c = self.config
        return build_model(c.model, c.model_overrides, c.base)

    def _new_dataset(self):
        from pyvq.data import build_dataset

        c = self.config
        return build_dataset(c.data, c.image_size, "train", seed=c.seed)

    def _setup_optimization(self) -> None:
        c = self.config
        self.loss = self.recipe.build_loss(self.model, c, perceptual=self.perceptual).to(self.dist.device)
        self.disc = self.loss.discriminator
        super()._setup_optimization()
        self.opt_d = self._adamw([p for p in self.disc.parameters() if p.requires_grad], c.disc_lr or c.lr,
                                 c.adam_eps if c.disc_adam_eps is None else c.disc_adam_eps)
        self.sched_d = self._lr_schedule(self.opt_d)

    # -- state handed to checkpoints
    def _trained_modules(self) -> dict:
        return {"model": self.model, "disc": self.disc}

    def _optimizers(self) -> dict:
        return {"g": self.opt_g, "d": self.opt_d}

    def _schedulers(self) -> dict:
        return {"g": self.sched_g, "d": self.sched_d}

    def step_masks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) masks (1 = region to generate) for a conditional
        (mask-guided) decoder: random irregular/box masks on even steps, the
        full mask on odd steps (nothing given: the decoder must rely on the
        latent), as the Asymmetric VQGAN paper alternates. Fixed by
        (seed, step, sample) so a resumed run sees the same masks."""
        from pyvq.data import MaskGenerator

        B, _, H, W = x.shape
        if self.step % 2 == 1:
            return torch.ones(B, 1, H, W, device=x.device)
        gen = MaskGenerator(kind="mixed", seed=self.config.seed)
        return torch.stack([gen(H, W, index=self.step * B + i) for i in range(B)]).to(x.device)

    def train_step(self, x: torch.Tensor) -> dict:
        """One generator step and one discriminator step; returns scalars."""
        c = self.config
        with self._autocast():
            output = self.recipe.forward(self.model_ddp, x, self)
        x_rec = output.x_rec.float()
        extra = self.recipe.loss_inputs(x, output)
        loss_g, log = self.loss(x, x_rec, 0, self.step, last_layer=self.model.get_last_layer(), **extra)
        g_stepped = self._model_step(loss_g)  # False: a non-finite step, skipped (BaseTrainer)
        if self.step >= c.disc_start:
            loss_d, log_d = self._disc_step(x, x_rec.detach())
            log.update(log_d)
        if g_stepped:
            self._update_ema()
        out = {k: float(v) for k, v in log.items()}
        out.update(self.recipe.metrics(output))
        out["train/lr"] = self.opt_g.param_groups[0]["lr"]
        return out

    def _disc_step(self, x, x_rec):
        # The loss module calls its discriminator; route it through DDP.
        disc = self.loss.discriminator
        self.loss.discriminator = self.disc_ddp
        try:
            loss_d, log_d = self.loss(x, x_rec, 1, self.step)
        finally:
            self.loss.discriminator = disc
        if self._optimizer_step(loss_d, self.opt_d, list(self.disc.parameters()), "d"):
            self.sched_d.step()
        return loss_d, log_d

    @torch.no_grad()
    def _log_images(self, x):
        """``images/reconstruction_<step>.png``: labelled rows of up to 8
        training images and their reconstructions; for a mask-conditioned
        (asymmetric) decoder also the mask, the decoder's masked input and
        the reconstruction with and without the mask. The masks are random
        ones (as on even training steps), fixed by (seed, tile), so every
        logged step shows the same holes."""
        if not self.dist.is_main:
            return
        from pyvq.train.figures import EDGE_NOTE, tint_holes
        from pyvq.train.recipes import AsymmetricRecipe

        self.model.eval()
        x = x[:8]
        rows, labels = [x], ["input"]
        if isinstance(self.recipe, AsymmetricRecipe):
            from pyvq.data import MaskGenerator

            B, _, H, W = x.shape
            gen = MaskGenerator(kind="mixed", seed=self.config.seed)
            mask = torch.stack([gen(H, W, index=i) for i in range(B)]).to(x.device, x.dtype)
            rows += [(mask * 2 - 1).expand(-1, 3, -1, -1), tint_holes(x, mask),
                     self.model(x, mask).x_rec, self.model(x).x_rec]
            labels += ["mask\n(white = hole)", "decoder input\n(holes magenta)", "reconstruction\nwith mask",
                       "reconstruction\nwithout mask"]
        else:
            rows.append(self.model(x).x_rec)
            labels.append("reconstruction")
        self.model.train()
        images = torch.cat([r.float().clamp(-1, 1) for r in rows])
        self.logger.image_grid(self.step, "reconstruction", images, nrow=len(x), row_labels=labels,
                               title=f"step {self.step}", caption=EDGE_NOTE, scale=2 if x.shape[-1] <= 64 else 1)

