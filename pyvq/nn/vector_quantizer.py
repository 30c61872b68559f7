"""Vector-quantisation bottleneck of VQ-VAE / VQGAN tokenizers.

The lookup is ``pyvq.ops.nearest_code`` (kernel or, under
``PYVQ_BACKEND=reference``, its plain-PyTorch twin); everything else here is
bookkeeping: the straight-through estimator, the VQ-VAE loss, EMA codebook
statistics, usage counters and dead-code restarts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pyvq._checks import assert_values, check_int, value_check
from pyvq._collectives import all_reduce_, broadcast_
from pyvq.ops import nearest_code

__all__ = ["BETA_TERMS", "QuantizerOutput", "VectorQuantizer", "check_beta_term", "check_code_indices",
           "code_usage_stats"]

#: The ``beta_term`` values ``VectorQuantizer`` accepts: the loss term ``beta`` weighs.
BETA_TERMS = ("commitment", "codebook")


def check_beta_term(beta_term, ema: bool, *, where: str, what: str = "argument") -> str:
    """``beta_term`` checked: one of ``BETA_TERMS``, and not ``"codebook"``
    with ``ema`` (an EMA codebook has no gradient, so a weight on the
    codebook term would weigh nothing, and beta would silently be unused)."""
    if beta_term not in BETA_TERMS:
        raise ValueError(f"{where}: {what} 'beta_term' must be one of {BETA_TERMS}, got {beta_term!r}")
    if beta_term == "codebook" and ema:
        raise ValueError(
            f"{where}: {what} 'beta_term'='codebook' needs ema=False: with ema=True the codebook term has no "
            "gradient and the loss is beta * commitment only (taming's EMAVectorQuantizer too); use "
            "beta_term='commitment' with ema=True"
        )
    return beta_term


class QuantizerOutput(NamedTuple):
    """What ``VectorQuantizer.forward`` returns.

    Attributes:
        z_q: quantised latents, same shape and layout as the input ``z``;
            forward value = the chosen codes, gradient = identity to ``z``
            (straight-through).
        loss: 0-d tensor, the VQ loss (see ``VectorQuantizer``).
        indices: int64 code indices, (B, H, W) for a (B, dim, H, W) input,
            ``z.shape[:-1]`` for a channels-last input.
        perplexity: 0-d tensor, exp(entropy) of this batch's code histogram
            (1 = one code used, num_codes = all used equally).
        usage: 0-d tensor, fraction of the codes used at least once in
            this batch.
    """

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(num_codes,) float32 histogram of ``indices`` (any shape).

    ``index_add_`` rather than ``bincount``: its output size does not depend
    on the data, so it traces under ``torch.compile(fullgraph=True)``.
    """
    flat = indices.reshape(-1)
    out = torch.zeros(num_codes, dtype=torch.float32, device=indices.device)
    return out.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def _stats_from_counts(counts: torch.Tensor):
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
    usage = (counts > 0).to(torch.float32).mean()
    return perplexity, usage


def check_code_indices(indices: torch.Tensor, num_codes: int, *, where: str, name: str = "indices") -> None:
    """``indices`` hold code indices in [0, num_codes): on CPU tensors read
    now (``ValueError`` with the offending range), on CUDA tensors an
    asynchronous device assertion (no host synchronisation;
    ``pyvq._checks.value_check``)."""
    mode = value_check(indices)
    if mode == "skip":
        return
    lo, hi = torch.aminmax(indices)
    message = f"{where}: argument '{name}' must hold code indices in [0, {num_codes}) (the codebook size)"
    if mode == "device":
        assert_values((lo >= 0) & (hi < num_codes), message)
        return
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_codes:
        bad = indices[(indices < 0) | (indices >= num_codes)].unique()
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise ValueError(f"{message}, got values in [{lo}, {hi}] (out of range: {shown})")


