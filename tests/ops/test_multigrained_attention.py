"""pyvq.ops.multigrained_attention (Efficient-VQGAN's multi-grained
attention) and its CPU kernel (csrc/multigrained_attention/) against the
reference.

- the public op and the dispatcher op against
  pyvq.reference.multigrained_attention, forward and the gradients of all
  five tensors, over block sizes 1/2/4/8 and Ws = H, halo 0/1/2, halo > Ws
  and halo >= H, G 0/1/nB/> nB, square and non-square grids, B / heads > 1,
  head_dim 1/8/32, blocks whose keys span several key tiles; float32 and
  float64 tightly, float16 / bfloat16 within the half-precision bound;
  strided inputs (views of a permuted qkv tensor) and empty inputs;
- the two limits: halo 0 is per-block attention plus the globals, halo >= H
  is global attention over the grid plus the globals (both through SDPA);
- the kernel's contract: gradcheck in float64, opcheck of both dispatcher
  ops, bitwise determinism (repeat runs, one thread against two), both
  instruction-set builds, PYVQ_BACKEND=reference, torch.compile;
- named errors from the public op and from the dispatcher ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyvq
from pyvq import reference
from tests.conftest import assert_compiled_equals_eager, bad_arguments, half_precision_bound

pytestmark = pytest.mark.usefixtures("one_thread")

_OPS = ("multigrained_attention", "_multigrained_attention_backward")
needs_kernel = pytest.mark.skipif(
    not all(pyvq._backend.has_kernel(op, "cpu") for op in _OPS),
    reason="pyvq._C was built without the multigrained_attention CPU kernel (rebuild the extension)",
)
FWD = torch.ops.pyvq.multigrained_attention
BWD = torch.ops.pyvq._multigrained_attention_backward
NAMES = ("q", "k", "v", "global_k", "global_v")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


# --- helpers -----------------------------------------------------------------

def _inputs(seed, B, heads, H, W, d, G, dtype=torch.float64):
    """q, k, v (B, heads, H, W, d), global_k, global_v (B, heads, G, d)."""
    g = torch.Generator().manual_seed(seed)
    grid = tuple(torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    glob = tuple(torch.randn(B, heads, G, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return grid + glob


def _grad_out(seed, shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _forward_backward(fn, tensors, grad, **kw):
    """(out, grad_q, grad_k, grad_v, grad_global_k, grad_global_v) of fn on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kw)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _assert_all_close(ours, ref, **tol):
    for name, a, b in zip(("out",) + NAMES, ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


# --- the op against the reference -------------------------------------------

# (B, heads, H, W, d, block_size, halo, G)
SHAPES = [
    (2, 2, 3, 5, 8, 1, 0, 15),     # Ws = 1, halo 0: itself and the globals
    (1, 2, 4, 4, 8, 1, 1, 16),     # Ws = 1 with a halo
    (2, 2, 4, 6, 8, 2, 0, 6),      # halo 0, G = nB, non-square
    (1, 3, 8, 8, 1, 2, 1, 1),      # head_dim 1, G = 1
    (1, 2, 8, 8, 8, 2, 3, 20),     # halo > Ws (blocks two away), G > nB
    (2, 2, 8, 16, 32, 4, 2, 8),    # G = nB, non-square
    (1, 2, 16, 8, 8, 4, 1, 0),     # G = 0
    (1, 2, 16, 16, 32, 8, 2, 4),   # the prior's Ws = 8, halo 2
    (1, 1, 8, 16, 8, 8, 20, 5),    # halo >= H: clipped
    (1, 2, 8, 8, 8, 8, 0, 1),      # Ws = H = W
    (1, 1, 16, 16, 8, 16, 2, 3),   # Ws = H: 256 queries
    (1, 1, 24, 24, 8, 8, 24, 3),   # 579 keys per block: several key tiles
]


def _shape_id(s):
    B, h, H, W, d, ws, halo, G = s
    return f"B{B}h{h}-{H}x{W}-d{d}-ws{ws}-halo{halo}-G{G}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference(shape, dtype):
    B, heads, H, W, d, ws, halo, G = shape
    tensors = _inputs(1, B, heads, H, W, d, G, dtype)
    grad = _grad_out(2, tensors[0].shape, dtype)
    kw = dict(block_size=ws, halo=halo)
    ours = _forward_backward(pyvq.ops.multigrained_attention, tensors, grad, **kw)
    ref = _forward_backward(reference.multigrained_attention, tensors, grad, **kw)
    assert ours[0].dtype == dtype and ours[0].shape == tensors[0].shape
    _assert_all_close(ours, ref, **TOL[dtype])


def test_scale_argument():
    tensors = _inputs(3, 2, 2, 8, 4, 8, 3)
    for scale in (0.3, 1.0, -0.5):
        torch.testing.assert_close(
            pyvq.ops.multigrained_attention(*tensors, block_size=4, halo=1, scale=scale),
            reference.multigrained_attention(*tensors, block_size=4, halo=1, scale=scale), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ws,halo,H,W,G", [(4, 2, 8, 16, 8), (2, 1, 8, 8, 20)], ids=["ws4-8x16", "ws2-G>nB"])
def test_half_precision_within_bound(dtype, ws, halo, H, W, G):
    """float16 / bfloat16 storage, float32 accumulation: the error against a
    float64 reference is within twice the reference's own in that dtype."""
    tensors = _inputs(4, 1, 2, H, W, 16, G, dtype)
    grad = _grad_out(5, tensors[0].shape, dtype)
    kw = dict(block_size=ws, halo=halo)
    ours = _forward_backward(pyvq.ops.multigrained_attention, tensors, grad, **kw)
    low = _forward_backward(reference.multigrained_attention, tensors, grad, **kw)
    ref64 = _forward_backward(reference.multigrained_attention, [t.double() for t in tensors], grad.double(), **kw)
    for name, a, lo, hi in zip(("out",) + NAMES, ours, low, ref64):
        assert a.dtype == dtype, name
        half_precision_bound(a, lo, hi, atol=1e-6 * hi.abs().max().item())


# --- the two limits -------------------------------------------------------------

def _sdpa_with_globals(q, k, v, gk, gv, mask=None):
    """SDPA of (B, h, L, d) queries over keys k (B, h, L, d) then gk
    (B, h, G, d) (any leading dims); mask (L, L) True where a grid key is allowed."""
    keys, values = torch.cat([k, gk], dim=-2), torch.cat([v, gv], dim=-2)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], gk.shape[-2])], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def test_halo_0_is_blocked_attention_plus_globals():
    B, heads, H, W, d, ws, G = 2, 2, 8, 12, 8, 4, 6
    q, k, v, gk, gv = _inputs(6, B, heads, H, W, d, G)
    out = pyvq.ops.multigrained_attention(q, k, v, gk, gv, block_size=ws, halo=0)

    def blocks(t):  # (B, h, H, W, d) -> (B, h, nB, Ws^2, d)
        t = t.reshape(B, heads, H // ws, ws, W // ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(B, heads, -1, ws * ws, d)

    nb = (H // ws) * (W // ws)
    expand = [t[:, :, None].expand(B, heads, nb, G, d) for t in (gk, gv)]
    expected = _sdpa_with_globals(blocks(q), blocks(k), blocks(v), *expand)
    expected = expected.reshape(B, heads, H // ws, W // ws, ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
    torch.testing.assert_close(out, expected.reshape(B, heads, H, W, d), **TOL[torch.float64])


@pytest.mark.parametrize("halo", [12, 100])
def test_halo_at_least_the_grid_is_global_attention_plus_globals(halo):
    B, heads, H, W, d, ws, G = 1, 2, 8, 12, 8, 4, 5
    tensors = _inputs(7, B, heads, H, W, d, G)
    grad = _grad_out(8, tensors[0].shape, torch.float64)
    ours = _forward_backward(pyvq.ops.multigrained_attention, tensors, grad, block_size=ws, halo=halo)

    def oracle(q, k, v, gk, gv):
        flat = [t.reshape(B, heads, H * W, d) for t in (q, k, v)]
        return _sdpa_with_globals(*flat, gk, gv).reshape(B, heads, H, W, d)

    _assert_all_close(ours, _forward_backward(oracle, tensors, grad), **TOL[torch.float64])


# --- strided and empty inputs -------------------------------------------------

def test_views_of_a_permuted_qkv_tensor():
    """q, k, v as a layer makes them (views of one (B, H, W, 3C) tensor), the
    globals as views of one (B, G, 2C) tensor, a transposed upstream gradient."""
    B, H, W, heads, d, ws, halo = 2, 8, 8, 2, 8, 4, 2
    G = (H // ws) * (W // ws)
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(B, H, W, 3 * heads * d, generator=g, dtype=torch.float64)
    q, k, v = qkv.view(B, H, W, 3, heads, d).permute(3, 0, 4, 1, 2, 5).unbind(0)
    kv = torch.randn(B, G, 2 * heads * d, generator=g, dtype=torch.float64)
    gk, gv = kv.view(B, G, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    tensors = (q, k, v, gk, gv)
    assert not any(t.is_contiguous() for t in tensors)
    grad = torch.randn(B, heads, W, H, d, generator=g, dtype=torch.float64).transpose(2, 3)
    kw = dict(block_size=ws, halo=halo)
    ours = _forward_backward(pyvq.ops.multigrained_attention, tensors, grad, **kw)
    ref = _forward_backward(reference.multigrained_attention, [t.contiguous() for t in tensors], grad.contiguous(),
                            **kw)
    _assert_all_close(ours, ref, **TOL[torch.float64])
    for t in ours:
        assert t.is_contiguous()


def test_strided_head_dim():
    tensors = _inputs(10, 1, 2, 8, 8, 8, 4)
    q, k, v, gk, gv = tensors
    ks = torch.stack([k, torch.zeros_like(k)], dim=-1).flatten(-2)[..., ::2]  # head_dim stride 2
    gvs = torch.stack([gv, torch.zeros_like(gv)], dim=-1).flatten(-2)[..., ::2]
    grad = _grad_out(11, q.shape, torch.float64)
    ours = _forward_backward(pyvq.ops.multigrained_attention, (q, ks, v, gk, gvs), grad, block_size=2, halo=1)
    ref = _forward_backward(reference.multigrained_attention, tensors, grad, block_size=2, halo=1)
    _assert_all_close(ours, ref, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(0, 2, 8, 8, 8), (1, 0, 8, 8, 8), (1, 2, 0, 8, 8), (1, 2, 8, 0, 8)],
                         ids=["B0", "heads0", "H0", "W0"])
@pytest.mark.parametrize("G", [0, 3], ids=["G0", "G3"])
def test_empty_inputs(shape, G):
    """Empty inputs give empty outputs; with no query, the globals' gradients are zero."""
    B, heads, H, W, d = shape
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    gk, gv = (torch.randn(B, heads, G, d, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(shape, dtype=torch.float64)
    ours = _forward_backward(pyvq.ops.multigrained_attention, (q, k, v, gk, gv), grad, block_size=4, halo=2)
    # (The expectations are written out: the kernel is checked against its documented result.)
    for a, t in zip(ours, (q, q, k, v, gk, gv)):
        assert a.shape == t.shape and a.dtype == t.dtype
    assert not ours[4].any() and not ours[5].any()
    out, lse = FWD(q, k, v, gk, gv, 4, 2, 0.5)
    assert out.shape == shape and lse.shape == shape[:4] and lse.dtype == torch.float64


@pytest.mark.parametrize("shape", [(1, 2, 0, 8, 8), (1, 2, 8, 0, 8), (1, 1, 0, 0, 3)], ids=["H0", "W0", "H0W0"])
def test_reference_empty_grid(shape, reference_backend):
    """Regression (found by tests/ops/test_fuzz.py): the reference, and so
    PYVQ_BACKEND=reference, crashed in unfold on a grid with no rows or
    columns; it now gives an empty output and zero gradients, as the kernel."""
    B, heads, H, W, d = shape
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    gk, gv = (torch.randn(B, heads, 3, d, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(shape, dtype=torch.float64)
    ref = _forward_backward(pyvq.ops.multigrained_attention, (q, k, v, gk, gv), grad, block_size=4, halo=2)
    for a, t in zip(ref, (q, q, k, v, gk, gv)):
        assert a.shape == t.shape and a.dtype == t.dtype
    assert not ref[4].any() and not ref[5].any()


@needs_kernel
def test_zero_head_dim_gives_uniform_lse():
    """head_dim 0: out is empty and every score 0, so lse is log(keys seen)."""
    H, W, ws, halo, G = 8, 12, 4, 1, 5
    q, k, v, gk, gv = _inputs(12, 1, 2, H, W, 0, G)
    out, lse = FWD(q, k, v, gk, gv, ws, halo, 1.0)
    assert out.shape == q.shape
    rows = torch.tensor([min(H, (i // ws + 1) * ws + halo) - max(0, (i // ws) * ws - halo) for i in range(H)])
    cols = torch.tensor([min(W, (j // ws + 1) * ws + halo) - max(0, (j // ws) * ws - halo) for j in range(W)])
    expected = torch.log((rows[:, None] * cols[None, :] + G).double()).expand(1, 2, H, W)
    torch.testing.assert_close(lse, expected, **TOL[torch.float64])


# --- the kernel's contract ----------------------------------------------------

@pytest.mark.parametrize("ws,halo,G", [(2, 1, 4), (2, 0, 0), (1, 1, 2), (2, 5, 3)])
def test_gradcheck(ws, halo, G):
    tensors = [t.requires_grad_() for t in _inputs(14, 1, 2, 2 * ws, 3 * ws, 3, G)]
    assert torch.autograd.gradcheck(
        lambda *t: pyvq.ops.multigrained_attention(*t, block_size=ws, halo=halo), tensors)


def _opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for ws, halo, G in ((2, 1, 4), (4, 0, 0)):
            yield (*_inputs(15, 2, 2, 2 * ws, 2 * ws, 4, G, dtype), ws, halo, 0.5)


def _sample_id(s):
    return f"{s[0].dtype}-ws{s[5]}-halo{s[6]}-G{s[3].shape[2]}"


@needs_kernel
@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=_sample_id)
def test_opcheck_forward(sample):
    tensors = [t.requires_grad_() for t in sample[:5]]
    torch.library.opcheck(FWD.default, (*tensors, *sample[5:]))


@needs_kernel
@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=_sample_id)
def test_opcheck_backward(sample):
    out, lse = FWD(*sample)
    grad = _grad_out(16, out.shape, out.dtype)
    torch.library.opcheck(BWD.default, (grad, *sample[:5], out, lse, *sample[5:]))


@needs_kernel
def test_lse_is_the_logsumexp_of_the_scores():
    """The saved lse is the logsumexp of each query's scaled scores over its
    clipped window and the globals (a dense mask over the grid)."""
    B, heads, H, W, d, ws, halo, G = 1, 2, 6, 8, 4, 2, 1, 7
    q, k, v, gk, gv = _inputs(17, B, heads, H, W, d, G)
    _, lse = FWD(q, k, v, gk, gv, ws, halo, 0.7)

    def near(n):  # (n, n): key coordinate within halo of the query's block
        idx = torch.arange(n)
        lo = (idx // ws) * ws - halo
        return (idx[None, :] >= lo[:, None]) & (idx[None, :] < lo[:, None] + ws + 2 * halo)

    mask = (near(H)[:, None, :, None] & near(W)[None, :, None, :]).reshape(H * W, H * W)
    qf, kf = q.reshape(B, heads, H * W, d), k.reshape(B, heads, H * W, d)
    local = (0.7 * qf @ kf.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    expected = torch.logsumexp(torch.cat([local, 0.7 * qf @ gk.transpose(-1, -2)], -1), -1)
    torch.testing.assert_close(lse, expected.reshape(B, heads, H, W), **TOL[torch.float64])


@needs_kernel
@pytest.mark.parametrize("ws,halo", [(4, 2), (2, 3), (4, 16)], ids=["ws4-halo2", "ws2-halo3", "halo>=H"])
def test_deterministic_across_runs_and_threads(ws, halo):
    """Outputs and all gradients (local keys are summed over overlapping
    windows, globals over every block) are bitwise equal between runs and
    between one and two threads."""
    tensors = _inputs(18, 2, 3, 16, 16, 32, 16, torch.float32)
    grad = _grad_out(19, tensors[0].shape, torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            runs.append(_forward_backward(pyvq.ops.multigrained_attention, tensors, grad, block_size=ws, halo=halo))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for name, a, b in zip(("out",) + NAMES, runs[0], other):
            assert torch.equal(a, b), name


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "generic"])
def test_each_instruction_set_build_matches_reference(isa, monkeypatch):
    """PYVQ_CPU_ISA caps the kernel: both builds of the float32 per-tile
    compute (AVX-512, baseline) match the reference."""
    monkeypatch.setenv("PYVQ_CPU_ISA", isa)
    tensors = _inputs(20, 1, 2, 16, 8, 32, 6, torch.float32)
    grad = _grad_out(21, tensors[0].shape, torch.float32)
    kw = dict(block_size=4, halo=2)
    ours = _forward_backward(pyvq.ops.multigrained_attention, tensors, grad, **kw)
    _assert_all_close(ours, _forward_backward(reference.multigrained_attention, tensors, grad, **kw),
                      **TOL[torch.float32])


@needs_kernel
def test_generic_build_is_reached(monkeypatch):
    """On an AVX-512 CPU, PYVQ_CPU_ISA=generic runs the baseline build: it
    rounds differently (no fused multiply-adds), so the output changes."""
    monkeypatch.delenv("PYVQ_CPU_ISA", raising=False)
    if pyvq.info()["ops"]["multigrained_attention"]["cpu_isa"] == "generic":
        pytest.skip("this CPU (or build) has no AVX-512 path: the kernel has one build")
    tensors = _inputs(22, 1, 2, 16, 16, 32, 4, torch.float32)
    native = pyvq.ops.multigrained_attention(*tensors, block_size=8, halo=2)
    monkeypatch.setenv("PYVQ_CPU_ISA", "generic")
    generic = pyvq.ops.multigrained_attention(*tensors, block_size=8, halo=2)
    assert not torch.equal(native, generic)
    torch.testing.assert_close(native, generic, **TOL[torch.float32])


@needs_kernel
def test_public_op_runs_the_kernel():
    """Without PYVQ_BACKEND the CPU call takes the C++ op."""
    assert pyvq._backend.use_kernel("multigrained_attention", "cpu")
    tensors = _inputs(23, 1, 2, 4, 4, 8, 4)
    out = pyvq.ops.multigrained_attention(*tensors, block_size=2, halo=1)
    direct, _ = FWD(*tensors, 2, 1, 8 ** -0.5)
    assert torch.equal(out, direct)


def test_reference_backend(reference_backend):
    """PYVQ_BACKEND=reference: the public op is the reference, bit for bit."""
    assert not pyvq._backend.use_kernel("multigrained_attention", "cpu")
    tensors = _inputs(24, 2, 2, 8, 8, 8, 4, torch.float32)
    grad = _grad_out(25, tensors[0].shape, torch.float32)
    kw = dict(block_size=4, halo=2)
    ours = _forward_backward(pyvq.ops.multigrained_attention, tensors, grad, **kw)
    ref = _forward_backward(reference.multigrained_attention, tensors, grad, **kw)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    """A function of the op traced whole by torch.compile equals eager,
    forward and gradients."""
    tensors = _inputs(26, 1, 2, 8, 8, 8, 4, torch.float32)

    def fn(q, k, v, gk, gv):
        out = pyvq.ops.multigrained_attention(q, k, v, gk, gv, block_size=4, halo=2)
        return (out * out).sum() + out.mean()

    assert_compiled_equals_eager(fn, tensors)


def test_meta_tensors():
    q = torch.empty(2, 3, 8, 8, 16, device="meta")
    g = torch.empty(2, 3, 4, 16, device="meta")
    out = pyvq.ops.multigrained_attention(q, q, q, g, g, block_size=4, halo=2)
    assert out.shape == q.shape and out.device.type == "meta"


# --- argument checks ------------------------------------------------------------

def _ok(dtype=torch.float32):
    """Valid arguments: q, k, v (2, 2, 8, 8, 4), 4 globals, Ws = 4, halo 1."""
    q, k, v, gk, gv = _inputs(28, 2, 2, 8, 8, 4, 4, dtype)
    return dict(q=q, k=k, v=v, global_k=gk, global_v=gv, block_size=4, halo=1)


def _bad(**changes):
    return bad_arguments(_ok, **changes)


BAD = [
    pytest.param(_bad(q=lambda kw: torch.randn(2, 2, 6, 8, 4), k=lambda kw: torch.randn(2, 2, 6, 8, 4),
                      v=lambda kw: torch.randn(2, 2, 6, 8, 4)),
                 ValueError, r"grid H x W .* multiple of block_size 4.*6 x 8", id="H-not-multiple"),
    pytest.param(_bad(k=lambda kw: torch.randn(2, 2, 8, 4, 4)), ValueError,
                 r"argument 'k' must have the shape of 'q'", id="k-shape"),
    pytest.param(_bad(global_k=lambda kw: torch.randn(2, 2, 4, 5)), ValueError,
                 r"argument 'global_k' must have shape \(B, heads, G, head_dim\) = \(2, 2, G, 4\), got \(2, 2, 4, 5\)",
                 id="global_k-dim"),
    pytest.param(_bad(global_v=lambda kw: torch.randn(2, 2, 3, 4)), ValueError,
                 r"argument 'global_v' must have shape \(2, 2, 4, 4\), got \(2, 2, 3, 4\)", id="global_v-G"),
    pytest.param(_bad(global_k=lambda kw: torch.randn(2, 4, 4)), ValueError,
                 r"argument 'global_k' must have shape", id="global_k-3d"),
    pytest.param(_bad(halo=lambda kw: -1), ValueError, r"argument 'halo' must be an int >= 0", id="halo-neg"),
    pytest.param(_bad(block_size=lambda kw: 0), ValueError, r"argument 'block_size' must be an int >= 1",
                 id="block-0"),
    pytest.param(_bad(k=lambda kw: kw["k"].double()), TypeError,
                 r"argument 'k' must have the dtype of 'q' \(torch.float32\), got torch.float64", id="k-dtype"),
    pytest.param(_bad(global_v=lambda kw: kw["global_v"].double()), TypeError,
                 r"argument 'global_v' must have the dtype of 'q'", id="global_v-dtype"),
    pytest.param(_bad(v=lambda kw: kw["v"].to("meta")), ValueError,
                 r"argument 'v' must be on the device of 'q'", id="v-device"),
    pytest.param(_bad(global_k=lambda kw: kw["global_k"].to("meta")), ValueError,
                 r"argument 'global_k' must be on the device of 'q'", id="global_k-device"),
    pytest.param(_bad(q=lambda kw: torch.zeros(2, 2, 8, 8, 4, dtype=torch.long)), TypeError,
                 r"argument 'q' must be a floating-point tensor", id="q-int"),
]


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("make,exc,msg", BAD)
def test_bad_input(make, exc, msg, backend, monkeypatch):
    monkeypatch.setenv("PYVQ_BACKEND", backend)
    kw = make()
    with pytest.raises(exc, match=msg):
        pyvq.ops.multigrained_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("global_k"),
                                        kw.pop("global_v"), **kw)


# The dispatcher ops check for themselves (direct torch.ops calls skip the
# Python checks): edits of (q, k, v, global_k, global_v, block_size, halo, scale).
BAD_CPP = [
    pytest.param(dict(q=torch.randn(2, 2, 6, 8, 4), k=torch.randn(2, 2, 6, 8, 4), v=torch.randn(2, 2, 6, 8, 4)),
                 r"must be a multiple of block_size 4 in both axes, got 6 x 8", id="H-not-multiple"),
    pytest.param(dict(k=torch.randn(2, 2, 8, 4, 4)), r"argument 'k' must have the shape of 'q'", id="k-shape"),
    pytest.param(dict(v=torch.randn(2, 2, 8, 8, 4, dtype=torch.float64)),
                 r"arguments 'v' and 'q' must have the same dtype", id="v-dtype"),
    pytest.param(dict(global_k=torch.randn(2, 3, 4, 4)),
                 r"argument 'global_k' must have shape \(B, heads, G, head_dim\) = \(2, 2, G, 4\)", id="global_k-heads"),
    pytest.param(dict(global_v=torch.randn(2, 2, 4)), r"argument 'global_v' must have shape", id="global_v-3d"),
    pytest.param(dict(global_v=torch.randn(2, 2, 5, 4)),
                 r"'global_k' and 'global_v' must have the same number of global keys G, got 4 and 5", id="G-differs"),
    pytest.param(dict(global_k=torch.randn(2, 2, 4, 4, dtype=torch.float64)),
                 r"arguments 'global_k' and 'q' must have the same dtype", id="global_k-dtype"),
    pytest.param(dict(global_v=torch.zeros(2, 2, 4, 4, dtype=torch.long)),
                 r"argument 'global_v' must be a floating-point tensor", id="global_v-int"),
    pytest.param(dict(halo=-1), r"argument 'halo' must be >= 0, got -1", id="halo-neg"),
    pytest.param(dict(block_size=0), r"argument 'block_size' must be >= 1, got 0", id="block-0"),
    pytest.param(dict(q=torch.randn(2, 8, 8, 4)), r"argument 'q' must be 5-D", id="q-4d"),
    pytest.param(dict(scale=float("nan")), r"argument 'scale' must be finite", id="scale"),
]


def _cpp_args(**changes):
    kw = _ok()
    args = dict(q=kw["q"], k=kw["k"], v=kw["v"], global_k=kw["global_k"], global_v=kw["global_v"], block_size=4,
                halo=1, scale=0.5)
    args.update(changes)
    return args


@needs_kernel
@pytest.mark.parametrize("changes,msg", BAD_CPP)
def test_bad_input_cpp_forward(changes, msg):
    a = _cpp_args(**changes)
    with pytest.raises(RuntimeError, match=msg):
        FWD(*a.values())


@needs_kernel
@pytest.mark.parametrize("changes,msg", BAD_CPP)
def test_bad_input_cpp_backward(changes, msg):
    a = _cpp_args(**changes)
    q = a["q"]
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.zeros(q.shape[:4]) if q.dim() == 5 else torch.zeros(1)
    t = list(a.values())
    with pytest.raises(RuntimeError, match=msg):
        BWD(out, *t[:5], out, lse, *t[5:])


@needs_kernel
@pytest.mark.parametrize("which,value,msg", [
    ("grad_out", torch.randn(2, 2, 8, 4, 4), r"argument 'grad_out' must have the shape of 'q'"),
    ("grad_out", torch.randn(2, 2, 8, 8, 4, dtype=torch.float64), r"arguments 'grad_out' and 'q' must have the same"),
    ("out", torch.randn(2, 2, 8, 8, 3), r"argument 'out' must have the shape of 'q'"),
    ("lse", torch.randn(2, 2, 8, 4), r"argument 'lse' must have shape \(B, heads, H, W\) = \[2, 2, 8, 8\]"),
    ("lse", torch.randn(2, 2, 8, 8, dtype=torch.float64), r"argument 'lse' must have dtype Float"),
], ids=["grad_out-shape", "grad_out-dtype", "out-shape", "lse-shape", "lse-dtype"])
def test_bad_input_cpp_backward_saved(which, value, msg):
    a = _cpp_args()
    t = list(a.values())
    out, lse = FWD(*t)
    args = dict(grad_out=torch.randn_like(out), out=out, lse=lse)
    args[which] = value
    with pytest.raises(RuntimeError, match=msg):
        BWD(args["grad_out"], *t[:5], args["out"], args["lse"], *t[5:])
