"""Plain-PyTorch multinomial-diffusion posterior and KL (VQ-DDM, Hu et al.;
multinomial diffusion, Hoogeboom et al.).

The definition every kernel in csrc/posterior/ must reproduce (see
``pyvq.ops.multinomial_posterior`` / ``pyvq.ops.multinomial_kl``):

- K classes, uniform transitions ``Q_t = alpha_t I + (1 - alpha_t) / K``
  (every row sums to one); their product over steps is again uniform,
  ``Qbar_t = alpha_bar_t I + (1 - alpha_bar_t) / K``. For a strided step
  s -> t the caller passes ``alpha_t = alpha_bar_t / alpha_bar_s`` and
  ``alpha_bar_prev = alpha_bar_s``.
- the posterior over z_{t-1} given z_t and a class distribution p0 of z_0 is

      theta_k  ∝  [alpha_t [k == z_t] + (1 - alpha_t) / K]                      (Q_t[k, z_t])
                * [alpha_bar_prev p0_k + (1 - alpha_bar_prev) / K]               ((p0 Qbar_{t-1})[k])

  normalised over k; ``p0 = onehot(z_0)`` gives the true posterior
  q(z_{t-1} | z_t, z_0), ``p0 = softmax(logits)`` the model's
  p_theta(z_{t-1} | z_t).
- both factors are computed as logarithms (``logaddexp`` of the two terms,
  ``log_softmax`` of the logits), added, and normalised with ``logsumexp``,
  in float32 (float64 for float64 inputs). Classes of zero probability
  (``alpha_t == 1`` and k != z_t; ``alpha_bar_prev == 1`` and k != z_0 in the
  index form) are exactly ``-inf`` and, being constant, get zero gradient.
  With ``alpha_t == alpha_bar_prev == 1`` and ``z_t != z_0`` the true
  posterior is 0 / 0 (z_t cannot follow z_0): undefined; here every class
  is then -inf and the KL 0 (no class in the support of q).
- ``KL(q || p_theta) = sum_k q_k (log q_k - log p_k)`` with ``0 log 0 = 0``:
  classes with ``q_k == 0`` contribute nothing (p_k is then 0 only where q_k
  is, so the KL stays finite at the schedule's ends).

Autograd differentiates the logits only (the indices are integers; the
alphas are schedule constants).
"""

from __future__ import annotations

import math

import torch

from pyvq._checks import accumulation_dtype


