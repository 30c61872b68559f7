"""The prior contract (``Prior``) and what the diffusion priors share
(``DiffusionPrior``).

``PriorTrainer``, ``pyvq sample`` and ``pyvq inpaint`` use a prior through
``Prior``'s members only, so a new prior (a diffusion model or not, e.g. a
masked-token transformer) plugs in by implementing them.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from pyvq._checks import ArgumentTypeError, is_int
from pyvq.models.priors.sampling import progress_bar
from pyvq.models.priors.schedules import Schedule

__all__ = ["CODE_KINDS", "DiffusionPrior", "Prior"]

CODE_KINDS = ("indices", "keys")
"""What a prior can model: a VQ tokenizer's int64 code indices (B, H, W), or
BRICS' float key codes (B, C, H, W) in [0, 1] (see ``pyvq.data.codes``)."""


class Prior(nn.Module, metaclass=abc.ABCMeta):
    """What every prior over a tokenizer's codes provides.

    - ``code_kind`` (class attribute): ``"indices"`` or ``"keys"``, the kind
      of codes it models, as written in a codes folder's codes.json.
    - ``training_loss(codes, generator=None, ...) -> (loss, logs)``: a
      scalar loss with a graph and a dict of float logs (``"train/..."``);
      ``forward(codes, generator=None)`` calls it, so that a
      DistributedDataParallel wrapper sees the call.
    - ``sample(n, *, steps=None, generator=None, progress=False, ...)``:
      ``n`` code maps; equal generator states give equal maps.
    - ``inpaint(codes, keep, *, steps=None, generator=None, progress=False,
      ...)``: fill the codes where the bool tensor ``keep`` (broadcast to
      the codes' shape) is False; the known codes (``keep`` True) never
      change.
    - optionally ``nll(codes, ...)``: a (B,) negative log-likelihood (or a
      bound on it) in nats per code. Not defined here; callers test
      ``hasattr(prior, "nll")``.

    ``sample``, ``inpaint`` and ``nll`` run in eval mode (dropout off) and
    restore the previous mode (``_eval_mode``). ``steps`` is how many model
    evaluations the sampler makes (its meaning is the prior's own).

    ``Prior.__init__(config)`` checks that ``config`` is a
    ``config_class`` (when the class names one, as a ``PretrainedModel``
    does) and stores it as ``self.config``.

    Helpers for implementations: ``_check_codes`` (for a prior with a
    ``code_shape``, the shape of one code map: (H, W) of indices or
    (C, H, W) of keys, and for indices the codebook size K, ``num_codes``
    or, as the diffusion priors call it, ``num_classes``), ``_check_keep``,
    ``_device`` / ``_dtype`` (those of the first parameter), ``_progress``
    (an optional tqdm bar) and ``_where(method)`` (``"Class.method"``, the
    prefix of error messages; the helpers take the calling method's name).

    Weights saved before an attribute rename still load: a subclass maps
    the old state-dict key prefixes to the new ones in
    ``_state_dict_renames`` (e.g. ``{"unet.": "net."}``); ``load_state_dict``
    renames the keys (also under a parent's prefix, as in an EMA copy)
    before loading, strictly or not.
    """

    code_kind: ClassVar[str]
    _state_dict_renames: ClassVar[dict[str, str]] = {}

    def __init__(self, config=None) -> None:
        super().__init__()
        name = type(self).__name__
        kind = getattr(type(self), "code_kind", None)
        if kind not in CODE_KINDS:
            raise TypeError(f"{name}: class attribute 'code_kind' must be one of {CODE_KINDS}, got {kind!r}")
        config_class = getattr(type(self), "config_class", None)
        if config_class is not None and not isinstance(config, config_class):
            raise ArgumentTypeError(f"{name}: argument 'config' must be a {config_class.__name__}, "
                                    f"got {type(config).__name__}")
        self.config = config

    # ------------------------------------------------------------ contract
    @abc.abstractmethod
    def training_loss(self, codes: torch.Tensor, generator: torch.Generator | None = None, **kwargs
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, logs)`` on a batch of codes."""

    @abc.abstractmethod
    def sample(self, n: int, *, steps: int | None = None, generator: torch.Generator | None = None,
               progress: bool = False, **kwargs) -> torch.Tensor:
        """``n`` code maps."""

    @abc.abstractmethod
    def inpaint(self, codes: torch.Tensor, keep: torch.Tensor, *, steps: int | None = None,
                generator: torch.Generator | None = None, progress: bool = False, **kwargs) -> torch.Tensor:
        """``codes`` with the positions where ``keep`` is False generated."""

    def forward(self, codes: torch.Tensor, generator: torch.Generator | None = None):
        """``training_loss(codes, generator)``."""
        return self.training_loss(codes, generator)

    # ------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def _dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def _where(self, method: str) -> str:
        return f"{type(self).__name__}.{method}"

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode inside the block, the previous mode restored after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    _progress = staticmethod(progress_bar)

    def _check_codes(self, codes, name: str, method: str, *, min_batch: int = 1) -> torch.Tensor:
        """(B, *code_shape) codes of ``code_kind``, B >= ``min_batch``:
        integer indices in [0, num_classes), returned as int64 on the
        model's device; or floating-point key codes, returned as given."""
        where = self._where(method)
        if not isinstance(codes, torch.Tensor):
            raise ArgumentTypeError(f"{where}: argument {name!r} must be a torch.Tensor, got {type(codes).__name__}")
        indices = self.code_kind == "indices"
        if indices and (codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool):
            raise ArgumentTypeError(f"{where}: argument {name!r} must hold integer code indices, "
                                    f"got dtype {codes.dtype}")
        if not indices and not codes.is_floating_point():
            raise ArgumentTypeError(f"{where}: argument {name!r} must be a floating-point tensor of key codes, "
                                    f"got dtype {codes.dtype}")
        shape = tuple(self.code_shape)
        if codes.dim() != 1 + len(shape) or tuple(codes.shape[1:]) != shape or codes.shape[0] < min_batch:
            dims = ", ".join(str(d) for d in ("B",) + shape)
            raise ValueError(f"{where}: argument {name!r} must have shape ({dims}) with B >= {min_batch}, "
                             f"got {tuple(codes.shape)}")
        if not indices:
            return codes
        K = getattr(self, "num_codes", None) or self.num_classes  # the codebook size
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{where}: argument {name!r} must hold codes in [0, {K}), "
                             f"got values in [{lo}, {hi}]")
        return codes.to(self._device, torch.int64)

    def _check_keep(self, keep, codes: torch.Tensor, method: str, name: str = "codes") -> torch.Tensor:
        """A bool ``keep`` broadcast to ``codes``' shape, on its device."""
        where = self._where(method)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            got = f"dtype {keep.dtype}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ArgumentTypeError(f"{where}: argument 'keep' must be a bool tensor, got {got}")
        try:
            return torch.broadcast_to(keep.to(codes.device), codes.shape)
        except RuntimeError:
            raise ValueError(f"{where}: argument 'keep' must broadcast to the shape of {name!r} "
                             f"{tuple(codes.shape)}, got {tuple(keep.shape)}") from None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the submodules load (they read ``state_dict`` after).
        for old, new in self._state_dict_renames.items():
            start = prefix + old
            for key in [k for k in state_dict if k.startswith(start)]:
                renamed = prefix + new + key[len(start):]
                if renamed not in state_dict:  # both present: leave it to the strict check
                    state_dict[renamed] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DiffusionPrior(Prior):
    """A ``Prior`` that is a diffusion process of ``num_timesteps`` steps
    over a ``schedule``, with a denoising network ``net``.

    Subclasses set ``self.schedule`` (a ``Schedule``) and ``self.net`` and
    keep only their process math; this class gives them:

    - ``_check_timesteps``: an int or an integer tensor of timesteps, as a
      (B,) int64 tensor;
    - ``_reverse_plan(steps)``: the (t, s) jumps of the reverse chain, all T
      steps or ``schedule.strided(steps)``, t decreasing, the last s = 0;
    - ``_reverse_chain``: run the jumps in eval mode with an optional
      progress bar, and for ``inpaint`` replacement conditioning (the kept
      region re-drawn from q(x_s | x_0) after every jump, and x_0 itself
      at s = 0).
    """

    schedule: Schedule

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.schedule.T

    def _check_timesteps(self, t, batch: int, method: str, *, name: str = "t", low: int = 1,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """An int, a 0-dim or a (batch,) integer tensor of timesteps in
        low..T -> (batch,) int64 on ``device``."""
        T, where = self.num_timesteps, self._where(method)
        if is_int(t):
            if not low <= t <= T:
                raise ValueError(f"{where}: argument {name!r} must be in [{low}, {T}], got {t}")
            return torch.full((batch,), int(t), dtype=torch.int64, device=device)
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else f"{t!r} ({type(t).__name__})"
            raise ArgumentTypeError(f"{where}: argument {name!r} must be an int or an integer tensor, got {got}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{where}: argument {name!r} must be an int or have shape ({batch},), "
                             f"got {tuple(t.shape)}")
        t = t.to(device, torch.int64)
        # One sync; only for given timesteps (drawn ones are in range).
        if t.numel() and not bool(((t >= low) & (t <= T)).all()):
            raise ValueError(f"{where}: argument {name!r} must be in [{low}, {T}], got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t

    def _reverse_plan(self, steps, method: str) -> list[tuple[int, int]]:
        """(t, s) pairs of the reverse chain, t decreasing from T, last s = 0:
        every step for ``steps=None``, else ``schedule.strided(steps)``."""
        T, where = self.num_timesteps, self._where(method)
        if steps is None:
            times = list(range(1, T + 1))
        else:
            if not is_int(steps):
                raise ArgumentTypeError(f"{where}: argument 'steps' must be None or an int in [1, {T}], "
                                        f"got {steps!r} ({type(steps).__name__})")
            if not 1 <= steps <= T:
                raise ValueError(f"{where}: argument 'steps' must be None or an int in [1, {T}], got {steps}")
            times = self.schedule.strided(int(steps)).tolist()
        return list(zip(times[::-1], ([0] + times[:-1])[::-1]))

    def _reverse_chain(self, x: torch.Tensor, plan: list[tuple[int, int]],
                       step: Callable[[torch.Tensor, int, int], torch.Tensor], *, progress: bool, desc: str,
                       keep: torch.Tensor | None = None,
                       known: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Run ``x = step(x, t, s)`` over ``plan`` in eval mode.

        With ``keep`` (bool, ``x``'s shape) and ``known(s)`` (the known
        codes noised to step s, drawn afresh per call; ``known(0)`` the
        known codes themselves): replacement inpainting. The start ``x`` (the
        noise at T) takes ``known(T)`` where ``keep``, and after every step
        ``x`` takes ``known(s)`` there, drawn after the step.
        """
        with self._eval_mode():
            if keep is not None:
                x = torch.where(keep, known(plan[0][0]), x)
            for t, s in self._progress(plan, progress, desc):
                x = step(x, t, s)
                if keep is not None:
                    x = torch.where(keep, known(s), x)
        return x
