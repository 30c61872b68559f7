"""Plain-PyTorch multiresolution feature-grid encoding (``grid_encode``).

The definition every kernel in csrc/grid/ must reproduce (see
``pyvq.ops.grid_encode`` for the argument contract):

- coordinates are clamped to [0, 1]; level ``l`` with resolution ``r`` scales
  them to ``p = x * r`` on a lattice of ``r + 1`` vertices per axis, cell
  ``i = min(floor(p), r - 1)`` and fraction ``w = p - i`` (so ``x = 1`` lands
  on the last vertex with ``w = 1``);
- vertex ``v`` (d integers in [0, r]) has row ``sum_k v_k * (r + 1)**k`` when
  ``(r + 1)**d <= T`` (dense); otherwise ``index="dense_mod"`` takes that sum
  modulo T (BRICS eq. 6; computed in 64-bit), and ``index="hash"`` takes
  ``xor_k (v_k * pi_k mod 2**32)`` modulo T with Instant-NGP's primes;
- each level returns the d-linear interpolation of its 2**d corners,
  accumulated in float32 (float64 for float64 tables) and returned in the
  tables' dtype; levels are concatenated: ``out[n, g, l * F + f]``.

Autograd differentiates both ``tables`` and ``coords`` (gradient for
0 < x < 1; none at or outside the ends, where the clamp holds x fixed).
"""

from __future__ import annotations

import torch

from pyvq._checks import accumulation_dtype

INDEX_MODES = ("dense_mod", "hash")
# Instant-NGP's spatial-hash primes (pi_1 = 1); d <= len(HASH_PRIMES).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_MASK32 = 0xFFFFFFFF


def corner_rows(cell: torch.Tensor, corner: int, r: int, T: int, index: str) -> torch.Tensor:
    """int64 rows of one corner (bit k of ``corner`` = +1 along axis k) of
    the cells ``cell`` (..., d) at resolution ``r``."""
    d = cell.shape[-1]
    dense = (r + 1) ** d <= T
    row = torch.zeros(cell.shape[:-1], dtype=torch.int64, device=cell.device)
    stride = 1
    for k in range(d):
        v = cell[..., k] + ((corner >> k) & 1)
        if dense or index == "dense_mod":
            # Accumulated modulo T (exact: v <= 2**20 and stride < T < 2**31 keep
            # every product inside int64); dense rows never reach T.
            row = torch.remainder(row + v * stride, T)
            stride = stride * (r + 1) % T
        else:
            row = row ^ ((v * HASH_PRIMES[k]) & _MASK32)
    return row if dense or index == "dense_mod" else torch.remainder(row, T)


def grid_encode(coords: torch.Tensor, tables: torch.Tensor, resolutions, index: str = "dense_mod") -> torch.Tensor:
    """``coords`` (N, G, d), ``tables`` (G, L, T, F) -> (N, G, L * F)."""
    N, G, d = coords.shape
    _, L, T, F = tables.shape
    acc = accumulation_dtype(tables.dtype)
    x = coords.to(acc)
    # Clamp with an explicit gradient mask: gradient for 0 < x < 1 only.
    x = torch.where((x > 0) & (x < 1), x, x.detach().clamp(0.0, 1.0))
    tab = tables.to(acc)
    g_idx = torch.arange(G, device=coords.device).view(1, G)
    outs = []
    for level, r in enumerate(int(r) for r in resolutions):
        p = x * r
        cell = p.detach().floor().clamp(max=r - 1).to(torch.int64)
        w = p - cell.to(acc)  # (N, G, d), differentiable in coords
        level_out = torch.zeros(N, G, F, dtype=acc, device=coords.device)
        for corner in range(2 ** d):
            weight = torch.ones(N, G, dtype=acc, device=coords.device)
            for k in range(d):
                weight = weight * (w[..., k] if (corner >> k) & 1 else 1.0 - w[..., k])
            rows = corner_rows(cell, corner, r, T, index)
            level_out = level_out + weight[..., None] * tab[g_idx, level, rows]
        outs.append(level_out)
    out = torch.cat(outs, dim=-1) if outs else torch.zeros(N, G, 0, dtype=acc, device=coords.device)
    return out.to(tables.dtype)
