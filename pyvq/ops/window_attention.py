"""Windowed (shifted) multi-head attention: ``pyvq.ops.window_attention``
(Swin's W-MSA / SW-MSA core; Efficient-VQGAN's local attention).

Kernels, one softmax pass per window with the logsumexp saved and the
scores recomputed in backward; none materialises the window partition, the
rolled grid, the mask or the (windows, w^2, w^2) attention matrix (window
membership, region ids and bias indices are arithmetic on token
coordinates):

- CPU: csrc/window_attention/ (``torch.ops.pyvq.window_attention``, C++).
- CUDA: triton_kernels/window_attention.py, registered with
  ``torch.library.triton_op`` as ``torch.ops.pyvq.window_attention_triton``
  (pyvq/ops/_window_attention_triton.py); on CPU tensors it runs under
  Triton's interpreter (``TRITON_INTERPRET=1``), which is how tests run it.

Both dispatcher ops return ``(out, lse)`` and share the autograd
registration below; their backward ops return ``(grad_q, grad_k, grad_v,
grad_bias)``. Reference: pyvq/reference/window_attention.py (the definition).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from pyvq import _backend, reference
from pyvq._checks import accumulation_dtype, check_float, check_floating, check_int
from pyvq.ops._common import use_kernel

_OP = "pyvq.window_attention"
# Largest window side and head dimension the kernels take (a window's q/k/v
# tiles stay in cache; Triton's block sizes stay within its limits).
MAX_WINDOW = 32
MAX_HEAD_DIM = 256


def _check(q, k, v, window_size, shift, bias_table, scale) -> float:
    """Validate the arguments; returns the scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(t, name, _OP)
        if t.dim() != 5:
            raise ValueError(
                f"{_OP}: argument '{name}' must be 5-D (B, heads, H, W, head_dim), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{_OP}: argument '{name}' must have the shape of 'q' {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: argument '{name}' must have the dtype of 'q' ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: argument '{name}' must be on the device of 'q' ({q.device}), got {t.device}")
    B, heads, H, W, d = q.shape
    w = check_int("window_size", window_size, where=_OP, minimum=1, maximum=MAX_WINDOW)
    check_int("shift", shift, where=_OP, minimum=0)
    if shift >= w:
        raise ValueError(f"{_OP}: argument 'shift' must be in [0, window_size) = [0, {w}), got {shift}")
    if H % w or W % w:
        raise ValueError(
            f"{_OP}: the grid H x W (q.shape[2:4]) must be a multiple of window_size {w} in both axes, "
            f"got {H} x {W} (the layers pad; the op does not)")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head_dim (q.shape[4]) must be at most {MAX_HEAD_DIM}, got {d}")
    if bias_table is not None:
        check_floating(bias_table, "bias_table", _OP)
        expected = ((2 * w - 1) ** 2, heads)
        if tuple(bias_table.shape) != expected:
            raise ValueError(
                f"{_OP}: argument 'bias_table' must have shape ((2 * window_size - 1)^2, heads) = {expected}, "
                f"got {tuple(bias_table.shape)}")
        if bias_table.device != q.device:
            raise ValueError(
                f"{_OP}: argument 'bias_table' must be on the device of 'q' ({q.device}), got {bias_table.device}")
    if scale is None:
        return d ** -0.5 if d > 0 else 1.0
    scale = check_float("scale", scale, where=_OP)
    if not math.isfinite(scale):
        raise ValueError(f"{_OP}: argument 'scale' must be finite, got {scale}")
    return scale


def _use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels when Triton is installed."""
    return (t.device.type == "cuda" and _backend.backend() == "kernel"
            and importlib.util.find_spec("triton") is not None)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int, shift: int = 0,
                     bias_table: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Multi-head attention inside (shifted) windows of a token grid.

    Args:
        q, k, v: (B, heads, H, W, head_dim) floating (float16, bfloat16,
            float32, float64), one dtype and device, any strides; H and W
            multiples of ``window_size``.
        window_size: w, the window side (1 to 32).
        shift: Swin's cyclic shift, in [0, w): the grid is rolled by
            ``-shift`` before partitioning and windows straddling the wrap
            are masked into their regions.
        bias_table: ((2w - 1)^2, heads) relative position bias indexed as
            Swin indexes it, or None; differentiable.
        scale: the score scale, default ``head_dim ** -0.5``.

    Returns:
        (B, heads, H, W, head_dim) in q's dtype, at the tokens' original
        positions; computed in float32 (float64 for float64 inputs).
        Differentiable with respect to q, k, v and ``bias_table``.
    """
    scale = _check(q, k, v, window_size, shift, bias_table, scale)
    w, shift = int(window_size), int(shift)
    if _use_triton(q):
        from pyvq.ops import _window_attention_triton  # noqa: F401  (registers the Triton ops)

        return torch.ops.pyvq.window_attention_triton(q, k, v, bias_table, w, shift, scale)[0]
    if use_kernel("window_attention", q):
        return torch.ops.pyvq.window_attention(q, k, v, bias_table, w, shift, scale)[0]
    return reference.window_attention(q, k, v, window_size=w, shift=shift, bias_table=bias_table, scale=scale)


# --- fake kernels and autograd, shared by the C++ and the Triton ops --------

def forward_fake(q, k, v, bias_table, window_size, shift, scale):
    """(out, lse) of either forward op on fake / meta tensors."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:4], dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


def backward_fake(grad_out, q, k, v, bias_table, out, lse, window_size, shift, scale):
    """(grad_q, grad_k, grad_v, grad_bias) of either backward op on fake tensors."""
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if bias_table is None:
        grad_bias = torch.empty((0,), dtype=q.dtype, device=q.device)
    else:
        grad_bias = torch.empty(bias_table.shape, dtype=bias_table.dtype, device=bias_table.device)
    return (*grads, grad_bias)


def _setup(ctx, inputs, output):
    q, k, v, bias_table, window_size, shift, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, bias_table, out, lse)
    ctx.window = (window_size, shift, scale)


def register_autograd(op: str, backward_op: str) -> None:
    """Autograd of the forward op ``op`` ("pyvq::name") through the backward
    op ``backward_op`` (its name under ``torch.ops.pyvq``); the gradient of
    lse is ignored (it is marked non-differentiable)."""

    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias_table, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        gq, gk, gv, gb = getattr(torch.ops.pyvq, backward_op)(grad_out, q, k, v, bias_table, out, lse, *ctx.window)
        need = ctx.needs_input_grad
        return (gq if need[0] else None, gk if need[1] else None, gv if need[2] else None,
                gb if bias_table is not None and need[3] else None, None, None, None)

    torch.library.register_autograd(op, backward, setup_context=_setup)


torch.library.register_fake("pyvq::window_attention")(forward_fake)
torch.library.register_fake("pyvq::_window_attention_backward")(backward_fake)
register_autograd("pyvq::window_attention", "_window_attention_backward")
