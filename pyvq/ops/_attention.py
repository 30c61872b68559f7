"""What the attention ops (``window_attention``, ``multigrained_attention``)
share: q/k/v checks, the scale, fake kernels and the autograd registration
of their dispatcher ops.

Every attention dispatcher op (C++ or Triton) has the shape

    fwd(t_1, ..., t_n, *ints_and_floats) -> (out, lse)
    bwd(grad_out, t_1, ..., t_n, out, lse, *ints_and_floats) -> (grad_1, ..., grad_n)

with ``out`` in q's (= t_1's) shape and dtype, ``lse`` ``(B, heads, H, W)``
in the accumulation dtype, and ``grad_i`` in ``t_i``'s shape and dtype, or
an empty (0,) tensor of q's dtype where ``t_i`` is an optional tensor
passed as None.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from pyvq import _backend
from pyvq._checks import accumulation_dtype, check_float, check_floating


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors take an attention op's Triton kernels when Triton is installed."""
    return (t.device.type == "cuda" and _backend.backend() == "kernel"
            and importlib.util.find_spec("triton") is not None)


def check_qkv(q, k, v, op: str) -> None:
    """q, k, v: floating (B, heads, H, W, head_dim) of one shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(t, name, op)
        if t.dim() != 5:
            raise ValueError(
                f"{op}: argument '{name}' must be 5-D (B, heads, H, W, head_dim), got shape {tuple(t.shape)}")
    check_like(q, "q", (("k", k), ("v", v)), op)


def check_like(ref, ref_name: str, tensors, op: str, shape: tuple | None = None) -> None:
    """Each (name, tensor) has ``ref``'s dtype and device and ``shape``
    (default ``ref``'s shape)."""
    shape = tuple(ref.shape) if shape is None else tuple(shape)
    for name, t in tensors:
        if tuple(t.shape) != shape:
            what = f"the shape of '{ref_name}' {shape}" if shape == tuple(ref.shape) else f"shape {shape}"
            raise ValueError(f"{op}: argument '{name}' must have {what}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: argument '{name}' must have the dtype of '{ref_name}' ({ref.dtype}), "
                            f"got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: argument '{name}' must be on the device of '{ref_name}' ({ref.device}), "
                             f"got {t.device}")


def resolve_scale(scale, head_dim: int, op: str) -> float:
    """``scale``, or ``head_dim ** -0.5`` when None (1 for head_dim 0)."""
    if scale is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    scale = check_float("scale", scale, where=op)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: argument 'scale' must be finite, got {scale}")
    return scale


def forward_fake(q, *args):
    """(out, lse) of an attention forward op on fake / meta tensors."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:4], dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


def backward_fake_for(num_tensors: int):
    """The fake of a backward op whose forward takes ``num_tensors`` tensors."""

    def fake(grad_out, *args):
        q = args[0]
        return tuple(
            torch.empty((0,), dtype=q.dtype, device=q.device) if t is None
            else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            for t in args[:num_tensors]
        )

    return fake


def register_autograd(op: str, backward_op: str, num_tensors: int) -> None:
    """Autograd of the forward op ``op`` ("pyvq::name"), whose first
    ``num_tensors`` inputs are tensors (or None), through the backward op
    ``backward_op`` (its name under ``torch.ops.pyvq``). lse is marked
    non-differentiable."""

    def setup(ctx, inputs, output):
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(*inputs[:num_tensors], out, lse)
        ctx.params = tuple(inputs[num_tensors:])

    def backward(ctx, grad_out, grad_lse):
        *tensors, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = getattr(torch.ops.pyvq, backward_op)(grad_out, *tensors, out, lse, *ctx.params)
        return tuple(g if t is not None and need else None
                     for g, t, need in zip(grads, tensors, ctx.needs_input_grad)) + (None,) * len(ctx.params)

    torch.library.register_autograd(op, backward, setup_context=setup)
