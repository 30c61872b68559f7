"""Multi-grained attention: ``pyvq.ops.multigrained_attention``
(Efficient-VQGAN, Cao et al., Sec. 3.2: each block of the token grid attends
to its extended local window and to one global token per block).

Kernels, one online softmax over the two key ranges (the block's extended
window, clipped to the grid, then the G global keys) with the logsumexp
saved and the scores recomputed in backward; none materialises unfolded
``(Ws + 2 halo)^2`` copies of k / v or an attention matrix:

- CPU: csrc/multigrained_attention/ (``torch.ops.pyvq.multigrained_attention``).
- CUDA: triton_kernels/multigrained_attention.py, registered with
  ``torch.library.triton_op`` as ``torch.ops.pyvq.multigrained_attention_triton``
  (pyvq/ops/_multigrained_attention_triton.py); on CPU tensors it runs under
  Triton's interpreter, which is how tests run it.

Both dispatcher ops return ``(out, lse)``; their backward ops return the
gradients of all five tensors. Reference: pyvq/reference/multigrained_attention.py.
"""

from __future__ import annotations

import torch

from pyvq import reference
from pyvq._checks import check_floating, check_int
from pyvq.ops._attention import (backward_fake_for, check_like, check_qkv, forward_fake, register_autograd,
                                 resolve_scale, use_triton)
from pyvq.ops._common import use_kernel

_OP = "pyvq.multigrained_attention"
MAX_HEAD_DIM = 256


def _check(q, k, v, global_k, global_v, block_size, halo, scale) -> float:
    """Validate the arguments; returns the scale to use."""
    check_qkv(q, k, v, _OP)
    B, heads, H, W, d = q.shape
    for name, t in (("global_k", global_k), ("global_v", global_v)):
        check_floating(t, name, _OP)
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, heads, d):
            raise ValueError(f"{_OP}: argument '{name}' must have shape (B, heads, G, head_dim) = "
                             f"({B}, {heads}, G, {d}), got {tuple(t.shape)}")
    check_like(q, "q", (("global_k", global_k), ("global_v", global_v)), _OP, shape=global_k.shape)
    ws = check_int("block_size", block_size, where=_OP, minimum=1)
    check_int("halo", halo, where=_OP, minimum=0)
    if H % ws or W % ws:
        raise ValueError(f"{_OP}: the grid H x W (q.shape[2:4]) must be a multiple of block_size {ws} in both "
                         f"axes, got {H} x {W}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head_dim (q.shape[4]) must be at most {MAX_HEAD_DIM}, got {d}")
    return resolve_scale(scale, d, _OP)


def multigrained_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor,
                           global_v: torch.Tensor, *, block_size: int, halo: int,
                           scale: float | None = None) -> torch.Tensor:
    """Each block's queries attend to its extended local window and to the global keys.

    Args:
        q, k, v: (B, heads, H, W, head_dim) floating, one dtype and device,
            any strides; H and W multiples of ``block_size``.
        global_k, global_v: (B, heads, G, head_dim), q's dtype and device,
            any G >= 0 (normally one global token per block).
        block_size: Ws, the block side.
        halo: Es >= 0; a query of block (bi, bj) sees the keys at rows
            ``[bi*Ws - Es, (bi+1)*Ws + Es)`` and columns likewise, clipped to
            the grid (outside positions are left out of the softmax).
        scale: the score scale, default ``head_dim ** -0.5``.

    Returns:
        (B, heads, H, W, head_dim) in q's dtype, computed in float32 (float64
        for float64 inputs); differentiable in all five tensors.
    """
    scale = _check(q, k, v, global_k, global_v, block_size, halo, scale)
    ws, halo = int(block_size), int(halo)
    if use_triton(q):
        from pyvq.ops import _multigrained_attention_triton  # noqa: F401  (registers the Triton ops)

        return torch.ops.pyvq.multigrained_attention_triton(q, k, v, global_k, global_v, ws, halo, scale)[0]
    if use_kernel("multigrained_attention", q):
        return torch.ops.pyvq.multigrained_attention(q, k, v, global_k, global_v, ws, halo, scale)[0]
    return reference.multigrained_attention(q, k, v, global_k, global_v, block_size=ws, halo=halo, scale=scale)


# The forward takes 5 tensors (q, k, v, global_k, global_v).
backward_fake = backward_fake_for(5)

torch.library.register_fake("pyvq::multigrained_attention")(forward_fake)
torch.library.register_fake("pyvq::_multigrained_attention_backward")(backward_fake)
register_autograd("pyvq::multigrained_attention", "_multigrained_attention_backward", 5)
