"""The Triton ops of pyvq.ops.multigrained_attention
(``torch.ops.pyvq.multigrained_attention_triton`` and its backward) against
pyvq.reference.multigrained_attention.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1``); on a GPU machine the same
tests run on CUDA tensors. Shapes stay small (the interpreter is numpy, one
program at a time). Covered: block sizes 1/2/4/8 and Ws = H (16: four query
tiles per block), halo 0/1/2, halo > Ws (key blocks reached by query blocks
two blocks away) and halo >= H (clipped), G = 0 / 1 / the block count / more
than the block count (two global tiles), square and non-square grids,
B * heads > 1, gradients of all five tensors, float64 / float16 / bfloat16,
lse against torch.logsumexp of explicitly built scores, strided inputs
(views of a permuted qkv tensor), empty inputs, head_dim 0, run-to-run
reproducibility, the public op's dispatch, gradcheck and opcheck.
"""

from __future__ import annotations

import importlib

import pytest
import torch

triton = pytest.importorskip("triton",
                             reason="Triton is not installed (the multi-grained attention Triton kernels need it)")

import pyvq.ops._multigrained_attention_triton  # noqa: E402,F401  (registers the Triton ops)
from pyvq import reference  # noqa: E402
from tests.conftest import half_precision_bound, triton_device  # noqa: E402

DEVICE = triton_device()
INTERPRETED = DEVICE == "cpu"

FWD = torch.ops.pyvq.multigrained_attention_triton
BWD = torch.ops.pyvq._multigrained_attention_triton_backward
NAMES = ("q", "k", "v", "global_k", "global_v")

# (B, heads, H, W, head_dim, block_size, halo, G)
CASES = [
    pytest.param(1, 1, 4, 4, 8, 1, 1, 16, id="ws1-halo1-G=nB"),
    pytest.param(1, 2, 4, 6, 8, 2, 0, 0, id="ws2-halo0-G0-4x6"),
    pytest.param(1, 1, 8, 8, 8, 2, 1, 16, id="ws2-halo1-G=nB"),
    pytest.param(1, 1, 8, 8, 8, 2, 3, 20, id="ws2-halo3-G>nB"),
    pytest.param(2, 2, 8, 16, 8, 4, 2, 8, id="ws4-halo2-G=nB-8x16"),
    pytest.param(1, 2, 16, 8, 16, 4, 1, 1, id="ws4-halo1-G1-16x8"),
    pytest.param(1, 1, 16, 16, 16, 8, 2, 4, id="ws8-halo2-G=nB"),
    pytest.param(1, 1, 8, 16, 8, 8, 20, 5, id="ws8-halo>=H-G>nB"),
    pytest.param(1, 1, 16, 16, 8, 16, 2, 1, id="ws=H=16-multitile"),
]


def _inputs(B, heads, H, W, d, G, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) for _ in range(3))
    gk, gv = (torch.randn(B, heads, G, d, generator=g, dtype=torch.float64) for _ in range(2))
    return tuple(t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (q, k, v, gk, gv))


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _reference(tensors, ws, halo, scale=None):
    return reference.multigrained_attention(*tensors, block_size=ws, halo=halo, scale=scale)


