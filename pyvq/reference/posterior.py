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
from numbers import Integral

import torch

_POSTERIOR = "pyvq.multinomial_posterior"
_KL = "pyvq.multinomial_kl"


# --- argument checks (shared with pyvq.ops) ------------------------------------

def _check_tensor(t, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")


def _check_index_tensor(t, name: str, op: str) -> None:
    _check_tensor(t, name, op)
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: argument '{name}' must be an int64 tensor of class indices, got dtype {t.dtype}")


def _check_logits_tensor(t, name: str, op: str) -> None:
    _check_tensor(t, name, op)
    if not t.is_floating_point():
        raise TypeError(
            f"{op}: argument '{name}' must be a floating-point tensor of logits "
            f"(float16, bfloat16, float32 or float64), got dtype {t.dtype}"
        )


def _has_data(t: torch.Tensor) -> bool:
    """Whether value checks can (and need to) read ``t``: not empty, not a
    meta or fake tensor, not while torch.compile traces (the checks would
    break the graph; the kernels check indices themselves)."""
    if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _check_indices(t: torch.Tensor, name: str, K: int, op: str) -> None:
    if _has_data(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{op}: argument '{name}' must hold class indices in [0, {K}), got values in [{lo}, {hi}]")


def _check_alpha(t, name: str, B: int, op: str) -> None:
    _check_tensor(t, name, op)
    if not t.is_floating_point():
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (B,):
        raise ValueError(f"{op}: argument '{name}' must have shape (B,) = ({B},), got {tuple(t.shape)}")
    if _has_data(t):
        bad = torch.isnan(t) | (t <= 0) | (t > 1)
        if bool(bad.any()):
            raise ValueError(
                f"{op}: argument '{name}' must hold values in (0, 1], got {t[bad][0].item()!r} at index "
                f"{int(bad.nonzero()[0, 0])}"
            )


def _check_common(x_t, logits_shape, logits_name: str, alpha_t, alpha_bar_prev, tensors, op: str) -> None:
    """Shapes of x_t (B, *S) against (B, K, *S), the alphas, one device."""
    B, S = x_t.shape[0], tuple(x_t.shape[1:])
    if len(logits_shape) != x_t.dim() + 1 or logits_shape[0] != B or tuple(logits_shape[2:]) != S:
        raise ValueError(
            f"{op}: argument '{logits_name}' must have shape (B, K, *S) = ({B}, K{''.join(f', {s}' for s in S)}) "
            f"to match 'x_t' {tuple(x_t.shape)}, got {tuple(logits_shape)}"
        )
    _check_alpha(alpha_t, "alpha_t", B, op)
    _check_alpha(alpha_bar_prev, "alpha_bar_prev", B, op)
    names = [n for n, _ in tensors]
    devs = [t.device for _, t in tensors]
    if any(d != devs[0] for d in devs):
        raise ValueError(
            f"{op}: arguments {', '.join(repr(n) for n in names)} must be on the same device, got "
            f"{', '.join(str(d) for d in devs)}"
        )


def _check_x_t(x_t, op: str) -> None:
    _check_index_tensor(x_t, "x_t", op)
    if x_t.dim() < 1:
        raise ValueError(f"{op}: argument 'x_t' must have shape (B, *S), got a 0-d tensor")


def check_posterior_args(x_t, x0, alpha_t, alpha_bar_prev, num_classes=None, *, op: str = _POSTERIOR) -> int:
    """Validate the arguments of ``multinomial_posterior``; returns K.

    Raises TypeError for wrong types (non-tensors, non-int64 indices,
    non-floating logits or alphas, a non-int ``num_classes``) and ValueError
    for wrong shapes or devices, a missing or mismatched ``num_classes``,
    indices outside [0, K) and alphas outside (0, 1] or NaN; each message
    names the argument. Value checks read the data (one host sync each)
    and are skipped on meta / fake tensors and under torch.compile.
    """
    _check_x_t(x_t, op)
    _check_tensor(x0, "x0", op)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, Integral)):
        raise TypeError(f"{op}: argument 'num_classes' must be an int, got {type(num_classes).__name__}")
    if x0.is_floating_point():
        if x0.dim() < 2:
            raise ValueError(f"{op}: argument 'x0' (logits) must have shape (B, K, *S), got {tuple(x0.shape)}")
        K = x0.shape[1]
        if num_classes is not None and int(num_classes) != K:
            raise ValueError(f"{op}: argument 'num_classes' is {int(num_classes)} but 'x0' has K = {K} logits (dim 1)")
        _check_common(x_t, tuple(x0.shape), "x0", alpha_t, alpha_bar_prev,
                      [("x_t", x_t), ("x0", x0), ("alpha_t", alpha_t), ("alpha_bar_prev", alpha_bar_prev)], op)
    elif x0.dtype == torch.int64:
        if num_classes is None:
            raise ValueError(f"{op}: argument 'num_classes' (K) is required when 'x0' holds class indices")
        K = int(num_classes)
        if K < 1:
            raise ValueError(f"{op}: argument 'num_classes' must be at least 1, got {K}")
        if x0.shape != x_t.shape:
            raise ValueError(
                f"{op}: argument 'x0' (indices) must have the shape of 'x_t' {tuple(x_t.shape)}, got {tuple(x0.shape)}")
        _check_common(x_t, (x_t.shape[0], K, *x_t.shape[1:]), "x0", alpha_t, alpha_bar_prev,
                      [("x_t", x_t), ("x0", x0), ("alpha_t", alpha_t), ("alpha_bar_prev", alpha_bar_prev)], op)
        _check_indices(x0, "x0", K, op)
    else:
        raise TypeError(
            f"{op}: argument 'x0' must be int64 class indices (B, *S) or floating-point logits (B, K, *S), "
            f"got dtype {x0.dtype}"
        )
    if K < 1:
        raise ValueError(f"{op}: the number of classes K must be at least 1, got {K}")
    _check_indices(x_t, "x_t", K, op)
    return K


