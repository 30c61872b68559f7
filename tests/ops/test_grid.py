"""pyvq.ops.grid_encode (multiresolution feature grids) against its reference.

Three layers of checks:

- the reference itself, against hand-derived values and a loop-and-int
  implementation of the definition written here from the docstring of
  pyvq/reference/grid.py (these do not need the kernel);
- the public op against the reference, forward and backward, for the dense,
  dense_mod and hash indexing, float32/float64, borders, clamping, strided
  views and empty inputs;
- the kernel's own contract (opcheck, the backward op, deterministic CPU
  backward, its input checks), skipped in a build without it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import pyvq
from pyvq import reference
from pyvq.ops import grid_encode, level_resolutions
from tests.conftest import half_precision_bound

pytestmark = pytest.mark.usefixtures("one_thread")

_has_kernel = pyvq._backend.has_kernel("grid_encode", "cpu")
needs_kernel = pytest.mark.skipif(
    not _has_kernel, reason="pyvq._C was built without the grid_encode kernel (rebuild the extension)"
)

INDEXES = ["dense_mod", "hash"]
# Instant-NGP's spatial-hash primes (tiny-cuda-nn, encodings/grid.h), entered
# here independently of pyvq.reference.grid.HASH_PRIMES.
PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


def _public(coords, tables, res, index="dense_mod"):
    return grid_encode(coords, tables, res, index=index)


# Both implementations must satisfy the definition; the public op is the
# kernel once the extension has it.
IMPLS = [pytest.param(reference.grid_encode, id="reference"), pytest.param(_public, id="op")]


# --- a loop-and-int implementation of the definition ------------------------

def _py_row(v, r, T, index):
    """Row of lattice vertex ``v`` (a list of ints in [0, r]) in a table of T rows."""
    d = len(v)
    if (r + 1) ** d <= T or index == "dense_mod":
        return sum(vk * (r + 1) ** k for k, vk in enumerate(v)) % T
    h = 0
    for k, vk in enumerate(v):
        h ^= (vk * PRIMES[k]) & 0xFFFFFFFF
    return h % T


def _py_encode(coords, tables, res, index):
    """(N, G, d), (G, L, T, F) -> nested lists (N, G, L * F) of Python floats."""
    N, G, d = coords.shape
    _, L, T, F = tables.shape
    c, t = coords.tolist(), tables.tolist()
    out = [[[0.0] * (L * F) for _ in range(G)] for _ in range(N)]
    for n, g, level in itertools.product(range(N), range(G), range(L)):
        r = res[level]
        x = [min(max(v, 0.0), 1.0) for v in c[n][g]]
        p = [xk * r for xk in x]
        cell = [min(math.floor(pk), r - 1) for pk in p]
        w = [pk - ik for pk, ik in zip(p, cell)]
        for corner in itertools.product((0, 1), repeat=d):
            weight = 1.0
            for k in range(d):
                weight *= w[k] if corner[k] else 1.0 - w[k]
            row = _py_row([cell[k] + corner[k] for k in range(d)], r, T, index)
            for f in range(F):
                out[n][g][level * F + f] += weight * t[g][level][row][f]
    return out


# --- helpers -----------------------------------------------------------------

def _coords(g, N, G, d, res, dtype=torch.float32, borders=True):
    """Uniform points in [0, 1]; with ``borders``, some entries sit on lattice
    vertices k / r of one of the levels, some are exactly 0 or 1 and some lie
    outside [0, 1] (clamped)."""
    x = torch.rand(N, G, d, generator=g, dtype=torch.float64)
    if borders:
        m = torch.rand(N, G, d, generator=g, dtype=torch.float64)
        r = torch.tensor(res, dtype=torch.float64)[torch.randint(0, len(res), (N, G, d), generator=g)]
        vertex = (torch.rand(N, G, d, generator=g, dtype=torch.float64) * (r + 1)).floor().clamp(max=r) / r
        x = torch.where(m < 0.25, vertex, x)
        x = torch.where((m >= 0.25) & (m < 0.3), torch.zeros_like(x), x)
        x = torch.where((m >= 0.3) & (m < 0.35), torch.ones_like(x), x)
        x = torch.where((m >= 0.35) & (m < 0.4), 3.0 * x - 1.0, x)
    return x.to(dtype)


def _tables(g, G, L, T, F, dtype=torch.float32):
    return torch.randn(G, L, T, F, generator=g, dtype=torch.float64).to(dtype)


def _assert_close(actual, expected, tol):
    """Relative ``tol``, with an absolute floor of ``tol`` times the largest
    magnitude (sums of many terms may cancel to tiny values)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _forward_backward(fn, coords, tables, res, index, grad_out):
    c = coords.detach().requires_grad_()
    t = tables.detach().requires_grad_()
    out = fn(c, t, res, index)
    gc, gt = torch.autograd.grad(out, (c, t), grad_out)
    return out.detach(), gc, gt


