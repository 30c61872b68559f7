"""Nearest-codebook search: ``pyvq.ops.nearest_code``.

Kernels: csrc/codebook/ (CPU: blocked AVX-512 micro-kernel with a fused
running argmin; CUDA: tiled kernel with the same math from codebook.h).
Reference: pyvq/reference/codebook.py.
"""

from __future__ import annotations

import torch

from pyvq import reference
from pyvq._checks import accumulation_dtype, check_floating
from pyvq.ops._common import use_kernel
from pyvq.reference.codebook import COSINE_EPS

_OP = "pyvq.nearest_code"
METRICS = ("l2", "cosine")


def _check(x, codebook, metric) -> None:
    check_floating(x, "x", _OP)
    check_floating(codebook, "codebook", _OP)
    if metric not in METRICS:
        raise ValueError(f"{_OP}: argument 'metric' must be 'l2' or 'cosine', got {metric!r}")
    if codebook.dim() != 2:
        raise ValueError(
            f"{_OP}: argument 'codebook' must be 2-D (K, D), got shape {tuple(codebook.shape)}"
        )
    if x.dim() < 1:
        raise ValueError(f"{_OP}: argument 'x' must have at least 1 dimension, got a 0-D tensor")
    if codebook.shape[0] == 0:
        raise ValueError(f"{_OP}: argument 'codebook' must hold at least one code, got shape {tuple(codebook.shape)}")
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"{_OP}: the last dimension of 'x' ({x.shape[-1]}) must equal the code "
            f"dimension of 'codebook' ({codebook.shape[1]})"
        )
    if x.device != codebook.device:
        raise ValueError(
            f"{_OP}: arguments 'x' and 'codebook' must be on the same device, "
            f"got {x.device} and {codebook.device}"
        )


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2"):
    """Index of, and distance to, the nearest code of every row of ``x``.

    Args:
        x: (..., D) float16/bfloat16/float32/float64; any strides.
        codebook: (K, D), K >= 1, on x's device.
        metric: "l2" (squared Euclidean distance) or "cosine"
            (1 - cosine similarity; norms clamped below by 1e-12).

    Returns:
        (indices, distances): int64 and x.dtype tensors of shape
        ``x.shape[:-1]``. Ties go to the lowest index. A row containing NaN
        gets index 0 and a NaN distance (as ``torch.argmin``); a NaN code is
        chosen by every finite row, again as ``argmin``. An inf in a row or
        in the codebook leaves the row's index unspecified (any code; the
        distance to it, inf or NaN, is returned). Half-precision inputs are
        computed in float32. ``distances`` is differentiable with respect to
        ``x`` and ``codebook`` (the index is treated as a constant).
    """
    _check(x, codebook, metric)
    if use_kernel("nearest_code", x):
        distances, indices = torch.ops.pyvq.nearest_code(x, codebook, metric)
        return indices, distances
    return reference.nearest_code(x, codebook, metric=metric)


@torch.library.register_fake("pyvq::nearest_code")
def _nearest_code_fake(x, codebook, metric="l2"):
    torch._check(codebook.dim() == 2, lambda: "codebook must be 2-D")
    torch._check(x.shape[-1] == codebook.shape[1], lambda: "x and codebook dims differ")
    shape = x.shape[:-1]
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.long)


def _setup_context(ctx, inputs, output):
    x, codebook, metric = (list(inputs) + ["l2"])[:3]
    ctx.metric = metric
    ctx.save_for_backward(x, codebook, output[1])


def _backward(ctx, grad_distances, grad_indices):
    """Gradient of the distances with the chosen index held fixed.

    l2:     d = |x - c|^2           dd/dx = 2 (x - c),  dd/dc = -2 (x - c)
    cosine: d = 1 - <u, v>, u = x / max(|x|, eps), v = c / max(|c|, eps)
            dd/dx = -(v - <u, v> u) / |x|   (-v / eps where |x| <= eps)
    """
    x, codebook, indices = ctx.saved_tensors
    dtype = accumulation_dtype(x.dtype, codebook.dtype)
    D = codebook.shape[1]
    xf = x.reshape(x.shape[:-1].numel(), D).to(dtype)
    idx = indices.reshape(-1)
    c = codebook.to(dtype)[idx]
    g = grad_distances.reshape(-1, 1).to(dtype)
    if ctx.metric == "l2":
        gx = 2 * (xf - c) * g
        gc_rows = -gx
    else:
        nx = xf.norm(dim=1, keepdim=True)
        nc = c.norm(dim=1, keepdim=True)
        nxc = nx.clamp_min(COSINE_EPS)
        ncc = nc.clamp_min(COSINE_EPS)
        u, v = xf / nxc, c / ncc
        s = (u * v).sum(1, keepdim=True)
        gx = -g * torch.where(nx > COSINE_EPS, v - s * u, v) / nxc
        gc_rows = -g * torch.where(nc > COSINE_EPS, u - s * v, u) / ncc
    grad_x = grad_cb = None
    if ctx.needs_input_grad[0]:
        grad_x = gx.to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        grad_cb = torch.zeros(codebook.shape, dtype=dtype, device=codebook.device)
        grad_cb.index_add_(0, idx, gc_rows)
        grad_cb = grad_cb.to(codebook.dtype)
    return grad_x, grad_cb, None


torch.library.register_autograd(
    "pyvq::nearest_code", _backward, setup_context=_setup_context
)
