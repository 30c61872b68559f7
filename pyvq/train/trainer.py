"""The tokenizer trainer: one loop for VQGAN and KL autoencoders.

Per step: the autoencoder (generator) step with reconstruction, perceptual,
codebook/KL and (after ``disc_start``) adaptive-weighted GAN losses, then the
discriminator step. AdamW, warm-up + cosine schedule, gradient clipping,
optional bf16 autocast and weight EMA; DistributedDataParallel under torchrun
(rank 0 logs and checkpoints, metrics are all-reduced); checkpoints
every ``ckpt_every`` steps or ``ckpt_minutes`` minutes and at the end;
``resume=True`` continues from the last one with the same data order.

A model can bring its own training setup (BRICS does) through three
optional methods: ``train_defaults()`` (TrainConfig values used where the
config holds TrainConfig's defaults, see ``TrainConfig``),
``build_loss(config, perceptual=None)`` (a loss module with a
``discriminator`` attribute and ``VQLPIPSWithDiscriminator``'s call
signature) and ``loss_inputs(aux)`` (the generator-step keyword arguments
taken from the model's ``aux``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from pyvq.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pyvq.train.config import TrainConfig
from pyvq.train.distributed import DistInfo, all_reduce_mean, init_distributed
from pyvq.train.logger import RunLogger
from pyvq.train.schedule import warmup_cosine


def build_model(name: str, overrides: dict | None = None, base: str | None = None):
    """A tokenizer with random weights from a registered preset; with
    ``base`` (a run directory or a saved model), an asymmetric model on that
    trained tokenizer (encoder side frozen) whose decoder is the preset's
    relative to the preset's own base (``AsymmetricVQGANConfig.scaled_to``:
    e.g. twice the width for ``asym_vqgan_tiny``); ``overrides`` set decoder
    fields on top."""
    from pyvq.models import _pretrained
    import pyvq.models  # noqa: F401  (registers the presets)

    config = _pretrained.get_preset(name)
    if base is not None:
        from pyvq.models.tokenizers import AsymmetricVQGAN, AsymmetricVQGANConfig

        if not isinstance(config, AsymmetricVQGANConfig):
            raise ValueError(f"build_model: 'base' applies to asymmetric presets, and {name!r} is a "
                             f"{type(config).__name__}")
        base_model = _pretrained.load_run(base)
        return AsymmetricVQGAN.from_base(base_model, **{**config.scaled_to(base_model.config), **(overrides or {})})
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return _pretrained.model_class_for(config)(config)


def trainable_params(module: torch.nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


class _Resumable(torch.utils.data.Sampler):
    """A DistributedSampler's epoch order, starting ``skip`` samples in."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip :])

    def __len__(self):
        return len(self.sampler) - self.skip