def _compare_with_reference(coords, tables, res, index, tol, seed=0):
    """The public op against the reference: output and both gradients of a
    random weighted sum."""
    g = torch.Generator().manual_seed(seed)
    N, G, _ = coords.shape
    L, F = tables.shape[1], tables.shape[3]
    grad_out = torch.randn(N, G, L * F, generator=g, dtype=torch.float64).to(tables.dtype)
    out, gc, gt = _forward_backward(_public, coords, tables, res, index, grad_out)
    ref, rgc, rgt = _forward_backward(reference.grid_encode, coords, tables, res, index, grad_out)
    _assert_close(out, ref, tol)
    _assert_close(gc, rgc, tol)
    _assert_close(gt, rgt, tol)
    return out, gc, gt


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# --- the reference against hand-derived values -----------------------------

@pytest.mark.parametrize("fn", IMPLS)
def test_bilinear_by_hand(fn):
    """d = 2, r = 1, T = 4: the four vertices are the four rows (dense, row
    v0 + 2 v1); the output is the bilinear interpolation of their values."""
    t00, t10, t01, t11 = 1.0, 2.0, 4.0, 8.0  # rows 0, 1, 2, 3
    u00, u10, u01, u11 = -3.0, 0.5, 0.0, 6.0  # second feature
    tables = torch.tensor([[[[t00, u00], [t10, u10], [t01, u01], [t11, u11]]]], dtype=torch.float64)
    coords = torch.tensor([[[0.25, 0.5]]], dtype=torch.float64, requires_grad=True)
    tables.requires_grad_()
    for index in INDEXES:  # a dense level ignores the index mode
        out = fn(coords, tables, [1], index)
        assert out.shape == (1, 1, 2) and out.dtype == torch.float64
        # weights: (0,0) .75*.5, (1,0) .25*.5, (0,1) .75*.5, (1,1) .25*.5
        expect0 = 0.375 * t00 + 0.125 * t10 + 0.375 * t01 + 0.125 * t11  # 3.125
        expect1 = 0.375 * u00 + 0.125 * u10 + 0.375 * u01 + 0.125 * u11  # -0.3125
        assert out[0, 0].tolist() == [expect0, expect1]
    # d out0 / d x0 = r * ((1 - w1) (t10 - t00) + w1 (t11 - t01)) = .5 * 1 + .5 * 4
    # d out0 / d x1 = r * ((1 - w0) (t01 - t00) + w0 (t11 - t10)) = .75 * 3 + .25 * 6
    # d out0 / d tables[row] = the row's weight
    gc, gt = torch.autograd.grad(out[0, 0, 0], (coords, tables))
    assert gc[0, 0].tolist() == [2.5, 3.75]
    assert gt[0, 0, :, 0].tolist() == [0.375, 0.125, 0.375, 0.125]
    assert gt[0, 0, :, 1].tolist() == [0.0] * 4


