"""Property-based fuzzing (hypothesis) of every op against its reference.

Each property draws shapes (0 and 1 included, odd sizes, large K / T now
and then), a dtype (float64, float32, float16, bfloat16), a memory layout
per input (contiguous, transposed, sliced with a step, expanded with
stride 0, channels-last) and values (normal, huge, tiny, subnormal, small
integers for exact ties, or inf / -inf / NaN sprinkled in), calls the op
and requires one of two outcomes: a ValueError / TypeError whose message
names the bad argument, or equality with the reference.

"Equal" (``assert_matches``), against the reference run in float64 on the
same values (``ref64``) and the reference run in the op's own dtype
(``ref_low``):

- where ``ref64`` is NaN or +-inf the op gives the same, or what ``ref_low``
  gives there (e.g. ``0 * inf = NaN`` where the op's dtype rounds a weight
  to exactly 0 and float64 does not);
- where both references are finite, the op's error against ``ref64`` is
  within the half-precision bound (``tests.conftest.half_precision_bound``:
  at most twice the error of ``ref_low``, plus a few ulps of the compute
  dtype for the float64 path and one ulp of the output dtype for the final
  rounding);
- where ``ref64`` is finite but ``ref_low`` is not (the computation
  overflows in the op's dtype), any value is allowed: the bound is infinite.

Op-specific rules (nearest_code's indices, the tie rule, NaN coordinates,
...) are stated at each property.

Example counts: ``PYVQ_FUZZ_EXAMPLES`` (default 20 per property, a few
seconds each); the default run is derandomized (the same examples every
time, so CI does not flake on a new find); a raised count draws fresh
random examples. Failures print a reproduction blob
(``@reproduce_failure``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (the fuzz tests need it)")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyvq import ops, reference  # noqa: E402
from pyvq._checks import accumulation_dtype  # noqa: E402
from pyvq.reference.codebook import COSINE_EPS, distance_to  # noqa: E402
from tests.conftest import half_precision_bound  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_RAISED = "PYVQ_FUZZ_EXAMPLES" in os.environ
settings.register_profile(
    "pyvq-fuzz",
    max_examples=int(os.environ.get("PYVQ_FUZZ_EXAMPLES", "20")),
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    print_blob=True,
    derandomize=not _RAISED,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings(settings.get_profile("pyvq-fuzz"))

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
KINDS = ("normal", "normal", "huge", "tiny", "subnormal", "integers", "specials")

# Scales of the value kinds per dtype: "huge" keeps squares finite in the
# compute dtype (float32 for half storage) for the ops that square; "tiny"
# is a normal number near the bottom of the range, "subnormal" below it.
_SCALE = {
    "huge": {torch.float64: 1e140, torch.float32: 1e17, torch.float16: 3e3, torch.bfloat16: 1e17},
    "tiny": {torch.float64: 1e-290, torch.float32: 1e-36, torch.float16: 1e-4, torch.bfloat16: 1e-36},
    "subnormal": {torch.float64: 1e-315, torch.float32: 1e-41, torch.float16: 1e-6, torch.bfloat16: 1e-41},
}


# --- strategies -------------------------------------------------------------

def values(draw, shape, dtype, kind=None, specials=(math.inf, -math.inf, math.nan), kinds=KINDS):
    """A tensor of ``shape`` and ``dtype`` with values of ``kind`` (drawn from ``kinds`` when None)."""
    kind = draw(st.sampled_from(kinds)) if kind is None else kind
    event(f"values: {kind}")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "integers":
        t = torch.randint(-3, 4, shape, generator=g).double()
    else:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if kind in _SCALE:
            t = t * _SCALE[kind][dtype]
    t = t.to(dtype)
    if kind == "specials" and t.numel():
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(specials))
    return t


LAYOUTS = ("contiguous", "contiguous", "transposed", "strided", "expanded", "channels_last")


def arrange(draw, t):
    """``t`` in a drawn memory layout. Every layout holds ``t``'s values
    except "expanded", which repeats one slice along a drawn dim (stride 0):
    callers compute the reference on what this returns."""
    layout = draw(st.sampled_from(LAYOUTS))
    if t.dim() == 0 or t.numel() == 0:
        return t
    dim = draw(st.integers(0, t.dim() - 1))
    if layout == "transposed" and t.dim() >= 2:
        other = (dim + draw(st.integers(1, t.dim() - 1))) % t.dim()
        return t.transpose(dim, other).contiguous().transpose(dim, other)
    if layout == "strided":
        shape = list(t.shape)
        shape[dim] *= 2
        big = torch.zeros(shape, dtype=t.dtype)
        index = [slice(None)] * t.dim()
        index[dim] = slice(None, None, 2)
        big[tuple(index)] = t
        return big[tuple(index)]
    if layout == "expanded":
        return t.narrow(dim, 0, 1).expand(t.shape)
    if layout == "channels_last" and t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    return t


def indices(draw, shape, K, bad_ok=False):
    """int64 indices in [0, K) in a drawn layout; with ``bad_ok``, sometimes
    one entry out of range (returns (tensor, is_bad))."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = arrange(draw, torch.randint(K, shape, generator=g))
    bad = bad_ok and t.numel() > 0 and draw(st.integers(0, 9)) == 0
    if bad:
        t = t.contiguous().clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([K, K + 7, -1]))
    return t, bad


