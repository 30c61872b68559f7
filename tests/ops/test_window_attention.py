"""pyvq.ops.window_attention (Swin's shifted-window attention) and its CPU
kernel (csrc/window_attention/) against the reference.

- the public op against pyvq.reference.window_attention, forward and the
  gradients of q, k, v and bias_table, over windows 1/2/4/7/8, square and
  non-square grids, shift 0 and > 0, with and without a bias table,
  head_dim 1/8/32; float32 and float64 tightly, float16 / bfloat16 within
  the half-precision bound; strided inputs (a qkv projection's views, a
  transposed grid) and empty inputs;
- the kernel's contract: gradcheck in float64, opcheck of both dispatcher
  ops, bitwise determinism (repeat runs, one thread against two), both
  instruction-set builds, PYVQ_BACKEND=reference, torch.compile;
- named errors from the public op and from the dispatcher ops;
- timm's WindowAttention (its qkv, bias table, mask and proj) on timm's
  partitioned windows equals the op.
"""

from __future__ import annotations

import pytest
import torch

import pyvq
from pyvq import reference
from pyvq.reference.window_attention import relative_position_index, shift_mask
from tests.conftest import assert_compiled_equals_eager, bad_arguments, half_precision_bound

pytestmark = pytest.mark.usefixtures("one_thread")

_OPS = ("window_attention", "_window_attention_backward")
needs_kernel = pytest.mark.skipif(
    not all(pyvq._backend.has_kernel(op, "cpu") for op in _OPS),
    reason="pyvq._C was built without the window_attention CPU kernel (rebuild the extension)",
)

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


# --- helpers -----------------------------------------------------------------

def _inputs(seed, B, heads, H, W, d, w, bias=True, dtype=torch.float64):
    """q, k, v (B, heads, H, W, d) and a ((2w - 1)^2, heads) bias table (or None)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    table = (torch.randn((2 * w - 1) ** 2, heads, generator=g, dtype=torch.float64).to(dtype) if bias else None)
    return q, k, v, table


def _grad_out(seed, shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _forward_backward(fn, q, k, v, table, grad, **kw):
    """(out, grad_q, grad_k, grad_v[, grad_table]) of fn on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    tab = None if table is None else table.detach().clone().requires_grad_()
    out = fn(*leaves, bias_table=tab, **kw)
    ins = leaves + ([tab] if tab is not None else [])
    return (out, *torch.autograd.grad(out, ins, grad))


# --- the op against the reference -------------------------------------------

# (B, heads, H, W, d, window, shift, bias)
SHAPES = [
    (2, 3, 3, 5, 8, 1, 0, True),     # w = 1: every token attends to itself
    (2, 2, 4, 6, 8, 2, 0, True),
    (2, 2, 4, 6, 8, 2, 1, True),
    (1, 3, 8, 8, 1, 4, 2, True),     # head_dim 1
    (2, 2, 8, 12, 32, 4, 3, False),
    (1, 2, 4, 4, 8, 4, 2, True),     # one window: the shift wraps inside it
    (2, 3, 14, 21, 32, 7, 0, True),  # Swin's window
    (2, 3, 14, 21, 32, 7, 3, True),
    (1, 2, 7, 7, 5, 7, 3, False),
    (2, 2, 16, 16, 32, 8, 4, True),  # the tokenizer's window
    (1, 4, 16, 24, 8, 8, 0, False),
    (1, 2, 24, 16, 32, 8, 7, True),  # the largest shift
    (1, 3, 16, 32, 4, 16, 5, True),  # float32: the heads' biases exceed a worker's cache
    (1, 2, 32, 32, 4, 32, 16, True),  # the largest window
]


