"""Sampling helpers that no one prior owns: seeded draws, improved DDPM's
loss-second-moment timestep sampler (its loss history and distribution),
and the progress bar.

The seeded draws take the caller's ``torch.Generator`` (or None for the
global one) and draw on the generator's device, then move the result to
``device``: a CPU generator gives the same numbers whatever device the
model is on.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pyvq._checks import accumulation_dtype

__all__ = [
    "generator_device",
    "gumbel_argmax",
    "progress_bar",
    "push_loss_history",
    "rand",
    "randint",
    "second_moment_probs",
]


def generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where a draw with ``generator`` happens: the generator's device, or
    ``device`` when there is no generator."""
    return generator.device if generator is not None else device


def rand(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 of ``shape`` on ``device``, drawn with ``generator``."""
    return torch.rand(shape, generator=generator, device=generator_device(generator, device)).to(device)


def randint(high: int, shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform int64 in [0, high) of ``shape`` on ``device``, drawn with ``generator``."""
    return torch.randint(high, shape, generator=generator, device=generator_device(generator, device)).to(device)


def gumbel_argmax(log_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per position from ``Cat(exp(log_probs))`` over dim 1 by the
    Gumbel-max trick: (B, K, *S) -> (B, *S) int64. The Gumbel noise is one
    ``rand`` of ``log_probs``' shape; the argmax is taken in the
    accumulation dtype (float32, float64 for float64 input)."""
    u = rand(log_probs.shape, generator, log_probs.device).clamp_(min=torch.finfo(torch.float32).tiny)
    log_probs = log_probs.to(accumulation_dtype(log_probs.dtype))
    return (log_probs - torch.log(-torch.log(u))).argmax(dim=1)


def second_moment_probs(history: torch.Tensor, counts: torch.Tensor, uniform_prob: float) -> torch.Tensor:
    """Improved DDPM's loss-second-moment timestep distribution.

    Args:
        history: (T + 1, N) float, row t the last N values of L_t (row 0,
            the clean data, is ignored).
        counts: (T + 1,) int, how many values row t holds (at most N).
        uniform_prob: weight of the uniform distribution mixed in, [0, 1).

    Returns:
        (T + 1,) float64 on the CPU, ``p[0] = 0`` and ``p[1:]`` summing to 1:
        uniform ``1 / T`` until every t in 1..T has N values, then
        ``(1 - uniform_prob) w_t / sum(w) + uniform_prob / T`` with
        ``w_t = sqrt(mean(history[t] ** 2))`` (uniform again should every
        w be 0 or any be non-finite).
    """
    T = history.shape[0] - 1
    probs = torch.zeros(T + 1, dtype=torch.float64)
    probs[1:] = 1.0 / T
    if T < 1 or not bool((counts[1:].cpu() >= history.shape[1]).all()):
        return probs
    w = history[1:].detach().to("cpu", torch.float64).pow(2).mean(1).sqrt()
    total = w.sum()
    if not (torch.isfinite(total) and total > 0):
        return probs
    probs[1:] = w / total * (1.0 - uniform_prob) + uniform_prob / T
    return probs


@torch.no_grad()
def push_loss_history(history: torch.Tensor, counts: torch.Tensor, t: torch.Tensor, losses: torch.Tensor) -> None:
    """Append per-sample losses to a loss history, in place and in batch
    order: row ``t`` of ``history`` (T + 1, N) is a ring of the last N
    values of L_t (oldest dropped first), ``counts`` (T + 1,) how many it
    holds (the layout ``second_moment_probs`` reads).

    Args:
        history, counts: the history tensors (any device; updated in place).
        t: (B,) integer timesteps in 1..T; losses: (B,) their L_t.
    """
    hist = history.detach().cpu().clone()
    cnt = counts.detach().cpu().clone()
    n = hist.shape[1]
    for ti, li in zip(t.tolist(), losses.detach().float().cpu().tolist()):
        c = int(cnt[ti])
        if c == n:
            hist[ti, :-1] = hist[ti, 1:].clone()
            hist[ti, -1] = li
        else:
            hist[ti, c] = li
            cnt[ti] = c + 1
    history.copy_(hist)
    counts.copy_(cnt)


def progress_bar(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """``iterable`` itself, or wrapped in a tqdm bar (``tqdm.auto``; the bar
    is removed when done) when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
