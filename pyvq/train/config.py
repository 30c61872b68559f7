"""Training configuration: a dataclass, readable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from pyvq._checks import check_choice, check_int, check_positive_fields

# TrainConfig.disc_type values: the discriminator of a tokenizer's GAN loss.
DISC_TYPES = ("patchgan", "projected")


@dataclass
class TrainConfig:
    """Everything a tokenizer training run needs (per-process batch size).

    ``model`` names a preset (``pyvq.models.list_presets()``);
    ``model_overrides`` replaces fields of its config. ``base`` (for the
    asymmetric presets) is a trained tokenizer's run directory: its frozen
    encoder side is used and only the new decoder trains (``model_overrides``
    then sets the decoder's width/depth; by default the base decoder's). ``data`` is
    ``"builtin"`` (scikit-image's photographs, no download) or an image folder.
    Loss weights follow taming-transformers' VQGAN; ``perceptual_weight`` needs
    LPIPS's VGG weights in the torch hub cache (0 turns LPIPS off).
    ``ckpt_every`` (steps) and ``ckpt_minutes`` (wall time) both trigger a
    checkpoint, whichever comes first.

    Model defaults: the defaults above are VQGAN's. A model type's training
    recipe (``pyvq.train.recipes``) may name its own with
    ``train_defaults(model)`` (BRICS: lr 2e-3, betas (0, 0.99), Adam eps
    1e-15 / 1e-8, L2 x 20, LPIPS x 5, ...); the trainer then replaces every
    such field that still holds TrainConfig's default
    (``with_model_defaults``) and writes the resolved values to the run's
    config.json. A value that differs from TrainConfig's default is the
    user's and is kept; ``model_defaults=False`` keeps every field as given
    (also a value that happens to equal TrainConfig's default).
    ``disc_type`` is "patchgan" (taming's NLayerDiscriminator) or
    "projected" (``pyvq.losses.ProjectedDiscriminator`` on the timm backbone
    ``disc_backbone``, Efficient-VQGAN's choice; its pretrained weights must
    be in the local Hugging Face cache).
    ``adam_eps`` / ``disc_adam_eps`` are the optimizers' eps (the
    discriminator's defaults to ``adam_eps``); ``pixel_weight`` weights the
    pixel loss.

    ``dist_timeout_s``: under torchrun, how long a collective waits for
    the other ranks before the run stops with a ``DistributedFailure``
    (None: ``$PYVQ_DIST_TIMEOUT``, else 300 s); it must exceed the longest
    pause of one rank alone (rank 0 writing a checkpoint or images).

    Priors: ``codes`` is a codes folder written by ``pyvq encode``; a prior
    preset (``vqddm_tiny``, ``keycode_diffusion_tiny``, ...) trains on it
    with ``PriorTrainer`` (``data`` and the tokenizer loss fields are then
    unused; the preset's code shape and number of classes are taken from
    the codes).

    Faults: a step whose loss or gradient norm is NaN or inf is skipped (no
    weight, optimizer, scheduler or EMA change) and counted;
    ``max_nonfinite_steps`` is how many such steps in a row the run
    tolerates; one more stops it with ``NonFiniteLossError`` (0: stop at the
    first). The default, 10, rides out an isolated bad batch or a short
    spike, and stops a diverged run (NaN at every step) within ten steps,
    before it has spent much time or written a checkpoint.
    """

    model: str = "vqgan_tiny"
    model_overrides: dict = field(default_factory=dict)
    base: str | None = None
    data: str = "builtin"
    codes: str | None = None
    image_size: int = 64
    batch_size: int = 8
    steps: int = 1000
    lr: float = 2e-4
    disc_lr: float | None = None
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    ema_decay: float = 0.0
    disc_start: int = 500
    disc_weight: float = 0.8
    disc_loss: str = "hinge"
    disc_type: str = "patchgan"
    disc_backbone: str = "tf_efficientnet_lite0"
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    pixel_loss: str = "l1"
    kl_weight: float = 1e-6
    pixel_weight: float = 1.0
    adam_eps: float = 1e-8
    disc_adam_eps: float | None = None
    model_defaults: bool = True
    log_every: int = 10
    image_every: int = 200
    ckpt_every: int = 500
    ckpt_minutes: float = 5.0
    max_nonfinite_steps: int = 10
    seed: int = 0
    num_workers: int = 0
    device: str | None = None
    dist_timeout_s: float | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        check_positive_fields(
            self, ("image_size", "batch_size", "steps", "log_every", "image_every", "ckpt_every"), where="TrainConfig")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig: 'lr' must be > 0, got {self.lr}")
        check_int("max_nonfinite_steps", self.max_nonfinite_steps, where="TrainConfig", minimum=0, what="field")
        for name in ("num_workers", "warmup_steps", "disc_start", "seed"):
            check_int(name, getattr(self, name), where="TrainConfig", minimum=0, what="field")
        for name, ok, expected in (("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: no EMA)"),
                                   ("perceptual_weight", lambda v: v >= 0, ">= 0 (0: no perceptual term)"),
                                   ("ckpt_minutes", lambda v: v > 0, "> 0 minutes"),
                                   ("grad_clip", lambda v: v >= 0, ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ValueError(f"TrainConfig: field '{name}' must be a number {expected}, got {v!r}")
        check_choice("disc_type", self.disc_type, DISC_TYPES, where="TrainConfig", what="field")
        t = self.dist_timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"TrainConfig: 'dist_timeout_s' must be None or > 0 seconds, got {self.dist_timeout_s}")

    def with_model_defaults(self, defaults: dict) -> "TrainConfig":
        """A copy in which each field named in ``defaults`` that still holds
        TrainConfig's own default takes the value from ``defaults``
        (nothing changes when ``model_defaults`` is False)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(defaults) - set(fields))
        if unknown:
            raise ValueError(f"TrainConfig.with_model_defaults: unknown keys {unknown}")
        if not self.model_defaults:
            return self
        changes = {}
        for name, value in defaults.items():
            default = fields[name].default
            if default is dataclasses.MISSING:  # a default_factory field: compare with a fresh default
                default = fields[name].default_factory()  # type: ignore[misc]
            if name == "betas":
                value, default = tuple(value), tuple(default)
            if getattr(self, name) == default:
                changes[name] = value
        return dataclasses.replace(self, **changes) if changes else self

    def check_model(self) -> None:
        """Check the run against its preset before anything is built: the
        preset exists, ``model_overrides`` names fields of its config, a
        prior preset has ``codes`` (and a tokenizer preset has none), and
        ``image_size`` is a multiple of a tokenizer's downsampling factor.
        ``ValueError`` naming the field, what is valid and what was given."""
        import pyvq.models  # noqa: F401  (registers the presets)
        from pyvq.models import Prior, get_preset, list_presets, model_class_for

        try:
            preset = get_preset(self.model)
        except KeyError:
            raise ValueError(f"TrainConfig: field 'model' (--preset) must be a registered preset, got "
                             f"{self.model!r}; valid presets: {', '.join(list_presets())}") from None
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"TrainConfig: field 'model_overrides' must be a mapping of {type(preset).__name__} "
                             f"fields to values, got {self.model_overrides!r}")
        valid = [f.name for f in dataclasses.fields(preset) if f.init]
        unknown = sorted(set(self.model_overrides) - set(valid))
        if unknown:
            raise ValueError(f"TrainConfig: field 'model_overrides' has unknown {type(preset).__name__} field(s) "
                             f"{unknown} (preset {self.model!r}); valid fields: {', '.join(valid)}")
        cls = model_class_for(preset)
        if issubclass(cls, Prior) and self.codes is None:
            raise ValueError(f"TrainConfig: preset {self.model!r} is a prior ({cls.__name__}); it trains on the "
                             f"codes of a tokenizer, not on images: give a codes folder with --codes (written by "
                             f"`pyvq encode --tokenizer RUN --out CODES`), not --data")
        if not issubclass(cls, Prior) and self.codes is not None:
            raise ValueError(f"TrainConfig: preset {self.model!r} is a tokenizer ({cls.__name__}) and trains on "
                             f"images (--data), but --codes {self.codes!r} was given; a codes folder trains a "
                             f"prior preset (vqddm_*, keycode_diffusion_*, mgt_*)")
        if self.base is not None and not cls.__name__.startswith("Asymmetric"):
            raise ValueError(f"TrainConfig: field 'base' (--base) applies to the asymmetric presets "
                             f"(asym_vqgan_tiny, asym_vq_f16_base, ...), and preset {self.model!r} is a "
                             f"{cls.__name__}: drop --base")
        if self.base is not None and os.path.isdir(self.base):
            folder = os.path.join(self.base, "model") if os.path.isdir(os.path.join(self.base, "model")) else self.base
            try:
                with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                    held = json.load(f).get("_class_name")
            except (OSError, ValueError, AttributeError):
                held = None  # the loader names what is missing
            if held is not None and held not in ("VQGAN", "AutoencoderKL"):
                raise ValueError(f"TrainConfig: field 'base' (--base) {self.base} holds a {held}, expected a "
                                 f"VQGAN or AutoencoderKL run (the tokenizer whose new decoder {self.model!r} "
                                 f"trains)")
        factor = getattr(preset, "downsample_factor", None)
        if self.codes is None and self.base is None and isinstance(factor, int) and self.image_size % factor:
            raise ValueError(f"TrainConfig: field 'image_size' (--image-size) must be a multiple of {factor}, the "
                             f"downsampling factor of preset {self.model!r}, got {self.image_size}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        """The config a YAML file of TrainConfig fields describes."""
        try:
            return cls.from_dict(cls.read_yaml(path))
        except TypeError as exc:  # a field given a value of the wrong kind (betas: 3)
            raise ValueError(f"TrainConfig: {path}: {exc}") from None

    @staticmethod
    def read_yaml(path: str) -> dict:
        """The fields a YAML file sets, as a dict (only those it names; unknown
        names are an error), without building the config: ``pyvq train``
        merges its flags in first. ``FileNotFoundError`` / ``IsADirectoryError``
        / ``ValueError`` (not YAML, not a mapping) name the file."""
        import yaml

        if os.path.isdir(path):
            raise IsADirectoryError(f"TrainConfig: --config {path} is a folder, expected a YAML file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TrainConfig: --config {path} does not exist (expected a YAML file of "
                                    f"TrainConfig fields)")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            detail = " ".join(str(exc).split())
            raise ValueError(f"TrainConfig: --config {path} is not readable YAML: {detail}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"TrainConfig: {path} must hold a mapping of TrainConfig fields to values, got a "
                             f"{type(data).__name__}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: {path} has unknown field(s) {unknown}; valid fields: "
                             f"{', '.join(sorted(known))}")
        return data

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