class Trainer:
    """Train a tokenizer preset on a dataset into ``out_dir``.

    Args:
        config: a ``TrainConfig``.
        out_dir: the run directory (config.json, log.jsonl, tensorboard/,
            images/, checkpoints/, and the final model in model/).
        resume: continue from ``out_dir``'s latest checkpoint.
        perceptual: a perceptual-loss module to use instead of LPIPS-VGG
            (tests inject a random-backbone LPIPS).
        dataset: a dataset to use instead of ``config.data``.
        model: a model to train instead of a new ``config.model`` preset
            (fine-tuning); parameters with ``requires_grad=False`` (a frozen
            encoder, say) are left out of the optimizer.
    """

    progress_key = "train/rec_loss"  # the scalar the progress bar shows

    def __init__(self, config: TrainConfig, out_dir: str, *, resume: bool = False,
                 perceptual: torch.nn.Module | None = None, dataset=None,
                 model: torch.nn.Module | None = None):
        from pyvq.losses import VQLPIPSWithDiscriminator

        self.config = config
        self.out_dir = out_dir
        self.dist: DistInfo = init_distributed(config.device)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        if model is None:
            model = build_model(config.model, config.model_overrides, config.base)
        if hasattr(model, "train_defaults"):  # the model's own training defaults (see TrainConfig)
            self.config = config = config.with_model_defaults(model.train_defaults())
        self.model = model.to(self.dist.device)
        if hasattr(model, "build_loss"):  # a model with its own loss (BRICS: WGAN + gradient penalty)
            self.loss = model.build_loss(config, perceptual=perceptual).to(self.dist.device)
        else:
            self.loss = VQLPIPSWithDiscriminator(
                config.disc_start,
                codebook_weight=config.codebook_weight,
                pixel_loss=config.pixel_loss,
                pixelloss_weight=config.pixel_weight,
                perceptual_weight=config.perceptual_weight,
                perceptual=perceptual,
                disc_weight=config.disc_weight,
                disc_loss=config.disc_loss,
                kl_weight=config.kl_weight,
            ).to(self.dist.device)
        self.disc = self.loss.discriminator
        c = config
        self.opt_g = self._adamw(trainable_params(self.model), c.lr, c.adam_eps)
        self.opt_d = self._adamw(self.disc.parameters(), c.disc_lr or c.lr,
                                 c.adam_eps if c.disc_adam_eps is None else c.disc_adam_eps)
        self.sched_g, self.sched_d = self._lr_schedule(self.opt_g), self._lr_schedule(self.opt_d)
        self.ema = self._make_ema()
        if dataset is None:
            from pyvq.data import build_dataset

            dataset = build_dataset(c.data, c.image_size, "train", seed=c.seed)
        self.dataset = dataset
        self._finish_setup(resume, {"model": self.model, "disc": self.disc})

    def _finish_setup(self, resume: bool, ddp_modules: dict) -> None:
        """The set-up every trainer shares once model, optimizers and dataset
        exist: resume from the last checkpoint, wrap ``ddp_modules`` as
        ``self.<name>_ddp`` (DDP under torchrun), open the logger, write
        config.json."""
        c = self.config
        if len(self.dataset) < c.batch_size * self.dist.world_size:
            raise ValueError(
                f"{type(self).__name__}: the dataset has {len(self.dataset)} samples, fewer than one global batch "
                f"({c.batch_size} x {self.dist.world_size} processes)"
            )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if resume:
            found = latest_checkpoint(self.out_dir)
            if found is None:
                raise FileNotFoundError(f"{type(self).__name__}: resume=True but {self.out_dir} has no checkpoint")
            info = load_checkpoint(found, self._modules(), optimizers=self._optimizers(),
                                   schedulers=self._schedulers(), map_location=self.dist.device)
            self.step = info["step"]
            self.epoch = info["extra"]["epoch"]
            self.batch_in_epoch = info["extra"]["batch_in_epoch"]
        for name, module in ddp_modules.items():
            if self.dist.distributed:
                ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
                module = DDP(module, device_ids=ids)
            setattr(self, f"{name}_ddp", module)
        self.logger = RunLogger(self.out_dir, enabled=self.dist.is_main)
        if self.dist.is_main:
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(c.to_dict(), f, indent=1)

    # -- state handed to checkpoints
    def _modules(self):
        mods = {"model": self.model, "disc": self.disc}
        if self.ema is not None:
            mods["ema"] = self.ema
        return mods

    def _optimizers(self):
        return {"g": self.opt_g, "d": self.opt_d}

    def _schedulers(self):
        return {"g": self.sched_g, "d": self.sched_d}

    def _loader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.config.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        skip = self.batch_in_epoch * self.config.batch_size
        return DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=_Resumable(sampler, skip),
                          drop_last=True, num_workers=self.config.num_workers)

    def _batches(self):
        while True:
            for batch in self._loader():
                self.batch_in_epoch += 1  # counts batches handed out (a checkpoint resumes after them)
                yield batch[0] if isinstance(batch, (list, tuple)) else batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

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
        conditional = getattr(self.model, "conditional", False)
        with self._autocast():
            if conditional:
                x_rec, aux = self.model_ddp(x, self.step_masks(x))
            else:
                x_rec, aux = self.model_ddp(x)
        x_rec = x_rec.float()
        if hasattr(self.model, "loss_inputs"):  # the model says what its loss takes from aux
            extra = self.model.loss_inputs(aux)
        elif isinstance(aux, dict):  # VQ: the quantizer's loss (a constant for a frozen base)
            extra = {"codebook_loss": aux["loss"].float()}
        elif conditional:  # KL base frozen: the KL term is omitted
            extra = {}
        else:
            extra = {"posterior": aux}
        loss_g, log = self.loss(x, x_rec, 0, self.step, last_layer=self.model.get_last_layer(), **extra)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable_params(self.model), c.grad_clip)
        self.opt_g.step()
        self.sched_g.step()
        if self.step >= c.disc_start:
            loss_d, log_d = self._disc_step(x, x_rec.detach())
            log.update(log_d)
            self.sched_d.step()
        self._update_ema()
        out = {k: float(v) for k, v in log.items()}
        if isinstance(aux, dict) and "perplexity" in aux:
            out["train/perplexity"] = float(aux["perplexity"])
            out["train/usage"] = float(aux["usage"])
        out["train/lr"] = self.opt_g.param_groups[0]["lr"]
        return out

    def _adamw(self, params, lr: float, eps: float) -> torch.optim.AdamW:
        c = self.config
        return torch.optim.AdamW(params, lr=lr, betas=c.betas, eps=eps, weight_decay=c.weight_decay)

    def _lr_schedule(self, opt):
        """Warm-up then cosine decay over the run."""
        c = self.config
        return warmup_cosine(opt, warmup_steps=min(c.warmup_steps, c.steps), total_steps=c.steps,
                             min_ratio=c.min_lr_ratio)

    def _make_ema(self):
        if self.config.ema_decay <= 0:
            return None
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        return AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.config.ema_decay))

    def _update_ema(self) -> None:
        if self.ema is not None:
            # EMA of the parameters; buffers (quantizer statistics, an EMA
            # codebook, norm statistics, a prior's loss history) follow the
            # live model.
            self.ema.update_parameters(self.model)
            with torch.no_grad():
                for mine, live in zip(self.ema.module.buffers(), self.model.buffers()):
                    mine.copy_(live)

    def _disc_step(self, x, x_rec):
        # The loss module calls its discriminator; route it through DDP.
        disc = self.loss.discriminator
        self.loss.discriminator = self.disc_ddp
        try:
            loss_d, log_d = self.loss(x, x_rec, 1, self.step)
        finally:
            self.loss.discriminator = disc
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.config.grad_clip)
        self.opt_d.step()
        return loss_d, log_d

    def save(self) -> str | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.out_dir, self.step, self._modules(), optimizers=self._optimizers(),
                               schedulers=self._schedulers(),
                               extra={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch})

    def train(self, *, progress: bool = True, stop_after: int | None = None) -> dict:
        """Run until ``config.steps`` (or until step ``stop_after``, then
        checkpoint and return: a time-boxed run that ``resume`` continues);
        returns the last logged scalars."""
        from tqdm import tqdm

        c = self.config
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        self.model.train()
        if self.loss is not None:
            self.loss.train()
        batches = self._batches()
        last_ckpt = time.monotonic()
        bar = tqdm(total=c.steps, initial=self.step, disable=not (progress and self.dist.is_main),
                   dynamic_ncols=True, unit="step")
        logged: dict = {}
        sample = None
        while self.step < end:
            x = next(batches).to(self.dist.device)
            sample = x
            scalars = self.train_step(x)
            self.step += 1
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.steps:
                logged = all_reduce_mean(scalars, self.dist)
                self.logger.scalars(self.step, logged)
                bar.set_postfix(loss=f"{logged.get(self.progress_key, float('nan')):.4f}")
            if self.step % c.image_every == 0 or self.step == c.steps:
                self._log_images(sample)
            due = (time.monotonic() - last_ckpt) / 60 >= c.ckpt_minutes
            if self.step % c.ckpt_every == 0 or self.step == end or due:
                self.save()
                last_ckpt = time.monotonic()
        bar.close()
        if self.dist.is_main and self.step == c.steps:
            final = self.ema.module if self.ema is not None else self.model
            final.save_pretrained(os.path.join(self.out_dir, "model"))
        self.logger.close()
        return logged

    @torch.no_grad()
    def _log_images(self, x):
        if not self.dist.is_main:
            return
        self.model.eval()
        x = x[:8]
        x_rec, _ = self.model(x)
        self.model.train()
        self.logger.image_grid(self.step, "reconstruction", torch.cat([x, x_rec.float().clamp(-1, 1)]), nrow=len(x))