def check_kl_args(x_t, x0, x0_logits, alpha_t, alpha_bar_prev, *, op: str = _KL) -> int:
    """Validate the arguments of ``multinomial_kl``; returns K. Same errors
    as ``check_posterior_args`` (``x0`` must be int64 indices of x_t's shape,
    ``x0_logits`` floating (B, K, *S))."""
    _check_x_t(x_t, op)
    _check_index_tensor(x0, "x0", op)
    _check_logits_tensor(x0_logits, "x0_logits", op)
    if x0.shape != x_t.shape:
        raise ValueError(f"{op}: argument 'x0' must have the shape of 'x_t' {tuple(x_t.shape)}, got {tuple(x0.shape)}")
    if x0_logits.dim() < 2:
        raise ValueError(f"{op}: argument 'x0_logits' must have shape (B, K, *S), got {tuple(x0_logits.shape)}")
    _check_common(x_t, tuple(x0_logits.shape), "x0_logits", alpha_t, alpha_bar_prev,
                  [("x_t", x_t), ("x0", x0), ("x0_logits", x0_logits), ("alpha_t", alpha_t),
                   ("alpha_bar_prev", alpha_bar_prev)], op)
    K = x0_logits.shape[1]
    if K < 1:
        raise ValueError(f"{op}: the number of classes K (x0_logits.shape[1]) must be at least 1, got {K}")
    _check_indices(x_t, "x_t", K, op)
    _check_indices(x0, "x0", K, op)
    return K


# --- the math ----------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, K: int) -> torch.Tensor:
    """``multinomial_posterior`` on checked arguments."""
    if x0.is_floating_point():
        return _log_posterior(x_t, None, x0, alpha_t, alpha_bar_prev, K, _acc_dtype(x0.dtype)).to(x0.dtype)
    return _log_posterior(x_t, x0, None, alpha_t, alpha_bar_prev, K, _acc_dtype(alpha_t.dtype)).to(alpha_t.dtype)


def _multinomial_kl(x_t, x0, x0_logits, alpha_t, alpha_bar_prev) -> torch.Tensor:
    """``multinomial_kl`` on checked arguments."""
    K = x0_logits.shape[1]
    acc = _acc_dtype(x0_logits.dtype)
    log_q = _log_posterior(x_t, x0, None, alpha_t, alpha_bar_prev, K, acc)
    log_p = _log_posterior(x_t, None, x0_logits, alpha_t, alpha_bar_prev, K, acc)
    support = log_q > float("-inf")  # 0 log 0 = 0: classes with q_k = 0 drop out
    diff = torch.where(support, log_q - log_p, torch.zeros_like(log_q))
    return (log_q.exp() * diff).sum(1).to(x0_logits.dtype)


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
    K = check_posterior_args(x_t, x0, alpha_t, alpha_bar_prev, num_classes)
    return _multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, K)


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
    check_kl_args(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)
    return _multinomial_kl(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)
