"""Multinomial-diffusion posterior and its KL: ``pyvq.ops.multinomial_posterior``
and ``pyvq.ops.multinomial_kl`` (VQ-DDM's reverse process over code indices).

Kernels: csrc/posterior/ (shared math posterior.h: the normaliser and the
true posterior are closed-form, so the model side takes a few passes over
the K logits of a position and no (B, K, *S) intermediate is stored; CPU
tasks are (batch row, tile of 64 positions), CUDA one thread per position;
both deterministic). The backward of each op is its own op
(``pyvq::_multinomial_posterior_backward``, ``pyvq::_multinomial_kl_backward``)
that recomputes the softmax statistics instead of saving them.
Reference: pyvq/reference/posterior.py (the definition).

Strided sampling (a jump from step t back to step s < t): pass
``alpha_t = alpha_bar_t / alpha_bar_s`` and ``alpha_bar_prev = alpha_bar_s``.
"""

from __future__ import annotations

import torch

from pyvq import reference
from pyvq._checks import accumulation_dtype, assert_values, check_floating, check_int, check_tensor, value_check
from pyvq.ops._common import use_kernel

_POSTERIOR = "pyvq.multinomial_posterior"
_KL = "pyvq.multinomial_kl"


# --- argument checks -------------------------------------------------------

def _check_index_tensor(t, name: str, op: str) -> None:
    check_tensor(t, name, op)
    if t.dtype != torch.int64:
        raise TypeError(f"{op}: argument '{name}' must be an int64 tensor of class indices, got dtype {t.dtype}")


def _check_indices(t: torch.Tensor, name: str, K: int, op: str) -> None:
    mode = value_check(t)
    if mode == "skip":
        return
    lo, hi = torch.aminmax(t)
    if mode == "device":
        assert_values((lo >= 0) & (hi < K), f"{op}: argument '{name}' must hold class indices in [0, {K})")
        return
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= K:
        raise ValueError(f"{op}: argument '{name}' must hold class indices in [0, {K}), got values in [{lo}, {hi}]")


def _check_alpha(t, name: str, B: int, op: str) -> None:
    check_tensor(t, name, op)
    if not t.is_floating_point():
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (B,):
        raise ValueError(f"{op}: argument '{name}' must have shape (B,) = ({B},), got {tuple(t.shape)}")
    mode = value_check(t)
    if mode == "skip":
        return
    good = (t > 0) & (t <= 1)  # False for NaN
    if mode == "device":
        assert_values(good.all(), f"{op}: argument '{name}' must hold values in (0, 1] (no NaN)")
        return
    if not bool(good.all()):
        at = int((~good).nonzero()[0, 0])
        raise ValueError(f"{op}: argument '{name}' must hold values in (0, 1], got {t[at].item()!r} at index {at}")


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


def _check_posterior_args(x_t, x0, alpha_t, alpha_bar_prev, num_classes=None, *, op: str = _POSTERIOR) -> int:
    """Validate the arguments of ``multinomial_posterior``; returns K.

    Raises TypeError for wrong types (non-tensors, non-int64 indices,
    non-floating logits or alphas, a non-int ``num_classes``) and ValueError
    for wrong shapes or devices, a missing or mismatched ``num_classes``,
    indices outside [0, K) and alphas outside (0, 1] or NaN; each message
    names the argument. Value checks (``pyvq._checks.value_check``) read the
    data on CPU; on CUDA they are device-side assertions (no host sync); they
    are skipped on meta / fake tensors and under torch.compile.
    """
    _check_x_t(x_t, op)
    check_tensor(x0, "x0", op)
    if num_classes is not None:
        check_int("num_classes", num_classes, where=op)
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


def _check_kl_args(x_t, x0, x0_logits, alpha_t, alpha_bar_prev, *, op: str = _KL) -> int:
    """Validate the arguments of ``multinomial_kl``; returns K. Same errors
    as ``_check_posterior_args`` (``x0`` must be int64 indices of x_t's shape,
    ``x0_logits`` floating (B, K, *S))."""
    _check_x_t(x_t, op)
    _check_index_tensor(x0, "x0", op)
    check_floating(x0_logits, "x0_logits", op, holds="of logits")
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


# --- the ops ---------------------------------------------------------------

