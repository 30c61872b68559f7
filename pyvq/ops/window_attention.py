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

import torch

from pyvq import reference
from pyvq._checks import check_floating, check_int
from pyvq.ops._attention import (backward_fake_for, check_qkv, forward_fake, register_autograd, resolve_scale,
                                 use_triton)
from pyvq.ops._common import use_kernel

_OP = "pyvq.window_attention"
# Largest window side and head dimension the kernels take (a window's q/k/v
# tiles stay in cache; Triton's block sizes stay within its limits).
MAX_WINDOW = 32
MAX_HEAD_DIM = 256


def _check(q, k, v, window_size, shift, bias_table, scale) -> float:
    """Validate the arguments; returns the scale to use."""
    check_qkv(q, k, v, _OP)
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
    return resolve_scale(scale, d, _OP)


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
    if use_triton(q):
        from pyvq.ops import _window_attention_triton  # noqa: F401  (registers the Triton ops)

        return torch.ops.pyvq.window_attention_triton(q, k, v, bias_table, w, shift, scale)[0]
    if use_kernel("window_attention", q):
        return torch.ops.pyvq.window_attention(q, k, v, bias_table, w, shift, scale)[0]
    return reference.window_attention(q, k, v, window_size=w, shift=shift, bias_table=bias_table, scale=scale)


# --- fake kernels and autograd, shared by the C++ and the Triton ops --------

# The forward takes 4 tensors (q, k, v, bias_table or None).
backward_fake = backward_fake_for(4)

torch.library.register_fake("pyvq::window_attention")(forward_fake)
torch.library.register_fake("pyvq::_window_attention_backward")(backward_fake)
register_autograd("pyvq::window_attention", "_window_attention_backward", 4)
