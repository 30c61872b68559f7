"""The Triton ops of pyvq.ops.window_attention
(``torch.ops.pyvq.window_attention_triton`` and its backward) against
pyvq.reference.window_attention.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1``); on a GPU machine the same
tests run on CUDA tensors. Shapes stay small (the interpreter is numpy, one
program at a time). Covered: windows 2/4/7/8 and two multi-block windows
(12: partial key/query blocks, 16: four blocks, with the shift mask hiding
whole blocks from some queries), square and non-square grids, with and
without shift and bias, B * heads > 1, gradients of q, k, v and the bias
table, float64 / float16 / bfloat16, lse against torch.logsumexp, strided
inputs as a layer makes them, empty inputs, the deterministic bias-gradient
path, and opcheck.
"""

from __future__ import annotations


import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (the window-attention Triton kernels need it)")

import pyvq.ops._window_attention_triton  # noqa: E402,F401  (registers the Triton ops)
from pyvq import reference  # noqa: E402
from pyvq.reference.window_attention import relative_position_index, shift_mask  # noqa: E402
from tests.conftest import half_precision_bound, triton_device  # noqa: E402

DEVICE = triton_device()
INTERPRETED = DEVICE == "cpu"

FWD = torch.ops.pyvq.window_attention_triton
BWD = torch.ops.pyvq._window_attention_triton_backward

# (B, heads, H, W, head_dim, window, shift, bias)
CASES = [
    pytest.param(1, 1, 4, 4, 8, 2, 0, False, id="w2"),
    pytest.param(1, 2, 4, 6, 8, 2, 1, True, id="w2-shift-bias-4x6"),
    pytest.param(2, 1, 8, 16, 16, 4, 0, True, id="w4-bias-8x16"),
    pytest.param(1, 2, 8, 16, 8, 4, 2, True, id="w4-shift-bias-8x16"),
    pytest.param(2, 2, 8, 8, 8, 4, 2, False, id="w4-shift"),
    pytest.param(1, 1, 14, 21, 8, 7, 0, False, id="w7-14x21"),
    pytest.param(1, 1, 14, 21, 8, 7, 3, True, id="w7-shift-bias-14x21"),
    pytest.param(1, 2, 16, 8, 16, 8, 4, True, id="w8-shift-bias-16x8"),
    pytest.param(1, 1, 24, 24, 8, 12, 6, True, id="w12-shift-bias-multiblock"),
    pytest.param(1, 1, 16, 16, 8, 16, 8, True, id="w16-shift-bias-multiblock"),
]


def _inputs(B, heads, H, W, d, w, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn((2 * w - 1) ** 2, heads, generator=g, dtype=torch.float64) if bias else None
    conv = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype).requires_grad_()  # noqa: E731
    return conv(q), conv(k), conv(v), conv(table)


def _grads(out, inputs, grad):
    """Gradients of ``(out * grad).sum()`` w.r.t. the inputs that are not None."""
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, present, grad)


def _reference(q, k, v, table, w, shift, scale=None):
    return reference.window_attention(q, k, v, window_size=w, shift=shift, bias_table=table, scale=scale)


# --- float32 against the reference: forward and gradients --------------------