@pytest.mark.parametrize("fn", IMPLS)
def test_index_rows_by_hand(fn):
    """One point on a vertex picks exactly one row; the rows below are
    computed by hand from the formulas."""
    # d = 2, r = 4: 25 vertices > T = 11 rows. Vertex (2, 1) at x = (0.5, 0.25):
    #   dense_mod: 2 + 1 * 5 = 7 (mod 11) -> 7
    #   hash: 2 xor (1 * 2654435761) = 2 xor 0x9E3779B1 = 0x9E3779B3 = 2654435763,
    #         2654435763 = 11 * 241312342 + 1 -> 1
    tables = torch.arange(11, dtype=torch.float64).view(1, 1, 11, 1)
    coords = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    assert fn(coords, tables, [4], "dense_mod").item() == 7.0
    assert fn(coords, tables, [4], "hash").item() == 1.0
    # d = 3, r = 1: 8 vertices > T = 7. Vertex (1, 1, 1) at x = (1, 1, 1)
    # (cell 0, fraction 1):
    #   dense_mod: 1 + 2 + 4 = 7 (mod 7) -> 0
    #   hash: 1 xor 2654435761 xor 805459861 = 2922720805 = 7 * 417531543 + 4 -> 4
    tables = torch.arange(7, dtype=torch.float64).view(1, 1, 7, 1) + 10
    coords = torch.ones(1, 1, 3, dtype=torch.float64)
    assert fn(coords, tables, [1], "dense_mod").item() == 10.0
    assert fn(coords, tables, [1], "hash").item() == 14.0
    # The same vertex with T = 8 rows fits: dense row 7 in both modes.
    tables = torch.arange(8, dtype=torch.float64).view(1, 1, 8, 1)
    for index in INDEXES:
        assert fn(coords, tables, [1], index).item() == 7.0


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("d,r,T", [(1, 6, 100), (2, 4, 100), (2, 4, 13), (3, 3, 20), (3, 8, 2**20)])
def test_vertices_hit_exact_rows(fn, index, d, r, T):
    """Every lattice vertex k / r (0 and 1 included) returns its row exactly:
    its weights are exactly 0 and 1."""
    g = torch.Generator().manual_seed(d * 100 + r)
    G, F = 2, 2
    tables = _tables(g, G, 1, T, F, torch.float64)
    verts = list(itertools.product(range(r + 1), repeat=d))
    v = torch.tensor(verts, dtype=torch.float64)  # (N, d)
    coords = (v / r).view(-1, 1, d).expand(-1, G, d)
    out = fn(coords, tables, [r], index)
    rows = [_py_row(list(vert), r, T, index) for vert in verts]
    expect = tables[:, 0, rows].permute(1, 0, 2)  # (N, G, F)
    assert torch.equal(out, expect)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_matches_loop_implementation(fn, index, d):
    """Random small inputs against the loop-and-int implementation, with
    dense, wrapped and hashed levels, a resolution of 2**20 (products beyond
    32 bits) and points on borders and outside [0, 1]."""
    g = torch.Generator().manual_seed(10 + d)
    res = [2, 3, 9, 2**20]
    T, F, G, N = 50, 2, 2, 12
    coords = _coords(g, N, G, d, res, torch.float64)
    tables = _tables(g, G, len(res), T, F, torch.float64)
    out = fn(coords, tables, res, index)
    expect = torch.tensor(_py_encode(coords, tables, res, index), dtype=torch.float64)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", IMPLS)
def test_levels_and_groups_layout(fn):
    """out[n, g, l * F + f] is level l of group g, as if computed alone."""
    g = torch.Generator().manual_seed(3)
    res, T, F, G = [2, 5, 11], 64, 4, 3
    coords = _coords(g, 20, G, 3, res, torch.float64)
    tables = _tables(g, G, len(res), T, F, torch.float64)
    out = fn(coords, tables, res, "hash")
    assert out.shape == (20, G, len(res) * F)
    for level, r in enumerate(res):
        for grp in range(G):
            alone = fn(coords[:, grp:grp + 1], tables[grp:grp + 1, level:level + 1], [r], "hash")
            assert torch.equal(out[:, grp:grp + 1, level * F:(level + 1) * F], alone)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamping(fn, dtype):
    """Coordinates outside [0, 1] give the value at the clamped point and no
    gradient; inside (0 and 1 included) the gradient flows."""
    g = torch.Generator().manual_seed(4)
    res, G, d = [3, 8], 2, 3
    tables = _tables(g, G, len(res), 32, 2, dtype)
    inside = _coords(g, 30, G, d, res, torch.float64, borders=False)
    inside[:5, :, 0] = 0.0
    inside[5:10, :, 1] = 1.0
    outside = inside.clone()
    outside[10:20, :, 0] = -torch.rand(10, G, generator=g, dtype=torch.float64) - 1e-3
    outside[15:25, :, 2] = 1.0 + torch.rand(10, G, generator=g, dtype=torch.float64) + 1e-3
    outside[25, :, :] = torch.tensor([-5.0, 7.0, float("inf")])
    outside[26, :, :] = float("-inf")
    clamped = outside.clamp(0.0, 1.0)
    outside, clamped = outside.to(dtype).requires_grad_(), clamped.to(dtype)
    out = fn(outside, tables, res, "dense_mod")
    assert torch.equal(out, fn(clamped, tables, res, "dense_mod"))
    (gc,) = torch.autograd.grad(out, outside, torch.ones_like(out))
    off = (outside.detach() < 0) | (outside.detach() > 1)
    assert bool(off.any()) and bool((gc[off] == 0).all())
    interior = (outside.detach() > 0) & (outside.detach() < 1)
    assert bool((gc[interior] != 0).all())  # random tables: never exactly 0


