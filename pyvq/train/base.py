"""What every trainer shares: the run set-up, the data order, checkpoints
and the training loop.

``BaseTrainer.__init__`` sets a run up in one order for every trainer:
process group (``init_distributed``), seed (identical initial weights on
every rank), the model (``_new_model`` when none is given), its recipe
(``pyvq.train.recipes.recipe_for``) and the recipe's ``train_defaults``
(``TrainConfig.with_model_defaults``), the loss and optimizers
(``_setup_optimization``), the weight EMA, the dataset (``_new_dataset``
when none is given), then resume, DDP wrapping, the logger and config.json.
Subclasses (``Trainer``, ``PriorTrainer``) add their modules and optimizers
through the hooks and write ``train_step``.

Faults. A step whose loss or gradient norm is not finite (NaN or inf) is
skipped: no optimizer step, no scheduler step, no EMA update, and the
modules' buffers (an EMA codebook, norm statistics, a prior's loss
history) are put back as they were before the step; every rank takes the
same decision (the flag is all-reduced). The step still counts (its batch
is consumed), ``train/nonfinite_steps`` (the run's total) is logged with
every row and a bad step always writes one, and a ``NonFiniteStepWarning``
names it. More than ``max_nonfinite_steps`` bad steps in a row raise
``NonFiniteLossError`` without writing a checkpoint (the last one on disk
holds the last good state; a skipped step changes no weights, so one
written during a short run of bad steps does too). A checkpoint that cannot
be written during the run (a full disk, say) is reported with a
``CheckpointWarning`` and training continues, since the previous checkpoint
is intact; the run's last checkpoint (at ``config.steps`` or ``stop_after``)
failing raises ``CheckpointWriteError``, so that no run ends as if saved.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from pyvq.train.checkpoint import (
    CheckpointWarning,
    CheckpointWriteError,
    CorruptCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pyvq.train.config import TrainConfig
from pyvq.train.distributed import DistInfo, all_reduce_mean, collective_guard, init_distributed
from pyvq.train.logger import RunLogger
from pyvq.train.recipes import Recipe, recipe_for
from pyvq.train.schedule import warmup_cosine

__all__ = ["BaseTrainer", "NonFiniteLossError", "NonFiniteStepWarning", "trainable_params"]


class NonFiniteLossError(RuntimeError):
    """More than ``TrainConfig.max_nonfinite_steps`` consecutive training steps
    had a non-finite loss or gradient norm; the message names the step, the
    non-finite terms and the limit. ``step`` and ``terms`` hold them too."""

    def __init__(self, message: str, *, step: int, terms: list):
        super().__init__(message)
        self.step, self.terms = step, terms


class NonFiniteStepWarning(UserWarning):
    """A training step was skipped because its loss or gradient norm was not finite."""


def trainable_params(module: torch.nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


class _Resumable(torch.utils.data.Sampler):
    """A DistributedSampler's epoch order, starting ``skip`` samples in."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return iter(list(self.sampler)[self.skip :])

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class BaseTrainer:
    """A training run of ``model`` into ``out_dir`` (see the module docstring).

    Args:
        config: a ``TrainConfig``.
        out_dir: the run directory (config.json, log.jsonl, tensorboard/,
            checkpoints/, the final model in model/).
        resume: continue from ``out_dir``'s latest checkpoint.
        model: the model to train; None: ``_new_model()`` builds it.
        dataset: the training data; None: ``_new_dataset()`` builds it.

    Attributes after set-up: ``config`` (with the recipe's defaults),
    ``dist``, ``model``, ``recipe``, ``loss`` (None without a loss module),
    ``opt_g``, ``sched_g``, ``ema``, ``dataset``, ``step``, ``epoch``,
    ``sample_in_epoch`` (samples of this epoch's order handed out to all
    ranks together), ``batch_in_epoch`` (the same in global batches),
    ``logger`` and ``<name>_ddp`` for every module of ``_trained_modules()``.

    Resuming on a different number of processes (or batch size) keeps the
    step count, the LR schedule (a function of the step), the epoch and the
    position in the epoch's sample order, counted in samples: the new ranks
    start that many samples into the same order (rounded down to a multiple
    of the world size, so at most world_size - 1 samples are seen twice) and
    the batches per epoch follow the new global batch. Each step then takes
    the new global batch (batch_size x world size; the learning rate is not
    rescaled). A warning says so. With batch_size x world size unchanged
    (e.g. 2 x 2 resumed as 4 x 1) every step sees the samples it would have
    seen without the change.

    A collective that fails because another rank died or is stuck (after
    ``TrainConfig.dist_timeout_s``) raises ``DistributedFailure`` with a
    one-line message, after the process group is destroyed.
    """

    progress_key = "train/loss"  # the scalar the progress bar shows
    recipe_kind: type = Recipe  # the kind of recipe this trainer runs

    def __init__(self, config: TrainConfig, out_dir: str, *, resume: bool = False,
                 model: torch.nn.Module | None = None, dataset=None):
        self.config = config
        self.out_dir = out_dir
        self.dist: DistInfo = init_distributed(config.device, timeout_s=config.dist_timeout_s)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.dataset = dataset
        if model is None:
            model = self._new_model()
        self.recipe = self._recipe_for(model)
        self.config = config.with_model_defaults(self.recipe.train_defaults(model))
        self.model = model.to(self.dist.device)
        self.loss = None
        self._setup_optimization()
        self.ema = self._make_ema()
        if self.dataset is None:
            self.dataset = self._new_dataset()
        self._finish_setup(resume)

    # -- set-up hooks
    def _new_model(self) -> torch.nn.Module:
        """The model to train when none is given."""
        raise ValueError(f"{type(self).__name__}: pass a model")

    def _new_dataset(self):
        """The training data when none is given."""
        raise ValueError(f"{type(self).__name__}: pass a dataset")

    def _recipe_for(self, model: torch.nn.Module) -> Recipe:
        recipe = recipe_for(model)
        if not isinstance(recipe, self.recipe_kind):
            raise TypeError(f"{type(self).__name__}: argument 'model' must be a model this trainer runs (a "
                            f"{self.recipe_kind.__name__}), got a {type(model).__name__}, which trains with "
                            f"{recipe.trainer}")
        return recipe

    def _setup_optimization(self) -> None:
        """The model's optimizer and schedule (subclasses add a loss module
        and more optimizers)."""
        c = self.config
        self.opt_g = self._adamw(trainable_params(self.model), c.lr, c.adam_eps)
        self.sched_g = self._lr_schedule(self.opt_g)

    def _finish_setup(self, resume: bool) -> None:
        """The set-up once model, optimizers and dataset exist: resume from
        the last checkpoint, wrap ``_trained_modules()`` as
        ``self.<name>_ddp`` (DDP under torchrun), open the logger, write
        config.json."""
        c = self.config
        if len(self.dataset) < c.batch_size * self.dist.world_size:
            raise ValueError(
                f"{type(self).__name__}: the dataset has {len(self.dataset)} samples, fewer than one global batch "
                f"({c.batch_size} x {self.dist.world_size} processes)"
            )
        self.step, self.epoch, self.sample_in_epoch = 0, 0, 0
        # Run state of the non-finite guard and the logger (train() may be called again after a stop_after).
        self.nonfinite_steps, self._nonfinite_streak, self._skipped = 0, 0, []
        self._last_saved, self._logger_closed = None, False
        if resume:
            found = latest_checkpoint(self.out_dir)
            if found is None:
                raise FileNotFoundError(f"{type(self).__name__}: resume=True but {self.out_dir} has no checkpoint")
            info = load_checkpoint(found, self._modules(), optimizers=self._optimizers(),
                                   schedulers=self._schedulers(), map_location=self.dist.device)
            self.step = info["step"]
            self._resume_position(info["extra"], found)
            self.nonfinite_steps = int(info["extra"].get("nonfinite_steps", 0))
        for name, module in self._trained_modules().items():
            if self.dist.distributed:
                ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
                with collective_guard(self.dist, f"wrapping {name!r} in DDP"):  # DDP broadcasts rank 0's weights
                    module = DDP(module, device_ids=ids)
            setattr(self, f"{name}_ddp", module)
        self.logger = RunLogger(self.out_dir, enabled=self.dist.is_main)
        if self.dist.is_main:
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(self._config_record(), f, indent=1)

    def _config_record(self) -> dict:
        """What config.json holds: the config's fields (a subclass may leave
        out those its runs do not use)."""
        return self.config.to_dict()

    def _resume_position(self, extra: dict, path: str) -> None:
        """The epoch and the position in it from a checkpoint's ``extra``,
        kept in samples when the world size or batch size changed (see the
        class docstring). Checkpoints without ``world_size``/``batch_size``
        (older ones) are taken to match this run."""
        c, world = self.config, self.dist.world_size
        self.epoch = int(extra["epoch"])
        saved_world = int(extra.get("world_size", world))
        saved_batch = int(extra.get("batch_size", c.batch_size))
        old_style = int(extra["batch_in_epoch"]) * saved_batch * saved_world  # checkpoints before sample_in_epoch
        self.sample_in_epoch = int(extra.get("sample_in_epoch", old_style))
        if (saved_world, saved_batch) != (world, c.batch_size) and self.dist.is_main:
            per_epoch = len(self.dataset) // world // c.batch_size
            left = max(0, (len(self.dataset) // world - self.sample_in_epoch // world) // c.batch_size)
            warnings.warn(
                f"{type(self).__name__}: resuming {path} (written by {saved_world} process(es) x batch_size "
                f"{saved_batch}) on {world} process(es) x batch_size {c.batch_size}: the global batch is "
                f"{world * c.batch_size} (was {saved_world * saved_batch}); kept: step {self.step}, the LR schedule "
                f"and the position in the data ({self.sample_in_epoch} samples into epoch {self.epoch}); an epoch now "
                f"has {per_epoch} steps ({left} left in this one)", stacklevel=3)

    @property
    def batch_in_epoch(self) -> int:
        """Global batches of the current epoch handed out (at this run's
        world size and batch size)."""
        return self.sample_in_epoch // (self.config.batch_size * self.dist.world_size)

    # -- state handed to checkpoints
    def _trained_modules(self) -> dict:
        """The modules trained (and DDP-wrapped), by name."""
        return {"model": self.model}

    def _modules(self) -> dict:
        mods = dict(self._trained_modules())
        if self.ema is not None:
            mods["ema"] = self.ema
        return mods

    def _optimizers(self) -> dict:
        return {"g": self.opt_g}

    def _schedulers(self) -> dict:
        return {"g": self.sched_g}

    # -- data
    def _loader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.config.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        skip = self.sample_in_epoch // self.dist.world_size  # this rank's share of the samples handed out
        return DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=_Resumable(sampler, skip),
                          drop_last=True, num_workers=self.config.num_workers)

    def _batches(self):
        while True:
            for batch in self._loader():
                # counts samples handed out to all ranks (a checkpoint resumes after them)
                self.sample_in_epoch += self.config.batch_size * self.dist.world_size
                yield batch[0] if isinstance(batch, (list, tuple)) else batch
            self.epoch += 1
            self.sample_in_epoch = 0

    # -- optimization
    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _adamw(self, params, lr: float, eps: float) -> torch.optim.AdamW:
        c = self.config
        return torch.optim.AdamW(params, lr=lr, betas=c.betas, eps=eps, weight_decay=c.weight_decay)

    def _lr_schedule(self, opt):
        """Warm-up then cosine decay over the run."""
        c = self.config
        return warmup_cosine(opt, warmup_steps=min(c.warmup_steps, c.steps), total_steps=c.steps,
                             min_ratio=c.min_lr_ratio)

    def _optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params,
                        name: str = "g") -> bool:
        """Backward ``loss``, clip the gradients of ``params`` at
        ``grad_clip`` (when > 0), step ``optimizer``; returns whether it
        stepped. It does not when the loss or the gradients' total norm is
        not finite on any rank (the backward still runs, as DDP needs it on
        every rank); the step is then recorded as non-finite (``name``
        names the optimizer in the messages)."""
        params = list(params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        loss_ok = torch.isfinite(loss.detach()).all()
        ok = bool(loss_ok & torch.isfinite(norm))  # one host sync on the good path
        if self.dist.distributed:  # one rank skipping alone would desynchronise the weights
            ok = all_reduce_mean({"ok": float(ok)}, self.dist)["ok"] == 1.0
        if not ok:
            why = (f"loss {float(loss.detach().float().sum())}" if not bool(loss_ok) else
                   f"gradient norm {float(norm)}" if not bool(torch.isfinite(norm)) else
                   "non-finite on another rank")
            self._skipped.append(f"optimizer {name!r}: {why}")
            return False
        optimizer.step()
        return True

    def _model_step(self, loss: torch.Tensor) -> bool:
        """``_optimizer_step`` of the model's trainable parameters, then
        ``sched_g`` (not when the step was skipped); returns whether it stepped."""
        if not self._optimizer_step(loss, self.opt_g, trainable_params(self.model), "g"):
            return False
        self.sched_g.step()
        return True

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

    # -- the run
    def train_step(self, batch: torch.Tensor) -> dict:
        """One optimization step on ``batch``; returns scalars to log."""
        raise NotImplementedError

    def save(self) -> str | None:
        """Checkpoint the run (rank 0; None elsewhere); CheckpointWriteError
        when it cannot be written (the previous checkpoint is then intact)."""
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.out_dir, self.step, self._modules(), optimizers=self._optimizers(),
                               schedulers=self._schedulers(),
                               extra={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                      "sample_in_epoch": self.sample_in_epoch, "world_size": self.dist.world_size,
                                      "batch_size": self.config.batch_size,
                                      "nonfinite_steps": self.nonfinite_steps})

    def _save_in_run(self, last: bool) -> None:
        """``save``; a failure warns and the run goes on, except for the
        run's last checkpoint (``last``), whose failure is raised."""
        try:
            path = self.save()
        except CheckpointWriteError as exc:
            if last:
                raise
            warnings.warn(f"{type(self).__name__}: step {self.step}: {exc}. Training continues; the next "
                          f"checkpoint is due in at most {self.config.ckpt_every} steps", CheckpointWarning,
                          stacklevel=3)
            return
        if path is not None:
            self._last_saved = path

    def _buffers(self) -> list:
        """Every buffer of the trained modules and the loss module, once each."""
        seen, out = set(), []
        mods = list(self._trained_modules().values()) + ([self.loss] if self.loss is not None else [])
        for module in mods:
            for b in module.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    out.append(b)
        return out

    def _last_checkpoint(self) -> str:
        """The run's newest valid checkpoint, for messages."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            try:
                return latest_checkpoint(self.out_dir) or "none (no checkpoint was written yet)"
            except CorruptCheckpointError:
                return "none (no valid checkpoint on disk)"

    def _nonfinite_step(self, scalars: dict, skipped: list) -> NonFiniteLossError | None:
        """Count a skipped step and warn; the error that stops the run when
        there were too many in a row."""
        self.nonfinite_steps += 1
        self._nonfinite_streak += 1
        terms = skipped + [f"{k}={v}" for k, v in sorted(scalars.items())
                           if isinstance(v, float) and not math.isfinite(v)]
        limit = self.config.max_nonfinite_steps
        name = type(self).__name__
        if self._nonfinite_streak > limit:
            last = self._last_saved or self._last_checkpoint()
            return NonFiniteLossError(
                f"{name}: stopped at step {self.step}: {self._nonfinite_streak} consecutive steps with a "
                f"non-finite loss or gradient norm, more than max_nonfinite_steps={limit}; at step {self.step}: "
                f"{'; '.join(terms)}. No checkpoint was written on the way out; the last one is {last}",
                step=self.step, terms=terms)
        if self.dist.is_main:
            warnings.warn(f"{name}: step {self.step} skipped (no optimizer, scheduler or EMA change): "
                          f"{'; '.join(terms)} ({self._nonfinite_streak} in a row, max_nonfinite_steps={limit}; "
                          f"{self.nonfinite_steps} in the run)", NonFiniteStepWarning, stacklevel=3)
        return None

    def train(self, *, progress: bool = True, stop_after: int | None = None) -> dict:
        """Run until ``config.steps`` (or until step ``stop_after``, then
        checkpoint and return: a time-boxed run that ``resume`` continues);
        returns the last logged scalars."""
        from tqdm import tqdm

        c = self.config
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        if self._logger_closed:  # train() again after a stop_after: log on
            self.logger = RunLogger(self.out_dir, enabled=self.dist.is_main)
            self._logger_closed = False
        self.model.train()
        if self.loss is not None:
            self.loss.train()
        batches = self._batches()
        last_ckpt = time.monotonic()
        bar = tqdm(total=c.steps, initial=self.step, disable=not (progress and self.dist.is_main),
                   dynamic_ncols=True, unit="step")
        logged: dict = {}
        sample = None
        self._nonfinite_streak = 0
        buffers = self._buffers()
        try:
            while self.step < end:
                x = next(batches).to(self.dist.device)
                sample = x
                saved = [b.detach().clone() for b in buffers]
                self._skipped = []
                with collective_guard(self.dist, f"step {self.step + 1}"):
                    scalars = self.train_step(x)
                skipped, self._skipped = self._skipped, []
                self.step += 1
                bar.update(1)
                stop = None
                if skipped:
                    with torch.no_grad():
                        for b, old in zip(buffers, saved):
                            b.copy_(old)
                    stop = self._nonfinite_step(scalars, skipped)
                else:
                    self._nonfinite_streak = 0
                scalars["train/nonfinite_steps"] = float(self.nonfinite_steps)
                if self.step % c.log_every == 0 or self.step == c.steps or skipped:
                    with collective_guard(self.dist, f"averaging the logged scalars of step {self.step}"):
                        logged = all_reduce_mean(scalars, self.dist)
                    self.logger.scalars(self.step, logged)
                    bar.set_postfix(loss=f"{logged.get(self.progress_key, float('nan')):.4f}")
                if stop is not None:  # every rank decided alike; nothing of this step is saved
                    raise stop
                if self.step % c.image_every == 0 or self.step == c.steps:
                    self._log_images(sample)
                due = (time.monotonic() - last_ckpt) / 60 >= c.ckpt_minutes
                if self.step % c.ckpt_every == 0 or self.step == end or due:
                    self._save_in_run(last=self.step == end)
                    last_ckpt = time.monotonic()
        except BaseException:
            self.logger.close()  # stopped by an error: leave the logs complete
            self._logger_closed = True
            raise
        finally:
            bar.close()
        if self.dist.is_main and self.step == c.steps:
            final = self.ema.module if self.ema is not None else self.model
            final.save_pretrained(os.path.join(self.out_dir, "model"))
        self.logger.close()
        self._logger_closed = True
        return logged

    def _log_images(self, x) -> None:
        """Images to log every ``image_every`` steps (none by default)."""