@pytest.mark.parametrize("B, heads, H, W, d, w, shift, bias", CASES)
def test_matches_reference_float32(B, heads, H, W, d, w, shift, bias):
    q, k, v, table = _inputs(B, heads, H, W, d, w, bias)
    scale = d ** -0.5
    out, lse = FWD(q, k, v, table, w, shift, scale)
    ref = _reference(q, k, v, table, w, shift)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, heads, H, W) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = _grads(out, (q, k, v, table), grad)
    theirs = _grads(ref, (q, k, v, table), grad)
    for name, a, b in zip(("q", "k", "v", "bias_table"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_nondefault_scale_and_float64():
    q, k, v, table = _inputs(1, 2, 8, 8, 8, 4, True, dtype=torch.float64)
    out, lse = FWD(q, k, v, table, 4, 2, 0.7)
    ref = _reference(q, k, v, table, 4, 2, scale=0.7)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    for a, b in zip(_grads(out, (q, k, v, table), grad), _grads(ref, (q, k, v, table), grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


# --- half precision: flash-attention's bound against a float64 oracle ---------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("w, shift, H, W", [(4, 2, 8, 16), (7, 3, 14, 14)], ids=["w4-8x16", "w7-14x14"])
def test_half_precision_bound(dtype, w, shift, H, W):
    q, k, v, table = _inputs(1, 2, H, W, 16, w, True, dtype=dtype, seed=2)
    out, lse = FWD(q, k, v, table, w, shift, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    low = _reference(q, k, v, table, w, shift, scale=0.25)
    q64, k64, v64, t64 = (t.detach().double().requires_grad_() for t in (q, k, v, table))
    ref64 = _reference(q64, k64, v64, t64, w, shift, scale=0.25)
    half_precision_bound(out, low, ref64, atol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours = _grads(out, (q, k, v, table), grad.to(dtype))
    lows = _grads(low, (q, k, v, table), grad.to(dtype))
    oracle = _grads(ref64, (q64, k64, v64, t64), grad.to(dtype).double())
    for a, lo, o in zip(ours, lows, oracle):
        assert a.dtype == dtype
        half_precision_bound(a, lo, o, atol=1e-6 * o.abs().max().item())


# --- lse ------------------------------------------------------------------------

def _reference_lse(q, k, table, w, shift, scale):
    """(B, heads, H, W) logsumexp of each token's window scores, written out
    with an explicit roll / partition / reverse."""
    B, heads, H, W, d = q.shape
    qr, kr = (torch.roll(t.double(), (-shift, -shift), (2, 3)) for t in (q, k))
    n_windows = (H // w) * (W // w)
    part = lambda t: t.reshape(B, heads, H // w, w, W // w, w, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(  # noqa: E731
        B, heads, n_windows, w * w, d)
    s = part(qr) @ part(kr).transpose(-1, -2) * scale  # (B, heads, nW, w*w, w*w)
    if table is not None:
        idx = relative_position_index(w, device=q.device)
        s = s + table.double()[idx].permute(2, 0, 1)[None, :, None]
    mask = shift_mask(H, W, w, shift, device=q.device)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, heads, nW, w*w)
    lse = lse.reshape(B, heads, H // w, W // w, w, w).permute(0, 1, 2, 4, 3, 5).reshape(B, heads, H, W)
    return torch.roll(lse, (shift, shift), (2, 3))


@pytest.mark.parametrize("w, shift, H, W", [(4, 2, 8, 12), (7, 3, 14, 21)], ids=["w4-shift", "w7-shift"])
def test_lse_is_logsumexp_of_scores(w, shift, H, W):
    q, k, v, table = _inputs(2, 2, H, W, 8, w, True)
    _, lse = FWD(q, k, v, table, w, shift, 0.4)
    torch.testing.assert_close(lse.double(), _reference_lse(q, k, table, w, shift, 0.4), rtol=1e-5, atol=1e-5)


# --- strides ------------------------------------------------------------------------

def test_strided_inputs_as_a_layer_makes_them():
    B, H, W, heads, d, w, shift = 2, 8, 8, 2, 8, 4, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, H, W, 3 * heads * d, generator=g).to(DEVICE)
    # (B, H, W, 3, heads, d) -> (3, B, heads, H, W, d): q, k, v are strided views.
    qkv = x.reshape(B, H, W, 3, heads, d).permute(3, 0, 4, 1, 2, 5)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    assert not q.is_contiguous()
    # A transposed bias table (strides (1, T)).
    table = torch.randn(heads, (2 * w - 1) ** 2, generator=g).to(DEVICE).t().detach().requires_grad_()
    assert table.stride() == (1, (2 * w - 1) ** 2)
    out, _ = FWD(q, k, v, table, w, shift, d ** -0.5)
    ref = _reference(q, k, v, table, w, shift)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # A non-contiguous upstream gradient (a transposed copy), and a stride-0 one (from .sum()).
    grad = torch.randn(B, heads, W, H, d, generator=g).to(DEVICE).transpose(2, 3)
    for a, b in zip(_grads(out, (q, k, v, table), grad), _grads(ref, (q, k, v, table), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out, _ = FWD(q, k, v, table, w, shift, d ** -0.5)
    ours = torch.autograd.grad(out.sum(), (q, k, v, table))
    theirs = torch.autograd.grad(_reference(q, k, v, table, w, shift).sum(), (q, k, v, table))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_backward_op_takes_strided_out_and_lse():
    q, k, v, table = (t.detach() if t is not None else None for t in _inputs(1, 2, 8, 8, 8, 4, True))
    out, lse = FWD(q, k, v, table, 4, 2, 0.35)
    grad = torch.randn_like(out)
    expected = BWD(grad, q, k, v, table, out, lse, 4, 2, 0.35)
    # Same values through transposed storage (out, lse and grad_out strided).
    t_out = out.transpose(2, 3).contiguous().transpose(2, 3)
    t_lse = lse.transpose(2, 3).contiguous().transpose(2, 3)
    t_grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    got = BWD(t_grad, q, k, v, table, t_out, t_lse, 4, 2, 0.35)
    for a, b in zip(got, expected):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- empty inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 2, 8, 8, 8), (1, 0, 8, 8, 8), (1, 2, 0, 8, 8), (1, 2, 8, 0, 8)],
                         ids=["B0", "heads0", "H0", "W0"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_empty_inputs(shape, bias):
    heads = shape[1]
    q, k, v = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    table = torch.randn(49, heads, device=DEVICE, requires_grad=True) if bias else None
    out, lse = FWD(q, k, v, table, 4, 2, 0.5)
    assert out.shape == shape and lse.shape == shape[:4] and lse.dtype == torch.float32
    gq, gk, gv, gb = BWD(torch.zeros_like(out), q, k, v, table, out, lse, 4, 2, 0.5)
    assert gq.shape == gk.shape == gv.shape == shape
    if bias:
        assert gb.shape == table.shape and gb.dtype == table.dtype and not gb.any()
    else:
        assert gb.shape == (0,) and gb.dtype == q.dtype


def test_zero_head_dim_keeps_lse():
    """head_dim 0: out is empty but each token's lse is that of its bias
    scores (q k^T is 0)."""
    q, k, v = (torch.randn(1, 2, 8, 8, 0, device=DEVICE) for _ in range(3))
    table = torch.randn(49, 2, device=DEVICE)
    out, lse = FWD(q, k, v, table, 4, 2, 1.0)
    assert out.shape == q.shape
    torch.testing.assert_close(lse.double(), _reference_lse(q, k, table, 4, 2, 1.0), rtol=1e-6, atol=1e-6)


def test_no_bias_table_gives_empty_grad_bias():
    q, k, v, _ = (t.detach() if t is not None else None for t in _inputs(1, 1, 4, 4, 8, 2, False))
    out, lse = FWD(q, k, v, None, 2, 1, 0.3)
    gb = BWD(torch.ones_like(out), q, k, v, None, out, lse, 2, 1, 0.3)[3]
    assert gb.shape == (0,) and gb.dtype == q.dtype


# --- determinism -----------------------------------------------------------------------

@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.usefixtures("deterministic_algorithms")
def test_deterministic_bias_gradient_path():
    """Under torch.use_deterministic_algorithms(True) the bias gradient is
    summed in a fixed order (no atomics): equal to the reference's, and
    bitwise equal run to run (as are q, k, v gradients on either path)."""
    q, k, v, table = _inputs(1, 1, 8, 8, 8, 4, True)
    ref = _reference(q, k, v, table, 4, 2)
    grad = torch.randn_like(ref)
    theirs = _grads(ref, (q, k, v, table), grad)
    runs = []
    for _ in range(2):
        out, _ = FWD(q, k, v, table, 4, 2, 8 ** -0.5)
        runs.append(_grads(out, (q, k, v, table), grad))
    for a, b, c in zip(runs[0], runs[1], theirs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


# --- opcheck -------------------------------------------------------------------------------

def _opcheck_both(bias, tests):
    q, k, v, table = _inputs(1, 2, 8, 8, 8, 4, bias)
    torch.library.opcheck(FWD, (q, k, v, table, 4, 2, 0.35), test_utils=tests)
    with torch.no_grad():
        out, lse = FWD(q, k, v, table, 4, 2, 0.35)
    args = (torch.randn_like(out), *(t.detach() if t is not None else None for t in (q, k, v, table)), out, lse,
            4, 2, 0.35)
    torch.library.opcheck(BWD, args, test_utils=tests)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(bias):
    _opcheck_both(bias, ("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_aot_dispatch(bias):
    if INTERPRETED:
        pytest.skip("opcheck's test_aot_dispatch_dynamic traces into the triton_op and launches its kernels on "
                    "fake tensors, which Triton's interpreter cannot read (no data pointer); needs a CUDA device")
    _opcheck_both(bias, ("test_aot_dispatch_dynamic",))
