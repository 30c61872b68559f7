"""Groups of multiresolution feature grids queried by (key, position) points:
the bi-level "key code -> grid feature" lookup of BRICS (Yang et al.).

``FeatureGrid`` holds ``G`` groups of ``L``-level grids (``tables``, shape
(G, L, T, F)) over the d-dimensional unit cube, ``d = key_dim + 2``: the first
``key_dim`` axes are a key (a per-image code value in [0, 1]) and the last two
the spatial position (row, column) in [0, 1]. A query point of group ``g`` is
looked up with ``pyvq.ops.grid_encode`` (L levels of F features each,
d-linearly interpolated), and each group's L*F features go through that
group's own small MLP; the group outputs are concatenated.

The G MLPs are batched: their weights are stacked into (G, in, out) tensors
and applied with one ``einsum`` each, not a loop over modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_choice, check_int
from pyvq.ops.grid import FEATURE_SIZES, INDEX_MODES, MAX_DIM, MAX_RESOLUTION, corner_rows, grid_encode, level_resolutions

__all__ = ["FeatureGrid", "finest_level_rows"]

_NAME = "FeatureGrid"


def finest_level_rows(points: torch.Tensor, resolution: int, table_size: int, index: str) -> torch.Tensor:
    """Table rows of the 2**d lattice corners around each point at one level.

    Uses the index formulas of ``pyvq.reference.grid`` (clamp to [0, 1], cell
    ``min(floor(x * r), r - 1)``, then the dense / dense-mod / hash row of each
    corner).

    Args:
        points: (N, G, d) coordinates.
        resolution: the level's resolution r.
        table_size: T.
        index: ``"dense_mod"`` or ``"hash"``.

    Returns:
        (N, G, 2**d) int64 rows in [0, T).
    """
    d = points.shape[-1]
    p = points.detach().to(torch.float64).clamp(0.0, 1.0) * resolution
    cell = p.floor().clamp(max=resolution - 1).to(torch.int64)
    return torch.stack([corner_rows(cell, c, resolution, table_size, index) for c in range(2**d)], dim=-1)


class FeatureGrid(nn.Module):
    """G groups of multiresolution feature grids with one MLP per group.

    Args:
        num_groups: G, the number of independent grids (BRICS: N_h key
            groups).
        key_dim: key length per group (BRICS: C_key); the grids are
            ``key_dim + 2``-dimensional (key + 2-D position), at most 7.
        levels: L, resolution levels per grid (BRICS: N_r).
        features: F, features per table entry, one of 1, 2, 4, 8 (BRICS: C_v).
        log2_table_size: T = 2**log2_table_size rows per level.
        min_res, max_res: coarsest and finest resolution; the levels follow
            ``pyvq.ops.level_resolutions(levels, min_res, max_res)``.
        out_dim: output channels, divisible by ``num_groups`` (each group's
            MLP gives ``out_dim // num_groups``); default ``G * L * F``.
        hidden_dim: width of the hidden layer of each group's MLP
            (Linear -> ReLU -> Linear); 0 makes each MLP one Linear layer.
        index: ``"dense_mod"`` (BRICS) or ``"hash"`` (Instant-NGP) for levels
            with more vertices than T (see ``pyvq.ops.grid_encode``).

    Parameters: ``tables`` (G, L, T, F), initialised uniformly in
    [-1e-4, 1e-4] as Instant-NGP does; the MLP weights ``weight{i}``
    (G, in, out) and ``bias{i}`` (G, out), initialised like ``nn.Linear``.
    """

    def __init__(
        self,
        num_groups: int,
        key_dim: int = 1,
        levels: int = 16,
        features: int = 4,
        log2_table_size: int = 18,
        min_res: int = 4,
        max_res: int = 64,
        out_dim: int | None = None,
        hidden_dim: int = 64,
        index: str = "dense_mod",
    ):
        super().__init__()
        check_int("num_groups", num_groups, where=_NAME, minimum=1)
        check_int("key_dim", key_dim, where=_NAME, minimum=0, maximum=MAX_DIM - 2)
        check_int("levels", levels, where=_NAME, minimum=1)
        check_int("log2_table_size", log2_table_size, where=_NAME, minimum=0, maximum=30)
        check_int("min_res", min_res, where=_NAME, minimum=1, maximum=MAX_RESOLUTION)
        check_int("max_res", max_res, where=_NAME, minimum=1, maximum=MAX_RESOLUTION)
        check_int("hidden_dim", hidden_dim, where=_NAME, minimum=0)
        if features not in FEATURE_SIZES:
            raise ValueError(f"{_NAME}: argument 'features' must be one of {FEATURE_SIZES}, got {features!r}")
        if max_res < min_res:
            raise ValueError(f"{_NAME}: argument 'max_res' ({max_res}) must be >= 'min_res' ({min_res})")
        check_choice("index", index, INDEX_MODES, where=_NAME)
        if out_dim is None:
            out_dim = num_groups * levels * features
        check_int("out_dim", out_dim, where=_NAME, minimum=1)
        if out_dim % num_groups:
            raise ValueError(
                f"{_NAME}: argument 'out_dim' ({out_dim}) must be divisible by 'num_groups' ({num_groups}): "
                "each group's MLP gives out_dim // num_groups channels"
            )
        self.num_groups = num_groups
        self.key_dim = key_dim
        self.dim = key_dim + 2
        self.levels = levels
        self.features = features
        self.table_size = 2**log2_table_size
        self.min_res = min_res
        self.max_res = max_res
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.index = index
        self.resolutions = level_resolutions(levels, min_res, max_res)

        self.tables = nn.Parameter(torch.empty(num_groups, levels, self.table_size, features))
        dims = [levels * features] + ([hidden_dim] if hidden_dim else []) + [out_dim // num_groups]
        self.num_layers = len(dims) - 1
        for i in range(self.num_layers):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.empty(num_groups, dims[i], dims[i + 1])))
            self.register_parameter(f"bias{i}", nn.Parameter(torch.empty(num_groups, dims[i + 1])))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.tables, -1e-4, 1e-4)
        for i in range(self.num_layers):
            weight = getattr(self, f"weight{i}")
            bound = 1.0 / math.sqrt(weight.shape[1])  # nn.Linear's default range
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(getattr(self, f"bias{i}"), -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"groups={self.num_groups}, key_dim={self.key_dim}, levels={self.levels}, features={self.features}, "
            f"table_size={self.table_size}, resolutions={self.resolutions}, out_dim={self.out_dim}, "
            f"hidden_dim={self.hidden_dim}, index={self.index!r}"
        )

    # ------------------------------------------------------------- points
    def points(self, keys: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """(N, G, d) query points from keys (..., G, key_dim) and coords
        (..., 2) (broadcast against the keys' leading dimensions); also
        returns the leading shape."""
        if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
            raise TypeError(f"{_NAME}: argument 'keys' must be a floating-point tensor")
        if not isinstance(coords, torch.Tensor) or not coords.is_floating_point():
            raise TypeError(f"{_NAME}: argument 'coords' must be a floating-point tensor")
        G, k = self.num_groups, self.key_dim
        if keys.dim() < 2 or keys.shape[-2:] != (G, k):
            raise ValueError(f"{_NAME}: argument 'keys' must have shape (..., {G}, {k}), got {tuple(keys.shape)}")
        if coords.dim() < 1 or coords.shape[-1] != 2:
            raise ValueError(f"{_NAME}: argument 'coords' must have shape (..., 2), got {tuple(coords.shape)}")
        try:
            lead = torch.broadcast_shapes(keys.shape[:-2], coords.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"{_NAME}: the leading dimensions of 'keys' {tuple(keys.shape[:-2])} and 'coords' "
                f"{tuple(coords.shape[:-1])} do not broadcast"
            ) from None
        keys = keys.expand(*lead, G, k)
        coords = coords.to(keys.dtype).unsqueeze(-2).expand(*lead, G, 2)
        return torch.cat([keys, coords], dim=-1).reshape(-1, G, self.dim), lead

    # ------------------------------------------------------------ forward
    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The G MLPs on (N, G, L*F) grid features -> (N, G, out_dim // G)."""
        for i in range(self.num_layers):
            h = torch.einsum("ngi,gio->ngo", h, getattr(self, f"weight{i}")) + getattr(self, f"bias{i}")
            if i < self.num_layers - 1:
                h = F.relu(h)
        return h

    def encode(self, keys: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The raw grid features (..., G, L*F), before the MLPs."""
        pts, lead = self.points(keys, coords)
        h = grid_encode(pts, self.tables, self.resolutions, index=self.index)
        return h.reshape(*lead, self.num_groups, self.levels * self.features)

    def forward(self, keys: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Features of (key, position) queries.

        Args:
            keys: (..., G, key_dim) per-group keys, nominally in [0, 1]
                (the lookup clamps them; values outside get no gradient).
            coords: (..., 2) spatial positions in [0, 1], shared by all
                groups; leading dimensions broadcast against the keys'.

        Returns:
            (..., out_dim): group g's MLP output in channels
            ``[g * out_dim / G, (g + 1) * out_dim / G)``. Differentiable in
            the tables, the MLPs, the keys and the coords.
        """
        pts, lead = self.points(keys, coords)
        h = grid_encode(pts, self.tables, self.resolutions, index=self.index)
        return self.mlp(h.to(self.weight0.dtype)).reshape(*lead, self.out_dim)

    # -------------------------------------------------------------- usage
    @torch.no_grad()
    def usage(self, batches) -> float:
        """Fraction of the finest level's table entries that the queries hit.

        Args:
            batches: one ``(keys, coords)`` pair (shapes as ``forward``) or an
                iterable of them (e.g. the keys of a dataset, batch by batch).

        Every point hits the 2**d lattice corners of its cell at the finest
        resolution r (corners with zero interpolation weight included). Per
        group, usage is ``|distinct rows hit| / min(T, (r + 1)**d)`` (the
        rows reachable at that level); the result is the mean over groups,
        in [0, 1].
        """
        if (
            isinstance(batches, (tuple, list))
            and len(batches) == 2
            and all(isinstance(t, torch.Tensor) for t in batches)
        ):
            batches = [batches]
        if not isinstance(batches, Iterable):
            raise TypeError(f"{_NAME}.usage: argument 'batches' must be a (keys, coords) pair or an iterable of them")
        r, T = self.resolutions[-1], self.table_size
        hit = torch.zeros(self.num_groups, T, dtype=torch.bool, device=self.tables.device)
        seen = False
        for item in batches:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"{_NAME}.usage: each item of 'batches' must be a (keys, coords) pair")
            pts, _ = self.points(*item)
            rows = finest_level_rows(pts.to(hit.device), r, T, self.index)  # (N, G, 2**d)
            groups = torch.arange(self.num_groups, device=hit.device).view(1, -1, 1).expand_as(rows)
            hit[groups.reshape(-1), rows.reshape(-1)] = True
            seen = True
        if not seen:
            raise ValueError(f"{_NAME}.usage: argument 'batches' holds no (keys, coords) pair")
        reachable = min(T, (r + 1) ** self.dim)
        return float((hit.sum(dim=1).double() / reachable).mean())