def _bcast(a: torch.Tensor, ndim: int, acc: torch.dtype) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims, in ``acc``."""
    return a.to(acc).view(-1, *([1] * (ndim - 1)))


def _log_mix(alpha: torch.Tensor, K: int):
    """log(alpha + (1 - alpha) / K) and log((1 - alpha) / K): the two values
    of a row of a uniform kernel, on and off the diagonal (-inf off it when
    alpha == 1)."""
    log_off = torch.log1p(-alpha) - math.log(K)
    return torch.logaddexp(torch.log(alpha), log_off), log_off


def _log_onehot_factor(idx: torch.Tensor, alpha: torch.Tensor, K: int) -> torch.Tensor:
    """log(alpha [k == idx] + (1 - alpha) / K), (B, K, *S), for ``idx`` (B, *S)
    and ``alpha`` (B, 1, ..., 1) in the accumulation dtype."""
    on, off = _log_mix(alpha, K)
    classes = torch.arange(K, device=idx.device).view(1, K, *([1] * (idx.dim() - 1)))
    return torch.where(classes == idx.unsqueeze(1), on, off)


def _log_normalise(u: torch.Tensor) -> torch.Tensor:
    """u - logsumexp(u) over dim 1; entries at -inf stay -inf with no gradient."""
    out = u - torch.logsumexp(u, dim=1, keepdim=True)
    return torch.where(u == float("-inf"), torch.full_like(u, float("-inf")), out)


def _log_posterior(x_t, x0_index, logits, alpha_t, alpha_bar_prev, K: int, acc: torch.dtype) -> torch.Tensor:
    """log theta (B, K, *S) in ``acc``, from x0 indices (``logits`` None) or logits."""
    ndim = x_t.dim() + 1
    a_t = _bcast(alpha_t, ndim, acc)
    a_prev = _bcast(alpha_bar_prev, ndim, acc)
    log_fact_t = _log_onehot_factor(x_t, a_t, K)  # log Q_t[k, z_t]
    if logits is None:
        log_fact_0 = _log_onehot_factor(x0_index, a_prev, K)  # log Qbar_{t-1}[z_0, k]
    else:
        log_p0 = torch.log_softmax(logits.to(acc), dim=1)
        log_fact_0 = torch.logaddexp(torch.log(a_prev) + log_p0, torch.log1p(-a_prev) - math.log(K))
    return _log_normalise(log_fact_t + log_fact_0)


def multinomial_posterior(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor,
                          alpha_bar_prev: torch.Tensor, *, num_classes: int | None = None) -> torch.Tensor:
    """log theta(z_t, z_0): the posterior over z_{t-1} of uniform multinomial diffusion.

    Args:
        x_t: (B, *S) int64 classes z_t in [0, K); *S may be empty.
        x0: either (B, *S) int64 classes z_0 (the true posterior q; then
            ``num_classes`` is required) or (B, K, *S) floating logits of z_0
            (the model posterior p_theta, p0 = softmax over dim 1).
        alpha_t: (B,) floating, in (0, 1]: 1 - beta_t (strided: alpha_bar_t / alpha_bar_s).
        alpha_bar_prev: (B,) floating, in (0, 1]: alpha_bar_{t-1} (strided: alpha_bar_s).
        num_classes: K; must equal logits.shape[1] when given with logits.

    Returns:
        (B, K, *S) log-probabilities over z_{t-1} (logsumexp over dim 1 is 0),
        ``-inf`` where the probability is 0. dtype: the logits' for logits,
        alpha_t's for indices; computed in float32 (float64 for float64).
        Differentiable with respect to the logits.
    """
    if x0.is_floating_point():
        return _log_posterior(x_t, None, x0, alpha_t, alpha_bar_prev, x0.shape[1],
                              accumulation_dtype(x0.dtype)).to(x0.dtype)
    return _log_posterior(x_t, x0, None, alpha_t, alpha_bar_prev, int(num_classes),
                          accumulation_dtype(alpha_t.dtype)).to(alpha_t.dtype)


def multinomial_kl(x_t: torch.Tensor, x0: torch.Tensor, x0_logits: torch.Tensor, alpha_t: torch.Tensor,
                   alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """KL(q(z_{t-1} | z_t, z_0) || p_theta(z_{t-1} | z_t)) per position.

    Args:
        x_t: (B, *S) int64 classes z_t in [0, K).
        x0: (B, *S) int64 classes z_0 in [0, K) (the data).
        x0_logits: (B, K, *S) floating logits of the model's prediction of z_0.
        alpha_t, alpha_bar_prev: (B,) floating, in (0, 1] (see ``multinomial_posterior``).

    Returns:
        (B, *S) in the logits' dtype, ``sum_k q_k (log q_k - log p_k)`` with
        ``0 log 0 = 0``; differentiable with respect to ``x0_logits``. With
        ``alpha_bar_prev == 1`` it is the decoder NLL ``-log p_theta(z_0 | z_t)``.
    """
    K = x0_logits.shape[1]
    acc = accumulation_dtype(x0_logits.dtype)
    log_q = _log_posterior(x_t, x0, None, alpha_t, alpha_bar_prev, K, acc)
    log_p = _log_posterior(x_t, None, x0_logits, alpha_t, alpha_bar_prev, K, acc)
    support = log_q > float("-inf")  # 0 log 0 = 0: classes with q_k = 0 drop out
    diff = torch.where(support, log_q - log_p, torch.zeros_like(log_q))
    return (log_q.exp() * diff).sum(1).to(x0_logits.dtype)