# --- equality -----------------------------------------------------------------

def eps(dtype):
    return torch.finfo(accumulation_dtype(dtype)).eps


def assert_matches(out, ref_low, ref64, *, atol):
    """The module docstring's rule: NaN and inf where ``ref64`` (or, in
    the op's dtype, ``ref_low``) has them, the half-precision bound where
    both references are finite."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    out64, low64 = out.detach().double(), ref_low.detach().double()
    special = ~torch.isfinite(ref64)

    def same(a, b):
        return (a == b) | (torch.isnan(a) & torch.isnan(b))

    agree = same(out64, ref64) | same(out64, low64)
    assert bool(agree[special].all()), ("NaN / inf differ from the reference's", out64[special & ~agree],
                                        ref64[special & ~agree])
    finite = torch.isfinite(ref64) & torch.isfinite(low64)
    if bool(finite.any()):
        # One ulp of the output dtype at the largest value: the final rounding
        # of a value computed a little differently may land on either neighbour.
        ulp = torch.finfo(out.dtype).eps * float(ref64[finite].abs().max())
        half_precision_bound(out64[finite], low64[finite], ref64[finite], atol=atol + ulp)


def magnitude(t):
    """max |t| over finite entries, at least 1."""
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return max(1.0, float(t.abs().max())) if t.numel() else 1.0


def raises_naming(exc, call, *names):
    """``call()`` raises ``exc`` with a message that names one of ``names``."""
    with pytest.raises(exc) as info:
        call()
    assert any(f"'{n}'" in str(info.value) for n in names), str(info.value)


# --- nearest_code ---------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_nearest_code(data):
    """Rules beyond ``assert_matches`` (which the distances follow):

    - finite inputs whose squared norms fit the compute dtype: the chosen
      code is a nearest one up to rounding: its float64 distance (from
      differences) is at most the minimum plus ``2 (D + 2)`` times
      ``eps * (|x|^2 + max |c|^2)`` (cosine: ``eps``) plus the dtype's
      smallest normal (underflow of tiny squares); of identical codes the
      lowest index is chosen; with small-integer inputs (l2: exact
      arithmetic) the index is exactly the lowest index of the minimum;
    - NaN and inf: see the comment at the check (a NaN row: index 0,
      distance NaN; a NaN code: chosen by every finite row; inf: any index);
    - squared norms beyond the compute dtype's range: indices in [0, K) only;
    - the distance is that of the chosen code, rounded to x's dtype.
    """
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    metric = draw(st.sampled_from(["l2", "cosine"]))
    large_k = draw(st.integers(0, 9)) == 0
    K = draw(st.integers(1000, 3000)) if large_k else draw(st.integers(1, 40))
    D = draw(st.integers(1, 4)) if large_k else draw(st.integers(1, 33))
    lead = draw(st.sampled_from([(draw(st.integers(0, 40)),), (draw(st.integers(0, 2)), draw(st.integers(0, 3)),
                                                                draw(st.integers(0, 4)))]))
    kind = draw(st.sampled_from(KINDS))
    cb = values(draw, (K, D), dtype, kind)
    if K > 1 and draw(st.booleans()):  # duplicated codes: ties
        for _ in range(draw(st.integers(1, 3))):
            i, j = sorted(draw(st.lists(st.integers(0, K - 1), min_size=2, max_size=2, unique=True)))
            cb[j] = cb[i]
    x = values(draw, lead + (D,), dtype, kind if draw(st.booleans()) else None)
    if x.numel() and draw(st.booleans()):  # rows equal to codes: distance 0
        flat = x.view(-1, D)
        flat[: min(3, flat.shape[0])] = cb[torch.arange(min(3, flat.shape[0])) % K]
    x, cb = arrange(draw, x), arrange(draw, cb)

    idx, dist = ops.nearest_code(x, cb, metric=metric)
    assert idx.dtype == torch.long and idx.shape == x.shape[:-1]
    assert dist.dtype == dtype and dist.shape == x.shape[:-1]
    if x.numel() == 0:
        return
    acc = accumulation_dtype(dtype)
    x64, cb64 = x.double().reshape(-1, D), cb.double()
    idx, dist = idx.reshape(-1), dist.reshape(-1)
    assert bool(((idx >= 0) & (idx < K)).all())
    # NaN, as documented: a row with a NaN takes index 0; a finite row takes
    # the first NaN code when the codebook has NaN and no inf (as argmin).
    # An inf in a row or in the codebook leaves the index unspecified (every
    # distance of the row is inf or NaN, or the expanded formula's inf - inf
    # is NaN); its distance is still that of the chosen code.
    nan_rows = torch.isnan(x64).any(1)
    assert bool((idx[nan_rows] == 0).all())
    cb_nan, cb_inf = torch.isnan(cb64).any(1), torch.isinf(cb64).any(1)
    row_inf = torch.isinf(x64).any(1)
    if bool(cb_nan.any()) and not bool(cb_inf.any()):
        finite_rows = ~nan_rows & ~row_inf
        assert bool((idx[finite_rows] == int(cb_nan.to(torch.int8).argmax())).all())
        nan_rows = nan_rows | finite_rows
    unspecified = ~nan_rows & (row_inf | bool(cb_inf.any()))
    scale = x64.pow(2).sum(1) + cb64.pow(2).sum(1).max()  # (N,), inf / NaN for non-finite inputs
    check = ~nan_rows & ~unspecified & (scale < 0.25 * torch.finfo(acc).max)  # finite, no overflow
    if metric == "l2":  # (N, K) float64 distances, from differences
        d64 = (x64[:, None, :] - cb64[None, :, :]).pow(2).sum(-1)
    else:
        d64 = 1 - F.normalize(x64, dim=1, eps=COSINE_EPS) @ F.normalize(cb64, dim=1, eps=COSINE_EPS).t()
    chosen = d64.gather(1, idx[:, None])[:, 0]
    # Rounding of the compute dtype, and its underflow (squares of tiny values are 0 there).
    slack = 2 * (D + 2) * (torch.finfo(acc).eps * (scale if metric == "l2" else torch.ones_like(scale))
                           + torch.finfo(acc).tiny)
    near = chosen <= d64.min(1).values + slack
    assert bool(near[check].all()), (chosen - d64.min(1).values)[check & ~near]
    # Of identical codes, the lowest index.
    first = (cb64[None, :, :] == cb64[idx][:, None, :]).all(-1).to(torch.int8).argmax(1)  # (N,)
    assert torch.equal(first[check], idx[check])
    exact = bool((x64 == x64.round()).all() and (cb64 == cb64.round()).all())
    if metric == "l2" and exact and float(scale.max()) < 2**20:  # exact arithmetic: exactly the lowest minimum
        assert torch.equal(idx, d64.argmin(1))
    # The distance is that of the chosen code, rounded to x's dtype.
    rows = check | nan_rows | unspecified
    c64 = cb64[idx]
    ref64 = distance_to(x64, c64, metric).to(dtype).double()
    ref_low = distance_to(x64.to(acc), c64.to(acc), metric).to(dtype)
    assert_matches(dist[rows], ref_low[rows], ref64[rows],
                   atol=8 * (D + 2) * eps(dtype) * magnitude(scale[check] if metric == "l2" else scale[:0]))


# --- grid_encode -------------------------------------------------------------------

def _grid_case(draw, backward=False):
    dtype = draw(st.sampled_from(DTYPES))
    N = draw(st.integers(0, 12))
    G = draw(st.integers(1, 3))
    d = draw(st.integers(1, 7)) if draw(st.integers(0, 5)) == 0 else draw(st.integers(1, 3))
    L = draw(st.integers(1, 3))
    large_t = draw(st.integers(0, 9)) == 0
    T = draw(st.sampled_from([2**16 + 1, 2**18])) if large_t and G == 1 else draw(st.integers(1, 70))
    feat = draw(st.sampled_from([1, 2, 4, 8]))
    resolutions = [draw(st.sampled_from([1, 2, 3, 5, 16, 63, 2**10, 2**20])) for _ in range(L)]
    index = draw(st.sampled_from(["dense_mod", "hash"]))
    coord_kind = draw(st.sampled_from(["inside", "inside", "outside", "lattice", "ends", "specials"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cdtype = accumulation_dtype(dtype) if backward else draw(st.sampled_from([torch.float32, torch.float64]))
    coords = torch.rand(N, G, d, generator=g, dtype=torch.float64)
    if coord_kind == "outside":
        coords = coords * 2 - 0.5
    elif coord_kind == "lattice":  # on vertices of the first level: cell boundaries
        r = resolutions[0]
        coords = torch.randint(r + 1, (N, G, d), generator=g).double() / r
    elif coord_kind == "ends":
        coords = torch.randint(2, (N, G, d), generator=g).double()
    coords = coords.to(cdtype)
    if coord_kind == "specials" and coords.numel():
        for _ in range(draw(st.integers(1, 3))):
            coords.view(-1)[draw(st.integers(0, coords.numel() - 1))] = draw(
                st.sampled_from([math.inf, -math.inf, math.nan]))
    tables = values(draw, (G, L, T, feat), dtype, "normal" if backward else None)
    return arrange(draw, coords), arrange(draw, tables), resolutions, index


@FUZZ
@given(data=st.data())
def test_fuzz_grid_encode(data):
    """Coordinates outside [0, 1] (inf included) are clamped, NaN raises a
    ValueError naming 'coords'; NaN / inf table entries propagate as in the
    reference (``assert_matches``)."""
    coords, tables, resolutions, index = _grid_case(data.draw)
    if bool(torch.isnan(coords).any()):
        raises_naming(ValueError, lambda: ops.grid_encode(coords, tables, resolutions, index), "coords")
        return
    out = ops.grid_encode(coords, tables, resolutions, index)
    # The op reads coordinates in the tables' accumulation dtype; so do both references.
    read = coords.to(accumulation_dtype(tables.dtype))
    ref64 = reference.grid_encode(read.double(), tables.double(), resolutions, index)
    ref_low = reference.grid_encode(read, tables, resolutions, index)
    assert out.dtype == tables.dtype
    assert_matches(out, ref_low, ref64, atol=16 * eps(tables.dtype) * magnitude(tables))


@FUZZ
@given(data=st.data())
def test_fuzz_grid_encode_backward(data):
    """Gradients of tables and coordinates against the reference's autograd
    (finite tables, coordinates in the tables' accumulation dtype)."""
    draw = data.draw
    coords, tables, resolutions, index = _grid_case(draw, backward=True)
    coords = coords.nan_to_num(0.5)
    if not (tables.dtype in (torch.float32, torch.float64) or coords.shape[0] <= 8):
        return
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out_shape = (coords.shape[0], coords.shape[1], tables.shape[1] * tables.shape[3])
    grad = torch.randn(out_shape, generator=g, dtype=torch.float64)

    def grads(fn, c, t):
        c, t = c.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        out = fn(c, t, resolutions, index)
        gc, gt = torch.autograd.grad(out, (c, t), grad.to(out.dtype), allow_unused=True)
        return (torch.zeros_like(c) if gc is None else gc), gt

    gc, gt = grads(ops.grid_encode, coords, tables)
    gc64, gt64 = grads(reference.grid_encode, coords.double(), tables.double())
    gc_low, gt_low = grads(reference.grid_encode, coords, tables)
    assert gt.dtype == tables.dtype and gc.dtype == coords.dtype
    scale = magnitude(tables) * max(resolutions) * 2 ** coords.shape[2]
    assert_matches(gt, gt_low, gt64, atol=64 * eps(tables.dtype) * magnitude(grad) * coords.shape[0])
    # Coordinates on a cell boundary ("lattice", "ends") take the same cell
    # in both (floor of the same value), so the one-sided derivative agrees.
    assert_matches(gc, gc_low, gc64, atol=64 * eps(tables.dtype) * scale * magnitude(grad))


# --- multinomial posterior and KL -----------------------------------------------

def _alpha(draw, B, dtype, name, bad_ok=True):
    """(B,) alphas in (0, 1]: schedule ends (1, nearly 0) included; with
    ``bad_ok`` now and then one out of range or NaN (returns (t, is_bad))."""
    pick = st.sampled_from([1.0, 1.0 - 1e-7, 0.5, 0.999, 1e-3, 1e-30, 0.25])
    vals = [draw(pick) if draw(st.booleans()) else draw(st.floats(1e-6, 1.0)) for _ in range(B)]
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    t = torch.where(t > 0, t, torch.ones_like(t))  # 1e-30 underflows in half
    if bad_ok and B > 0 and draw(st.integers(0, 12)) == 0:
        t[draw(st.integers(0, B - 1))] = draw(st.sampled_from([0.0, -0.5, 1.5, math.nan, math.inf]))
    t = arrange(draw, t)  # (an expanded layout may drop the bad entry)
    return t, not bool(((t > 0) & (t <= 1)).all())


def _posterior_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(0, 3))
    large_k = draw(st.integers(0, 9)) == 0
    K = draw(st.integers(1000, 5000)) if large_k else draw(st.integers(1, 40))
    S = () if large_k else tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    adtype = draw(st.sampled_from([torch.float32, torch.float64]))
    alpha_t, bad_a = _alpha(draw, B, adtype, "alpha_t")
    alpha_bar_prev, bad_ab = _alpha(draw, B, adtype, "alpha_bar_prev")
    x_t, bad_xt = indices(draw, (B, *S), K, bad_ok=True)
    logits = arrange(draw, values(draw, (B, K, *S), dtype, specials=(math.inf, -math.inf, -math.inf, math.nan)))
    return dict(dtype=dtype, B=B, K=K, S=S, alpha_t=alpha_t, alpha_bar_prev=alpha_bar_prev, x_t=x_t,
                logits=logits, bad={"alpha_t": bad_a, "alpha_bar_prev": bad_ab, "x_t": bad_xt})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posterior_huge_equal_logits(dtype):
    """Found by fuzzing: log softmax formed as l - (m + log sum) lost log sum
    when |m| is beyond 1 / eps (equal huge logits gave softmax 1 per class,
    not 1/K); the kernels now form (l - m) - log sum."""
    K = 1000
    logits = torch.full((1, K), 1e140 if dtype == torch.float64 else 1e10, dtype=dtype)
    x_t, a, ab = torch.zeros(1, dtype=torch.long), torch.tensor([0.5], dtype=dtype), torch.ones(1, dtype=dtype)
    out = ops.multinomial_posterior(x_t, logits, a, ab)
    ref = reference.multinomial_posterior(x_t, logits, a, ab)
    torch.testing.assert_close(out, ref)


