"""Gaussian diffusion over BRICS key codes (the BRICS prior, appendix).

BRICS encodes an image into key codes ``z`` in [0, 1]^(Cz, Hz, Wz); this
prior learns their distribution with a DDPM-style Gaussian diffusion:

- data space: ``x0 = to_model(z) = 2 z - 1`` in [-1, 1]; samples come back
  through ``from_model(x) = clamp((x + 1) / 2, 0, 1)``;
- forward process: ``q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I)`` with
  ``a_t = alpha_bar[t]`` of a ``pyvq.models.priors.schedules`` schedule
  (default the cosine variant of Chen 2023, start 0.2, end 1, tau 1.5, as
  BRICS; also ``"cosine"`` and ``"linear"``), t = 1..T;
- network: ``pyvq.nn.UNet`` predicts the noise ``eps`` from ``(x_t, t)``
  (the integer timestep goes to its sinusoidal embedding); BRICS' UNet has
  channel multipliers (1, 2, 3, 4), 2 residual blocks per level and
  attention at sides 32, 16 and 8 (those of them that the code size has);
- loss: per-sample ``mean((eps_hat - eps)**2)`` weighted by Min-SNR-gamma
  (Hang et al. 2023; epsilon form ``min(snr_t, gamma) / snr_t``, gamma 5),
  t uniform in 1..T;
- sampling: DDPM ancestral steps (all T, or a strided subset with the
  respaced posterior variance) or DDIM (Song et al. 2021) with ``eta``, over
  ``Schedule.strided(steps)`` in decreasing order, the last step jumping to
  t = 0 where ``alpha_bar = 1`` (so the result is the predicted x0);
- inpainting by replacement: after every reverse step the kept region of
  ``x_s`` is overwritten by a fresh ``q_sample(x0_known, s)``.

The predicted x0 is clipped to [-1, 1] (``clip_denoised``) and the noise
estimate recomputed from the clipped x0, as in ADM, so that the DDIM and
DDPM updates stay consistent (with that, DDIM with ``eta=1`` is the DDPM
update).

Key values outside [0, 1] are clamped into it (BRICS' keys are sigmoids, so
this only matters for hand-made inputs); wrong shapes raise ``ValueError``.

Tensor layout: key codes and diffusion states are (B, C, H, W) =
(B, channels, code_size, code_size); timesteps are int64 of shape (B,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyvq._checks import ArgumentTypeError, accumulation_dtype, check_bool, check_choice, check_float, check_int
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.priors._config import build_unet, check_tokenizer_field, check_unet_fields, level_sizes
from pyvq.models.priors.base import DiffusionPrior
from pyvq.models.priors.schedules import SCHEDULES, Schedule, make_schedule, min_snr_weight

__all__ = ["GaussianDiffusion", "GaussianDiffusionConfig"]

_NAME = "GaussianDiffusionConfig"
METHODS = ("ddim", "ddpm")


@dataclass(frozen=True)
class GaussianDiffusionConfig:
    """Architecture and schedule of a ``GaussianDiffusion`` prior.

    Attributes:
        channels: Cz, key-code channels (the tokenizer's ``code_channels``).
        code_size: Hz = Wz, key-code side; divisible by
            ``2 ** (len(channel_mult) - 1)``.
        timesteps: T, diffusion steps.
        schedule: ``"cosine_variant"`` (BRICS), ``"cosine"`` or ``"linear"``.
        schedule_kwargs: keyword arguments of ``make_schedule`` for that
            schedule; empty means its defaults (for ``"cosine_variant"``:
            start 0.2, end 1, tau 1.5, BRICS' values).
        min_snr_gamma: gamma of the Min-SNR loss weight; None or 0 turns
            the weighting off (plain epsilon MSE).
        model_channels, channel_mult, num_res_blocks, dropout, num_heads,
            scale_shift, num_groups: the ``UNet``.
        attention_resolutions: level sides with self-attention; sides that
            the UNet does not have (``code_size / 2**i``) are ignored, so
            the paper's (32, 16, 8) fits every code size
            (``unet_attention_resolutions`` is what is used).
        clip_denoised: clip the predicted x0 to [-1, 1] while sampling.
        tokenizer: the record of the tokenizer whose codes the prior was
            trained on (``pyvq.data.codes.tokenizer_record``; written by
            ``PriorTrainer``, checked against the tokenizer given to
            ``pyvq sample`` / ``pyvq inpaint``); None: not recorded.
    """

    channels: int = 8
    code_size: int = 16
    timesteps: int = 1000
    schedule: str = "cosine_variant"
    schedule_kwargs: dict = field(default_factory=dict)
    min_snr_gamma: float | None = 5.0
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    num_heads: int = 4
    scale_shift: bool = True
    num_groups: int = 32
    clip_denoised: bool = True
    tokenizer: dict | None = None

    def __post_init__(self):
        check_unet_fields(self, _NAME, ints=("channels",), strict_attention=False)
        check_tokenizer_field(self, _NAME)
        check_bool("clip_denoised", self.clip_denoised, where=_NAME, what="field")
        if self.min_snr_gamma is not None:
            check_float("min_snr_gamma", self.min_snr_gamma, where=_NAME, what="field", low=0.0, high=math.inf, high_open=True)
        check_choice("schedule", self.schedule, sorted(SCHEDULES), where=_NAME, what="field")
        if not isinstance(self.schedule_kwargs, dict):
            raise ArgumentTypeError(f"{_NAME}: field 'schedule_kwargs' must be a dict, got "
                                    f"{self.schedule_kwargs!r} ({type(self.schedule_kwargs).__name__})")
        try:
            self.make_schedule()
        except ValueError as exc:
            raise ValueError(f"{_NAME}: fields 'schedule' / 'schedule_kwargs' / 'timesteps' do not make a "
                             f"schedule: {exc}") from exc

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """UNet level sides, ``code_size / 2**i``."""
        return level_sizes(self)

    @property
    def unet_attention_resolutions(self) -> tuple[int, ...]:
        """The ``attention_resolutions`` the UNet has a level for."""
        return tuple(r for r in self.attention_resolutions if r in self.level_sizes)

    @property
    def code_shape(self) -> tuple[int, int, int]:
        """(channels, code_size, code_size)."""
        return (self.channels, self.code_size, self.code_size)

    def make_schedule(self) -> Schedule:
        """The ``Schedule`` (float64, on the CPU whatever the default device)."""
        with torch.device("cpu"):  # also under ``with torch.device("meta")``
            return make_schedule(self.schedule, self.timesteps, **self.schedule_kwargs)


class GaussianDiffusion(PretrainedModel, DiffusionPrior):
    """Epsilon-prediction Gaussian diffusion over key codes; see the module
    docstring.

    Args:
        config: a ``GaussianDiffusionConfig``.

    A ``DiffusionPrior`` (see ``pyvq.models.priors.base`` for the contract).
    Submodule: ``net`` (``pyvq.nn.UNet``, ``channels`` in and out).
    Attributes: ``schedule`` (``Schedule``, float64 on the CPU; the
    coefficients are copied once per device and cast to the state's dtype
    after indexing); ``num_timesteps`` (T).
    """

    config_class = GaussianDiffusionConfig
    code_kind = "keys"  # the codes it models (see pyvq.data.codes)

    def __init__(self, config: GaussianDiffusionConfig):
        super().__init__(config)
        c = config
        self.net = build_unet(c, c.channels)
        self.schedule = c.make_schedule()
        # device -> float64 tables (alpha_bar, snr); not buffers, so that
        # ``.half()`` cannot round the schedule and state_dict holds only weights.
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def code_shape(self) -> tuple[int, int, int]:
        """(channels, code_size, code_size)."""
        return self.config.code_shape

    # ------------------------------------------------------------ helpers
    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        if device not in self._tables:
            ab = self.schedule.alpha_bar
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._tables[device] = (ab.to(device, dtype), (ab / (1 - ab)).to(device, dtype))
        return self._tables[device]

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar[t] as (B, 1, 1, 1) in float64 on ``like``'s device."""
        return self._table(like.device)[0][t].reshape(-1, 1, 1, 1)

    # ------------------------------------------------------------ spaces
    @staticmethod
    def to_model(keys: torch.Tensor) -> torch.Tensor:
        """Key codes in [0, 1] -> diffusion space [-1, 1]: ``2 keys - 1``."""
        return 2 * keys - 1

    @staticmethod
    def from_model(x: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> key codes: ``clamp((x + 1) / 2, 0, 1)``."""
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------ process
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x0) = sqrt(a_t) x0 + sqrt(1 - a_t) noise``.

        Args:
            x0: (B, C, H, W), diffusion space ([-1, 1]).
            t: int or (B,) integer timesteps in 0..T (t = 0 returns x0).
            noise: standard normal noise of x0's shape; drawn with
                ``generator`` when None.

        Returns (B, C, H, W) in x0's dtype.
        """
        t = self._check_timesteps(t, x0.shape[0], "q_sample", low=0, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"{self._where('q_sample')}: argument 'noise' must have x0's shape "
                             f"{tuple(x0.shape)}, got {tuple(noise.shape)}")
        ab = self._alpha_bar(t, x0)
        return (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(x0.dtype)

    def predict_eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The network's noise estimate: (B, C, H, W), t int or (B,) -> (B, C, H, W)."""
        t = self._check_timesteps(t, x_t.shape[0], "predict_eps", low=0, device=x_t.device)
        return self.net(x_t, t)

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """Invert ``q_sample``: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``,
        clipped to [-1, 1] when ``config.clip_denoised``.

        Shapes: x_t, eps (B, C, H, W); t int or (B,) -> (B, C, H, W).
        """
        t = self._check_timesteps(t, x_t.shape[0], "predict_x0", low=0, device=x_t.device)
        ab = self._alpha_bar(t, x_t)
        x0 = ((x_t - (1 - ab).sqrt() * eps) / ab.sqrt()).to(x_t.dtype)
        return x0.clamp(-1, 1) if self.config.clip_denoised else x0

    # ------------------------------------------------------------ training
    def training_loss(self, keys: torch.Tensor, generator: torch.Generator | None = None, *,
                      t: torch.Tensor | int | None = None,
                      noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Min-SNR-weighted epsilon-prediction loss on a batch of key codes.

        Args:
            keys: (B, C, H, W) key codes in [0, 1] (clamped into it).
            generator: draws t (uniform in 1..T) and the noise.
            t: fixed timesteps instead (int or (B,) in 1..T), e.g. for tests.
            noise: fixed noise (B, C, H, W) instead.

        Returns ``(loss, logs)``: ``loss`` the batch mean of
        ``w(t) * mean((eps_hat - eps)**2)`` (0-dim, float32 or wider), with
        ``w = min(snr_t, gamma) / snr_t`` (1 when the weighting is off);
        ``logs`` ``{"train/loss", "train/mse"}`` (floats; mse unweighted).
        """
        self._check_codes(keys, "keys", "training_loss")
        b = keys.shape[0]
        x0 = self.to_model(keys.clamp(0, 1))
        if t is None:
            t = torch.randint(1, self.num_timesteps + 1, (b,), generator=generator, device=keys.device)
        else:
            t = self._check_timesteps(t, b, "training_loss", device=keys.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        eps = self.net(x_t, t)
        mse = (eps.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        gamma = self.config.min_snr_gamma
        if gamma:
            w = min_snr_weight(self._table(keys.device)[1][t], gamma).to(mse.dtype)
            loss = (w * mse).mean()
        else:
            loss = mse.mean()
        logs = {"train/loss": float(loss.detach()), "train/mse": float(mse.detach().mean())}
        return loss, logs

    # ------------------------------------------------------------ sampling
    def _step(self, x: torch.Tensor, t: int, s: int, method: str, eta: float,
              generator: torch.Generator | None) -> torch.Tensor:
        """One reverse step x_t -> x_s (s < t)."""
        b = x.shape[0]
        tt = torch.full((b,), t, dtype=torch.int64, device=x.device)
        ab_t = float(self.schedule.alpha_bar[t])
        ab_s = float(self.schedule.alpha_bar[s])
        eps = self.net(x, tt)
        # The update in at least float32 (half-precision states are rounded once, at the end).
        dtype = accumulation_dtype(x.dtype)
        xf = x.to(dtype)
        x0 = (xf - math.sqrt(1 - ab_t) * eps.to(dtype)) / math.sqrt(ab_t)
        if self.config.clip_denoised:
            x0 = x0.clamp(-1, 1)
        # The noise consistent with the (clipped) x0 (ADM), so DDIM(eta=1) == DDPM.
        eps = (xf - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        if s == 0:
            return x0.to(x.dtype)
        if method == "ddpm":
            # Posterior q(x_s | x_t, x0) of the (respaced) forward process:
            # beta = 1 - a_t / a_s, the "fixed small" variance.
            beta = 1 - ab_t / ab_s
            c0 = math.sqrt(ab_s) * beta / (1 - ab_t)
            ct = math.sqrt(ab_t / ab_s) * (1 - ab_s) / (1 - ab_t)
            mean = c0 * x0 + ct * xf
            sigma = math.sqrt(beta * (1 - ab_s) / (1 - ab_t))
        else:
            sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
            mean = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        out = mean.to(x.dtype)
        if sigma > 0:
            out = out + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return out

    def _check_method(self, method, eta, where: str) -> float:
        check_choice("method", method, METHODS, where=where)
        return check_float("eta", eta, where=where, low=0.0, high=math.inf, high_open=True)

    @torch.no_grad()
    def sample(self, n: int, *, steps: int | None = None, method: str = "ddim", eta: float = 0.0,
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Draw ``n`` key codes.

        Args:
            n: number of samples (>= 0).
            steps: reverse steps over ``schedule.strided(steps)``; None: all T.
            method: ``"ddim"`` (with ``eta``; 0 is deterministic given the
                starting noise) or ``"ddpm"`` (ancestral, the posterior
                variance of the respaced process; ``eta`` is ignored).
            eta: DDIM noise scale (1 gives the DDPM update).
            generator: source of all randomness (on the model's device);
                the same seed gives the same samples.
            progress: show a tqdm bar.

        Returns (n, C, H, W) key codes in [0, 1], in the model's dtype and
        on its device. The model runs in eval mode (restored afterwards).
        """
        where = self._where("sample")
        n = check_int("n", n, where=where, minimum=0)
        eta = self._check_method(method, eta, where)
        plan = self._reverse_plan(steps, "sample")
        x = torch.randn((n, *self.config.code_shape), generator=generator, device=self._device, dtype=self._dtype)
        if n == 0:
            return self.from_model(x)
        x = self._reverse_chain(x, plan, lambda x, t, s: self._step(x, t, s, method, eta, generator),
                                progress=progress, desc=f"{method} sampling")
        return self.from_model(x)

    @torch.no_grad()
    def inpaint(self, keys: torch.Tensor, keep: torch.Tensor, *, steps: int | None = None, method: str = "ddim",
                eta: float = 0.0, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
        """Fill in key codes by replacement conditioning.

        The reverse process starts from ``x_T`` with its kept region set to
        ``q_sample(x0_known, T)``; after every step t -> s the kept region of
        ``x_s`` is replaced by a fresh ``q_sample(x0_known, s)`` (the last,
        s = 0, is x0_known itself).

        Args:
            keys: (B, C, H, W) known key codes in [0, 1] (values under
                ``~keep`` are ignored).
            keep: bool, broadcastable to (B, C, H, W), True where
                ``keys`` is kept.
            steps, method, eta, generator, progress: as ``sample``.

        Returns (B, C, H, W) key codes in [0, 1], equal to ``keys`` where
        ``keep`` is True, in ``keys``' dtype.
        """
        where = self._where("inpaint")
        self._check_codes(keys, "keys", "inpaint", min_batch=0)
        keep = self._check_keep(keep, keys, "inpaint", name="keys")
        eta = self._check_method(method, eta, where)
        plan = self._reverse_plan(steps, "inpaint")
        device, dtype = self._device, self._dtype
        x0_known = self.to_model(keys.clamp(0, 1)).to(device, dtype)

        def known(s: int) -> torch.Tensor:
            return x0_known if s == 0 else self.q_sample(x0_known, s, generator=generator)

        x = torch.randn(keys.shape, generator=generator, device=device, dtype=dtype)
        if keys.shape[0] == 0:
            return keys.clone()
        x = self._reverse_chain(x, plan, lambda x, t, s: self._step(x, t, s, method, eta, generator),
                                progress=progress, desc=f"{method} inpainting", keep=keep.to(device), known=known)
        out = self.from_model(x).to(keys.device, keys.dtype)
        return torch.where(keep, keys, out)


def _preset(channels: int, code_size: int, **kw) -> GaussianDiffusionConfig:
    return GaussianDiffusionConfig(channels=channels, code_size=code_size, **kw)


# BRICS' priors, one per tokenizer preset (code Hz x Wz x Cz): UNet with
# channel multipliers (1, 2, 3, 4), 2 residual blocks per level, attention
# at 32, 16 and 8 where the level exists (16x16 codes: levels 16, 8, 4, 2
# -> attention at 16 and 8), cosine-variant schedule, Min-SNR-5, T = 1000.
register_preset("keycode_diffusion_16x16x8", _preset(8, 16))
register_preset("keycode_diffusion_16x16x16", _preset(16, 16))
register_preset("keycode_diffusion_32x32x4", _preset(4, 32))
register_preset("keycode_diffusion_64x64x4", _preset(4, 64))
# A toy matching brics_tiny's 16x16x4 codes, for tests and demos: two levels
# (16, 8), 32/64 channels, attention only at 8 (and in the middle block:
# attention over the 256 positions of level 16 doubled the CPU cost of a
# step), T = 100 so that ancestral sampling over every step is cheap on a CPU.
register_preset(
    "keycode_diffusion_tiny",
    _preset(4, 16, timesteps=100, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_groups=8,
            attention_resolutions=(8,)),
)
