"""The prior trainer: a diffusion prior on cached tokenizer codes.

Same run layout, checkpoints, resume, DDP, logs and warm-up + cosine
schedule as the tokenizer ``Trainer`` (it is a subclass); per step one
optimizer step on the prior's own objective, ``model(codes) -> (loss,
logs)`` (the VLB for ``MultinomialDiffusion``, the min-SNR-weighted
epsilon MSE for ``GaussianDiffusion``).
"""

from __future__ import annotations

import dataclasses

import torch

from pyvq.train.config import TrainConfig
from pyvq.train.distributed import init_distributed
from pyvq.train.trainer import Trainer, trainable_params

# The field a prior config takes from the codes' metadata.
_CODE_FIELDS = {"num_classes": lambda m: m.get("num_classes"), "code_size": lambda m: m["shape"][-1],
                "channels": lambda m: m["shape"][0] if m["kind"] == "keys" else None}


def build_prior(name: str, meta: dict, overrides: dict | None = None):
    """A prior from a registered preset, sized for codes described by
    ``meta`` (a ``codes.json``): code size, number of classes (indices) or
    channels (key codes); ``overrides`` set further config fields."""
    from pyvq.models import _pretrained
    import pyvq.models  # noqa: F401  (registers the presets and model classes)

    config = _pretrained.get_preset(name)
    cls = _pretrained.model_class_for(config)
    kind = getattr(cls, "code_kind", None)
    if kind is None:
        raise ValueError(f"build_prior: preset {name!r} is a {cls.__name__}, not a prior")
    if kind != meta["kind"]:
        raise ValueError(f"build_prior: preset {name!r} models {kind} but the codes hold {meta['kind']}")
    H, W = meta["shape"][-2:]
    if H != W:
        raise ValueError(f"build_prior: priors model square code maps, the codes are {H} x {W}")
    fields = {f.name for f in dataclasses.fields(config)}
    sized = {k: get(meta) for k, get in _CODE_FIELDS.items() if k in fields and get(meta) is not None}
    return cls(dataclasses.replace(config, **{**sized, **(overrides or {})}))


class PriorTrainer(Trainer):
    """Train a prior preset (``config.model``) on the codes folder
    ``config.codes`` into ``out_dir``.

    Args:
        config: a ``TrainConfig`` with ``codes`` set (or pass ``dataset``).
        out_dir: the run directory (config.json, log.jsonl, tensorboard/,
            checkpoints/, the final prior in model/).
        resume: continue from ``out_dir``'s latest checkpoint.
        dataset: a ``CodesDataset`` (or any dataset of code maps with a
            ``meta`` dict) instead of ``config.codes``.
        model: a prior to train instead of a new preset.
    """

    progress_key = "train/loss"

    def __init__(self, config: TrainConfig, out_dir: str, *, resume: bool = False, dataset=None,
                 model: torch.nn.Module | None = None):
        from pyvq.data.codes import CodesDataset

        self.config = config
        self.out_dir = out_dir
        self.dist = init_distributed(config.device)
        torch.manual_seed(config.seed)
        if dataset is None:
            if config.codes is None:
                raise ValueError("PriorTrainer: set 'codes' (a folder written by `pyvq encode`) or pass a dataset")
            dataset = CodesDataset(config.codes)
        if model is None:
            model = build_prior(config.model, dataset.meta, config.model_overrides)
        if hasattr(model, "train_defaults"):
            self.config = config = config.with_model_defaults(model.train_defaults())
        self.model = model.to(self.dist.device)
        self.loss = None
        self.opt_g = self._adamw(trainable_params(self.model), config.lr, config.adam_eps)
        self.sched_g = self._lr_schedule(self.opt_g)
        self.ema = self._make_ema()
        self.dataset = dataset
        self._finish_setup(resume, {"model": self.model})

    def _modules(self):
        mods = {"model": self.model}
        if self.ema is not None:
            mods["ema"] = self.ema
        return mods

    def _optimizers(self):
        return {"g": self.opt_g}

    def _schedulers(self):
        return {"g": self.sched_g}

    def train_step(self, codes: torch.Tensor) -> dict:
        """One optimizer step on the prior's objective; returns scalars."""
        with self._autocast():
            loss, logs = self.model_ddp(codes)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable_params(self.model), self.config.grad_clip)
        self.opt_g.step()
        self.sched_g.step()
        self._update_ema()
        out = {k: float(v) for k, v in logs.items()}
        out.setdefault("train/loss", float(loss.detach()))
        out["train/lr"] = self.opt_g.param_groups[0]["lr"]
        return out

    def _log_images(self, x):
        """Priors log no images while training (their samples need a
        tokenizer: ``pyvq sample``)."""
