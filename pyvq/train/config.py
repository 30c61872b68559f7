"""Training configuration: a dataclass, readable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    """

    model: str = "vqgan_tiny"
    model_overrides: dict = field(default_factory=dict)
    base: str | None = None
    data: str = "builtin"
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
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    pixel_loss: str = "l1"
    kl_weight: float = 1e-6
    log_every: int = 10
    image_every: int = 200
    ckpt_every: int = 500
    ckpt_minutes: float = 5.0
    seed: int = 0
    num_workers: int = 0
    device: str | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("image_size", "batch_size", "steps", "log_every", "image_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig: '{name}' must be an int >= 1, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig: 'lr' must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"TrainConfig: {path} must hold a mapping of keys to values")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
