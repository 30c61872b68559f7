"""Noise schedules of the diffusion priors.

A schedule is a discretisation of the forward process into ``T`` steps:
``q(x_t | x_0) = N(sqrt(alpha_bar[t]) x_0, (1 - alpha_bar[t]) I)`` for the
Gaussian prior (BRICS), and the same ``alpha_bar`` as the probability of
keeping a code for the multinomial prior (VQ-DDM).

Continuous-time shapes, ``alpha_bar(t)`` for ``t`` in [0, 1]:

- ``cosine_alpha_bar``: Nichol & Dhariwal 2021 (improved DDPM).
- ``cosine_variant_alpha_bar``: the cosine "gamma" of Chen 2023, *On the
  importance of noise scheduling for diffusion models*, with its start /
  end / temperature knobs.

Discrete schedules, betas for t = 1..T:

- ``linear_betas``: DDPM's linear betas (scaled by 1000 / T).
- ``betas_from_alpha_bar``: any continuous ``alpha_bar`` discretised as
  improved DDPM does (each beta capped at ``max_beta``).

``make_schedule(name, T)`` packs either into a ``Schedule`` of float64
tensors of length ``T + 1`` indexed by the timestep itself (index 0 is the
clean data: ``betas[0] = 0``, ``alpha_bar[0] = 1``).

``min_snr_weight`` is the Min-SNR-gamma loss weight of Hang et al. 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from pyvq._checks import ArgumentTypeError, check_float, check_int

__all__ = [
    "SCHEDULES",
    "Schedule",
    "betas_from_alpha_bar",
    "cosine_alpha_bar",
    "cosine_variant_alpha_bar",
    "linear_betas",
    "make_schedule",
    "min_snr_weight",
]


def _as_float_tensor(t) -> torch.Tensor:
    """A float tensor from a number or tensor: float64 for numbers and
    integer tensors, the tensor's own dtype for floating tensors."""
    if not isinstance(t, torch.Tensor):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float64)


def cosine_alpha_bar(t, s: float = 0.008) -> torch.Tensor:
    """Improved-DDPM cosine schedule: ``f(t) / f(0)`` with
    ``f(t) = cos(((t + s) / (1 + s)) * pi / 2) ** 2``.

    Args:
        t: times in [0, 1], a number or a tensor of any shape.
        s: small offset that keeps ``beta`` away from 0 near ``t = 0``.

    Returns a tensor of ``t``'s shape (float64 unless ``t`` is a floating
    tensor, whose dtype is kept); 1 at ``t = 0``, about 0 at ``t = 1``.
    """
    check_float("s", s, low=0.0, high=math.inf, where="cosine_alpha_bar")
    t = _as_float_tensor(t)

    def f(u):
        return torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2

    return f(t) / f(torch.zeros((), dtype=t.dtype))


