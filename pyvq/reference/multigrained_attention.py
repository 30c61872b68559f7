"""Plain-PyTorch multi-grained attention (Efficient-VQGAN, Cao et al., Sec. 3.2).

The definition every kernel (csrc/multigrained_attention/,
triton_kernels/multigrained_attention.py) must reproduce:

- ``q``, ``k``, ``v`` are ``(B, heads, H, W, head_dim)`` on a token grid
  whose H and W are multiples of the block side ``Ws``; ``global_k``,
  ``global_v`` are ``(B, heads, G, head_dim)``, any ``G >= 0``.
- the query at (i, j) lies in block ``(i // Ws, j // Ws)`` and attends, with
  one softmax, to
  * every key at rows ``[bi*Ws - halo, (bi+1)*Ws + halo)`` and columns
    ``[bj*Ws - halo, (bj+1)*Ws + halo)``, intersected with the grid (its
    block's extended local window; positions outside the grid are left out
    of the softmax, never zero-padded into it), and
  * all G global keys;
- scores ``q . k * scale`` with ``scale = head_dim ** -0.5`` by default,
  computed in float32 (float64 for float64 inputs); the output has q's dtype.

``halo = 0`` is blocked local attention; ``halo >= max(H, W)`` is global
attention over the grid plus the global keys.

Written as an explicit gather: the key grid is zero-padded by ``halo`` and
unfolded into one ``(Ws + 2 halo)^2`` window per block, with a validity
mask for the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyvq._checks import accumulation_dtype


def _blocks(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, nB, Ws*Ws, d), blocks row-major over the grid."""
    B, h, H, W, d = x.shape
    x = x.reshape(B, h, H // ws, ws, W // ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, h, (H // ws) * (W // ws), ws * ws, d)


def _unblocks(x: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """The inverse of ``_blocks``."""
    B, h, _, _, d = x.shape
    x = x.reshape(B, h, H // ws, W // ws, ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, h, H, W, d)


def _windows(x: torch.Tensor, ws: int, halo: int) -> torch.Tensor:
    """(B, h, H, W, c) -> (B, h, nB, (Ws + 2 halo)^2, c): each block's extended
    window of the grid zero-padded by ``halo`` on every side."""
    B, h, H, W, c = x.shape
    n = ws + 2 * halo
    x = F.pad(x, (0, 0, halo, halo, halo, halo))  # pads W, then H
    x = x.unfold(2, n, ws).unfold(3, n, ws)  # (B, h, H/Ws, W/Ws, c, n, n)
    x = x.permute(0, 1, 2, 3, 5, 6, 4)
    return x.reshape(B, h, (H // ws) * (W // ws), n * n, c)


def multigrained_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_k: torch.Tensor,
                           global_v: torch.Tensor, *, block_size: int, halo: int,
                           scale: float | None = None) -> torch.Tensor:
    """(B, heads, H, W, head_dim) attention of each block's queries to its
    extended local window and the global keys; see the module docstring."""
    B, heads, H, W, d = q.shape
    ws = block_size
    if H == 0 or W == 0:  # no block and no query (unfold needs a non-empty grid); zero gradients
        return q + 0 * (k + v) + 0 * (global_k.sum() + global_v.sum())
    halo = min(halo, max(H, W))  # a larger halo covers no more of the grid
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, global_k.dtype, global_v.dtype)
    if scale is None:
        scale = d ** -0.5
    qa, ka, va, gk, gv = (t.to(acc) for t in (q, k, v, global_k, global_v))
    qb = _blocks(qa, ws) * scale  # (B, h, nB, Ws^2, d)
    kw, vw = _windows(ka, ws, halo), _windows(va, ws, halo)  # (B, h, nB, n^2, d)
    inside = torch.ones(1, 1, H, W, 1, dtype=acc, device=q.device)
    valid = _windows(inside, ws, halo)[0, 0, :, :, 0] > 0  # (nB, n^2): not padding
    local = qb @ kw.transpose(-2, -1)  # (B, h, nB, Ws^2, n^2)
    local = local.masked_fill(~valid[None, None, :, None, :], float("-inf"))
    glob = torch.einsum("bhnqd,bhgd->bhnqg", qb, gk)  # (B, h, nB, Ws^2, G)
    p = torch.softmax(torch.cat([local, glob], dim=-1), dim=-1)
    nl = kw.shape[-2]
    out = p[..., :nl] @ vw + torch.einsum("bhnqg,bhgd->bhnqd", p[..., nl:], gv)
    return _unblocks(out, ws, H, W).to(q.dtype)