@pytest.mark.parametrize("fn", IMPLS)
def test_gradient_at_0_and_1(fn):
    """As torch.clamp, the clamp passes gradient for 0 < x < 1 only: none at
    x_k = 0 or 1 exactly, while just inside (x_k = delta or 1 - delta) it is
    the derivative of the first (last) cell, constant along axis k there."""
    g = torch.Generator().manual_seed(19)
    res, G, d = [3, 8], 2, 3
    tables = _tables(g, G, len(res), 32, 2, torch.float64)
    base = _coords(g, 20, G, d, res, torch.float64, borders=False)
    delta = 0.25 / max(res)
    for k, (edge, near, nearer) in itertools.product(range(d), ((0.0, delta, delta / 2),
                                                                (1.0, 1.0 - delta, 1.0 - delta / 2))):
        grads = []
        for value in (edge, near, nearer):
            c = base.clone()
            c[..., k] = value
            c.requires_grad_()
            out = fn(c, tables, res, "hash")
            grads.append(torch.autograd.grad(out, c, torch.ones_like(out))[0])
        assert bool((grads[0][..., k] == 0).all())
        assert bool((grads[1][..., k] != 0).all())
        torch.testing.assert_close(grads[1][..., k], grads[2][..., k], rtol=1e-12, atol=1e-12)
        # the other axes still get their gradient at the edge
        others = [j for j in range(d) if j != k]
        assert bool((grads[0][..., others] != 0).all())


def test_level_resolutions():
    # b = (64 / 4) ** (1 / 4) = 2: exact powers of two.
    assert level_resolutions(5, 4, 64) == [4, 8, 16, 32, 64]
    # b = 128 ** (1 / 2) = 11.31...: floor(16 * 11.31...) = floor(181.02) = 181.
    assert level_resolutions(3, 16, 2048) == [16, 181, 2048]
    assert level_resolutions(1, 7, 7) == [7]
    assert level_resolutions(1, 4, 64) == [4]
    assert level_resolutions(4, 9, 9) == [9, 9, 9, 9]
    for args in [(16, 4, 64), (16, 16, 2048), (16, 16, 2**19), (8, 2, 1000), (24, 1, 4096)]:
        levels, lo, hi = args
        res = level_resolutions(*args)
        assert len(res) == levels and res[0] == lo and res[-1] == hi, (args, res)
        assert all(a <= b for a, b in zip(res, res[1:])), res
        assert all(isinstance(r, int) for r in res)
        b = (hi / lo) ** (1 / (levels - 1))
        assert all(abs(r - lo * b**level) < 1 for level, r in enumerate(res)), res


@pytest.mark.parametrize("args,expect", [
    ((8, 16, 2**20), 2**20),
    ((11, 16, 16 * 3**10), 16 * 3**10),  # b = 3: every level is exact, 16 * 3**l
])
def test_level_resolutions_large(args, expect):
    res = level_resolutions(*args)
    assert res[-1] == expect
    if args[0] == 11:
        assert res == [16 * 3**level for level in range(11)]


@pytest.mark.parametrize("args", [(0, 4, 64), (4, 0, 64), (4, 64, 4)])
def test_level_resolutions_bad(args):
    with pytest.raises(ValueError, match="level_resolutions"):
        level_resolutions(*args)


# --- the op against the reference -------------------------------------------

