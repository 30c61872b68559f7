"""Multiresolution feature-grid encoding: ``pyvq.ops.grid_encode``.

Kernels: csrc/grid/ (CPU: OpenMP over points for the forward pass and the
coordinate gradient, over (group, level) table slices for the table gradient,
so the CPU backward is deterministic; CUDA: one thread per (point, group,
level), table gradient by atomics or, deterministically, by a sorted
segmented reduction). The shared math is csrc/grid/grid.h.
Reference: pyvq/reference/grid.py (the definition, with the index formulas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pyvq import reference
from pyvq._checks import accumulation_dtype, assert_values, check_floating, is_int, value_check
from pyvq.ops._common import use_kernel
from pyvq.reference.grid import HASH_PRIMES, INDEX_MODES, corner_rows  # noqa: F401  (re-exported for pyvq.nn)

_OP = "pyvq.grid_encode"
FEATURE_SIZES = (1, 2, 4, 8)
MAX_RESOLUTION = 2**20
MAX_TABLE_SIZE = 2**31 - 1
MAX_DIM = len(HASH_PRIMES)


def _check(coords, tables, resolutions, index) -> list[int]:
    check_floating(coords, "coords", _OP)
    check_floating(tables, "tables", _OP)
    if coords.dim() != 3:
        raise ValueError(f"{_OP}: argument 'coords' must be 3-D (N, G, d), got shape {tuple(coords.shape)}")
    if tables.dim() != 4:
        raise ValueError(f"{_OP}: argument 'tables' must be 4-D (G, L, T, F), got shape {tuple(tables.shape)}")
    N, G, d = coords.shape
    Gt, L, T, F = tables.shape
    if G != Gt:
        raise ValueError(f"{_OP}: 'coords' has {G} groups (dim 1) but 'tables' has {Gt} (dim 0)")
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"{_OP}: the coordinate dimension d (coords.shape[2]) must be in [1, {MAX_DIM}], got {d}")
    if F not in FEATURE_SIZES:
        raise ValueError(f"{_OP}: the feature size F (tables.shape[3]) must be one of {FEATURE_SIZES}, got {F}")
    if not 1 <= T <= MAX_TABLE_SIZE:
        raise ValueError(f"{_OP}: the table size T (tables.shape[2]) must be in [1, 2**31 - 1], got {T}")
    if index not in INDEX_MODES:
        raise ValueError(f"{_OP}: argument 'index' must be one of {INDEX_MODES}, got {index!r}")
    if isinstance(resolutions, torch.Tensor):
        resolutions = resolutions.tolist()
    if not isinstance(resolutions, Sequence) or isinstance(resolutions, str):
        raise TypeError(f"{_OP}: argument 'resolutions' must be a sequence of L ints, got {type(resolutions).__name__}")
    res = []
    for r in resolutions:
        if not is_int(r) or not 1 <= r <= MAX_RESOLUTION:
            raise ValueError(f"{_OP}: argument 'resolutions' must hold ints in [1, 2**20], got {list(resolutions)}")
        res.append(int(r))
    if L < 1:
        raise ValueError(f"{_OP}: argument 'tables' must have at least one level (dim 1), got shape {tuple(tables.shape)}")
    if len(res) != L:
        raise ValueError(f"{_OP}: argument 'resolutions' has {len(res)} entries but 'tables' has L = {L} levels (dim 1)")
    if coords.device != tables.device:
        raise ValueError(f"{_OP}: 'coords' and 'tables' must be on the same device, got {coords.device} and {tables.device}")
    mode = value_check(coords)
    if mode == "device":
        assert_values(~torch.isnan(coords).any(), f"{_OP}: argument 'coords' contains NaN")
    elif mode == "host" and bool(torch.isnan(coords).any()):
        raise ValueError(f"{_OP}: argument 'coords' contains NaN")
    return res


def level_resolutions(levels: int, min_res: int, max_res: int) -> list[int]:
    """``floor(min_res * b**l)``, ``b = exp((ln max_res - ln min_res) / (levels - 1))``
    (Instant-NGP's and BRICS' geometric progression; one level: ``[min_res]``)."""
    if levels < 1 or min_res < 1 or max_res < min_res:
        raise ValueError(f"level_resolutions: need levels >= 1 and 1 <= min_res <= max_res, got {levels}, {min_res}, {max_res}")
    if levels == 1:
        return [int(min_res)]
    b = math.exp((math.log(max_res) - math.log(min_res)) / (levels - 1))
    out = []
    for level in range(levels):
        v = min_res * b**level
        # Values within rounding error of an integer (exact powers such as
        # 4 * 2**4 = 64, or 16 * 2**16) are that integer, not one below.
        near = round(v)
        out.append(int(near) if abs(v - near) <= 1e-9 * max(v, 1.0) else int(math.floor(v)))
    out[-1] = int(max_res)
    return out


def grid_encode(coords: torch.Tensor, tables: torch.Tensor, resolutions, index: str = "dense_mod") -> torch.Tensor:
    """Features of points looked up in G groups of L-level feature grids.

    Args:
        coords: (N, G, d) points, d in [1, 7] (BRICS: key length + 2 spatial
            coordinates). Values outside [0, 1] (``+-inf`` included) are
            clamped to it; as with ``torch.clamp``, the gradient is zero
            outside (0, 1) and at its ends. NaN raises ``ValueError`` on CPU;
            on CUDA it is a device-side assertion, checked without a host
            synchronisation and raised as ``RuntimeError: CUDA error:
            device-side assert triggered`` at the next synchronisation (the
            device prints "argument 'coords' contains NaN"; the CUDA context
            is unusable after it).
        tables: (G, L, T, F) grid entries, F in {1, 2, 4, 8}; float16,
            bfloat16, float32 or float64 (CPU and CUDA).
        resolutions: L ints r_l in [1, 2**20] (see ``level_resolutions``):
            level l is a lattice of (r_l + 1)**d vertices. Host data: a
            list or tuple (a CUDA tensor here would be read with a sync).
        index: how a level with more vertices than T rows indexes them:
            ``"dense_mod"`` (BRICS eq. 6: the dense index modulo T) or
            ``"hash"`` (Instant-NGP: xor of v_k * pi_k, modulo T). Levels
            that fit use the dense index either way.

    Returns:
        (N, G, L * F) in the tables' dtype, levels concatenated
        (``out[n, g, l * F + f]``), accumulated in float32 (float64 for
        float64 tables). Differentiable with respect to ``tables`` and
        ``coords`` (first derivatives; the kernels have no double
        backward); the CPU backward is deterministic. NaN or inf table
        entries propagate: an output is non-finite where a corner it
        interpolates is (the reference's arithmetic, ``0 * inf = NaN``
        included).
    """
    res = _check(coords, tables, resolutions, index)
    if use_kernel("grid_encode", coords):
        # The kernels read coordinates in the accumulation dtype.
        return torch.ops.pyvq.grid_encode(coords.to(accumulation_dtype(tables.dtype)), tables, res, index)
    return reference.grid_encode(coords, tables, res, index)


@torch.library.register_fake("pyvq::grid_encode")
def _grid_encode_fake(coords, tables, resolutions, index="dense_mod"):
    torch._check(coords.dim() == 3 and tables.dim() == 4, lambda: "coords must be 3-D and tables 4-D")
    torch._check(len(resolutions) == tables.shape[1], lambda: "one resolution per level")
    return tables.new_empty(coords.shape[0], coords.shape[1], tables.shape[1] * tables.shape[3])


@torch.library.register_fake("pyvq::_grid_encode_backward")
def _grid_encode_backward_fake(grad_out, coords, tables, resolutions, index, need_coords, need_tables):
    grad_coords = coords.new_empty(coords.shape) if need_coords else coords.new_empty(0)
    grad_tables = tables.new_empty(tables.shape) if need_tables else tables.new_empty(0)
    return grad_coords, grad_tables


def _setup_context(ctx, inputs, output):
    coords, tables, resolutions = inputs[:3]
    ctx.resolutions = list(resolutions)
    ctx.index = inputs[3] if len(inputs) > 3 else "dense_mod"
    ctx.save_for_backward(coords, tables)


def _backward(ctx, grad_out):
    coords, tables = ctx.saved_tensors
    need_coords, need_tables = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_coords, grad_tables = torch.ops.pyvq._grid_encode_backward(
        grad_out, coords, tables, ctx.resolutions, ctx.index, need_coords, need_tables)
    return (grad_coords if need_coords else None), (grad_tables if need_tables else None), None, None


torch.library.register_autograd("pyvq::grid_encode", _backward, setup_context=_setup_context)
