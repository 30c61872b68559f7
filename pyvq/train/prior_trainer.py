"""The prior trainer: a prior (diffusion or masked-token) on cached tokenizer codes.

Same run layout, checkpoints, resume, DDP, logs and warm-up + cosine
schedule as the tokenizer ``Trainer`` (both are ``BaseTrainer``s); per step
one optimizer step on the prior's own objective, the recipe's
``loss(model, codes) -> (loss, logs)`` (``pyvq.train.recipes.PriorRecipe``:
the VLB for ``MultinomialDiffusion``, the min-SNR-weighted epsilon MSE for
``GaussianDiffusion``, the masked-token cross-entropy for
``MultiGrainedTransformer``), with the recipe's optimiser defaults.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from pyvq.train.base import BaseTrainer
from pyvq.train.config import TrainConfig
from pyvq.train.recipes import PriorRecipe

# TrainConfig fields a prior run does not use (the tokenizer's data, loss
# and image logging); config.json leaves them out.
_UNUSED_FIELDS = ("data", "base", "image_size", "disc_lr", "disc_start", "disc_weight", "disc_loss", "disc_type",
                  "disc_backbone", "perceptual_weight", "codebook_weight", "pixel_loss", "kl_weight",
                  "pixel_weight", "disc_adam_eps", "image_every")

# What a prior config takes from the codes' metadata, by value name; a
# config field of that name receives it unless the prior class maps its own
# field names to these values in ``code_config_fields`` ({field: value}).
_CODE_VALUES = {"num_classes": lambda m: m.get("num_classes"), "code_size": lambda m: m["shape"][-1],
                "channels": lambda m: m["shape"][0] if m["kind"] == "keys" else None}


def build_prior(name: str, meta: dict, overrides: dict | None = None):
    """A prior from a registered preset, sized for codes described by
    ``meta`` (a ``codes.json``): code size, number of classes (indices) or
    channels (key codes), into the config fields of those names or those
    the prior class names in ``code_config_fields`` (e.g.
    ``MultiGrainedTransformer``: ``num_codes``, ``latent_size``), and the
    tokenizer's record (``pyvq.data.codes.tokenizer_record``) into the
    ``tokenizer`` field; ``overrides`` set further config fields."""
    from pyvq.models import get_preset, model_class_for  # importing pyvq.models registers the presets

    config = get_preset(name)
    cls = model_class_for(config)
    kind = getattr(cls, "code_kind", None)
    if kind is None:
        raise ValueError(f"build_prior: preset {name!r} is a {cls.__name__}, not a prior")
    if kind != meta["kind"]:
        raise ValueError(f"build_prior: preset {name!r} models {kind} but the codes hold {meta['kind']}")
    H, W = meta["shape"][-2:]
    if H != W:
        raise ValueError(f"build_prior: priors model square code maps, the codes are {H} x {W}")
    fields = {f.name for f in dataclasses.fields(config)}
    names = getattr(cls, "code_config_fields", None) or {k: k for k in _CODE_VALUES}
    values = {field: _CODE_VALUES[value](meta) for field, value in names.items() if field in fields}
    sized = {k: v for k, v in values.items() if v is not None}
    if "tokenizer" in fields:
        from pyvq.data.codes import tokenizer_record

        sized["tokenizer"] = tokenizer_record(meta)
    return cls(dataclasses.replace(config, **{**sized, **(overrides or {})}))


class PriorTrainer(BaseTrainer):
    """Train a prior preset (``config.model``) on the codes folder
    ``config.codes`` into ``out_dir``.

    Args:
        config: a ``TrainConfig`` with ``codes`` set (or pass ``dataset``).
        out_dir: the run directory (config.json, log.jsonl, tensorboard/,
            checkpoints/, the final prior in model/).
        resume: continue from ``out_dir``'s latest checkpoint.
        overwrite: start afresh into a non-empty ``out_dir`` (its contents
            are moved aside; ``BaseTrainer``).
        dataset: a ``CodesDataset`` (or any dataset of code maps with a
            ``meta`` dict) instead of ``config.codes``.
        model: a prior to train instead of a new preset.
    """

    progress_key = "train/loss"
    recipe_kind = PriorRecipe

    def __init__(self, config: TrainConfig, out_dir: str, *, resume: bool = False, overwrite: bool = False,
                 dataset=None, model: torch.nn.Module | None = None):
        if dataset is None:
            from pyvq.data.codes import CodesDataset

            if config.codes is None:
                raise ValueError("PriorTrainer: set 'codes' (a folder written by `pyvq encode`) or pass a dataset")
            dataset = CodesDataset(config.codes)
        super().__init__(config, out_dir, resume=resume, overwrite=overwrite, model=model, dataset=dataset)

    def _new_model(self) -> torch.nn.Module:
        """The ``config.model`` preset sized for the dataset's codes."""
        c = self.config
        model = build_prior(c.model, self.dataset.meta, c.model_overrides)
        if getattr(model, "class_embed", None) is not None:  # a class-conditional MultiGrainedTransformer
            warnings.warn(f"PriorTrainer: {c.model!r} with num_classes={model.config.num_classes} is "
                          "class-conditional, but a codes folder holds no class labels: it trains the null "
                          "class only, so its class embeddings stay untrained (set num_classes=0 for an "
                          "unconditional prior)", stacklevel=2)
        return model

    def _config_record(self) -> dict:
        """config.json of a prior run: the codes folder (absolute) instead of
        ``data``; the tokenizer-only fields left out (``_UNUSED_FIELDS``)."""
        record = {k: v for k, v in super()._config_record().items() if k not in _UNUSED_FIELDS}
        if record.get("codes"):
            record["codes"] = os.path.abspath(record["codes"])
        return record

    def train_step(self, codes: torch.Tensor) -> dict:
        """One optimizer step on the prior's objective; returns scalars."""
        with self._autocast():
            loss, logs = self.recipe.loss(self.model_ddp, codes)
        if self._model_step(loss):  # False: a non-finite step, skipped (BaseTrainer)
            self._update_ema()
        out = {k: float(v) for k, v in logs.items()}
        out.setdefault("train/loss", float(loss.detach()))
        out["train/lr"] = self.opt_g.param_groups[0]["lr"]
        return out