CASES = [  # (d, G, resolutions, T, F)
    pytest.param(2, 1, [4, 16], 2**12, 2, id="d2-dense"),
    pytest.param(3, 3, [3, 7, 15], 2**10, 4, id="d3-G3-mixed"),
    pytest.param(4, 1, [2, 5], 2**9, 8, id="d4-F8"),
    pytest.param(2, 3, [1, 2, 3, 4], 2**16, 1, id="d2-largeT-smallr"),
    pytest.param(3, 1, [64, 1000, 2**20], 7, 2, id="d3-smallT-larger"),
    pytest.param(2, 1, [8, 33], 1, 2, id="d2-T1"),
    pytest.param(1, 2, [5, 300], 16, 4, id="d1"),
    pytest.param(7, 1, [1, 3], 2**7, 1, id="d7"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("d,G,res,T,F", CASES)
def test_matches_reference(d, G, res, T, F, index, dtype):
    g = torch.Generator().manual_seed(d * 1000 + G * 100 + T % 97 + F)
    N = 24 if d == 7 else 60
    coords = _coords(g, N, G, d, res, dtype)
    tables = _tables(g, G, len(res), T, F, dtype)
    out, _, _ = _compare_with_reference(coords, tables, res, index, TOL[dtype])
    assert out.shape == (N, G, len(res) * F) and out.dtype == dtype


def _strided_inputs(kind, g, N, G, d, res, T, F):
    L = len(res)
    coords = _coords(g, N, G, d, res)
    tables = _tables(g, G, L, T, F)
    if kind == "coords-transposed":
        coords = coords.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    elif kind == "coords-sliced":
        coords = torch.stack([coords, torch.full_like(coords, float("nan"))], -1).flatten(-2)[..., ::2]
    elif kind == "coords-expanded":
        coords = coords[:1].expand(N, G, d)
    elif kind == "tables-transposed":
        tables = tables.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    elif kind == "tables-sliced":
        tables = torch.stack([torch.full_like(tables, float("nan")), tables], -1).flatten(-2)[..., 1::2]
    elif kind == "tables-feature-major":
        tables = tables.transpose(2, 3).contiguous().transpose(2, 3)
    elif kind == "tables-rows-sliced":
        tables = torch.cat([tables, tables], 2)[:, :, ::2]
    return coords, tables


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("kind", ["coords-transposed", "coords-sliced", "coords-expanded", "tables-transposed",
                                  "tables-sliced", "tables-feature-major", "tables-rows-sliced"])
def test_non_contiguous(kind, index):
    g = torch.Generator().manual_seed(5)
    res = [3, 10]
    coords, tables = _strided_inputs(kind, g, 40, 2, 3, res, 64, 2)
    assert not (coords.is_contiguous() and tables.is_contiguous())
    out, gc, gt = _compare_with_reference(coords, tables, res, index, TOL[torch.float32])
    out_c, gc_c, gt_c = _compare_with_reference(coords.contiguous(), tables.contiguous(), res, index,
                                                TOL[torch.float32])
    assert torch.equal(out, out_c)
    _assert_close(gc, gc_c, TOL[torch.float32])
    _assert_close(gt, gt_c, TOL[torch.float32])


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("N,G,res", [
    pytest.param(0, 3, [2, 40], id="N0"),
    pytest.param(5, 0, [2, 40], id="G0"),
])
def test_empty(N, G, res, index):
    """Empty inputs give empty outputs that still belong to the graph:
    zero gradients of the inputs' shapes."""
    g = torch.Generator().manual_seed(6)
    F, T = 4, 16
    coords = torch.rand(N, G, 3, generator=g, requires_grad=True)
    tables = torch.randn(G, len(res), T, F, generator=g, requires_grad=True)
    for fn in (_public, reference.grid_encode):
        out = fn(coords, tables, res, index)
        assert out.shape == (N, G, len(res) * F) and out.dtype == torch.float32
        gc, gt = torch.autograd.grad(out, (coords, tables), torch.ones_like(out), allow_unused=True)
        assert gt is not None  # the tables always take part
        for grad, leaf in ((gc, coords), (gt, tables)):
            if grad is not None:  # None (unused) is a valid zero gradient
                assert grad.shape == leaf.shape and grad.dtype == leaf.dtype
                assert bool((grad == 0).all())


def test_zero_levels_rejected():
    with pytest.raises(ValueError, match="'tables' must have at least one level"):
        grid_encode(torch.rand(5, 2, 3), torch.randn(2, 0, 16, 4), [])


def test_tensor_resolutions():
    g = torch.Generator().manual_seed(7)
    coords, tables = _coords(g, 10, 1, 2, [3, 6]), _tables(g, 1, 2, 16, 2)
    assert torch.equal(grid_encode(coords, tables, torch.tensor([3, 6])),
                       grid_encode(coords, tables, (3, 6)))


def _mixed_dtype_ids(p):
    return str(p).replace("torch.", "")


@pytest.mark.parametrize("coords_dtype,tables_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                       (torch.float16, torch.float32)], ids=_mixed_dtype_ids)
def test_mixed_dtypes(coords_dtype, tables_dtype):
    """coords and tables of different dtypes: output in the tables' dtype,
    gradients in each input's dtype, values as the reference's."""
    g = torch.Generator().manual_seed(8)
    res = [4, 12]
    coords = _coords(g, 30, 2, 3, res, coords_dtype)
    tables = _tables(g, 2, 2, 64, 2, tables_dtype)
    out, gc, gt = _compare_with_reference(coords, tables, res, "hash", 1e-5)
    assert out.dtype == tables_dtype and gc.dtype == coords_dtype and gt.dtype == tables_dtype


# --- gradcheck ---------------------------------------------------------------

def _off_border_coords(g, N, G, d, res, margin=0.05):
    """Points whose fraction x * r - floor(x * r) is at least ``margin`` from 0
    and 1 at every level (the encoding is only piecewise smooth)."""
    out = []
    while len(out) < N * G * d:
        x = torch.rand(256, generator=g, dtype=torch.float64) * 0.98 + 0.01
        ok = torch.ones(256, dtype=torch.bool)
        for r in res:
            frac = x * r - (x * r).floor()
            ok &= (frac > margin) & (frac < 1 - margin)
        out.extend(x[ok].tolist())
    return torch.tensor(out[:N * G * d], dtype=torch.float64).view(N, G, d)


@pytest.mark.parametrize("index,d,res,T", [
    ("dense_mod", 2, [2, 3], 16),  # both levels dense (9 and 16 vertices)
    ("dense_mod", 2, [2, 5], 16),  # level 2 wraps (36 vertices)
    ("hash", 2, [2, 5], 16),
    ("dense_mod", 3, [1, 3], 16),  # 8 dense, 64 wrapped
    ("hash", 3, [1, 3], 16),
])
def test_gradcheck(index, d, res, T):
    g = torch.Generator().manual_seed(9)
    G, F = 2, 2
    coords = _off_border_coords(g, 4, G, d, res).requires_grad_()
    tables = _tables(g, G, len(res), T, F, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, t: grid_encode(c, t, res, index=index), (coords, tables))


# --- float16 / bfloat16 tables on the CPU -------------------------------------

@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coords_half", [False, True], ids=["coords32", "coords-half"])
def test_half_tables(dtype, index, coords_half):
    g = torch.Generator().manual_seed(11)
    res, G, d, T, F = [4, 9, 40], 2, 3, 256, 2
    coords = _coords(g, 200, G, d, res, dtype if coords_half else torch.float32)
    tables = _tables(g, G, len(res), T, F, dtype)
    grad_out = torch.randn(200, G, len(res) * F, generator=g).to(dtype)
    out, gc, gt = _forward_backward(_public, coords, tables, res, index, grad_out)
    assert out.dtype == dtype and gt.dtype == dtype and gc.dtype == coords.dtype
    low, lgc, lgt = _forward_backward(reference.grid_encode, coords, tables, res, index, grad_out)
    # float64 math on the exact same inputs
    o64, gc64, gt64 = _forward_backward(reference.grid_encode, coords.double(), tables.double(), res, index,
                                        grad_out.double())
    half_precision_bound(out, low, o64, atol=1e-6)
    half_precision_bound(gt, lgt, gt64, atol=1e-6)
    half_precision_bound(gc, lgc, gc64, atol=1e-4 * gc64.abs().max().item())


# --- argument checks ---------------------------------------------------------

def _ok(N=4, G=2, d=3, L=2, T=16, F=2):
    return torch.rand(N, G, d), torch.randn(G, L, T, F)


BAD = [  # (make -> (coords, tables, resolutions, index), exception, message)
    (lambda: (torch.rand(4, 3), _ok()[1], [2, 3], "dense_mod"), ValueError, "'coords' must be 3-D"),
    (lambda: (torch.rand(1, 4, 2, 3), _ok()[1], [2, 3], "dense_mod"), ValueError, "'coords' must be 3-D"),
    (lambda: (_ok()[0], torch.randn(2, 16, 2), [2, 3], "dense_mod"), ValueError, "'tables' must be 4-D"),
    (lambda: (torch.rand(4, 3, 3), _ok()[1], [2, 3], "dense_mod"), ValueError, "'coords' has 3 groups.*'tables' has 2"),
    (lambda: (torch.randint(0, 2, (4, 2, 3)), _ok()[1], [2, 3], "dense_mod"), TypeError, "'coords'.*floating"),
    (lambda: (_ok()[0], torch.randint(0, 2, (2, 2, 16, 2)), [2, 3], "dense_mod"), TypeError, "'tables'.*floating"),
    (lambda: ([[[0.5] * 3] * 2] * 4, _ok()[1], [2, 3], "dense_mod"), TypeError, "'coords' must be a torch.Tensor"),
    (lambda: (*_ok(), [2], "dense_mod"), ValueError, "'resolutions' has 1 entries.*L = 2"),
    (lambda: (*_ok(), [2, 3, 4], "dense_mod"), ValueError, "'resolutions' has 3 entries.*L = 2"),
    (lambda: (*_ok(), [2, 0], "dense_mod"), ValueError, "'resolutions' must hold ints in \\[1, 2\\*\\*20\\]"),
    (lambda: (*_ok(), [2, -3], "dense_mod"), ValueError, "'resolutions' must hold ints"),
    (lambda: (*_ok(), [2, 2**20 + 1], "dense_mod"), ValueError, "'resolutions' must hold ints"),
    (lambda: (*_ok(), [2, 3.0], "dense_mod"), ValueError, "'resolutions' must hold ints"),
    (lambda: (*_ok(), [2, True], "dense_mod"), ValueError, "'resolutions' must hold ints"),
    (lambda: (*_ok(), "23", "dense_mod"), TypeError, "'resolutions' must be a sequence"),
    (lambda: (*_ok(), 4, "dense_mod"), TypeError, "'resolutions' must be a sequence"),
    (lambda: (*_ok(), [2, 3], "dense"), ValueError, "'index' must be one of"),
    (lambda: (*_ok(), [2, 3], "HASH"), ValueError, "'index' must be one of"),
    (lambda: (*_ok(F=3), [2, 3], "dense_mod"), ValueError, "feature size F \\(tables.shape\\[3\\]\\).*got 3"),
    (lambda: (*_ok(F=16), [2, 3], "dense_mod"), ValueError, "feature size F \\(tables.shape\\[3\\]\\).*got 16"),
    (lambda: (*_ok(T=0), [2, 3], "dense_mod"), ValueError, "table size T \\(tables.shape\\[2\\]\\)"),
    (lambda: (*_ok(d=0), [2, 3], "dense_mod"), ValueError, "dimension d \\(coords.shape\\[2\\]\\).*got 0"),
    (lambda: (*_ok(d=8), [2, 3], "hash"), ValueError, "dimension d \\(coords.shape\\[2\\]\\).*got 8"),
    (lambda: (torch.tensor([[[0.5, float("nan"), 0.1]] * 2] * 3), _ok()[1], [2, 3], "dense_mod"),
     ValueError, "'coords' contains NaN"),
    # a second device that always exists: the meta device
    (lambda: (_ok()[0], torch.randn(2, 2, 16, 2, device="meta"), [2, 3], "dense_mod"), ValueError, "same device"),
]


@pytest.mark.parametrize("make,exc,msg", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(make, exc, msg):
    coords, tables, res, index = make()
    with pytest.raises(exc, match=msg):
        grid_encode(coords, tables, res, index=index)


# Errors the dispatcher op must raise on its own (torch.ops users skip the
# Python checks); matched on the argument they name.
BAD_CPP = [
    (lambda: (torch.rand(4, 3), _ok()[1], [2, 3], "dense_mod"), "coords"),
    (lambda: (_ok()[0], torch.randn(2, 16, 2), [2, 3], "dense_mod"), "tables"),
    (lambda: (torch.rand(4, 3, 3), _ok()[1], [2, 3], "dense_mod"), "groups|G"),
    (lambda: (*_ok(), [2], "dense_mod"), "resolutions"),
    (lambda: (*_ok(), [2, 0], "dense_mod"), "resolutions"),
    (lambda: (*_ok(), [2, 2**20 + 1], "dense_mod"), "resolutions"),
    (lambda: (*_ok(), [2, 3], "dense"), "index"),
    (lambda: (*_ok(F=3), [2, 3], "dense_mod"), "F"),
    (lambda: (*_ok(d=8), [2, 3], "hash"), "d"),
]


@needs_kernel
@pytest.mark.parametrize("make,msg", BAD_CPP, ids=[f"bad{i}" for i in range(len(BAD_CPP))])
def test_bad_input_cpp(make, msg):
    coords, tables, res, index = make()
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pyvq.grid_encode(coords, tables, res, index)


# --- backend choice ----------------------------------------------------------

def _spy(monkeypatch):
    calls = []
    real = reference.grid_encode

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pyvq.reference, "grid_encode", spy)
    return calls


def test_reference_backend(reference_backend, monkeypatch):
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(12)
    coords, tables = _coords(g, 10, 2, 3, [2, 5]), _tables(g, 2, 2, 32, 4)
    out = grid_encode(coords, tables, [2, 5], index="hash")
    assert len(calls) == 1 and calls[0][3] == "hash"
    assert pyvq.backend() == "reference"
    assert torch.equal(out, reference.grid_encode(coords, tables, [2, 5], "hash"))


@needs_kernel
def test_kernel_backend_bypasses_reference(monkeypatch):
    monkeypatch.delenv("PYVQ_BACKEND", raising=False)
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(13)
    grid_encode(_coords(g, 10, 2, 3, [2, 5]), _tables(g, 2, 2, 32, 4), [2, 5])
    assert calls == []


# --- the kernel's own contract -----------------------------------------------

def _opcheck_samples():
    g = torch.Generator().manual_seed(14)
    yield _coords(g, 20, 2, 3, [3, 9]), _tables(g, 2, 2, 64, 2), [3, 9], "dense_mod"
    yield _coords(g, 16, 1, 2, [5, 70]), _tables(g, 1, 2, 32, 4), [5, 70], "hash"
    yield (_coords(g, 9, 2, 3, [2, 6], torch.float64).requires_grad_(),
           _tables(g, 2, 2, 16, 1, torch.float64).requires_grad_(), [2, 6], "hash")
    yield _coords(g, 7, 1, 4, [3]), _tables(g, 1, 1, 20, 8).requires_grad_(), [3], "dense_mod"
    yield (torch.rand(0, 2, 3, generator=g, requires_grad=True), _tables(g, 2, 2, 16, 2).requires_grad_(),
           [2, 6], "dense_mod")
    yield _coords(g, 12, 3, 2, [4]).transpose(0, 1).contiguous().transpose(0, 1), \
        _tables(g, 1, 3, 8, 2).transpose(0, 1), [4], "hash"


@needs_kernel
@pytest.mark.parametrize("sample", list(_opcheck_samples()),
                         ids=lambda s: "x".join(map(str, s[0].shape)) + "-" + s[3])
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.pyvq.grid_encode.default, sample)


@needs_kernel
@pytest.mark.parametrize("need_coords,need_tables", [(True, True), (True, False), (False, True)])
def test_backward_op(need_coords, need_tables):
    """pyvq::_grid_encode_backward returns the gradients asked for and an
    empty (0,) tensor for the other."""
    g = torch.Generator().manual_seed(15)
    res, index = [3, 17], "hash"
    coords, tables = _coords(g, 50, 2, 3, res, torch.float64), _tables(g, 2, 2, 64, 2, torch.float64)
    grad_out = torch.randn(50, 2, 4, generator=g, dtype=torch.float64)
    _, rgc, rgt = _forward_backward(reference.grid_encode, coords, tables, res, index, grad_out)
    gc, gt = torch.ops.pyvq._grid_encode_backward(grad_out, coords, tables, res, index, need_coords, need_tables)
    for got, ref, needed in ((gc, rgc, need_coords), (gt, rgt, need_tables)):
        if needed:
            _assert_close(got, ref, TOL[torch.float64])
        else:
            assert got.shape == (0,)


@needs_kernel
@pytest.mark.parametrize("need_coords,need_tables", [(True, True), (False, True), (True, False)])
def test_opcheck_backward_op(need_coords, need_tables):
    g = torch.Generator().manual_seed(17)
    res = [3, 17]
    coords, tables = _coords(g, 30, 2, 3, res), _tables(g, 2, 2, 64, 2)
    grad_out = torch.randn(30, 2, 4, generator=g)
    torch.library.opcheck(torch.ops.pyvq._grid_encode_backward.default,
                          (grad_out, coords, tables, res, "hash", need_coords, need_tables))


@needs_kernel
@pytest.mark.parametrize("index", INDEXES)
def test_deterministic_and_thread_invariant(index):
    """The CPU backward (and forward) are bitwise identical across runs and
    thread counts, even with many points colliding on the same rows."""
    g = torch.Generator().manual_seed(16)
    res, G = [16, 64, 300], 2
    coords = _coords(g, 4000, G, 3, res)
    tables = _tables(g, G, len(res), 512, 4)
    grad_out = torch.randn(4000, G, len(res) * 4, generator=g)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            runs.append(_forward_backward(_public, coords, tables, res, index, grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# --- CUDA ------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(index, dtype):
    g = torch.Generator().manual_seed(17)
    res, G = [4, 33, 500], 3
    coords = _coords(g, 500, G, 3, res)
    tables = _tables(g, G, len(res), 2**12, 4, dtype)
    grad_out = torch.randn(500, G, len(res) * 4, generator=g).to(dtype)
    dev = [t.cuda() for t in (coords, tables, grad_out)]
    out, gc, gt = (t.cpu() for t in _forward_backward(_public, *dev[:2], res, index, dev[2]))
    assert out.dtype == dtype and gt.dtype == dtype and gc.dtype == torch.float32
    ref = _forward_backward(reference.grid_encode, coords, tables, res, index, grad_out)
    if dtype == torch.float32:
        for a, b in zip((out, gc, gt), ref):
            _assert_close(a, b, TOL[torch.float32])
    else:
        ref64 = _forward_backward(reference.grid_encode, coords.double(), tables.double(), res, index,
                                  grad_out.double())
        half_precision_bound(out, ref[0], ref64[0], atol=1e-6)
        half_precision_bound(gt, ref[2], ref64[2], atol=1e-6)
        half_precision_bound(gc, ref[1], ref64[1], atol=1e-4 * ref64[1].abs().max().item())