def multinomial_posterior(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor,
                          alpha_bar_prev: torch.Tensor, *, num_classes: int | None = None) -> torch.Tensor:
    """log theta(z_t, z_0), the posterior over z_{t-1} of uniform multinomial diffusion.

    Args:
        x_t: (B, *S) int64 classes z_t in [0, K); *S may be empty.
        x0: (B, *S) int64 classes z_0 (the true posterior q; ``num_classes``
            is then required) or (B, K, *S) floating logits of z_0 (the model
            posterior p_theta with p0 = softmax over dim 1; float16/bfloat16
            are accumulated in float32).
        alpha_t: (B,) floating in (0, 1]: 1 - beta_t (strided: alpha_bar_t / alpha_bar_s).
        alpha_bar_prev: (B,) floating in (0, 1]: alpha_bar_{t-1} (strided: alpha_bar_s).
        num_classes: K; must equal the logits' dim 1 when given with logits.

    Returns:
        (B, K, *S) log-probabilities (``-inf`` where the probability is 0),
        in the logits' dtype, or alpha_t's for indices. Differentiable with
        respect to the logits. A position whose logits hold a NaN or a
        ``+inf`` (or are all ``-inf``) is NaN in every class, as
        ``torch.log_softmax`` makes it; a ``-inf`` logit is a class of
        probability 0.

    Bad values: indices outside [0, K) and alphas outside (0, 1] (or NaN)
    raise ``ValueError`` naming the argument on CPU. On CUDA the same checks
    run on the device, without a host synchronisation: a bad value is a
    device-side assertion, raised as ``RuntimeError: CUDA error: device-side
    assert triggered`` at the next synchronisation, with the message (naming
    the argument) printed by the device; the CUDA context is unusable after
    it, as after any device-side assert.
    """
    K = _check_posterior_args(x_t, x0, alpha_t, alpha_bar_prev, num_classes)
    if use_kernel("multinomial_posterior", x_t):
        out = torch.ops.pyvq.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, K)
        return out if x0.is_floating_point() else out.to(alpha_t.dtype)
    return reference.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)


def multinomial_kl(x_t: torch.Tensor, x0: torch.Tensor, x0_logits: torch.Tensor, alpha_t: torch.Tensor,
                   alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """KL(q(z_{t-1} | z_t, z_0) || p_theta(z_{t-1} | z_t)) per position, fused.

    Args:
        x_t: (B, *S) int64 classes z_t in [0, K).
        x0: (B, *S) int64 classes z_0 in [0, K).
        x0_logits: (B, K, *S) floating logits of the model's z_0 prediction.
        alpha_t, alpha_bar_prev: (B,) floating in (0, 1] (see ``multinomial_posterior``).

    Returns:
        (B, *S) in the logits' dtype, ``sum_k q_k (log q_k - log p_k)`` with
        ``0 log 0 = 0``, accumulated in float32 (float64 for float64 logits);
        differentiable with respect to ``x0_logits``. With
        ``alpha_bar_prev == 1`` it is ``-log p_theta(z_0 | z_t)``. A
        position whose logits hold a NaN or a ``+inf`` (or are all
        ``-inf``) is NaN.

    Bad values are reported as in ``multinomial_posterior`` (``ValueError``
    on CPU, a device-side assertion without a host sync on CUDA).
    """
    _check_kl_args(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)
    if use_kernel("multinomial_kl", x_t):
        return torch.ops.pyvq.multinomial_kl(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)
    return reference.multinomial_kl(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)


@torch.library.register_fake("pyvq::multinomial_posterior")
def _posterior_fake(x_t, x0, alpha_t, alpha_bar_prev, num_classes):
    if x0.is_floating_point():
        return x0.new_empty(x0.shape)
    return alpha_t.new_empty((x_t.shape[0], num_classes, *x_t.shape[1:]), dtype=accumulation_dtype(alpha_t.dtype))


@torch.library.register_fake("pyvq::_multinomial_posterior_backward")
def _posterior_backward_fake(grad, x_t, logits, alpha_t, alpha_bar_prev):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("pyvq::multinomial_kl")
def _kl_fake(x_t, x0, logits, alpha_t, alpha_bar_prev):
    return logits.new_empty(x_t.shape)


@torch.library.register_fake("pyvq::_multinomial_kl_backward")
def _kl_backward_fake(grad, x_t, x0, logits, alpha_t, alpha_bar_prev):
    return logits.new_empty(logits.shape)


def _posterior_setup(ctx, inputs, output):
    x_t, x0, alpha_t, alpha_bar_prev, _ = inputs
    ctx.save_for_backward(x_t, x0, alpha_t, alpha_bar_prev)


def _posterior_backward(ctx, grad):
    x_t, x0, alpha_t, alpha_bar_prev = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[1] and x0.is_floating_point():
        g = torch.ops.pyvq._multinomial_posterior_backward(grad.contiguous(), x_t, x0, alpha_t, alpha_bar_prev)
    return None, g, None, None, None


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _kl_backward(ctx, grad):
    x_t, x0, logits, alpha_t, alpha_bar_prev = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[2]:
        g = torch.ops.pyvq._multinomial_kl_backward(grad.contiguous(), x_t, x0, logits, alpha_t, alpha_bar_prev)
    return None, None, g, None, None


torch.library.register_autograd("pyvq::multinomial_posterior", _posterior_backward, setup_context=_posterior_setup)
torch.library.register_autograd("pyvq::multinomial_kl", _kl_backward, setup_context=_kl_setup)