def cosine_variant_alpha_bar(
    t, start: float = 0.2, end: float = 1.0, tau: float = 1.5, clip_min: float = 1e-9
) -> torch.Tensor:
    """Chen 2023's cosine schedule: a slice ``[start, end]`` of
    ``cos(u * pi / 2) ** (2 * tau)``, rescaled to run from 1 to 0::

        v(u)   = cos(u * pi / 2) ** (2 * tau)
        out(t) = (v(end) - v(t * (end - start) + start)) / (v(end) - v(start))

    then clipped to ``[clip_min, 1]``. A larger ``tau`` or ``start`` spends
    more of the schedule at high noise.

    Args:
        t: times in [0, 1], a number or a tensor of any shape.
        start, end: the slice of the cosine, ``0 <= start < end <= 1``.
        tau: temperature, > 0.
        clip_min: floor of the output, in (0, 1).

    Returns a tensor of ``t``'s shape (dtype as ``cosine_alpha_bar``): 1 at
    ``t = 0``, ``clip_min`` at ``t = 1`` when ``end = 1``.
    """
    if not 0 <= start < end <= 1:
        raise ValueError(
            f"cosine_variant_alpha_bar: arguments 'start' and 'end' must satisfy 0 <= start < end <= 1, "
            f"got start={start!r}, end={end!r}"
        )
    check_float("tau", tau, low=0.0, high=math.inf, low_open=True, where="cosine_variant_alpha_bar")
    if not 0 < clip_min < 1:
        raise ValueError(f"cosine_variant_alpha_bar: argument 'clip_min' must be in (0, 1), got {clip_min!r}")
    t = _as_float_tensor(t)
    v_start = math.cos(start * math.pi / 2) ** (2 * tau)
    v_end = math.cos(end * math.pi / 2) ** (2 * tau)
    v = torch.cos((t * (end - start) + start) * (math.pi / 2)) ** (2 * tau)
    return ((v_end - v) / (v_end - v_start)).clamp(clip_min, 1.0)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas for t = 1..T, float64 of shape (T,).

    Both ends are scaled by ``1000 / T`` (improved DDPM), so any ``T`` gives
    roughly the same total noise as DDPM's ``T = 1000``; the scaled
    ``beta_end`` must stay below 1, which needs ``T > 1000 * beta_end``.
    """
    T = check_int("T", T, where="linear_betas", minimum=1)
    if not 0 < beta_start <= beta_end:
        raise ValueError(
            f"linear_betas: arguments 'beta_start' and 'beta_end' must satisfy 0 < beta_start <= beta_end, "
            f"got beta_start={beta_start!r}, beta_end={beta_end!r}"
        )
    scale = 1000.0 / T
    if not scale * beta_end < 1:
        raise ValueError(
            f"linear_betas: argument 'beta_end'={beta_end!r} scaled by 1000/T (T={T}) is "
            f"{scale * beta_end:g}, not < 1; use a larger 'T' or a smaller 'beta_end'"
        )
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)


def betas_from_alpha_bar(
    alpha_bar_fn: Callable[[torch.Tensor], torch.Tensor], T: int, max_beta: float = 0.999
) -> torch.Tensor:
    """Discretise a continuous ``alpha_bar`` into betas for t = 1..T::

        beta_t = min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), max_beta)

    Args:
        alpha_bar_fn: maps a float64 tensor of times in [0, 1] to
            ``alpha_bar`` of the same shape (``cosine_alpha_bar``,
            ``cosine_variant_alpha_bar`` or a ``functools.partial`` of them).
        T: number of steps.
        max_beta: cap on each beta, in (0, 1]; keeps the last steps from
            being singular (``alpha_bar(1)`` is about 0).

    Returns float64 of shape (T,).
    """
    T = check_int("T", T, where="betas_from_alpha_bar", minimum=1)
    check_float("max_beta", max_beta, low=0.0, high=1.0, low_open=True, where="betas_from_alpha_bar")
    times = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.as_tensor(alpha_bar_fn(times), dtype=torch.float64)
    if alpha_bar.shape != times.shape:
        raise ValueError(
            f"betas_from_alpha_bar: argument 'alpha_bar_fn' must map a ({T + 1},) tensor to the same shape, "
            f"got {tuple(alpha_bar.shape)}"
        )
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule, every tensor float64 of shape (T + 1,) on
    the CPU and indexed by the timestep t = 0..T (t = 0 is clean data).

    Attributes:
        name: the ``make_schedule`` name it was built from.
        T: number of diffusion steps.
        betas: ``betas[0] = 0``; ``betas[t]`` is the variance added at step t.
        alphas: ``1 - betas``.
        alpha_bar: ``cumprod(alphas)``, so ``alpha_bar[0] = 1``.

    Index with the timesteps then move to the model's device and dtype:
    ``schedule.alpha_bar[t].to(x)``.
    """

    name: str
    T: int
    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor

    @classmethod
    def from_betas(cls, name: str, betas: torch.Tensor) -> "Schedule":
        """Build from the betas of t = 1..T, shape (T,)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(
                f"Schedule.from_betas: argument 'betas' must be 1-D and non-empty, got {tuple(betas.shape)}"
            )
        if not bool(((betas >= 0) & (betas <= 1)).all()):
            raise ValueError("Schedule.from_betas: argument 'betas' must lie in [0, 1]")
        betas = torch.cat([betas.new_zeros(1), betas])
        alphas = 1 - betas
        return cls(name=name, T=betas.numel() - 1, betas=betas, alphas=alphas, alpha_bar=torch.cumprod(alphas, 0))

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_bar[t] / (1 - alpha_bar[t])`` at
        integer timesteps ``t`` (an int or an integer tensor of any shape,
        values in 0..T); ``inf`` at t = 0. Float64, shape of ``t``."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ArgumentTypeError(f"Schedule.snr: argument 't' must hold integer timesteps, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.T):
            raise ValueError(f"Schedule.snr: argument 't' must be in [0, {self.T}], got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        a = self.alpha_bar[t.cpu()]
        return a / (1 - a)

    def strided(self, steps: int) -> torch.Tensor:
        """``steps`` evenly spaced timesteps from 1..T for fast sampling.

        Returns an increasing, duplicate-free int64 tensor of shape (steps,)
        whose last entry is T and whose first is 1 (for ``steps >= 2``;
        ``steps = 1`` gives ``[T]``, one jump from pure noise).
        """
        steps = check_int("steps", steps, where="Schedule.strided", minimum=1, maximum=self.T)
        if steps == 1:
            return torch.tensor([self.T], dtype=torch.int64)
        # Spacing (T - 1) / (steps - 1) >= 1, so rounding half up keeps the
        # points distinct and the ends exact.
        points = torch.linspace(1, self.T, steps, dtype=torch.float64)
        return torch.floor(points + 0.5).to(torch.int64)

    def __repr__(self) -> str:
        return f"Schedule(name={self.name!r}, T={self.T})"


def _cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    return betas_from_alpha_bar(lambda t: cosine_alpha_bar(t, s=s), T, max_beta=max_beta)


def _cosine_variant(
    T: int, start: float = 0.2, end: float = 1.0, tau: float = 1.5, clip_min: float = 1e-9, max_beta: float = 0.999
) -> torch.Tensor:
    # Check the arguments once, here, rather than per call of the lambda.
    cosine_variant_alpha_bar(0.0, start=start, end=end, tau=tau, clip_min=clip_min)
    fn = lambda t: cosine_variant_alpha_bar(t, start=start, end=end, tau=tau, clip_min=clip_min)  # noqa: E731
    return betas_from_alpha_bar(fn, T, max_beta=max_beta)


def _linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return linear_betas(T, beta_start=beta_start, beta_end=beta_end)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "cosine": _cosine,
    "cosine_variant": _cosine_variant,
    "linear": _linear,
}
"""Schedule name -> function ``(T, **kwargs) -> betas (T,)``."""

_KWARGS = {
    "cosine": ("s", "max_beta"),
    "cosine_variant": ("start", "end", "tau", "clip_min", "max_beta"),
    "linear": ("beta_start", "beta_end"),
}


def make_schedule(name: str, T: int, **kwargs) -> Schedule:
    """Build a ``Schedule`` of ``T`` steps.

    Args:
        name: ``"cosine"`` (kwargs ``s``, ``max_beta``), ``"cosine_variant"``
            (``start``, ``end``, ``tau``, ``clip_min``, ``max_beta``) or
            ``"linear"`` (``beta_start``, ``beta_end``).
        T: number of diffusion steps, >= 1.
        kwargs: passed to the schedule's function (see above).
    """
    if name not in SCHEDULES:
        raise ValueError(f"make_schedule: unknown schedule name {name!r}; known names: {sorted(SCHEDULES)}")
    T = check_int("T", T, where="make_schedule", minimum=1)
    unknown = sorted(set(kwargs) - set(_KWARGS[name]))
    if unknown:
        raise ValueError(
            f"make_schedule: unknown keyword argument(s) {unknown} for schedule {name!r}; "
            f"it accepts {list(_KWARGS[name])}"
        )
    return Schedule.from_betas(name, SCHEDULES[name](T, **kwargs))


def min_snr_weight(snr, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weight of the epsilon-prediction loss (Hang et al.
    2023): ``min(snr, gamma) / snr``, i.e. 1 where ``snr <= gamma`` and
    ``gamma / snr`` above (0 at ``snr = inf``, 1 at ``snr = 0``).

    Args:
        snr: a tensor (or number) of non-negative SNRs, any shape.
        gamma: the clamp, > 0.

    Returns a float tensor of ``snr``'s shape.
    """
    check_float("gamma", gamma, low=0.0, high=math.inf, low_open=True, where="min_snr_weight")
    snr = _as_float_tensor(snr)
    # gamma / max(snr, gamma) equals min(snr, gamma) / snr without 0 / 0.
    return gamma / snr.clamp(min=gamma)