def _posterior_atol(c, ref64, dtype=None):
    """A few ulps of the compute dtype (of ``dtype``, default the logits')."""
    return 64 * eps(dtype or c["logits"].dtype) * magnitude(ref64) * max(1.0, math.log(c["K"]))


def _alphas(c, dt):
    """The alphas as drawn, or in float64 for the float64 reference."""
    a, ab = c["alpha_t"], c["alpha_bar_prev"]
    return (a, ab) if dt != torch.float64 else (a.double(), ab.double())


def _check_logits_gradient(draw, c, call, op, ref, out_shape, factor):
    """The logits' gradient of ``call(fn, dtype, logits)`` for ``op`` against
    ``ref`` (float32 / float64 finite logits only)."""
    if c["dtype"] not in (torch.float32, torch.float64) or not bool(torch.isfinite(c["logits"]).all()):
        return
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grad = torch.randn(out_shape, generator=g, dtype=torch.float64)

    def grad_of(fn, dt):
        leaf = c["logits"].to(dt).detach().requires_grad_()
        o = call(fn, dt, leaf)
        return torch.autograd.grad(o, leaf, grad.to(o.dtype))[0]

    g64 = grad_of(ref, torch.float64)
    assert_matches(grad_of(op, c["dtype"]), grad_of(ref, c["dtype"]), g64,
                   atol=_posterior_atol(c, g64) * magnitude(grad) * factor)


