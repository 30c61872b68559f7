"""VQ-DDM: multinomial (discrete) diffusion over a tokenizer's code indices
(Hu et al., "Global Context with Discrete Diffusion in Vector Quantised
Modelling for Image Generation", CVPR 2022; the process is Hoogeboom et al.'s
multinomial diffusion with uniform transitions).

Codes are int64 maps z_0 (B, H, W), H = W = ``code_size``, with values in
[0, K), K = ``num_classes`` (the tokenizer's codebook size).

Forward process (``q_sample``), with ``alpha_bar`` from
``make_schedule(schedule, timesteps)`` (``alpha_bar[0] = 1``)::

    q(z_t | z_0) = Cat(alpha_bar_t onehot(z_0) + (1 - alpha_bar_t) / K)

sampled by keeping z_0 with probability ``alpha_bar_t`` and drawing a
uniform class otherwise (which may again be z_0: the same distribution).

Model (the paper's eq. 23): the UNet ``mu`` (``pyvq.nn.unet.UNet``, K input
and K output channels) reads the one-hot map Z_t (B, K, H, W) and the
integer timestep t; the logits of the z_0 prediction are
``mu(Z_t, t) + Z_t``. The UNet's last conv is zero-initialised, so a fresh
model predicts "z_0 is probably z_t". The reverse step is the posterior of
that prediction (``pyvq.ops.multinomial_posterior``)::

    p(z_{t-1} | z_t) ∝ Q_t[k, z_t] * (alpha_bar_{t-1} softmax(logits)_k + (1 - alpha_bar_{t-1}) / K)

Training objective (``training_loss``): the variational bound, one random
timestep per sample. ``L_t`` is the mean over the H * W positions of
``pyvq.ops.multinomial_kl(z_t, z_0, logits, alpha_t, alpha_bar_{t-1})``,
``KL(q(z_{t-1} | z_t, z_0) || p(z_{t-1} | z_t))`` in nats per code. At t = 1
``alpha_bar_0 = 1`` makes the true posterior the point mass on z_0 and the op
returns exactly the decoder term ``-log p(z_0 | z_1)`` (the op's
``0 log 0 = 0`` convention drops every class but z_0), so one call covers
t = 1..T with no special case. The timestep is drawn from p(t): uniform on
1..T, or (``importance_sampling``) improved DDPM's loss-second-moment
sampler, ``p(t) ∝ sqrt(E[L_t^2])`` over the last ``history`` values of L_t
seen at each t, mixed with ``uniform_prob`` of the uniform distribution,
and uniform until every t has a full history. The loss is
``mean_b L_{t_b}(b) / p(t_b)``: an unbiased estimate of ``sum_{t=1}^T L_t``,
the bound without its parameter-free prior term (about 1e-9 nats per code
for the cosine schedule at T = 4000), in nats per code.

The loss history is two persistent buffers, ``loss_history`` (T + 1,
history) float32 (row t: the last values of L_t, oldest first; row 0 unused)
and ``loss_counts`` (T + 1,) int64, so checkpoints and ``save_pretrained``
keep the sampler's state. It is updated with the detached per-sample L_t in
training mode only. Under DistributedDataParallel each rank keeps its own
history (and DDP's buffer broadcast copies rank 0's at every forward); the
estimate stays unbiased either way since each sample is weighted by the p(t)
it was drawn from.

Sampling (``sample``): z_T uniform, then ancestral steps t -> s through all
T steps or through ``steps`` strided timesteps (``Schedule.strided``) ending
with a jump to s = 0. A jump uses the posterior with
``alpha_t = alpha_bar_t / alpha_bar_s`` and ``alpha_bar_prev = alpha_bar_s``;
at s = 0 (``alpha_bar_0 = 1``) it samples z_0 from ``p(z_0 | z_t)``
∝ ``Q(t -> 0)[k, z_t] softmax(logits)_k``. Categorical draws use the
Gumbel-max trick with the caller's generator, so results are a function of
the generator's state. ``inpaint`` (paper section 4.4) is the same chain
with the kept positions re-drawn from q(z_s | z_0) after every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyvq._checks import accumulation_dtype, check_bool, check_choice, check_float, check_int
from pyvq.models._pretrained import PretrainedModel, register_preset
from pyvq.models.priors._config import build_unet, check_tokenizer_field, check_unet_fields
from pyvq.models.priors.base import DiffusionPrior
from pyvq.models.priors.sampling import (
    generator_device,
    gumbel_argmax,
    push_loss_history,
    rand,
    randint,
    second_moment_probs,
)
from pyvq.models.priors.schedules import SCHEDULES, Schedule, make_schedule
from pyvq.ops import multinomial_kl, multinomial_posterior

__all__ = [
    "MultinomialDiffusion",
    "MultinomialDiffusionConfig",
    "second_moment_probs",  # lives in pyvq.models.priors.sampling; kept importable from here
    "uniform_prior_kl",
]

_NAME = "MultinomialDiffusionConfig"


# ---------------------------------------------------------------- helpers
def uniform_prior_kl(alpha_bar: float, num_classes: int) -> float:
    """``KL(q(z_T | z_0) || uniform)`` per code, nats (the bound's prior
    term; the same for every z_0)::

        (a + (1 - a) / K) log(1 + a (K - 1)) + (K - 1) (1 - a) / K log(1 - a)

    with ``a = alpha_bar_T``; 0 at ``a = 0``.
    """
    a, K = float(alpha_bar), int(num_classes)
    hit = (a + (1 - a) / K) * math.log1p(a * (K - 1))
    other = 0.0 if a >= 1 else (K - 1) * (1 - a) / K * math.log1p(-a)
    return hit + other


def _cpu_schedule(name: str, T: int) -> Schedule:
    # On the CPU even inside ``with torch.device("meta"):`` (building a big
    # preset without memory): the schedule is data, read on the host.
    with torch.device("cpu"):
        return make_schedule(name, T)


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class MultinomialDiffusionConfig:
    """Architecture and training settings of a ``MultinomialDiffusion``
    (defaults: preset ``vqddm_celebahq_512``).

    Attributes:
        num_classes: K, the tokenizer's codebook size (>= 2).
        code_size: side of the square code map (H = W); divisible by
            ``2 ** (len(channel_mult) - 1)``.
        timesteps: T, diffusion steps.
        schedule: a ``make_schedule`` name: ``"cosine"`` (the paper's),
            ``"linear"`` (needs T > 20) or ``"cosine_variant"``.
        model_channels, channel_mult, num_res_blocks, attention_resolutions,
        dropout, num_heads, scale_shift, num_groups: the ``UNet``
            (``attention_resolutions`` are level sides, e.g. 16, 8, 4).
        importance_sampling: draw t from the loss-second-moment sampler
            (else uniformly).
        history: N, loss values kept per timestep for that sampler.
        uniform_prob: share of the uniform distribution mixed into it.
        tokenizer: the record of the tokenizer whose codes the prior was
            trained on (``pyvq.data.codes.tokenizer_record``; written by
            ``PriorTrainer``, checked against the tokenizer given to
            ``pyvq sample`` / ``pyvq inpaint``); None: not recorded.
    """

    num_classes: int = 512
    code_size: int = 16
    timesteps: int = 4000
    schedule: str = "cosine"
    model_channels: int = 224
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8, 4)
    dropout: float = 0.0
    num_heads: int = 4
    scale_shift: bool = True
    num_groups: int = 32
    importance_sampling: bool = True
    history: int = 10
    uniform_prob: float = 1e-3
    tokenizer: dict | None = None

    def __post_init__(self):
        check_unet_fields(self, _NAME, ints=("history",))
        check_tokenizer_field(self, _NAME)
        check_int("num_classes", self.num_classes, where=_NAME, minimum=2, what="field")
        check_bool("importance_sampling", self.importance_sampling, where=_NAME, what="field")
        check_float("uniform_prob", self.uniform_prob, where=_NAME, what="field", low=0.0, high=1.0, high_open=True)
        check_choice("schedule", self.schedule, sorted(SCHEDULES), where=_NAME, what="field")
        try:
            _cpu_schedule(self.schedule, self.timesteps)
        except ValueError as exc:
            raise ValueError(f"{_NAME}: fields 'schedule' ({self.schedule!r}) and 'timesteps' "
                             f"({self.timesteps}) do not make a schedule: {exc}") from None


# ---------------------------------------------------------------- model
class MultinomialDiffusion(PretrainedModel, DiffusionPrior):
    """VQ-DDM prior over code maps; see the module docstring.

    Args:
        config: a ``MultinomialDiffusionConfig``.

    A ``DiffusionPrior`` (see ``pyvq.models.priors.base`` for the contract).
    Submodule ``net`` (``pyvq.nn.unet.UNet``; called ``unet`` before, and
    weights saved under that name still load); attribute ``schedule``
    (``Schedule``, float64 CPU tensors, rebuilt from the config, not saved);
    ``num_timesteps`` (T); buffers ``loss_history`` (T + 1, history) and
    ``loss_counts`` (T + 1,).

    Parameter counts (the UNet is all of them): ``vqddm_celebahq_1024``
    126,383,392 (the paper reports 117M for its K = 1024 model; 224 base
    channels is the multiple of 32 closest to it with channel_mult
    (1, 2, 2, 2), 2 blocks per level and attention at 16, 8 and 4: 192 gives
    93.4M), ``vqddm_celebahq_512`` 124,318,496, ``vqddm_tiny`` (K = 64)
    791,360.

    ``forward(codes, generator=None)`` is ``training_loss``; ``sample``,
    ``inpaint`` and ``nll`` run in eval mode (as every ``Prior``).
    """

    config_class = MultinomialDiffusionConfig
    code_kind = "indices"  # the codes it models (see pyvq.data.codes)
    _state_dict_renames = {"unet.": "net."}

    def __init__(self, config: MultinomialDiffusionConfig):
        super().__init__(config)
        c = config
        self.num_classes = c.num_classes
        self.schedule: Schedule = _cpu_schedule(c.schedule, c.timesteps)
        self.net = build_unet(c, c.num_classes)
        self.register_buffer("loss_history", torch.zeros(c.timesteps + 1, c.history, dtype=torch.float32))
        self.register_buffer("loss_counts", torch.zeros(c.timesteps + 1, dtype=torch.int64))

    @property
    def code_shape(self) -> tuple[int, int]:
        return (self.config.code_size, self.config.code_size)

    def _alpha(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """float64 CPU schedule values -> the op's alpha dtype on the model's device."""
        return values.to(self._device, accumulation_dtype(dtype))

    # ------------------------------------------------------------ forward process
    def q_sample(self, codes: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z_t ~ q(z_t | z_0): keep each code with probability
        ``alpha_bar_t``, else draw a uniform class.

        Args:
            codes: (B, H, W) int64 z_0 in [0, K).
            t: an int or a (B,) integer tensor in 0..T (t = 0 returns a copy
                of ``codes`` and draws nothing).
            generator: for the draws (rand (B, H, W), then randint (B, H, W)).

        Returns (B, H, W) int64.
        """
        codes = self._check_codes(codes, "codes", "q_sample")
        t = self._check_timesteps(t, codes.shape[0], "q_sample", low=0)
        return self._q_sample(codes, t, generator)

    def _q_sample(self, codes, t, generator):
        if not bool(t.any()):
            return codes.clone()
        a = self.schedule.alpha_bar[t].to(codes.device).view(-1, 1, 1)
        keep = rand(codes.shape, generator, codes.device).to(torch.float64) < a
        uniform = randint(self.num_classes, codes.shape, generator, codes.device)
        return torch.where(keep, codes, uniform)

    # ------------------------------------------------------------ model
    def p_logits(self, z_t: torch.Tensor, t) -> torch.Tensor:
        """Logits of the z_0 prediction, ``net(onehot(z_t), t) + onehot(z_t)``.

        Args:
            z_t: (B, H, W) int64 codes in [0, K).
            t: an int or a (B,) integer tensor in 1..T.

        Returns (B, K, H, W) in the UNet's dtype.
        """
        z_t = self._check_codes(z_t, "z_t", "p_logits")
        t = self._check_timesteps(t, z_t.shape[0], "p_logits")
        return self._p_logits(z_t, t)

    def _p_logits(self, z_t, t):
        onehot = F.one_hot(z_t, self.num_classes).permute(0, 3, 1, 2).to(self._dtype)
        return self.net(onehot, t.to(z_t.device, torch.float32)) + onehot

    def p_posterior_logprobs(self, z_t: torch.Tensor, t, s) -> torch.Tensor:
        """Log-probabilities of the model's jump t -> s, p(z_s | z_t).

        ``multinomial_posterior(z_t, logits, alpha_t = alpha_bar_t /
        alpha_bar_s, alpha_bar_prev = alpha_bar_s)``; s = t - 1 is the
        ordinary reverse step, s = 0 the decoder p(z_0 | z_t).

        Args:
            z_t: (B, H, W) int64 codes.
            t: an int or (B,) integer tensor in 1..T.
            s: an int or (B,) integer tensor in 0..T, ``s < t``.

        Returns (B, K, H, W) log-probabilities (``-inf`` where impossible).
        """
        z_t = self._check_codes(z_t, "z_t", "p_posterior_logprobs")
        B = z_t.shape[0]
        t = self._check_timesteps(t, B, "p_posterior_logprobs")
        s = self._check_timesteps(s, B, "p_posterior_logprobs", name="s", low=0)
        if bool((s >= t).any()):
            i = int((s >= t).nonzero()[0])
            raise ValueError(f"{self._where('p_posterior_logprobs')}: argument 's' must be smaller than 't' "
                             f"(a jump back in time), got s={int(s[i])}, t={int(t[i])} at batch index {i}")
        return self._posterior(z_t, t, s, self._p_logits(z_t, t))

    def _posterior(self, z_t, t, s, logits):
        ab = self.schedule.alpha_bar
        alpha_t = self._alpha(ab[t] / ab[s], logits.dtype)
        return multinomial_posterior(z_t, logits, alpha_t, self._alpha(ab[s], logits.dtype))

    def vlb_term(self, codes: torch.Tensor, z_t: torch.Tensor, t, logits: torch.Tensor | None = None) -> torch.Tensor:
        """L_t of the bound, per sample: the mean over positions of
        ``KL(q(z_{t-1} | z_t, z_0) || p(z_{t-1} | z_t))``; at t = 1
        (``alpha_bar_0 = 1``) exactly ``-log p(z_0 | z_1)``.

        Args:
            codes: (B, H, W) z_0; z_t: (B, H, W) its noised codes.
            t: an int or (B,) integer tensor in 1..T.
            logits: ``p_logits(z_t, t)`` when already computed.

        Returns (B,) float, nats per code; differentiable in the UNet.
        """
        codes = self._check_codes(codes, "codes", "vlb_term")
        z_t = self._check_codes(z_t, "z_t", "vlb_term")
        if z_t.shape != codes.shape:
            raise ValueError(f"{self._where('vlb_term')}: arguments 'codes' and 'z_t' must have the same shape, "
                             f"got {tuple(codes.shape)} and {tuple(z_t.shape)}")
        t = self._check_timesteps(t, codes.shape[0], "vlb_term")
        if logits is None:
            logits = self._p_logits(z_t, t)
        return self._vlb_term(codes, z_t, t, logits)

    def _vlb_term(self, codes, z_t, t, logits):
        ab, alphas = self.schedule.alpha_bar, self.schedule.alphas
        kl = multinomial_kl(z_t, codes, logits, self._alpha(alphas[t], logits.dtype),
                            self._alpha(ab[t - 1], logits.dtype))
        return kl.float().mean(dim=(1, 2))

    # ------------------------------------------------------------ training
    def timestep_probs(self) -> torch.Tensor:
        """p(t) of the training sampler: (T + 1,) float64 on the CPU,
        ``p[0] = 0``; uniform unless ``importance_sampling`` (then
        ``second_moment_probs`` of the loss history)."""
        if not self.config.importance_sampling:
            T = self.num_timesteps
            probs = torch.full((T + 1,), 1.0 / T, dtype=torch.float64)
            probs[0] = 0
            return probs
        return second_moment_probs(self.loss_history, self.loss_counts, self.config.uniform_prob)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch`` timesteps from ``timestep_probs()`` (with
        replacement, ``torch.multinomial`` on the generator's device).

        Returns (t, p): (B,) int64 timesteps in 1..T and their (B,) float64
        probabilities, both on the CPU.
        """
        probs = self.timestep_probs()
        dev = generator_device(generator, torch.device("cpu"))
        t = torch.multinomial(probs.to(dev), batch, replacement=True, generator=generator).cpu()
        return t, probs[t]

    def update_loss_history(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append per-sample L_t values to the sampler's history (a ring of
        ``history`` values per timestep, oldest dropped first), in order
        (``push_loss_history``).

        Args:
            t: (B,) integer timesteps in 1..T; losses: (B,) their L_t.
        """
        push_loss_history(self.loss_history, self.loss_counts, t, losses)

    def training_loss(self, codes: torch.Tensor, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """The importance-weighted bound on a batch of codes.

        Draws, in this order: t with ``sample_timesteps``, z_t with
        ``q_sample``; then ``L = vlb_term(codes, z_t, t)`` (B,) and
        ``loss = mean_b L_b / p(t_b)``, an unbiased estimate of
        ``sum_{t=1}^T L_t`` in nats per code (without the prior term).
        In training mode the detached L values update the loss history.

        Args:
            codes: (B, H, W) integer codes in [0, K).
            generator: for every random draw (dropout excepted).

        Returns:
            ``(loss, logs)``: a scalar float32 tensor with a graph, and
            ``{"train/vlb": loss, "train/kl": mean_b L_b}`` as floats.
        """
        codes = self._check_codes(codes, "codes", "training_loss")
        t, p = self.sample_timesteps(codes.shape[0], generator)
        z_t = self._q_sample(codes, t, generator)
        L = self._vlb_term(codes, z_t, t, self._p_logits(z_t, t))
        weight = (1.0 / p).to(L.device, L.dtype)
        loss = (L * weight).mean()
        if self.training:
            self.update_loss_history(t, L)
        return loss, {"train/vlb": float(loss.detach()), "train/kl": float(L.detach().mean())}

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, *, steps: int | None = None, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """Unconditional code maps from the reverse chain.

        Args:
            n: number of maps, >= 1.
            steps: None for all T steps, else that many strided timesteps
                (``schedule.strided(steps)``, e.g. 1 = one jump T -> 0).
            generator: for every draw (z_T, then one Gumbel draw (n, K, H, W)
                per step); equal generator states give equal maps.
            progress: show a tqdm bar.

        Returns (n, H, W) int64 codes in [0, K).
        """
        n = check_int("n", n, where=self._where("sample"), minimum=1)
        plan = self._reverse_plan(steps, "sample")
        z = randint(self.num_classes, (n, *self.code_shape), generator, self._device)
        return self._reverse_chain(z, plan, lambda z, t, s: self._step(z, t, s, generator), progress=progress,
                                   desc="sampling")

    def _step(self, z, t: int, s: int, generator) -> torch.Tensor:
        B = z.shape[0]
        tt = torch.full((B,), t, dtype=torch.int64)
        ss = torch.full((B,), s, dtype=torch.int64)
        return gumbel_argmax(self._posterior(z, tt, ss, self._p_logits(z, tt)), generator)

    @torch.no_grad()
    def inpaint(self, codes: torch.Tensor, keep: torch.Tensor, *, steps: int | None = None,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Fill the positions of ``codes`` where ``keep`` is False (paper
        section 4.4, no retraining): the chain of ``sample``, with the kept
        positions re-drawn from q(z_s | z_0) after every step (and at the
        start, from q(z_T | z_0)); at s = 0 they are ``codes`` exactly.

        Args:
            codes: (B, H, W) integer codes in [0, K) (values at positions
                not kept are ignored but must be in range).
            keep: bool, broadcastable to (B, H, W) (e.g. (H, W)), True where
                ``codes`` is kept.
            steps, generator, progress: as in ``sample``.

        Returns (B, H, W) int64, equal to ``codes`` where ``keep``.
        """
        codes = self._check_codes(codes, "codes", "inpaint")
        keep = self._check_keep(keep, codes, "inpaint")
        plan = self._reverse_plan(steps, "inpaint")
        B = codes.shape[0]

        def known(s: int) -> torch.Tensor:
            return codes if s == 0 else self._q_sample(codes, torch.full((B,), s, dtype=torch.int64), generator)

        z = randint(self.num_classes, codes.shape, generator, codes.device)
        return self._reverse_chain(z, plan, lambda z, t, s: self._step(z, t, s, generator), progress=progress,
                                   desc="inpainting", keep=keep, known=known)

    # ------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nll(self, codes: torch.Tensor, *, batch_t: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """The negative variational bound, nats per code:
        ``sum_{t=1}^T L_t + KL(q(z_T | z_0) || uniform)`` (``vlb_term`` and
        ``uniform_prior_kl``), exact over the timesteps and with one draw
        of z_t per t.

        Cost: T UNet evaluations on the batch (4000 for the paper's
        presets), grouped ``batch_t`` timesteps per call (a batch of
        B * batch_t maps). z_t for t = 1..T is drawn in increasing t, one
        ``q_sample`` per t, so the result does not depend on ``batch_t``
        (up to float rounding).

        Precision: with float32 logits each ``multinomial_kl`` term is
        within about 4e-7 nats of float64 (measured over the cosine
        schedule at K = 512; the last terms, whose true value is ~1e-10,
        may come out at -1e-8); run a float64 copy of the model
        (``model.double()``) for bounds exact to more digits.

        Args:
            codes: (B, H, W) integer codes in [0, K).
            batch_t: timesteps per UNet call (None: 1).
            generator: for the z_t draws.

        Returns (B,) float32.
        """
        codes = self._check_codes(codes, "codes", "nll")
        batch_t = 1 if batch_t is None else check_int("batch_t", batch_t, where=self._where("nll"), minimum=1)
        B, T = codes.shape[0], self.num_timesteps
        with self._eval_mode():
            total = torch.zeros(B, dtype=torch.float64, device=codes.device)
            for start in range(1, T + 1, batch_t):
                ts = range(start, min(start + batch_t, T + 1))
                t = torch.cat([torch.full((B,), ti, dtype=torch.int64) for ti in ts])
                z_t = torch.cat([self._q_sample(codes, torch.full((B,), ti, dtype=torch.int64), generator)
                                 for ti in ts])
                x0 = codes.repeat(len(ts), 1, 1)
                L = self._vlb_term(x0, z_t, t, self._p_logits(z_t, t))
                total += L.double().view(len(ts), B).sum(0)
        prior = uniform_prior_kl(float(self.schedule.alpha_bar[T]), self.num_classes)
        return (total + prior).float()


# The paper's CelebA-HQ 256 priors: 16x16 codes of a K = 512 or K = 1024
# VQGAN, T = 4000, cosine schedule, a DDPM-style UNet with attention at 16,
# 8 and 4. The paper gives 117M parameters for K = 1024 but not the width;
# 224 base channels is the closest to it (126.4M; see the class docstring).
register_preset("vqddm_celebahq_512", MultinomialDiffusionConfig(num_classes=512))
register_preset("vqddm_celebahq_1024", MultinomialDiffusionConfig(num_classes=1024))
# A toy for tests and the CPU demo: K = 64 by default (build it with
# num_classes set to the tokenizer's codebook size), 16x16 codes (vqgan_tiny
# at f2 on 32x32 images), T = 100 so that sampling every step is cheap.
register_preset(
    "vqddm_tiny",
    MultinomialDiffusionConfig(
        num_classes=64, code_size=16, timesteps=100, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), num_groups=8,
    ),
)
