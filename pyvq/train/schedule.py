"""Learning-rate schedules."""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "warmup_cosine"]


class WarmupCosine:
    """The factor of linear warm-up from 0 over ``warmup_steps``, then
    cosine decay to ``min_ratio`` at ``total_steps`` (held after).

    A callable object rather than a function, so a ``LambdaLR``'s
    ``state_dict`` holds its fields and ``load_state_dict`` puts them back:
    a resumed run follows the schedule it was saved with, step by step,
    whatever the new run's settings (``BaseTrainer`` warns when they differ).
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
            raise ValueError(
                f"warmup_cosine: need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
            )
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"warmup_cosine: argument 'min_ratio' must be in [0, 1], got {min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def describe(self) -> str:
        return (f"warm-up over {self.warmup_steps} steps, cosine decay to {self.min_ratio:g} x lr at step "
                f"{self.total_steps}")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to
    ``min_ratio`` times the base rate at ``total_steps`` (held after); the
    schedule is saved in the scheduler's ``state_dict`` (``WarmupCosine``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))
