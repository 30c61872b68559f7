"""pyvq.nn.FeatureGrid: the batched per-group MLPs against a per-group loop,
gradients, the hit statistics, argument checks."""

from __future__ import annotations

import pytest
import torch

from pyvq.nn import FeatureGrid
from pyvq.ops import grid_encode
from pyvq.ops.grid import level_resolutions

pytestmark = pytest.mark.usefixtures("one_thread")


def small_grid(**kw) -> FeatureGrid:
    torch.manual_seed(0)
    args = dict(num_groups=3, key_dim=1, levels=3, features=2, log2_table_size=8, min_res=2, max_res=8,
                out_dim=12, hidden_dim=8)
    args.update(kw)
    grid = FeatureGrid(**args)
    with torch.no_grad():  # entries large enough for gradients to matter
        grid.tables.uniform_(-1, 1)
    return grid


def test_parameters_and_init():
    torch.manual_seed(0)
    grid = FeatureGrid(4, key_dim=2, levels=5, features=4, log2_table_size=10, min_res=4, max_res=64,
                       out_dim=32, hidden_dim=16)
    assert grid.tables.shape == (4, 5, 1024, 4)
    assert grid.tables.abs().max() <= 1e-4 and grid.tables.std() > 1e-5
    assert grid.resolutions == level_resolutions(5, 4, 64) == [4, 8, 16, 32, 64]
    assert grid.dim == 4
    shapes = {k: tuple(v.shape) for k, v in grid.named_parameters()}
    assert shapes == {"tables": (4, 5, 1024, 4), "weight0": (4, 20, 16), "bias0": (4, 16),
                      "weight1": (4, 16, 8), "bias1": (4, 8)}
    single = FeatureGrid(2, levels=2, features=2, log2_table_size=4, hidden_dim=0)
    assert single.out_dim == 2 * 2 * 2 and single.num_layers == 1


def test_forward_matches_a_loop_over_groups():
    grid = small_grid()
    keys = torch.rand(2, 5, 7, 3, 1)
    coords = torch.rand(5, 7, 2)  # broadcast over the batch
    out = grid(keys, coords)
    assert out.shape == (2, 5, 7, 12)
    pts = torch.cat([keys, coords.expand(2, 5, 7, 2).unsqueeze(-2).expand(2, 5, 7, 3, 2)], dim=-1).reshape(-1, 3, 3)
    feats = grid_encode(pts, grid.tables, grid.resolutions)
    for g in range(3):
        h = torch.relu(feats[:, g] @ grid.weight0[g] + grid.bias0[g])
        expected = h @ grid.weight1[g] + grid.bias1[g]
        torch.testing.assert_close(out.reshape(-1, 12)[:, 4 * g : 4 * g + 4], expected)
    torch.testing.assert_close(grid.encode(keys, coords), feats.reshape(2, 5, 7, 3, 6))


def test_gradients_reach_tables_mlp_keys_and_coords():
    grid = small_grid()
    keys = torch.rand(4, 3, 1, requires_grad=True)
    coords = torch.rand(4, 2, requires_grad=True)
    grid(keys, coords).square().sum().backward()
    for name, t in [("keys", keys), ("coords", coords)] + list(grid.named_parameters()):
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def test_hash_index_and_float64():
    grid = small_grid(index="hash", log2_table_size=4).double()
    out = grid(torch.rand(6, 3, 1, dtype=torch.float64), torch.rand(6, 2, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (6, 12)


def _rows_with_gradient(grid, keys, coords):
    """Rows of the finest level that receive a table gradient (an
    independent way to see which entries the queries touch)."""
    tables = grid.tables.detach().clone().requires_grad_(True)
    pts, _ = grid.points(keys, coords)
    grid_encode(pts, tables, grid.resolutions, index=grid.index).sum().backward()
    return (tables.grad[:, -1].abs().sum(-1) > 0).sum(dim=1)  # (G,)


@pytest.mark.parametrize("kw", [dict(log2_table_size=12), dict(log2_table_size=6),
                                dict(log2_table_size=6, index="hash")])
def test_usage_counts_distinct_finest_rows(kw):
    grid = small_grid(**kw)
    torch.manual_seed(1)
    batches = [(torch.rand(50, 3, 1), torch.rand(50, 2)) for _ in range(3)]
    r, T = grid.resolutions[-1], grid.table_size
    reachable = min(T, (r + 1) ** 3)
    hit = sum(_rows_with_gradient(grid, torch.cat([k for k, _ in batches]), torch.cat([c for _, c in batches])))
    expected = hit.item() / (3 * reachable)
    assert grid.usage(batches) == pytest.approx(expected)
    assert 0 < grid.usage(batches[0]) <= grid.usage(batches) <= 1


def test_usage_extremes():
    # one level of resolution 2 in 3-D: 27 vertices, dense (T = 32)
    grid = FeatureGrid(1, levels=1, features=1, log2_table_size=5, min_res=2, max_res=2, hidden_dim=0)
    one_cell = (torch.full((1, 1, 1), 0.2), torch.full((1, 2), 0.2))
    assert grid.usage(one_cell) == pytest.approx(8 / 27)
    c = torch.tensor([0.25, 0.75])
    pts = torch.cartesian_prod(c, c, c)
    assert grid.usage((pts[:, :1, None], pts[:, 1:])) == pytest.approx(1.0)


def test_meta_device_build():
    with torch.device("meta"):
        grid = FeatureGrid(16, levels=16, features=4, log2_table_size=18, out_dim=512)
    assert grid.tables.is_meta and grid.tables.numel() == 16 * 16 * 2**18 * 4


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(out_dim=10), "out_dim"),
        (dict(features=3), "features"),
        (dict(num_groups=0), "num_groups"),
        (dict(key_dim=6), "key_dim"),
        (dict(min_res=8, max_res=4), "max_res"),
        (dict(index="linear"), "index"),
        (dict(levels=0), "levels"),
        (dict(hidden_dim=-1), "hidden_dim"),
    ],
)
def test_bad_arguments(kw, arg):
    args = dict(num_groups=3, levels=2, features=2, log2_table_size=4, out_dim=12)
    args.update(kw)
    with pytest.raises(ValueError, match=arg):
        FeatureGrid(**args)


def test_bad_inputs():
    grid = small_grid()
    with pytest.raises(ValueError, match="keys"):
        grid(torch.rand(4, 2, 1), torch.rand(4, 2))
    with pytest.raises(ValueError, match="coords"):
        grid(torch.rand(4, 3, 1), torch.rand(4, 3))
    with pytest.raises(ValueError, match="broadcast"):
        grid(torch.rand(4, 3, 1), torch.rand(5, 2))
    with pytest.raises(TypeError, match="keys"):
        grid(torch.zeros(4, 3, 1, dtype=torch.long), torch.rand(4, 2))
    with pytest.raises(ValueError, match="no"):
        grid.usage([])