def _shape_id(s):
    B, h, H, W, d, w, shift, bias = s
    return f"B{B}h{h}-{H}x{W}-d{d}-w{w}s{shift}{'-bias' if bias else ''}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference(shape, dtype):
    B, heads, H, W, d, w, shift, bias = shape
    q, k, v, table = _inputs(1, B, heads, H, W, d, w, bias, dtype)
    grad = _grad_out(2, q.shape, dtype)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=w, shift=shift)
    ref = _forward_backward(reference.window_attention, q, k, v, table, grad, window_size=w, shift=shift)
    assert ours[0].dtype == dtype and ours[0].shape == q.shape
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("shift", [0, 2])
def test_scale_argument(shift):
    q, k, v, table = _inputs(3, 2, 2, 8, 4, 8, 4, True)
    for scale in (0.3, 1.0, -0.5):
        torch.testing.assert_close(
            pyvq.ops.window_attention(q, k, v, window_size=4, shift=shift, bias_table=table, scale=scale),
            reference.window_attention(q, k, v, window_size=4, shift=shift, bias_table=table, scale=scale),
            **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shift", [0, 3])
def test_half_precision_within_bound(dtype, shift):
    """float16 / bfloat16 storage, float32 accumulation: the error against a
    float64 reference is within twice the reference's own in that dtype."""
    q, k, v, table = _inputs(4, 2, 2, 14, 14, 32, 7, True, dtype)
    grad = _grad_out(5, q.shape, dtype)
    kw = dict(window_size=7, shift=shift)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, **kw)
    low = _forward_backward(reference.window_attention, q, k, v, table, grad, **kw)
    ref64 = _forward_backward(reference.window_attention, q.double(), k.double(), v.double(), table.double(),
                              grad.double(), **kw)
    for a, lo, hi in zip(ours, low, ref64):
        assert a.dtype == dtype
        half_precision_bound(a, lo, hi, atol=1e-6)


def test_bias_table_dtype_differs_from_q():
    """A float64 bias table with float32 q: computed in float32, the table's
    gradient in the table's dtype."""
    q, k, v, _ = _inputs(6, 1, 2, 8, 8, 8, 4, False, torch.float32)
    table = _inputs(7, 1, 2, 4, 4, 1, 4)[3]
    grad = _grad_out(8, q.shape, torch.float32)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=4, shift=2)
    ref = _forward_backward(reference.window_attention, q, k, v, table, grad, window_size=4, shift=2)
    assert ours[-1].dtype == torch.float64
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# --- strided and empty inputs -------------------------------------------------

def test_views_of_a_qkv_projection():
    """q, k, v as the layers make them: views of one (B, H, W, 3 * C) tensor."""
    B, H, W, heads, d, w = 2, 14, 7, 3, 8, 7
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(B, H, W, 3 * heads * d, generator=g, dtype=torch.float64)
    q, k, v = qkv.view(B, H, W, 3, heads, d).permute(3, 0, 4, 1, 2, 5).unbind(0)
    assert not q.is_contiguous()
    table = _inputs(10, 1, heads, 1, 1, 1, w)[3]
    grad = _grad_out(11, q.shape, torch.float64)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=w, shift=3)
    ref = _forward_backward(reference.window_attention, q.contiguous(), k.contiguous(), v.contiguous(), table,
                            grad, window_size=w, shift=3)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_transposed_grid_and_strided_head_dim():
    q, k, v, table = _inputs(12, 2, 2, 12, 8, 12, 4, True)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # the grid stored transposed
    ks = torch.stack([k, torch.zeros_like(k)], dim=-1).flatten(-2)[..., ::2]  # head_dim stride 2
    vs = v.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)  # heads outer in memory
    assert not (qt.is_contiguous() or ks.is_contiguous() or vs.is_contiguous())
    grad = _grad_out(13, q.shape, torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    ours = _forward_backward(pyvq.ops.window_attention, qt, ks, vs, table, grad, window_size=4, shift=1)
    ref = _forward_backward(reference.window_attention, q, k, v, table, grad.contiguous(), window_size=4, shift=1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(0, 2, 4, 4, 8), (2, 2, 0, 4, 8), (2, 2, 4, 0, 8), (1, 2, 4, 4, 0)],
                         ids=["B0", "H0", "W0", "d0"])
def test_empty_inputs(shape):
    """Empty inputs give empty outputs (d = 0: softmax over zero scores, an
    empty output); the bias gradient sums over nothing."""
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    table = torch.randn(49, 2, dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=4, shift=1, scale=1.0)
    ref = _forward_backward(reference.window_attention, q, k, v, table, grad, window_size=4, shift=1, scale=1.0)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    out, lse = torch.ops.pyvq.window_attention(q, k, v, table, 4, 1, 1.0)
    assert out.shape == shape and lse.shape == shape[:4] and lse.dtype == torch.float64


# --- the kernel's contract ----------------------------------------------------

@pytest.mark.parametrize("w,shift,bias", [(2, 1, True), (4, 2, True), (4, 0, False), (3, 1, True)])
def test_gradcheck(w, shift, bias):
    q, k, v, table = _inputs(14, 1, 2, 2 * w, w, 3, w, bias)
    ins = [t.requires_grad_() for t in (q, k, v)] + ([table.requires_grad_()] if bias else [])

    def fn(*args):
        tab = args[3] if bias else None
        return pyvq.ops.window_attention(*args[:3], window_size=w, shift=shift, bias_table=tab)

    assert torch.autograd.gradcheck(fn, ins)