@FUZZ
@given(data=st.data())
def test_fuzz_multinomial_posterior(data):
    """Logits form and index form. A position with a NaN or +inf logit (or
    all logits -inf) is NaN in every class, as ``torch.log_softmax`` makes
    it; classes of probability 0 are exactly -inf. Out-of-range indices and
    alphas outside (0, 1] raise a ValueError naming the argument."""
    draw = data.draw
    c = _posterior_case(draw)
    bad = [name for name, b in c["bad"].items() if b]
    index_form = draw(st.booleans())
    if index_form:
        x0, bad_x0 = indices(draw, (c["B"], *c["S"]), c["K"], bad_ok=True)
        if bad_x0:
            bad.append("x0")

        def call(fn, dt, logits=None):
            return fn(c["x_t"], x0, *_alphas(c, dt), num_classes=c["K"])
    else:
        def call(fn, dt, logits=None):
            return fn(c["x_t"], c["logits"].to(dt) if logits is None else logits, *_alphas(c, dt))
    low = c["alpha_t"].dtype if index_form else c["dtype"]
    if bad:
        raises_naming(ValueError, lambda: call(ops.multinomial_posterior, low), *bad)
        return
    out = call(ops.multinomial_posterior, low)
    assert out.dtype == low
    if not index_form and c["logits"].numel():  # the documented NaN rule, beyond matching the reference
        poisoned = (torch.isnan(c["logits"]) | (c["logits"] == math.inf)).any(1, keepdim=True)
        assert bool(torch.isnan(out[poisoned.expand_as(out)]).all())
    ref64 = call(reference.multinomial_posterior, torch.float64)
    assert_matches(out, call(reference.multinomial_posterior, low), ref64, atol=_posterior_atol(c, ref64, low))
    if not index_form:
        _check_logits_gradient(draw, c, call, ops.multinomial_posterior, reference.multinomial_posterior,
                               out.shape, c["K"])


