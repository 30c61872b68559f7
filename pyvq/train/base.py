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
import shutil
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
from pyvq.train.logger import RunLogger, check_writable_dir
from pyvq.train.recipes import Recipe, recipe_for
from pyvq.train.schedule import WarmupCosine, warmup_cosine

try:
    import fcntl
except ImportError:  # not POSIX: no run-folder lock
    fcntl = None

__all__ = ["LOCK_NAME", "BaseTrainer", "NonFiniteLossError", "NonFiniteStepWarning", "RunFolderError",
           "describe_run_folder", "trainable_params"]


class NonFiniteLossError(RuntimeError):
    """More than ``TrainConfig.max_nonfinite_steps`` consecutive training steps
    had a non-finite loss or gradient norm; the message names the step, the
    non-finite terms and the limit. ``step`` and ``terms`` hold them too."""

    def __init__(self, message: str, *, step: int, terms: list):
        super().__init__(message)
        self.step, self.terms = step, terms


class NonFiniteStepWarning(UserWarning):
    """A training step was skipped because its loss or gradient norm was not finite."""


class RunFolderError(FileExistsError):
    """A run would start into a folder that already holds something (a
    previous run, say) without ``resume`` or ``overwrite``; the message
    names the folder, what is in it and the two ways on."""


LOCK_NAME = ".pyvq-run.lock"  # held (flock) by the process training into the folder


def _lock_holder(path: str) -> int | None:
    """The pid of another live process holding the run folder's lock, else None."""
    lock = os.path.join(path, LOCK_NAME)
    if fcntl is None or not os.path.isfile(lock):
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held
        try:
            pid = int(os.read(fd, 32).decode().strip() or 0)
        except ValueError:
            pid = 0
        return None if pid == os.getpid() else pid  # this process (another trainer object): let it be
    finally:
        os.close(fd)  # releases a lock taken here
    return None


def _in_use(name: str, out: str, holder: int) -> RunFolderError:
    """The error for a run folder whose lock another process holds."""
    return RunFolderError(f"{name}: another process (pid {holder}) is training into {out} now; wait until it ends "
                          f"(or stop it) before starting, resuming or overwriting a run there, or choose another "
                          f"folder")


def _run_entries(path: str) -> list[str]:
    """The entries of a run folder, but for its lock file."""
    return sorted(n for n in os.listdir(path) if n != LOCK_NAME)


def describe_run_folder(path: str) -> str:
    """What a run folder holds, in words: "checkpoints up to step 20 (2),
    model/, log.jsonl (25 rows), config.json, tensorboard/"."""
    names = _run_entries(path)
    parts = []
    for name in names:
        full = os.path.join(path, name)
        if name == "checkpoints" and os.path.isdir(full):
            steps = sorted(int(n[5:]) for n in os.listdir(full)
                           if n.startswith("step_") and n[5:].isdigit() and os.path.isdir(os.path.join(full, n)))
            parts.append(f"checkpoints up to step {steps[-1]} ({len(steps)})" if steps else "checkpoints/ (no step_N)")
        elif name == "log.jsonl" and os.path.isfile(full):
            with open(full, "rb") as f:
                parts.append(f"log.jsonl ({sum(1 for line in f if line.strip())} rows)")
        else:
            parts.append(name + ("/" if os.path.isdir(full) else ""))
    return ", ".join(parts[:12]) + (f" and {len(parts) - 12} more" if len(parts) > 12 else "")


