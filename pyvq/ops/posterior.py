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

from pyvq.ops._common import use_kernel
from pyvq.reference import posterior as _ref


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
        respect to the logits.
    """
    K = _ref.check_posterior_args(x_t, x0, alpha_t, alpha_bar_prev, num_classes)
    if use_kernel("multinomial_posterior", x_t):
        out = torch.ops.pyvq.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, K)
        return out if x0.is_floating_point() else out.to(alpha_t.dtype)
    return _ref._multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, K)


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
        ``alpha_bar_prev == 1`` it is ``-log p_theta(z_0 | z_t)``.
    """
    _ref.check_kl_args(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)
    if use_kernel("multinomial_kl", x_t):
        return torch.ops.pyvq.multinomial_kl(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)
    return _ref._multinomial_kl(x_t, x0, x0_logits, alpha_t, alpha_bar_prev)


def _index_out_dtype(alpha_t: torch.Tensor) -> torch.dtype:
    return torch.float64 if alpha_t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyvq::multinomial_posterior")
def _posterior_fake(x_t, x0, alpha_t, alpha_bar_prev, num_classes):
    if x0.is_floating_point():
        return x0.new_empty(x0.shape)
    return alpha_t.new_empty((x_t.shape[0], num_classes, *x_t.shape[1:]), dtype=_index_out_dtype(alpha_t))


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