def _opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for w, shift, bias in ((2, 1, True), (4, 0, False)):
            q, k, v, table = _inputs(15, 2, 2, 2 * w, 2 * w, 4, w, bias, dtype)
            yield q, k, v, table, w, shift, 0.5


@needs_kernel
@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: f"{s[0].dtype}-w{s[4]}s{s[5]}")
def test_opcheck_forward(sample):
    q, k, v, table, w, shift, scale = sample
    leaves = [t.requires_grad_() for t in (q, k, v)]
    tab = None if table is None else table.requires_grad_()
    torch.library.opcheck(torch.ops.pyvq.window_attention.default, (*leaves, tab, w, shift, scale))


@needs_kernel
@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: f"{s[0].dtype}-w{s[4]}s{s[5]}")
def test_opcheck_backward(sample):
    q, k, v, table, w, shift, scale = sample
    out, lse = torch.ops.pyvq.window_attention(q, k, v, table, w, shift, scale)
    grad = _grad_out(16, q.shape, q.dtype)
    torch.library.opcheck(torch.ops.pyvq._window_attention_backward.default,
                          (grad, q, k, v, table, out, lse, w, shift, scale))


def _windows(t, w):
    """(B, h, H, W, d) -> (B, h, nW, w * w, d): the rolled grid's windows, row-major."""
    B, h, H, W, d = t.shape
    t = t.reshape(B, h, H // w, w, W // w, w, d).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, h, (H // w) * (W // w), w * w, d)


@needs_kernel
def test_lse_is_the_logsumexp_of_the_scores():
    """The saved lse, at the tokens' original positions, is the logsumexp of
    each query's scaled, biased, masked scores."""
    B, heads, H, W, d, w, shift = 1, 2, 8, 12, 4, 4, 2
    q, k, v, table = _inputs(17, B, heads, H, W, d, w)
    _, lse = torch.ops.pyvq.window_attention(q, k, v, table, w, shift, 0.7)
    qw, kw = (_windows(torch.roll(t, (-shift, -shift), (2, 3)), w) for t in (q, k))
    s = 0.7 * qw @ kw.transpose(-2, -1)
    index = relative_position_index(w)
    s = s + table[index.reshape(-1)].reshape(w * w, w * w, heads).permute(2, 0, 1)[None, :, None]
    s = s.masked_fill(shift_mask(H, W, w, shift)[None, None], float("-inf"))
    lse_windows = torch.logsumexp(s, -1)  # (B, h, nW, N)
    # the rolled grid position of every original token, then back to the grid
    pos = _windows(torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W, 1), w).reshape(-1).long()
    rolled = torch.empty(B, heads, H * W, dtype=torch.float64)
    rolled[:, :, pos] = lse_windows.reshape(B, heads, -1)
    expected = torch.roll(rolled.reshape(B, heads, H, W), (shift, shift), (2, 3))
    torch.testing.assert_close(lse, expected, **TOL[torch.float64])