@FUZZ
@given(data=st.data())
def test_fuzz_multinomial_kl(data):
    """As the posterior: NaN / +inf logits give NaN; bad indices or alphas
    raise a ValueError naming the argument."""
    draw = data.draw
    c = _posterior_case(draw)
    x0, bad_x0 = indices(draw, (c["B"], *c["S"]), c["K"], bad_ok=True)
    bad = [name for name, b in {**c["bad"], "x0": bad_x0}.items() if b]

    def call(fn, dt, logits=None):
        return fn(c["x_t"], x0, c["logits"].to(dt) if logits is None else logits, *_alphas(c, dt))

    if bad:
        raises_naming(ValueError, lambda: call(ops.multinomial_kl, c["dtype"]), *bad)
        return
    out = call(ops.multinomial_kl, c["dtype"])
    assert out.dtype == c["dtype"] and out.shape == c["x_t"].shape
    ref64 = call(reference.multinomial_kl, torch.float64)
    assert_matches(out, call(reference.multinomial_kl, c["dtype"]), ref64, atol=_posterior_atol(c, ref64))
    _check_logits_gradient(draw, c, call, ops.multinomial_kl, reference.multinomial_kl, out.shape, 1)


# --- kmeans ------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_kmeans(data):
    """Non-finite points raise a ValueError naming 'x'. Always: centroids
    (k, D) finite in x's dtype, assignments in [0, k), inertia the summed
    distance of the assignments, n_iter <= iters. Float64 normal data in a
    layout without repeated points equals the reference (ties there have
    probability 0); other data (exact ties between distinct centroids,
    rounding of half precision) may take another path, so only the
    invariants are checked."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    N = draw(st.integers(1, 30))
    D = draw(st.integers(1, 6))
    k = draw(st.integers(1, N))
    kind = draw(st.sampled_from(KINDS))
    x = values(draw, (N, D), dtype, kind)
    x = arrange(draw, x)
    kw = dict(iters=draw(st.integers(0, 5)), init=draw(st.sampled_from(["afkmc2", "kmeans++", "random"])),
              chain_length=draw(st.integers(1, 20)), seed=draw(st.integers(0, 2**31 - 1)),
              tol=draw(st.sampled_from([0.0, 1e-4, 1.0])))
    if not bool(torch.isfinite(x).all()):
        raises_naming(ValueError, lambda: ops.kmeans(x, k, **kw), "x")
        return
    res = ops.kmeans(x, k, return_assignments=True, **kw)
    assert res.centroids.shape == (k, D) and res.centroids.dtype == dtype
    assert bool(torch.isfinite(res.centroids.double()).all()) or kind == "huge"
    assert res.assignments.shape == (N,) and bool(((res.assignments >= 0) & (res.assignments < k)).all())
    assert 0 <= res.n_iter <= kw["iters"]
    acc = accumulation_dtype(dtype)
    xc, cc = x.to(acc), res.centroids.to(acc)
    if dtype in (torch.float32, torch.float64) and (kind != "huge" or dtype == torch.float64):
        # (half precision: the inertia is of the float32 centroids, before rounding)
        inertia = (xc - cc[res.assignments]).pow(2).sum()
        torch.testing.assert_close(res.inertia.double(), inertia.double(), rtol=1e-3, atol=1e-30)
    no_repeats = all(s != 0 for s in x.stride()) and kind == "normal"
    if dtype == torch.float64 and no_repeats:
        ref = reference.kmeans(x, k, return_assignments=True, **kw)
        torch.testing.assert_close(res.centroids, ref.centroids)
        assert torch.equal(res.assignments, ref.assignments) and res.n_iter == ref.n_iter


# --- attention ---------------------------------------------------------------------

def _qkv(draw, dtype, B, heads, H, W, d, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    return [arrange(draw, values(draw, (B, heads, H, W, d), dtype, kind if draw(st.booleans()) else None,
                                 kinds=kinds)) for _ in range(3)]


def _attention_atol(dtype, tensors, n_keys):
    m = max(magnitude(t) for t in tensors if t is not None)
    return 16 * eps(dtype) * m * m * max(1, n_keys)


def _check_attention(draw, op, ref, tensors, n_keys):
    """Forward and (finite, moderate inputs, float32 / float64) backward of
    ``op(*tensors)`` against ``ref(*tensors)``."""
    dtype = tensors[0].dtype
    out = op(*tensors)
    ref64 = ref(*[None if t is None else t.double() for t in tensors])
    ref_low = ref(*tensors)
    assert out.dtype == dtype and out.shape == tensors[0].shape
    atol = _attention_atol(dtype, tensors, n_keys)
    assert_matches(out, ref_low, ref64, atol=atol)
    given_tensors = [t for t in tensors if t is not None]
    if (out.numel() == 0 or dtype not in (torch.float32, torch.float64)
            or not all(bool(torch.isfinite(t).all()) for t in given_tensors)
            or max(magnitude(t) for t in given_tensors) > 1e3):
        return
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)

    def grads(fn, dt):
        leaves = [None if t is None else t.to(dt).detach().requires_grad_() for t in tensors]
        o = fn(*leaves)
        return torch.autograd.grad(o, [t for t in leaves if t is not None], grad.to(o.dtype), allow_unused=True)

    for a, b, c in zip(grads(op, dtype), grads(ref, dtype), grads(ref, torch.float64)):
        if c is not None:
            assert_matches(a, b, c, atol=atol * magnitude(grad) * 4)


def _scale(draw, d):
    """A drawn scale (None: the op's default) and the value it resolves to."""
    scale = draw(st.sampled_from([None, 0.1, 1.0, 3.0]))
    return scale, (scale if scale is not None else (d ** -0.5 if d else 1.0))


@FUZZ
@given(data=st.data())
def test_fuzz_window_attention(data):
    """The C++ CPU kernel (the Triton kernels run only on tiny shapes in
    tests/ops/test_window_attention_triton.py: the interpreter is too slow
    to fuzz). NaN in a token's q gives that token NaN, in a k or v the
    queries of its window (``assert_matches`` against the reference)."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    w = draw(st.integers(1, 4))
    B, heads = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    H, W = w * draw(st.integers(0, 3)), w * draw(st.integers(0, 3))
    d = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 16]))
    shift = draw(st.integers(0, w - 1))
    q, k, v = _qkv(draw, dtype, B, heads, H, W, d)
    bias = arrange(draw, values(draw, ((2 * w - 1) ** 2, heads), dtype)) if draw(st.booleans()) else None
    scale, resolved = _scale(draw, d)
    _check_attention(
        draw,
        lambda q, k, v, b: ops.window_attention(q, k, v, window_size=w, shift=shift, bias_table=b, scale=scale),
        lambda q, k, v, b: reference.window_attention(q, k, v, window_size=w, shift=shift, bias_table=b,
                                                      scale=resolved),
        [q, k, v, bias], w * w)


@FUZZ
@given(data=st.data())
def test_fuzz_multigrained_attention(data):
    """The C++ CPU kernel (Triton: see test_fuzz_window_attention). Any
    G >= 0 global keys, any halo (beyond the grid included)."""
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    ws = draw(st.integers(1, 3))
    B, heads = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    H, W = ws * draw(st.integers(0, 3)), ws * draw(st.integers(0, 3))
    d = draw(st.sampled_from([0, 1, 3, 4, 8]))
    halo = draw(st.sampled_from([0, 1, 2, 5, 100]))
    G = draw(st.integers(0, 4))
    q, k, v = _qkv(draw, dtype, B, heads, H, W, d)
    gk = arrange(draw, values(draw, (B, heads, G, d), dtype))
    gv = arrange(draw, values(draw, (B, heads, G, d), dtype))
    scale, resolved = _scale(draw, d)
    n_keys = (ws + 2 * min(halo, max(H, W, 1))) ** 2 + G
    _check_attention(
        draw,
        lambda *t: ops.multigrained_attention(*t, block_size=ws, halo=halo, scale=scale),
        lambda *t: reference.multigrained_attention(*t, block_size=ws, halo=halo, scale=resolved),
        [q, k, v, gk, gv], n_keys)


# --- the Triton attention kernels (interpreted without a GPU) ---------------------

# The interpreter takes about 0.5 s for one tiny call, so these properties
# draw fewer, smaller examples (forward only; the gradients and larger
# shapes are in tests/ops/test_*_attention_triton.py). Finite values only
# (the all -inf case is test_triton_attention_all_scores_minus_inf).
TRITON_FUZZ = settings(FUZZ, max_examples=max(4, FUZZ.max_examples // 4))
FINITE_KINDS = tuple(k for k in KINDS if k != "specials")


@pytest.mark.parametrize("op", ["window", "multigrained"])
def test_triton_attention_all_scores_minus_inf(op):
    """Found by fuzzing: the Triton kernels gave 0 where every score of a
    query is -inf (an inf input); softmax's 0 / 0 is NaN, as in the reference
    and the C++ kernels."""
    dev = _triton_device()
    import pyvq.ops._multigrained_attention_triton  # noqa: F401  (registers the Triton ops)
    import pyvq.ops._window_attention_triton  # noqa: F401

    q = torch.full((1, 1, 1, 1, 1), math.inf, dtype=torch.float64)
    k, v = -torch.ones_like(q), torch.ones_like(q)
    if op == "window":
        out, _ = torch.ops.pyvq.window_attention_triton(q.to(dev), k.to(dev), v.to(dev), None, 1, 0, 1.0)
        ref = reference.window_attention(q, k, v, window_size=1, scale=1.0)
    else:
        g = -torch.ones(1, 1, 2, 1, dtype=torch.float64)  # (B, heads, G, d): scores -inf too
        out, _ = torch.ops.pyvq.multigrained_attention_triton(q.to(dev), k.to(dev), v.to(dev), g.to(dev),
                                                              g.to(dev), 1, 0, 1.0)
        ref = reference.multigrained_attention(q, k, v, g, g, block_size=1, halo=0, scale=1.0)
    assert bool(torch.isnan(ref).all())
    assert bool(torch.isnan(out.cpu()).all()), out


def _triton_device():
    pytest.importorskip("triton", reason="Triton is not installed")
    from tests.conftest import triton_device

    return triton_device()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on NaN / inf inputs under the interpreter
@TRITON_FUZZ
@given(data=st.data())
def test_fuzz_window_attention_triton(data):
    dev = _triton_device()
    import pyvq.ops._window_attention_triton  # noqa: F401  (registers the Triton ops)

    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    w = draw(st.integers(1, 3))
    H, W = w * draw(st.integers(0, 2)), w * draw(st.integers(1, 2))
    d = draw(st.sampled_from([1, 3, 8]))
    shift = draw(st.integers(0, w - 1))
    heads = draw(st.integers(1, 2))
    q, k, v = _qkv(draw, dtype, 1, heads, H, W, d, kinds=FINITE_KINDS)
    bias = values(draw, ((2 * w - 1) ** 2, heads), dtype, kinds=FINITE_KINDS) if draw(st.booleans()) else None
    scale = d ** -0.5
    out, _ = torch.ops.pyvq.window_attention_triton(*(t if t is None else t.to(dev) for t in (q, k, v, bias)),
                                                    w, shift, scale)

    def ref(*t):
        return reference.window_attention(*t[:3], window_size=w, shift=shift, bias_table=t[3], scale=scale)

    assert out.dtype == dtype and out.shape == q.shape
    assert_matches(out.cpu(), ref(q, k, v, bias), ref(*(t if t is None else t.double() for t in (q, k, v, bias))),
                   atol=_attention_atol(dtype, [q, k, v, bias], w * w))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@TRITON_FUZZ
@given(data=st.data())
def test_fuzz_multigrained_attention_triton(data):
    dev = _triton_device()
    import pyvq.ops._multigrained_attention_triton  # noqa: F401  (registers the Triton ops)

    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    ws = draw(st.integers(1, 2))
    H, W = ws * draw(st.integers(0, 2)), ws * draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 4, 8]))
    halo = draw(st.sampled_from([0, 1, 5]))
    G = draw(st.integers(0, 3))
    q, k, v = _qkv(draw, dtype, 1, 1, H, W, d, kinds=FINITE_KINDS)
    gk, gv = (values(draw, (1, 1, G, d), dtype, kinds=FINITE_KINDS) for _ in range(2))
    scale = d ** -0.5
    tensors = [q, k, v, gk, gv]
    out, _ = torch.ops.pyvq.multigrained_attention_triton(*(t.to(dev) for t in tensors), ws, halo, scale)

    def ref(*t):
        return reference.multigrained_attention(*t, block_size=ws, halo=halo, scale=scale)

    assert out.dtype == dtype and out.shape == q.shape
    n_keys = (ws + 2 * min(halo, max(H, W, 1))) ** 2 + G
    assert_matches(out.cpu(), ref(*tensors), ref(*(t.double() for t in tensors)),
                   atol=_attention_atol(dtype, tensors, n_keys))