def code_usage_stats(indices: torch.Tensor, num_codes: int):
    """(perplexity, usage) of a set of code indices.

    Args:
        indices: int64 tensor of any shape, values in [0, num_codes).
        num_codes: codebook size K.

    Returns:
        perplexity: 0-d float32, exp(-sum_k p_k log p_k) with p the
            normalised histogram (1 for an empty input).
        usage: 0-d float32, (number of codes with p_k > 0) / K.
    """
    return _stats_from_counts(_counts(indices, num_codes))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a straight-through gradient.

    Args:
        num_codes: codebook size K.
        dim: code dimension D (the channel size of the input).
        beta: weight of one of the two loss terms (``beta_term``). The
            codebook term ``mean((q - sg[z])^2)`` moves the codes, the
            commitment term ``mean((z - sg[q])^2)`` the encoder (means over
            all elements; ``sg`` = stop-gradient). With ``ema=True`` the
            codebook has no gradient and the loss is
            ``beta * mean((z - sg[q])^2)`` only.
        beta_term: which term ``beta`` weighs, the other having weight 1:
            ``"commitment"`` (default; the VQ-VAE paper,
            ``mean((q - sg[z])^2) + beta * mean((z - sg[q])^2)``) or
            ``"codebook"`` (taming-transformers' default quantiser,
            ``VectorQuantizer2(legacy=True)``:
            ``beta * mean((q - sg[z])^2) + mean((z - sg[q])^2)``). The two
            losses have the same value, ``(1 + beta) * mean((z - q)^2)``;
            only their gradients differ: d/dz is ``2 beta (z - q) / n``
            (commitment) or ``2 (z - q) / n`` (codebook), d/dq is
            ``2 (q - z) / n`` or ``2 beta (q - z) / n``, summed over the
            vectors assigned to each code. ``"codebook"`` with ``ema=True``
            raises ``ValueError`` (the codebook term has no gradient there).
        ema: update the codebook by exponential moving averages of the
            cluster sizes and sums (VQ-VAE appendix, Sonnet's VQ-EMA) instead
            of by gradient. The codebook is then a buffer, not a Parameter.
        decay: EMA decay of the cluster-size and cluster-sum statistics.
        eps: Laplace smoothing of the EMA cluster sizes,
            ``N_k <- (N_k + eps) / (n + K eps) * n`` with ``n = sum_k N_k``.
        l2_normalize: normalise z and the codes to unit length before the
            lookup (cosine-similarity codebook, as in ViT-VQGAN and
            Efficient-VQGAN). Implemented as ``F.normalize`` of both followed
            by ``metric="l2"`` search: on unit vectors |u - v|^2 = 2 - 2 cos,
            so the argmin is the cosine one, and the normalised vectors are
            needed for the loss anyway. ``z_q``, the loss and
            ``codes_from_indices`` then all use the unit vectors.
        restart_dead_codes: in training mode, replace dead codes by random
            (normalised, if l2_normalize) vectors of the current batch before
            the lookup. Under ``torch.distributed`` the replacements are
            broadcast from rank 0 so every rank keeps the same codebook.
        dead_code_threshold: a code is dead when its ``cluster_size`` (the
            EMA, with ``decay``, of the number of vectors assigned to it per
            training step, summed over ranks) is below this value. The
            default 1.0 means "used less than once per step on average".
            Cluster sizes start at 1, so a code unused in one step is
            already below 1.0.
        check_finite: raise ValueError on a non-finite input. It costs one
            device-to-host sync per call, and is skipped while
            ``torch.compile`` traces (``torch.compiler.is_compiling()``),
            where a data-dependent raise would break the graph.

    Buffers:
        cluster_size: (K,) float32, EMA of per-step assignment counts
            (all ranks), initialised to 1. Drives EMA updates and dead codes.
        embed_sum: (K, D) float32, EMA of per-code sums of the assigned
            vectors (only with ``ema=True``), initialised to the codebook.
        code_usage: (K,) int64, assignments accumulated over all training
            steps and ranks since construction, ``load_codebook`` or
            ``reset_usage``.

    Keep the module in float32 and use autocast for mixed precision: half
    inputs are looked up against the float32 codebook (the loss is float32,
    ``z_q`` keeps z's dtype), whereas ``.half()`` would also round the EMA
    statistics.

    Statistics and the codebook change only in training mode; in eval mode
    forward is a pure function (and runs no collective). Under
    ``torch.distributed`` every training forward all-reduces the counts (and,
    with ema, the sums) before updating, so all ranks must call it in step.

    Layouts: a 4-D input is read channels-first, (B, dim, H, W), as conv
    encoders produce; any other rank is read channels-last, (..., dim). For a
    channels-last image tensor (B, H, W, dim) pass ``z.flatten(1, 2)`` or
    permute it to channels-first.

    Known limit: with ``l2_normalize`` and ``restart_dead_codes`` in training
    with gradient codebook, a restart in-places the codebook that an earlier,
    not yet back-propagated forward saved for the normalisation's backward;
    run backward after each forward (the usual loop) in that configuration.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        beta: float = 0.25,
        beta_term: str = "commitment",
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        l2_normalize: bool = False,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1.0,
        check_finite: bool = True,
    ):
        super().__init__()
        check_int("num_codes", num_codes, where="VectorQuantizer", minimum=1)
        check_int("dim", dim, where="VectorQuantizer", minimum=1)
        if not beta >= 0:
            raise ValueError(f"VectorQuantizer: argument 'beta' must be >= 0, got {beta!r}")
        check_beta_term(beta_term, ema, where="VectorQuantizer")
        if not 0 <= decay <= 1:
            raise ValueError(f"VectorQuantizer: argument 'decay' must be in [0, 1], got {decay!r}")
        if not eps >= 0:
            raise ValueError(f"VectorQuantizer: argument 'eps' must be >= 0, got {eps!r}")
        if not dead_code_threshold >= 0:
            raise ValueError(
                f"VectorQuantizer: argument 'dead_code_threshold' must be >= 0, got {dead_code_threshold!r}"
            )
        self.num_codes = num_codes
        self.dim = dim
        self.beta = float(beta)
        self.beta_term = beta_term
        self.ema = bool(ema)
        self.decay = float(decay)
        self.eps = float(eps)
        self.l2_normalize = bool(l2_normalize)
        self.restart_dead_codes = bool(restart_dead_codes)
        self.dead_code_threshold = float(dead_code_threshold)
        self.check_finite = bool(check_finite)

        # taming-transformers' VQGAN init: U(-1/K, 1/K).
        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("code_usage", torch.zeros(num_codes, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, beta_term={self.beta_term!r}, ema={self.ema}, "
            f"l2_normalize={self.l2_normalize}, restart_dead_codes={self.restart_dead_codes}"
        )

    # ------------------------------------------------------------------ helpers
    def _codes(self) -> torch.Tensor:
        """(K, D) codes as used by the lookup (unit rows if l2_normalize)."""
        return F.normalize(self.codebook, dim=1) if self.l2_normalize else self.codebook

    def _check_input(self, z) -> int:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(
                f"VectorQuantizer: argument 'z' must be a floating-point tensor, got "
                f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}"
            )
        if z.dim() < 1:
            raise ValueError("VectorQuantizer: argument 'z' must have at least 1 dimension, got a 0-D tensor")
        ch = 1 if z.dim() == 4 else z.dim() - 1
        if z.shape[ch] != self.dim:
            layout = "(B, dim, H, W)" if z.dim() == 4 else "(..., dim)"
            raise ValueError(
                f"VectorQuantizer: argument 'z' must have {self.dim} channels in layout {layout}, "
                f"got shape {tuple(z.shape)} (channel size {z.shape[ch]})"
            )
        if self.check_finite and not torch.compiler.is_compiling():
            bad = int((~torch.isfinite(z)).sum())
            if bad:
                raise ValueError(
                    f"VectorQuantizer: argument 'z' contains {bad} non-finite (NaN or inf) "
                    f"value(s) out of {z.numel()}"
                )
        return ch

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor) -> None:
        """Replace codes with cluster_size < dead_code_threshold by batch vectors."""
        # cluster_size is identical on every rank (its counts are all-reduced),
        # so all ranks agree on `dead` and take part in the same broadcast.
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        n_dead, n = dead.numel(), flat.shape[0]
        distributed = _distributed()
        if n_dead == 0 or (n == 0 and not distributed):
            return
        if n == 0:  # nothing local to offer: keep the old codes (matters on rank 0 only)
            new = self.codebook.detach()[dead].contiguous()
        else:
            if n >= n_dead:
                pick = torch.randperm(n, device=flat.device)[:n_dead]
            else:
                pick = torch.randint(n, (n_dead,), device=flat.device)
            new = flat[pick].to(self.codebook.dtype).contiguous()
        if distributed:
            broadcast_(new, src=0)
        self.codebook.index_copy_(0, dead, new)
        size = torch.full((n_dead,), self.dead_code_threshold, dtype=self.cluster_size.dtype, device=dead.device)
        self.cluster_size.index_copy_(0, dead, size)
        if self.ema:
            self.embed_sum.index_copy_(0, dead, new.to(self.embed_sum.dtype) * size.unsqueeze(1).to(self.embed_sum.dtype))

    @torch.no_grad()
    def _update(self, counts: torch.Tensor, indices: torch.Tensor, flat: torch.Tensor) -> None:
        """Accumulate statistics of one training step; EMA-update the codebook."""
        counts = counts.clone()
        if self.ema:
            sums = torch.zeros(self.num_codes, self.dim, dtype=torch.float32, device=flat.device)
            sums.index_add_(0, indices, flat.to(torch.float32))
            if _distributed():
                packed = torch.cat([counts.unsqueeze(1), sums], 1)
                all_reduce_(packed)
                counts, sums = packed[:, 0].contiguous(), packed[:, 1:]
        elif _distributed():
            all_reduce_(counts)
        self.cluster_size.mul_(self.decay).add_(counts.to(self.cluster_size.dtype), alpha=1 - self.decay)
        self.code_usage.add_(counts.round().to(torch.long))
        if self.ema:
            self.embed_sum.mul_(self.decay).add_(sums.to(self.embed_sum.dtype), alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    # ------------------------------------------------------------------ API
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z``.

        Args:
            z: (B, dim, H, W) channels-first, or (..., dim) channels-last
                (any rank but 4), floating, finite.

        Returns:
            QuantizerOutput(z_q like z, loss 0-d, indices (B, H, W) or
            z.shape[:-1] int64, perplexity 0-d, usage 0-d).
        """
        ch = self._check_input(z)
        zz = F.normalize(z, dim=ch) if self.l2_normalize else z
        last = zz.movedim(ch, -1)  # (..., D) view
        flat = last.reshape(-1, self.dim)

        if self.training and self.restart_dead_codes:
            self._restart(flat.detach())

        codes = self._codes()
        indices, _ = nearest_code(flat.detach().to(codes.dtype), codes.detach())
        q = F.embedding(indices, codes).view(last.shape).movedim(-1, ch)  # z's layout

        zc = zz.to(q.dtype)
        commitment = F.mse_loss(zc, q.detach())
        if self.ema:
            loss = self.beta * commitment
        elif self.beta_term == "codebook":
            loss = self.beta * F.mse_loss(q, zc.detach()) + commitment
        else:
            loss = F.mse_loss(q, zc.detach()) + self.beta * commitment

        counts = _counts(indices, self.num_codes)
        if self.training:
            self._update(counts, indices, flat.detach())
        perplexity, usage = _stats_from_counts(counts)

        z_q = zz + (q.to(zz.dtype) - zz).detach()
        return QuantizerOutput(z_q, loss, indices.view(last.shape[:-1]), perplexity, usage)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices``: the inverse of ``forward(...).indices``.

        Args:
            indices: int64. A 3-D (B, H, W) tensor gives (B, dim, H, W)
                (the layout of a 4-D forward input); any other shape S gives
                (*S, dim) (the layout of a channels-last input).

        Returns:
            The codes in the codebook's dtype; unit vectors if
            ``l2_normalize``, i.e. exactly the forward value of ``z_q``.

        Indices outside [0, num_codes) are an error (``check_code_indices``).
        """
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError("VectorQuantizer.codes_from_indices: argument 'indices' must be an int64 or int32 tensor")
        check_code_indices(indices, self.num_codes, where="VectorQuantizer.codes_from_indices")
        out = F.embedding(indices.long(), self._codes())
        if indices.dim() == 3:
            out = out.permute(0, 3, 1, 2)
        return out

    @torch.no_grad()
    def load_codebook(self, codebook: torch.Tensor) -> None:
        """Replace the codebook (e.g. by ReFiT's k-means centroids).

        Args:
            codebook: (num_codes, dim) floating, finite; copied (cast to the
                codebook's dtype and device).

        The statistics describe the old codes, so they are reset:
        ``cluster_size`` to 1, ``embed_sum`` to the new codes, ``code_usage``
        to 0.
        """
        if not isinstance(codebook, torch.Tensor) or not codebook.is_floating_point():
            raise TypeError("VectorQuantizer.load_codebook: argument 'codebook' must be a floating-point tensor")
        if tuple(codebook.shape) != (self.num_codes, self.dim):
            raise ValueError(
                f"VectorQuantizer.load_codebook: argument 'codebook' must have shape "
                f"({self.num_codes}, {self.dim}), got {tuple(codebook.shape)}"
            )
        bad = int((~torch.isfinite(codebook)).sum())
        if bad:
            raise ValueError(f"VectorQuantizer.load_codebook: argument 'codebook' contains {bad} non-finite values")
        self.codebook.copy_(codebook)
        self.cluster_size.fill_(1.0)
        if self.ema:
            self.embed_sum.copy_(self.codebook)
        self.code_usage.zero_()

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero the ``code_usage`` counters."""
        self.code_usage.zero_()

    def usage_fraction(self) -> float:
        """Fraction of codes with a nonzero ``code_usage`` count."""
        return float((self.code_usage > 0).float().mean())