def _check_grads(ours, theirs, **tol):
    for name, a, b in zip(NAMES, ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous(), name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


# --- float32 against the reference: forward and gradients --------------------

@pytest.mark.parametrize("B, heads, H, W, d, ws, halo, G", CASES)
def test_matches_reference_float32(B, heads, H, W, d, ws, halo, G):
    tensors = _inputs(B, heads, H, W, d, G)
    out, lse = FWD(*tensors, ws, halo, d ** -0.5)
    ref = _reference(tensors, ws, halo)
    assert out.shape == tensors[0].shape and out.dtype == torch.float32 and out.is_contiguous()
    assert lse.shape == (B, heads, H, W) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check_grads(_grads(out, tensors, grad), _grads(ref, tensors, grad), rtol=1e-4, atol=1e-4)


def test_nondefault_scale_and_float64():
    tensors = _inputs(1, 2, 8, 12, 8, 6, dtype=torch.float64)
    out, lse = FWD(*tensors, 4, 1, 0.7)
    ref = _reference(tensors, 4, 1, scale=0.7)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    _check_grads(_grads(out, tensors, grad), _grads(ref, tensors, grad), rtol=1e-11, atol=1e-11)


def test_gradcheck_float64():
    tensors = _inputs(1, 1, 4, 4, 4, 3, dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda *t: FWD(*t, 2, 1, 0.6)[0], tensors, fast_mode=True)


# --- half precision: flash-attention's bound against a float64 oracle ---------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("ws, halo, H, W, G", [(4, 2, 8, 16, 8), (2, 1, 8, 8, 20)], ids=["ws4-8x16", "ws2-G>nB"])
def test_half_precision_bound(dtype, ws, halo, H, W, G):
    tensors = _inputs(1, 2, H, W, 16, G, dtype=dtype, seed=2)
    out, lse = FWD(*tensors, ws, halo, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    low = _reference(tensors, ws, halo, scale=0.25)
    t64 = tuple(t.detach().double().requires_grad_() for t in tensors)
    ref64 = _reference(t64, ws, halo, scale=0.25)
    half_precision_bound(out, low, ref64, atol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE).to(dtype)
    ours, lows = _grads(out, tensors, grad), _grads(low, tensors, grad)
    oracle = _grads(ref64, t64, grad.double())
    for name, a, lo, o in zip(NAMES, ours, lows, oracle):
        assert a.dtype == dtype, name
        half_precision_bound(a, lo, o, atol=1e-6 * o.abs().max().item())


# --- lse ------------------------------------------------------------------------

def _reference_lse(q, k, gk, ws, halo, scale):
    """(B, heads, H, W) logsumexp of each query's scores against the whole
    grid (keys outside its block's extended window set to -inf) and the
    global keys, written out densely."""
    B, heads, H, W, d = q.shape
    rows = torch.arange(H, device=q.device)
    cols = torch.arange(W, device=q.device)

    def near(n, idx):  # (n, n): key idx within halo of the query's block
        lo = (idx // ws) * ws - halo
        return (idx[None, :] >= lo[:, None]) & (idx[None, :] < lo[:, None] + ws + 2 * halo)

    mask = near(H, rows)[:, None, :, None] & near(W, cols)[None, :, None, :]  # (H, W, H, W)
    mask = mask.reshape(H * W, H * W)
    qf = q.double().reshape(B, heads, H * W, d)
    local = (qf @ k.double().reshape(B, heads, H * W, d).transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    glob = qf @ gk.double().transpose(-1, -2) * scale
    return torch.logsumexp(torch.cat([local, glob], dim=-1), dim=-1).reshape(B, heads, H, W)


@pytest.mark.parametrize("ws, halo, H, W, G", [(2, 1, 6, 8, 12), (4, 3, 8, 12, 0)], ids=["ws2-halo1", "ws4-halo3-G0"])
def test_lse_is_logsumexp_of_scores(ws, halo, H, W, G):
    q, k, v, gk, gv = _inputs(2, 2, H, W, 8, G)
    _, lse = FWD(q, k, v, gk, gv, ws, halo, 0.4)
    torch.testing.assert_close(lse.double(), _reference_lse(q, k, gk, ws, halo, 0.4), rtol=1e-5, atol=1e-5)


# --- strides ------------------------------------------------------------------------

def test_strided_inputs_as_a_layer_makes_them():
    B, H, W, heads, d, ws, halo = 2, 8, 8, 2, 8, 4, 2
    G = (H // ws) * (W // ws)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, H, W, 3 * heads * d, generator=g).to(DEVICE)
    # (B, H, W, 3, heads, d) -> (3, B, heads, H, W, d): q, k, v are strided views.
    qkv = x.reshape(B, H, W, 3, heads, d).permute(3, 0, 4, 1, 2, 5)
    # (B, G, 2, heads, d) -> (2, B, heads, G, d): global_k, global_v likewise.
    kv = torch.randn(B, G, 2 * heads * d, generator=g).to(DEVICE).reshape(B, G, 2, heads, d).permute(2, 0, 3, 1, 4)
    tensors = tuple(t.detach().requires_grad_() for t in (*qkv.unbind(0), *kv.unbind(0)))
    assert not any(t.is_contiguous() for t in tensors)
    out, _ = FWD(*tensors, ws, halo, d ** -0.5)
    ref = _reference(tensors, ws, halo)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # A non-contiguous upstream gradient (a transposed copy), and a stride-0 one (from .sum()).
    grad = torch.randn(B, heads, W, H, d, generator=g).to(DEVICE).transpose(2, 3)
    _check_grads(_grads(out, tensors, grad), _grads(ref, tensors, grad), rtol=1e-4, atol=1e-4)
    out, _ = FWD(*tensors, ws, halo, d ** -0.5)
    ours = torch.autograd.grad(out.sum(), tensors)
    theirs = torch.autograd.grad(_reference(tensors, ws, halo).sum(), tensors)
    _check_grads(ours, theirs, rtol=1e-4, atol=1e-4)


def test_backward_op_takes_strided_out_and_lse():
    tensors = tuple(t.detach() for t in _inputs(1, 2, 8, 8, 8, 4))
    out, lse = FWD(*tensors, 4, 1, 0.35)
    grad = torch.randn_like(out)
    expected = BWD(grad, *tensors, out, lse, 4, 1, 0.35)
    # Same values through transposed storage (out, lse and grad_out strided).
    t_out, t_lse, t_grad = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (out, lse, grad))
    got = BWD(t_grad, *tensors, t_out, t_lse, 4, 1, 0.35)
    for a, b in zip(got, expected):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- empty inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 2, 8, 8, 8), (1, 0, 8, 8, 8), (1, 2, 0, 8, 8), (1, 2, 8, 0, 8)],
                         ids=["B0", "heads0", "H0", "W0"])
@pytest.mark.parametrize("G", [0, 3], ids=["G0", "G3"])
def test_empty_inputs(shape, G):
    B, heads, H, W, d = shape
    q, k, v = (torch.randn(shape, device=DEVICE) for _ in range(3))
    gk, gv = (torch.randn(B, heads, G, d, device=DEVICE) for _ in range(2))
    out, lse = FWD(q, k, v, gk, gv, 4, 2, 0.5)
    assert out.shape == shape and lse.shape == shape[:4] and lse.dtype == torch.float32
    grads = BWD(torch.zeros_like(out), q, k, v, gk, gv, out, lse, 4, 2, 0.5)
    for name, g, t in zip(NAMES, grads, (q, k, v, gk, gv)):
        assert g.shape == t.shape and g.dtype == t.dtype, name
    # No query attends to the globals: their gradients are zero, not garbage.
    assert not grads[3].any() and not grads[4].any()


def test_zero_head_dim_keeps_lse():
    """head_dim 0: out is empty but every score is 0, so each query's lse is
    log(its clipped window's key count + G)."""
    H, W, ws, halo, G = 8, 12, 4, 1, 5
    q, k, v = (torch.randn(1, 2, H, W, 0, device=DEVICE) for _ in range(3))
    gk, gv = (torch.randn(1, 2, G, 0, device=DEVICE) for _ in range(2))
    out, lse = FWD(q, k, v, gk, gv, ws, halo, 1.0)
    assert out.shape == q.shape
    torch.testing.assert_close(lse.double(), _reference_lse(q, k, gk, ws, halo, 1.0), rtol=1e-6, atol=1e-6)


# --- determinism and the public op --------------------------------------------------

@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "use_deterministic_algorithms"])
def test_gradients_are_reproducible(deterministic):
    """No atomics in any pass: gradients are bitwise equal run to run, with or
    without torch.use_deterministic_algorithms(True)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        tensors = _inputs(1, 1, 8, 8, 8, 4)
        grad = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(6)).to(DEVICE)
        runs = [_grads(FWD(*tensors, 2, 3, 0.35)[0], tensors, grad) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


def test_public_op_dispatches_to_the_triton_op(monkeypatch):
    """pyvq.ops.multigrained_attention's CUDA branch (forced here onto
    ``DEVICE``) imports this module and calls the Triton op, with autograd."""
    module = importlib.import_module("pyvq.ops.multigrained_attention")
    calls = []
    monkeypatch.setattr(module, "use_triton", lambda t: calls.append(t.device) or True)
    tensors = _inputs(1, 2, 8, 8, 8, 4)
    out = module.multigrained_attention(*tensors, block_size=4, halo=1)
    assert calls
    torch.testing.assert_close(out, FWD(*tensors, 4, 1, 8 ** -0.5)[0], rtol=0, atol=0)
    ref = _reference(tensors, 4, 1)
    grad = torch.randn_like(ref)
    _check_grads(_grads(out, tensors, grad), _grads(ref, tensors, grad), rtol=1e-4, atol=1e-4)


# --- opcheck -------------------------------------------------------------------------------

def _opcheck_both(G, tests):
    tensors = _inputs(1, 2, 8, 8, 8, G)
    torch.library.opcheck(FWD, (*tensors, 4, 1, 0.35), test_utils=tests)
    with torch.no_grad():
        out, lse = FWD(*tensors, 4, 1, 0.35)
    args = (torch.randn_like(out), *(t.detach() for t in tensors), out, lse, 4, 1, 0.35)
    torch.library.opcheck(BWD, args, test_utils=tests)


@pytest.mark.parametrize("G", [0, 4], ids=["G0", "G4"])
def test_opcheck(G):
    _opcheck_both(G, ("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("G", [0, 4], ids=["G0", "G4"])
def test_opcheck_aot_dispatch(G):
    if INTERPRETED:
        pytest.skip("opcheck's test_aot_dispatch_dynamic traces into the triton_op and launches its kernels on "
                    "fake tensors, which Triton's interpreter cannot read (no data pointer); needs a CUDA device")
    _opcheck_both(G, ("test_aot_dispatch_dynamic",))
