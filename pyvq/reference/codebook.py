"""Reference nearest-codebook search: the formula taming-transformers' VQGAN
uses (||x||^2 + ||c||^2 - 2 x.c over the full N x K matrix, then argmin).
"""

from __future__ import annotations

import torch

from pyvq._checks import accumulation_dtype

COSINE_EPS = 1e-12  # the norm clamp of metric="cosine", as F.normalize


def _flatten(x: torch.Tensor, codebook: torch.Tensor):
    dtype = accumulation_dtype(x.dtype, codebook.dtype)
    return x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(dtype), codebook.to(dtype)


def distance_to(x: torch.Tensor, codes: torch.Tensor, metric: str = "l2"):
    """Distance between rows of ``x`` (N, D) and ``codes`` (N, D), row by row."""
    if metric == "l2":
        return (x - codes).pow(2).sum(-1)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    cn = codes / codes.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return 1 - (xn * cn).sum(-1)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2"):
    """Nearest code of each row.

    Args:
        x: (..., D) floating tensor.
        codebook: (K, D).
        metric: "l2" (squared Euclidean) or "cosine" (1 - cosine similarity).

    Returns:
        (indices, distances): int64 and x.dtype tensors of shape x.shape[:-1].
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    flat, cb = _flatten(x, codebook)
    if metric == "l2":
        scores = (
            flat.pow(2).sum(1, keepdim=True)
            + cb.pow(2).sum(1)
            - 2 * flat @ cb.t()
        )
    else:
        xn = flat / flat.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
        cn = cb / cb.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
        scores = -(xn @ cn.t())
    indices = scores.argmin(1) if flat.shape[0] else flat.new_empty(0, dtype=torch.long)
    distances = distance_to(flat, cb[indices], metric)
    shape = x.shape[:-1]
    return indices.reshape(shape), distances.to(x.dtype).reshape(shape)