def _on_threads(n, fn):
    """fn() with n intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_deterministic_across_runs_and_threads():
    """Outputs and all gradients (the bias table's is a sum over windows) are
    bitwise equal between runs and between 1, 2 and 3 threads (the workers
    claim chunks dynamically, so runs assign them differently)."""
    q, k, v, table = _inputs(18, 2, 3, 14, 14, 32, 7, True, torch.float32)
    grad = _grad_out(19, q.shape, torch.float32)

    def run():
        return _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=7, shift=3)

    first = _on_threads(2, run)
    for n in (2, 3, 1):
        for a, b in zip(first, _on_threads(n, run)):
            assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "generic"])
def test_each_instruction_set_build_matches_reference(isa, monkeypatch):
    """PYVQ_CPU_ISA caps the kernel: both builds of the float32 per-window
    compute (AVX-512, baseline) match the reference."""
    monkeypatch.setenv("PYVQ_CPU_ISA", isa)
    q, k, v, table = _inputs(20, 2, 2, 14, 7, 32, 7, True, torch.float32)
    grad = _grad_out(21, q.shape, torch.float32)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=7, shift=3)
    ref = _forward_backward(reference.window_attention, q, k, v, table, grad, window_size=7, shift=3)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@needs_kernel
def test_generic_build_is_reached(monkeypatch):
    """On an AVX-512 CPU, PYVQ_CPU_ISA=generic runs the baseline build: it
    rounds differently (no fused multiply-adds), so the output changes."""
    monkeypatch.delenv("PYVQ_CPU_ISA", raising=False)
    if pyvq.info()["ops"]["window_attention"]["cpu_isa"] == "generic":
        pytest.skip("this CPU (or build) has no AVX-512 path: the kernel has one build")
    q, k, v, table = _inputs(22, 2, 2, 16, 16, 32, 8, True, torch.float32)
    native = pyvq.ops.window_attention(q, k, v, window_size=8, shift=4, bias_table=table)
    monkeypatch.setenv("PYVQ_CPU_ISA", "generic")
    generic = pyvq.ops.window_attention(q, k, v, window_size=8, shift=4, bias_table=table)
    assert not torch.equal(native, generic)
    torch.testing.assert_close(native, generic, **TOL[torch.float32])


@needs_kernel
def test_public_op_runs_the_kernel():
    """Without PYVQ_BACKEND the CPU call takes the C++ op (its lse exists)."""
    assert pyvq._backend.use_kernel("window_attention", "cpu")
    q, k, v, table = _inputs(23, 1, 2, 4, 4, 8, 2)
    out = pyvq.ops.window_attention(q, k, v, window_size=2, shift=1, bias_table=table)
    direct, _ = torch.ops.pyvq.window_attention(q, k, v, table, 2, 1, 8 ** -0.5)
    assert torch.equal(out, direct)


def test_reference_backend(reference_backend):
    """PYVQ_BACKEND=reference: the public op is the reference, bit for bit."""
    assert not pyvq._backend.use_kernel("window_attention", "cpu")
    q, k, v, table = _inputs(24, 2, 2, 8, 8, 8, 4, True, torch.float32)
    grad = _grad_out(25, q.shape, torch.float32)
    ours = _forward_backward(pyvq.ops.window_attention, q, k, v, table, grad, window_size=4, shift=2)
    ref = _forward_backward(reference.window_attention, q, k, v, table, grad, window_size=4, shift=2)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    """A function of the op traced whole by torch.compile equals eager,
    forward and gradients."""
    q, k, v, table = _inputs(26, 1, 2, 8, 8, 8, 4, True, torch.float32)

    def fn(q, k, v, table):
        out = pyvq.ops.window_attention(q, k, v, window_size=4, shift=2, bias_table=table)
        return (out * out).sum() + out.mean()

    assert_compiled_equals_eager(fn, (q, k, v, table))


def test_meta_tensors():
    q = torch.empty(2, 3, 8, 8, 16, device="meta")
    table = torch.empty(49, 3, device="meta")
    out = pyvq.ops.window_attention(q, q, q, window_size=4, shift=2, bias_table=table)
    assert out.shape == q.shape and out.device.type == "meta"


# --- equality with timm ---------------------------------------------------------

@pytest.mark.parametrize("shift", [0, 3])
def test_matches_timm_window_attention(shift):
    """timm's WindowAttention (its qkv, relative position bias table, mask
    and proj) on timm's partitioned windows equals the op on the grid, with
    the windows cut the same way. (timm masks with -100, the op with -inf:
    the difference is below exp(-100).)"""
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(27)
    B, H, W, heads, d, w = 2, 14, 21, 3, 8, 7
    C = heads * d
    block = swin.SwinTransformerBlock(C, (H, W), heads, window_size=w, shift_size=shift).double().eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # timm's init (std .02) would hide index errors
    attn = block.attn
    x = torch.randn(B, H, W, C, dtype=torch.float64)

    def partition(t):  # (B, H, W, C) on the grid -> timm's windows (nW * B, N, C)
        t = torch.roll(t, (-shift, -shift), (1, 2)) if shift else t
        return swin.window_partition(t, (w, w)).view(-1, w * w, C)

    with torch.no_grad():
        expected = attn(partition(x), mask=block.attn_mask)
        q, k, v = attn.qkv(x).view(B, H, W, 3, heads, d).permute(3, 0, 4, 1, 2, 5).unbind(0)
        out = pyvq.ops.window_attention(q, k, v, window_size=w, shift=shift,
                                        bias_table=attn.relative_position_bias_table)
        ours = partition(attn.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)))
    torch.testing.assert_close(ours, expected, **TOL[torch.float64])


# --- argument checks ------------------------------------------------------------

def _ok(dtype=torch.float32):
    """Valid arguments: q, k, v (2, 2, 8, 8, 4), w = 4, a bias table."""
    q, k, v, table = _inputs(28, 2, 2, 8, 8, 4, 4, True, dtype)
    return dict(q=q, k=k, v=v, window_size=4, shift=0, bias_table=table)


def _bad(**changes):
    return bad_arguments(_ok, **changes)


BAD = [
    pytest.param(_bad(q=lambda kw: torch.randn(2, 2, 6, 8, 4), k=lambda kw: torch.randn(2, 2, 6, 8, 4),
                      v=lambda kw: torch.randn(2, 2, 6, 8, 4)),
                 ValueError, r"grid H x W .* multiple of window_size 4.*6 x 8", id="H-not-multiple"),
    pytest.param(_bad(k=lambda kw: torch.randn(2, 2, 8, 4, 4)), ValueError,
                 r"argument 'k' must have the shape of 'q'", id="k-shape"),
    pytest.param(_bad(v=lambda kw: torch.randn(2, 3, 8, 8, 4)), ValueError,
                 r"argument 'v' must have the shape of 'q' \(2, 2, 8, 8, 4\), got \(2, 3, 8, 8, 4\)",
                 id="v-heads"),
    pytest.param(_bad(k=lambda kw: kw["k"].double()), TypeError,
                 r"argument 'k' must have the dtype of 'q' \(torch.float32\), got torch.float64", id="k-dtype"),
    pytest.param(_bad(v=lambda kw: kw["v"].to("meta")), ValueError,
                 r"argument 'v' must be on the device of 'q'", id="v-device"),
    pytest.param(_bad(bias_table=lambda kw: torch.randn(49, 3)), ValueError,
                 r"argument 'bias_table' must have shape .*\(49, 2\), got \(49, 3\)", id="bias-heads"),
    pytest.param(_bad(bias_table=lambda kw: torch.randn(25, 2)), ValueError,
                 r"argument 'bias_table' must have shape .*\(49, 2\), got \(25, 2\)", id="bias-size"),
    pytest.param(_bad(bias_table=lambda kw: torch.zeros(49, 2, dtype=torch.long)), TypeError,
                 r"argument 'bias_table' must be a floating-point tensor", id="bias-int"),
    pytest.param(_bad(shift=lambda kw: 4), ValueError, r"argument 'shift' must be in \[0, window_size\)",
                 id="shift-eq-window"),
    pytest.param(_bad(shift=lambda kw: -1), ValueError, r"argument 'shift' must be an int >= 0", id="shift-neg"),
    pytest.param(_bad(window_size=lambda kw: 0), ValueError, r"argument 'window_size' must be an int in \[1, 32\]",
                 id="window-0"),
    pytest.param(_bad(window_size=lambda kw: 33), ValueError, r"argument 'window_size' must be an int in \[1, 32\]",
                 id="window-33"),
    pytest.param(_bad(window_size=lambda kw: 2.0), TypeError, r"argument 'window_size' must be an int",
                 id="window-float"),
    pytest.param(_bad(q=lambda kw: torch.zeros(2, 2, 8, 8, 4, dtype=torch.long)), TypeError,
                 r"argument 'q' must be a floating-point tensor", id="q-int"),
    pytest.param(_bad(q=lambda kw: torch.randn(2, 8, 8, 4)), ValueError, r"argument 'q' must be 5-D",
                 id="q-4d"),
]


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("make,exc,msg", BAD)
def test_bad_input(make, exc, msg, backend, monkeypatch):
    monkeypatch.setenv("PYVQ_BACKEND", backend)
    kw = make()
    with pytest.raises(exc, match=msg):
        pyvq.ops.window_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


def test_bad_scale():
    kw = _ok()
    for scale in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="argument 'scale'"):
            pyvq.ops.window_attention(kw["q"], kw["k"], kw["v"], window_size=4, scale=scale)


# The dispatcher ops check for themselves (direct torch.ops calls skip the
# Python checks): (q, k, v, bias_table, window_size, shift, scale) edits.
BAD_CPP = [
    pytest.param(dict(q=torch.randn(2, 2, 6, 8, 4), k=torch.randn(2, 2, 6, 8, 4), v=torch.randn(2, 2, 6, 8, 4)),
                 r"must be a multiple of window_size 4 in both axes, got 6 x 8", id="H-not-multiple"),
    pytest.param(dict(k=torch.randn(2, 2, 8, 4, 4)), r"argument 'k' must have the shape of 'q'", id="k-shape"),
    pytest.param(dict(v=torch.randn(2, 3, 8, 8, 4)), r"argument 'v' must have the shape of 'q'", id="v-heads"),
    pytest.param(dict(k=torch.randn(2, 2, 8, 8, 4, dtype=torch.float64)),
                 r"arguments 'k' and 'q' must have the same dtype", id="k-dtype"),
    pytest.param(dict(bias_table=torch.randn(49, 3)), r"argument 'bias_table' must have shape .*\(49, 2\)",
                 id="bias-heads"),
    pytest.param(dict(bias_table=torch.randn(49)), r"argument 'bias_table' must have shape", id="bias-1d"),
    pytest.param(dict(bias_table=torch.zeros(49, 2, dtype=torch.long)),
                 r"argument 'bias_table' must be a floating-point tensor", id="bias-int"),
    pytest.param(dict(shift=4), r"argument 'shift' must be in \[0, window_size\) = \[0, 4\), got 4", id="shift"),
    pytest.param(dict(shift=-1), r"argument 'shift' must be in \[0, window_size\)", id="shift-neg"),
    pytest.param(dict(window_size=0), r"argument 'window_size' must be in \[1, 32\], got 0", id="window-0"),
    pytest.param(dict(window_size=33), r"argument 'window_size' must be in \[1, 32\], got 33", id="window-33"),
    pytest.param(dict(q=torch.zeros(2, 2, 8, 8, 4, dtype=torch.long)),
                 r"argument 'q' must be a floating-point tensor", id="q-int"),
    pytest.param(dict(q=torch.randn(2, 8, 8, 4)), r"argument 'q' must be 5-D", id="q-4d"),
    pytest.param(dict(scale=float("inf")), r"argument 'scale' must be finite", id="scale"),
]


def _cpp_args(**changes):
    kw = _ok()
    args = dict(q=kw["q"], k=kw["k"], v=kw["v"], bias_table=kw["bias_table"], window_size=4, shift=0, scale=0.5)
    args.update(changes)
    return args


@needs_kernel
@pytest.mark.parametrize("changes,msg", BAD_CPP)
def test_bad_input_cpp_forward(changes, msg):
    a = _cpp_args(**changes)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pyvq.window_attention(a["q"], a["k"], a["v"], a["bias_table"], a["window_size"], a["shift"],
                                        a["scale"])


@needs_kernel
@pytest.mark.parametrize("changes,msg", BAD_CPP)
def test_bad_input_cpp_backward(changes, msg):
    a = _cpp_args(**changes)
    out = torch.zeros(a["q"].shape, dtype=a["q"].dtype)
    lse = torch.zeros(a["q"].shape[:4]) if a["q"].dim() == 5 else torch.zeros(1)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pyvq._window_attention_backward(out, a["q"], a["k"], a["v"], a["bias_table"], out, lse,
                                                  a["window_size"], a["shift"], a["scale"])


@needs_kernel
@pytest.mark.parametrize("which,value,msg", [
    ("grad_out", torch.randn(2, 2, 8, 4, 4), r"argument 'grad_out' must have the shape of 'q'"),
    ("grad_out", torch.randn(2, 2, 8, 8, 4, dtype=torch.float64), r"arguments 'grad_out' and 'q' must have the same"),
    ("out", torch.randn(2, 2, 8, 8, 3), r"argument 'out' must have the shape of 'q'"),
    ("lse", torch.randn(2, 2, 8, 4), r"argument 'lse' must have shape \(B, heads, H, W\) = \[2, 2, 8, 8\]"),
    ("lse", torch.randn(2, 2, 8, 8, dtype=torch.float64), r"argument 'lse' must have dtype Float"),
], ids=["grad_out-shape", "grad_out-dtype", "out-shape", "lse-shape", "lse-dtype"])
def test_bad_input_cpp_backward_saved(which, value, msg):
    kw = _ok()
    q, k, v, table = kw["q"], kw["k"], kw["v"], kw["bias_table"]
    out, lse = torch.ops.pyvq.window_attention(q, k, v, table, 4, 0, 0.5)
    args = dict(grad_out=torch.randn_like(out), out=out, lse=lse)
    args[which] = value
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pyvq._window_attention_backward(args["grad_out"], q, k, v, table, args["out"], args["lse"], 4, 0,
                                                  0.5)
