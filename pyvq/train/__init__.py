"""The training stack: checkpoints, schedules, logging (trainer and CLI build on these)."""

from pyvq.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pyvq.train.schedule import warmup_cosine

__all__ = [
    "capture_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "warmup_cosine",
]