def _aside_name(path: str) -> str:
    """A free sibling name for moving ``path``'s contents aside."""
    base = f"{os.path.normpath(path)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    return target


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
        overwrite: start afresh into an ``out_dir`` that already holds
            something; see "Run folders" below.
        model: the model to train; None: ``_new_model()`` builds it.
        dataset: the training data; None: ``_new_dataset()`` builds it.

    Run folders. ``out_dir`` is checked first, before any work: it must be
    writable (or creatable: ``check_writable_dir``), and a folder that
    already holds anything is refused (``RunFolderError``, naming what is in
    it) unless ``resume`` (go on from its newest valid checkpoint) or
    ``overwrite``. ``overwrite`` never deletes: once the new run is set up
    (model, data, resume state), the old contents are moved to the sibling
    folder ``<out_dir>.replaced-<date>-<time>`` (a warning names it) and the
    run starts in the emptied folder. A new run that fails before its first
    step completes (a bad image size, say) removes what it created, and
    only that (a resumed one leaves the folder as it is). ``resume`` continues the saved run exactly, LR schedule
    included: the schedulers keep the schedule they were saved with (a
    warning says so when ``steps`` or the warm-up changed: more steps than
    saved hold its final rate), and a checkpoint past ``steps`` is refused.
    Rows of ``log.jsonl`` after the resumed
    checkpoint (logged by the run that died) go to ``log.discarded.jsonl``.

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

    def __init__(self, config: TrainConfig, out_dir: str, *, resume: bool = False, overwrite: bool = False,
                 model: torch.nn.Module | None = None, dataset=None):
        self.config = config
        self.out_dir = out_dir
        self._overwrite = self._check_run_folder(resume, overwrite)
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

    # -- the run folder
    def _check_run_folder(self, resume: bool, overwrite: bool) -> bool:
        """Before any work: ``out_dir`` writable, and empty unless
        ``resume`` or ``overwrite``; returns whether old contents are to be
        moved aside (see the class docstring)."""
        name, out = type(self).__name__, self.out_dir
        if resume and overwrite:
            raise ValueError(f"{name}: resume=True and overwrite=True contradict each other (resume continues "
                             f"the run in {out}, overwrite starts a new one there); pass one")
        check_writable_dir(out, "out_dir")
        holder = _lock_holder(out) if os.path.isdir(out) else None
        if holder is not None:
            raise _in_use(name, out, holder)
        if resume or not os.path.isdir(out) or not _run_entries(out):
            return False
        if not overwrite:
            raise RunFolderError(
                f"{name}: the run folder {out} is not empty: it holds {describe_run_folder(out)}. Continue that "
                f"run with resume=True (`pyvq train --resume`), or start a new one there with overwrite=True "
                f"(`pyvq train --overwrite`: the old contents are moved to {os.path.normpath(out)}.replaced-<time>), "
                f"or choose another folder")
        check_writable_dir(os.path.dirname(os.path.abspath(out)), "the parent folder of out_dir")
        return True

    def _take_run_folder(self) -> None:
        """Rank 0, once set-up succeeded: move old contents aside
        (overwrite), create the folder, note what this start creates."""
        out = self.out_dir
        if self._overwrite:
            aside = _aside_name(out)
            os.makedirs(aside)
            for entry in sorted(os.listdir(out)):
                os.replace(os.path.join(out, entry), os.path.join(aside, entry))
            warnings.warn(f"{type(self).__name__}: overwrite=True: the previous contents of {out} were moved to "
                          f"{aside}", UserWarning, stacklevel=4)
            self._overwrite = False
        existed = os.path.isdir(out)
        self._before = set(os.listdir(out)) if existed else None
        os.makedirs(out, exist_ok=True)
        self._lock()

    def _lock(self) -> None:
        """Hold the run folder's lock (rank 0, while set up or training): a
        second process resuming or overwriting the run is refused meanwhile."""
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(os.path.join(self.out_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _lock_holder(self.out_dir)
            if holder is None:  # held by this process (another trainer object of the same folder)
                return
            raise _in_use(type(self).__name__, self.out_dir, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __del__(self):  # a trainer set up and never trained (or dropped) lets the folder go
        if getattr(self, "_lock_fd", None) is not None:  # None too when __init__ failed before the set-up
            self._unlock()

    def _remove_failed_start(self) -> None:
        """Remove what this start created in the run folder (the folder
        itself when it created it), never what was there before."""
        out, before = self.out_dir, self._before
        self._unlock()
        try:
            if before is None:
                shutil.rmtree(out, ignore_errors=True)
                return
            for entry in set(os.listdir(out)) - before:
                path = os.path.join(out, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        except OSError:
            pass

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
                held = (f"it holds {describe_run_folder(self.out_dir)}" if os.path.isdir(self.out_dir)
                        and _run_entries(self.out_dir) else "it is empty" if os.path.isdir(self.out_dir)
                        else "it does not exist")
                raise FileNotFoundError(f"{type(self).__name__}: resume=True but {self.out_dir} has no checkpoint "
                                        f"({held}); start a new run without resume (with overwrite=True, "
                                        f"`pyvq train --overwrite`, if the folder is not empty)")
            info = load_checkpoint(found, self._modules(), optimizers=self._optimizers(),
                                   schedulers=self._schedulers(), map_location=self.dist.device)
            self.step = info["step"]
            self._check_schedule(found)
            self._resume_position(info["extra"], found)
            self.nonfinite_steps = int(info["extra"].get("nonfinite_steps", 0))
        for name, module in self._trained_modules().items():
            if self.dist.distributed:
                ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
                with collective_guard(self.dist, f"wrapping {name!r} in DDP"):  # DDP broadcasts rank 0's weights
                    module = DDP(module, device_ids=ids)
            setattr(self, f"{name}_ddp", module)
        # a fresh start that fails before its first step removes what it created (a resumed one leaves the run)
        self._before, self._started, self._lock_fd = None, resume, None
        if self.dist.is_main:
            self._take_run_folder()
        self.logger = RunLogger(self.out_dir, enabled=self.dist.is_main, resume_step=self.step if resume else None)
        if self.dist.is_main:
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(self._config_record(), f, indent=1)

    def _config_record(self) -> dict:
        """What config.json holds: the config's fields (a subclass may leave
        out those its runs do not use)."""
        return self.config.to_dict()

    def _check_schedule(self, path: str) -> None:
        """After loading a checkpoint: the schedulers follow the schedule
        they were saved with (``WarmupCosine`` is in their state); say so
        when this run's settings would have given another, and refuse a
        checkpoint past ``steps``."""
        c, name = self.config, type(self).__name__
        if self.step > c.steps:
            raise ValueError(f"{name}: resume: {path} is at step {self.step}, past this run's steps={c.steps} "
                             f"(--steps); resume with steps >= {self.step}")
        saved = self.sched_g.lr_lambdas[0]
        mine = WarmupCosine(self._warmup_steps(), c.steps, c.min_lr_ratio)
        if not isinstance(saved, WarmupCosine) or vars(saved) == vars(mine) or not self.dist.is_main:
            return
        after = (f"; steps {saved.total_steps + 1} to {c.steps} hold its final rate" if c.steps > saved.total_steps
                 else f"; the run ends at step {c.steps}, before its decay does" if c.steps < saved.total_steps else "")
        warnings.warn(f"{name}: going on from {path} with steps={c.steps}, warmup_steps={c.warmup_steps}, "
                      f"min_lr_ratio={c.min_lr_ratio}: the learning rate follows the schedule the run was saved "
                      f"with ({saved.describe()}), not this run's ({mine.describe()}), so it does not jump{after}",
                      UserWarning, stacklevel=4)

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

    def _warmup_steps(self) -> int:
        """``warmup_steps``, at most a tenth of the run: a short run (fewer
        than 10 x warmup_steps) warms up over its first tenth, then decays."""
        c = self.config
        return min(c.warmup_steps, c.steps // 10)

    def _lr_schedule(self, opt):
        """Warm-up (``_warmup_steps``) then cosine decay over the run."""
        c = self.config
        return warmup_cosine(opt, warmup_steps=self._warmup_steps(), total_steps=c.steps, min_ratio=c.min_lr_ratio)

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
            if self.dist.is_main:
                self._lock()
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
                self._started = True  # a failure from here on leaves the run folder as it is
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
            if not self._started and self.dist.is_main:  # a failed start: take back what it created
                self._remove_failed_start()
            self._unlock()
            raise
        finally:
            bar.close()
        try:
            if self.dist.is_main and self.step == c.steps:
                self._save_final_model()
        finally:
            self.logger.close()
            self._logger_closed = True
            self._unlock()
        return logged

    def _save_final_model(self) -> None:
        """The final model (the EMA when there is one) into ``model/``,
        written beside it first and then renamed into place, so ``model/``
        is always a whole model (the previous one until the new one is)."""
        final = self.ema.module if self.ema is not None else self.model
        target = os.path.join(self.out_dir, "model")
        tmp, old = f"{target}.tmp-{os.getpid()}", f"{target}.old-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            final.save_pretrained(tmp)
            if os.path.exists(target):
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    def _log_images(self, x) -> None:
        """Images to log every ``image_every`` steps (none by default)."""
