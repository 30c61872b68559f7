"""pyvq.ops.multinomial_posterior / multinomial_kl (VQ-DDM's multinomial
diffusion posterior) against their reference.

Three layers of checks:

- the definition, for the reference and the public op alike: Bayes' rule
  with explicit K x K transition matrices (products of per-step Q_s, so
  alpha_bar and strided steps are checked too), normalisation, KL >= 0,
  KL -> 0 at the true logits, the schedule's ends (alpha_t = 1,
  alpha_bar_prev = 1), gradcheck, argument errors;
- the public op against the reference, forward and gradients w.r.t. the
  logits, over shapes (*S empty, 1-D, 2-D), K in {1, 2, 7, 64, 1000},
  float32/float64, strided views and empty inputs;
- the kernels' own contract (opcheck of the four dispatcher ops, the
  backward ops against autograd of the reference, errors raised by the C++
  ops, bitwise determinism), skipped while the extension lacks the kernels.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import pyvq
from pyvq import reference

pytestmark = pytest.mark.usefixtures("one_thread")

_OPS = ("multinomial_posterior", "_multinomial_posterior_backward", "multinomial_kl", "_multinomial_kl_backward")
_has_kernel = all(pyvq._backend.has_kernel(op, "cpu") for op in _OPS)
needs_kernel = pytest.mark.skipif(
    not _has_kernel, reason="pyvq._C was built without the multinomial posterior kernels (rebuild the extension)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NEG_INF = float("-inf")
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


# Both implementations must satisfy the definition; the public op is the
# kernel once the extension has it. Looked up at call time.
def _posterior(impl):
    return reference.multinomial_posterior if impl == "reference" else pyvq.ops.multinomial_posterior


def _kl(impl):
    return reference.multinomial_kl if impl == "reference" else pyvq.ops.multinomial_kl


IMPLS = [pytest.param("reference", id="reference"), pytest.param("op", id="pyvq_op")]


# --- helpers -----------------------------------------------------------------

def _alphas(g, B, dtype=torch.float64):
    """(alpha_t, alpha_bar_prev), (B,) each, strictly inside (0, 1)."""
    alpha_t = 1.0 - 0.6 * torch.rand(B, generator=g, dtype=torch.float64) - 1e-3
    alpha_bar_prev = 0.02 + 0.96 * torch.rand(B, generator=g, dtype=torch.float64)
    return alpha_t.to(dtype), alpha_bar_prev.to(dtype)


def _inputs(g, B, K, S, dtype=torch.float64, scale=3.0):
    """x_t, x0 (B, *S) int64 in [0, K); logits (B, K, *S); alphas (B,)."""
    x_t = torch.randint(0, K, (B, *S), generator=g)
    x0 = torch.randint(0, K, (B, *S), generator=g)
    # Make z_t = z_0 at about half the positions (as at small t).
    same = torch.rand(B, *S, generator=g) < 0.5
    x_t = torch.where(same, x0, x_t)
    logits = (scale * torch.randn(B, K, *S, generator=g, dtype=torch.float64)).to(dtype)
    return (x_t, x0, logits, *_alphas(g, B, dtype))


def _assert_close(actual, expected, tol, scaled=False):
    """Same shape, dtype and -inf pattern; finite entries within ``tol``
    (relative, and absolute: times the largest magnitude with ``scaled``)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        actual.shape, expected.shape, actual.dtype, expected.dtype)
    inf_a, inf_e = actual == NEG_INF, expected == NEG_INF
    assert torch.equal(inf_a, inf_e), "the -inf entries differ"
    a, e = actual.masked_fill(inf_a, 0.0), expected.masked_fill(inf_e, 0.0)
    scale = max(1.0, e.abs().max().item()) if scaled and e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale)


def _assert_valid_log_probs(lp, tol):
    """No NaN, nothing above 0, logsumexp over the classes (dim 1) is 0."""
    assert not bool(torch.isnan(lp).any())
    assert bool((lp <= tol).all())
    lse = torch.logsumexp(lp.double(), dim=1)
    torch.testing.assert_close(lse, torch.zeros_like(lse), rtol=0, atol=tol)


def _posterior_and_grad(fn, x_t, logits, alpha_t, alpha_bar_prev, grad_out):
    lg = logits.detach().requires_grad_()
    out = fn(x_t, lg, alpha_t, alpha_bar_prev)
    (g,) = torch.autograd.grad(out, lg, grad_out)
    return out.detach(), g


def _kl_and_grad(fn, x_t, x0, logits, alpha_t, alpha_bar_prev, grad_out):
    lg = logits.detach().requires_grad_()
    out = fn(x_t, x0, lg, alpha_t, alpha_bar_prev)
    (g,) = torch.autograd.grad(out, lg, grad_out)
    return out.detach(), g


def _grad_out(g, shape, dtype):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _grad_out_finite(g, like):
    """A random upstream gradient for log-probabilities: zero at the -inf
    entries (a loss cannot use them), so both sides see the same numbers."""
    go = _grad_out(g, like.shape, like.dtype)
    return go.masked_fill(like == NEG_INF, 0.0)


# --- Bayes' rule with explicit transition matrices -----------------------------

def _Q(alpha, K):
    """The uniform one-step kernel, K x K float64: rows z_{t-1}, columns z_t."""
    return alpha * torch.eye(K, dtype=torch.float64) + (1.0 - alpha) / K * torch.ones(K, K, dtype=torch.float64)


def _Qprod(alphas, K):
    out = torch.eye(K, dtype=torch.float64)
    for a in alphas:
        out = out @ _Q(a, K)
    return out


# Per batch element: the step alphas before z_{t-1} (their product is
# alpha_bar_prev; none: t = 1, alpha_bar_prev = 1) and the alphas of the
# steps from z_{t-1} to z_t (more than one: a strided step, alpha_t is
# their product = alpha_bar_t / alpha_bar_s).
SCHEDULES = [
    ([0.99, 0.95, 0.9], [0.8]),
    ([], [0.9]),  # t = 1
    ([0.99, 0.9], [0.85, 0.7, 0.6]),  # strided
    ([0.9, 0.8], [1.0]),  # alpha_t = 1
    ([0.1, 0.2], [0.05]),  # nearly uniform
    ([0.999], [0.97, 0.99]),
]


def _schedule_tensors():
    alpha_t = torch.tensor([math.prod(s[1]) for s in SCHEDULES], dtype=torch.float64)
    alpha_bar_prev = torch.tensor([math.prod(s[0]) for s in SCHEDULES], dtype=torch.float64)
    return alpha_t, alpha_bar_prev


def _bayes(x_t, x0_probs, K, exact_denominator):
    """(B, K, *S) float64 posterior from the matrices: for each position,
    q(z_{t-1} = k | z_t, p0) = Q_t[k, z_t] (p0 Qbar_{t-1})[k] / norm, where
    norm is q(z_t | z_0) = (p0 Qbar_{t-1} Q_t)[z_t] (``exact_denominator``)
    or the sum over k (the two agree; both are checked)."""
    B = x_t.shape[0]
    flat_t = x_t.reshape(B, -1)
    flat_p = x0_probs.reshape(B, K, -1)
    out = torch.empty(B, K, flat_t.shape[1], dtype=torch.float64)
    for b in range(B):
        Qbar = _Qprod(SCHEDULES[b][0], K)
        Qt = _Qprod(SCHEDULES[b][1], K)
        for n in range(flat_t.shape[1]):
            zt = int(flat_t[b, n])
            p0 = flat_p[b, :, n]
            num = Qt[:, zt] * (p0 @ Qbar)
            norm = (p0 @ Qbar @ Qt)[zt] if exact_denominator else num.sum()
            out[b, :, n] = num / norm
    return out.view(B, K, *x_t.shape[1:])


def _onehot(x0, K):
    return torch.nn.functional.one_hot(x0, K).movedim(-1, 1).double()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_true_posterior_matches_bayes(impl, K):
    g = torch.Generator().manual_seed(K)
    B = len(SCHEDULES)
    x_t, x0, _, _, _ = _inputs(g, B, K, (2, 3))
    # alpha_t = 1 (schedule 3) forces z_t = z_{t-1}; q(z_t | z_0) > 0 always here.
    alpha_t, alpha_bar_prev = _schedule_tensors()
    out = _posterior(impl)(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)
    expect = _bayes(x_t, _onehot(x0, K), K, exact_denominator=True)
    assert out.shape == (B, K, 2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out.exp(), expect, rtol=1e-12, atol=1e-14)
    # zero probability <=> -inf
    assert torch.equal(out == NEG_INF, expect == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_model_posterior_matches_bayes(impl, K):
    g = torch.Generator().manual_seed(10 + K)
    B = len(SCHEDULES)
    x_t, _, logits, _, _ = _inputs(g, B, K, (4,))
    alpha_t, alpha_bar_prev = _schedule_tensors()
    for nc in (None, K):
        out = _posterior(impl)(x_t, logits, alpha_t, alpha_bar_prev, num_classes=nc)
        expect = _bayes(x_t, torch.softmax(logits, 1), K, exact_denominator=False)
        assert out.shape == (B, K, 4) and out.dtype == torch.float64
        torch.testing.assert_close(out.exp(), expect, rtol=1e-12, atol=1e-14)
        assert torch.equal(out == NEG_INF, expect == 0)
    # the sum over k and q(z_t | p0) are the same normaliser
    torch.testing.assert_close(expect, _bayes(x_t, torch.softmax(logits, 1), K, exact_denominator=True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [2, 5])
def test_kl_matches_bayes(impl, K):
    g = torch.Generator().manual_seed(20 + K)
    B = len(SCHEDULES)
    x_t, x0, logits, _, _ = _inputs(g, B, K, (3, 2))
    alpha_t, alpha_bar_prev = _schedule_tensors()
    q = _bayes(x_t, _onehot(x0, K), K, exact_denominator=True)
    p = _bayes(x_t, torch.softmax(logits, 1), K, exact_denominator=False)
    expect = torch.zeros(x_t.shape, dtype=torch.float64)
    for idx in itertools.product(*(range(s) for s in x_t.shape)):
        b, rest = idx[0], idx[1:]
        for k in range(K):
            qk, pk = q[(b, k, *rest)].item(), p[(b, k, *rest)].item()
            if qk > 0:
                expect[idx] += qk * math.log(qk / pk)
    out = _kl(impl)(x_t, x0, logits, alpha_t, alpha_bar_prev)
    assert out.shape == x_t.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)


# --- properties --------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_sum_to_one(impl, dtype):
    g = torch.Generator().manual_seed(30)
    K = 64
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 6, K, (5, 3), dtype)
    alpha_t[0], alpha_bar_prev[1] = 1.0, 1.0
    alpha_t[2] = alpha_bar_prev[2] = 1.0
    x_t[2] = x0[2]  # alpha_bar_t = 1: z_t = z_0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _assert_valid_log_probs(_posterior(impl)(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K), tol)
    _assert_valid_log_probs(_posterior(impl)(x_t, logits, alpha_t, alpha_bar_prev), tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_nonnegative(impl, dtype):
    g = torch.Generator().manual_seed(31)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 8, 7, (6, 5), dtype, scale=5.0)
    kl = _kl(impl)(x_t, x0, logits, alpha_t, alpha_bar_prev)
    assert kl.shape == (8, 6, 5) and kl.dtype == dtype
    assert bool(torch.isfinite(kl).all())
    assert bool((kl >= -(1e-5 if dtype == torch.float32 else 1e-12)).all())
    assert kl.max().item() > 1e-2  # random logits are far from the data


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_vanishes_at_true_logits(impl):
    """logits = c * onehot(z_0): p0 = onehot up to K e^-c, so the model
    posterior tends to the true one and the KL to 0."""
    g = torch.Generator().manual_seed(32)
    K = 7
    x_t, x0, _, alpha_t, alpha_bar_prev = _inputs(g, 4, K, (5,))
    kls = [_kl(impl)(x_t, x0, c * _onehot(x0, K), alpha_t, alpha_bar_prev) for c in (5.0, 15.0, 30.0)]
    assert kls[-1].abs().max().item() < 1e-10
    assert kls[0].max().item() > kls[1].max().item() > kls[2].max().item()
    assert bool((kls[0] > 0).all())
    # and so does the posterior itself
    lq = _posterior(impl)(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)
    lp = _posterior(impl)(x_t, 30.0 * _onehot(x0, K), alpha_t, alpha_bar_prev)
    torch.testing.assert_close(lp, lq, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["alpha_t=1", "alpha_bar_prev=1", "both=1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_schedule_ends(impl, case, dtype):
    """alpha_t = 1: z_{t-1} = z_t, both posteriors are onehot(z_t) and the KL
    is 0. alpha_bar_prev = 1 (t = 1): q = onehot(z_0) and the KL is the
    decoder NLL -log p_theta(z_0 | z_t). Both (then z_t = z_0): KL 0.
    Always finite, with finite gradients."""
    g = torch.Generator().manual_seed(33)
    K, B, S = 6, 3, (4, 5)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, B, K, S, dtype)
    if case != "alpha_bar_prev=1":
        alpha_t.fill_(1.0)
    if case != "alpha_t=1":
        alpha_bar_prev.fill_(1.0)
    if case == "both=1":
        x_t = x0.clone()
    post, kl = _posterior(impl), _kl(impl)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    lq = post(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)
    lg = logits.clone().requires_grad_()
    lp = post(x_t, lg, alpha_t, alpha_bar_prev)
    for lprob in (lq, lp.detach()):
        _assert_valid_log_probs(lprob, tol)
    # one class of probability 1 (to rounding), all others exactly -inf
    hot = _onehot(x0 if case == "alpha_bar_prev=1" else x_t, K).to(dtype)
    for lprob in ((lq,) if case == "alpha_bar_prev=1" else (lq, lp.detach())):
        assert torch.equal(lprob == NEG_INF, hot == 0)
        torch.testing.assert_close(lprob.exp(), hot, rtol=0, atol=tol)
    out = kl(x_t, x0, lg, alpha_t, alpha_bar_prev)
    assert bool(torch.isfinite(out).all()) and bool((out >= -tol).all())
    if case == "alpha_bar_prev=1":
        nll = -lp.detach().gather(1, x0.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(out.detach(), nll, rtol=tol, atol=tol)
        assert out.min().item() > 0
    else:
        assert out.abs().max().item() <= tol
    (grad,) = torch.autograd.grad(out.sum() + (lp.masked_fill(lp == NEG_INF, 0.0)).sum(), lg)
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_no_gradient_through_impossible_classes(impl):
    """Classes of zero probability are constant -inf: an upstream gradient
    on them alone gives the logits a zero gradient."""
    g = torch.Generator().manual_seed(34)
    K = 5
    x_t, _, logits, alpha_t, alpha_bar_prev = _inputs(g, 3, K, (4,))
    alpha_t[1] = 1.0
    lg = logits.clone().requires_grad_()
    out = _posterior(impl)(x_t, lg, alpha_t, alpha_bar_prev)
    dead = out.detach() == NEG_INF
    assert int(dead.sum()) == 4 * (K - 1)
    (grad,) = torch.autograd.grad(out, lg, torch.where(dead, 1.0, 0.0).double())
    assert bool((grad == 0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_index_form_equals_onehot_logits(impl):
    g = torch.Generator().manual_seed(35)
    K = 9
    x_t, x0, _, alpha_t, alpha_bar_prev = _inputs(g, 4, K, (3, 3))
    lq = _posterior(impl)(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)
    lp = _posterior(impl)(x_t, 100.0 * _onehot(x0, K), alpha_t, alpha_bar_prev, num_classes=K)
    torch.testing.assert_close(lp, lq, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_output_dtypes(impl):
    """Logits form and KL: the logits' dtype, whatever the alphas'; index
    form: alpha_t's dtype."""
    g = torch.Generator().manual_seed(36)
    K = 4
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, K, (3,))
    for lg_dtype, a_dtype in [(torch.float32, torch.float64), (torch.float64, torch.float32)]:
        lg = logits.to(lg_dtype)
        at, ab = alpha_t.to(a_dtype), alpha_bar_prev.to(a_dtype)
        assert _posterior(impl)(x_t, lg, at, ab).dtype == lg_dtype
        assert _kl(impl)(x_t, x0, lg, at, ab).dtype == lg_dtype
        assert _posterior(impl)(x_t, x0, at, ab, num_classes=K).dtype == a_dtype
        _assert_close(_posterior(impl)(x_t, lg, at, ab), reference.multinomial_posterior(x_t, lg, at, ab),
                      TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_logits(dtype):
    """The reference computes half inputs in float32 and returns their dtype."""
    g = torch.Generator().manual_seed(37)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, 16, (3,), torch.float32)
    lg = logits.to(dtype)
    out = reference.multinomial_posterior(x_t, lg, alpha_t, alpha_bar_prev)
    kl = reference.multinomial_kl(x_t, x0, lg, alpha_t, alpha_bar_prev)
    assert out.dtype == dtype and kl.dtype == dtype
    torch.testing.assert_close(out, reference.multinomial_posterior(x_t, lg.float(), alpha_t, alpha_bar_prev).to(dtype))
    q = reference.multinomial_posterior(x_t, x0, alpha_t.to(dtype), alpha_bar_prev.to(dtype), num_classes=16)
    assert q.dtype == dtype


# --- gradcheck ---------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S", [(), (3,), (2, 2)], ids=["S0", "S1", "S2"])
def test_gradcheck_posterior(impl, S):
    g = torch.Generator().manual_seed(40)
    x_t, _, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, 4, S, scale=1.0)
    fn = _posterior(impl)
    assert torch.autograd.gradcheck(lambda lg: fn(x_t, lg, alpha_t, alpha_bar_prev), (logits.requires_grad_(),))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S", [(), (3,), (2, 2)], ids=["S0", "S1", "S2"])
def test_gradcheck_kl(impl, S):
    g = torch.Generator().manual_seed(41)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, 4, S, scale=1.0)
    alpha_bar_prev[1] = 1.0  # t = 1 (the decoder NLL) too
    fn = _kl(impl)
    assert torch.autograd.gradcheck(lambda lg: fn(x_t, x0, lg, alpha_t, alpha_bar_prev), (logits.requires_grad_(),))


# --- the op against the reference -------------------------------------------

def _compare_with_reference(x_t, x0, logits, alpha_t, alpha_bar_prev, tol, seed=0):
    """pyvq.ops against pyvq.reference: the three outputs (true posterior,
    model posterior, KL) and the logits' gradients of the last two under
    random upstream gradients. Returns the op's results."""
    g = torch.Generator().manual_seed(seed)
    K = logits.shape[1]
    lq = pyvq.ops.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)
    _assert_close(lq, reference.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K), tol)
    ref_lp = reference.multinomial_posterior(x_t, logits, alpha_t, alpha_bar_prev)
    go = _grad_out_finite(g, ref_lp)
    lp, glp = _posterior_and_grad(pyvq.ops.multinomial_posterior, x_t, logits, alpha_t, alpha_bar_prev, go)
    ref_lp, ref_glp = _posterior_and_grad(reference.multinomial_posterior, x_t, logits, alpha_t, alpha_bar_prev, go)
    _assert_close(lp, ref_lp, tol)
    _assert_close(glp, ref_glp, tol, scaled=True)
    go_kl = _grad_out(g, x_t.shape, logits.dtype)
    kl, gkl = _kl_and_grad(pyvq.ops.multinomial_kl, x_t, x0, logits, alpha_t, alpha_bar_prev, go_kl)
    ref_kl, ref_gkl = _kl_and_grad(reference.multinomial_kl, x_t, x0, logits, alpha_t, alpha_bar_prev, go_kl)
    _assert_close(kl, ref_kl, tol, scaled=True)
    _assert_close(gkl, ref_gkl, tol, scaled=True)
    return lq, lp, glp, kl, gkl


SHAPES = [pytest.param((), id="S0"), pytest.param((5,), id="S5"), pytest.param((4, 3), id="S4x3")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("S", SHAPES)
def test_op_matches_reference(S, K, dtype):
    g = torch.Generator().manual_seed(K * 10 + len(S))
    B = 3
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, B, K, S, dtype)
    lq, lp, glp, kl, gkl = _compare_with_reference(x_t, x0, logits, alpha_t, alpha_bar_prev, TOL[dtype])
    assert lq.shape == lp.shape == glp.shape == (B, K, *S) and kl.shape == (B, *S)
    assert lq.dtype == lp.dtype == kl.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("K", [2, 64])
def test_op_schedule_ends_match_reference(K, dtype):
    """alpha_t = 1 (-inf entries), alpha_bar_prev = 1 and both, batched with
    ordinary alphas."""
    g = torch.Generator().manual_seed(50 + K)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 4, K, (3, 4), dtype)
    alpha_t[0] = 1.0
    alpha_bar_prev[1] = 1.0
    alpha_t[2] = alpha_bar_prev[2] = 1.0
    x_t[2] = x0[2]
    _compare_with_reference(x_t, x0, logits, alpha_t, alpha_bar_prev, TOL[dtype])


@pytest.mark.parametrize("K,S", [pytest.param(1000, (16, 16), id="K1000"), pytest.param(8192, (8, 8), id="K8192")])
def test_op_float32_accuracy(K, S):
    """Large K in float32: the op's error against the float64 reference is
    at most a small multiple of the float32 reference's own error
    (flash-attention's rule, as for half precision), for the three outputs
    and both gradients."""
    g = torch.Generator().manual_seed(55)
    x_t, x0, logits, _, _ = _inputs(g, 4, K, S, torch.float32)
    # late steps (small alpha_bar_prev: q spreads over all K classes) included
    alpha_t = torch.tensor([0.57, 0.7, 0.9, 0.99])
    alpha_bar_prev = torch.tensor([0.47, 0.28, 0.05, 0.9])
    go = _grad_out(g, logits.shape, torch.float32)
    go_kl = _grad_out(g, x_t.shape, torch.float32)

    def run(fns, dt):
        post, kl = fns
        lg, a, ab = logits.to(dt), alpha_t.to(dt), alpha_bar_prev.to(dt)
        return (post(x_t, x0, a, ab, num_classes=K), *_posterior_and_grad(post, x_t, lg, a, ab, go.to(dt)),
                *_kl_and_grad(kl, x_t, x0, lg, a, ab, go_kl.to(dt)))

    ops = (pyvq.ops.multinomial_posterior, pyvq.ops.multinomial_kl)
    refs = (reference.multinomial_posterior, reference.multinomial_kl)
    names = ("true posterior", "model posterior", "its gradient", "KL", "its gradient")
    for name, got, low, exact in zip(names, run(ops, torch.float32), run(refs, torch.float32),
                                     run(refs, torch.float64)):
        err = (got.double() - exact).abs().max().item()
        ref_err = (low.double() - exact).abs().max().item()
        assert err <= 4.0 * ref_err + 1e-7 * max(1.0, exact.abs().max().item()), (name, err, ref_err)


def _strided(kind, g, B, K, dtype=torch.float32):
    """Inputs with (4, 3) spatial dims, one of them laid out non-contiguously."""
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, B, K, (4, 3), dtype)
    if kind == "spatial-transposed":  # all of x_t, x0, logits
        x_t = x_t.transpose(1, 2).contiguous().transpose(1, 2)
        x0 = x0.transpose(1, 2).contiguous().transpose(1, 2)
        logits = logits.transpose(2, 3).contiguous().transpose(2, 3)
    elif kind == "logits-channels-last":
        logits = logits.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    elif kind == "logits-sliced":
        logits = torch.stack([logits, torch.full_like(logits, float("nan"))], -1).flatten(-2)[..., ::2]
    elif kind == "logits-class-sliced":
        logits = torch.cat([logits, torch.full_like(logits, float("nan"))], 1)[:, :K]
    elif kind == "indices-expanded":
        x_t, x0 = x_t[:1].expand_as(x_t), x0[:1].expand_as(x0)
    elif kind == "alphas-sliced":
        alpha_t = torch.stack([alpha_t, torch.full_like(alpha_t, float("nan"))], -1).flatten()[::2]
        alpha_bar_prev = torch.stack([torch.full_like(alpha_bar_prev, 2.0), alpha_bar_prev], -1).flatten()[1::2]
    return x_t, x0, logits, alpha_t, alpha_bar_prev


@pytest.mark.parametrize("kind", ["spatial-transposed", "logits-channels-last", "logits-sliced",
                                  "logits-class-sliced", "indices-expanded", "alphas-sliced"])
def test_op_non_contiguous(kind):
    g = torch.Generator().manual_seed(60)
    args = _strided(kind, g, 3, 7)
    assert not all(t.is_contiguous() for t in args)
    got = _compare_with_reference(*args, TOL[torch.float32])
    dense = _compare_with_reference(*(t.contiguous() for t in args), TOL[torch.float32])
    for a, b in zip(got, dense):
        _assert_close(a, b, TOL[torch.float32], scaled=True)
    assert torch.equal(got[0], dense[0]) and torch.equal(got[1], dense[1]) and torch.equal(got[3], dense[3])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,S", [pytest.param(0, (4,), id="B0"), pytest.param(0, (), id="B0-S0"),
                                 pytest.param(2, (0, 3), id="S0x3"), pytest.param(2, (3, 0), id="S3x0")])
def test_empty(impl, B, S):
    """Empty inputs give empty outputs that still belong to the graph: zero
    gradients of the logits' shape."""
    K = 5
    x_t = torch.zeros(B, *S, dtype=torch.int64)
    x0 = torch.zeros(B, *S, dtype=torch.int64)
    logits = torch.randn(B, K, *S, requires_grad=True)
    alpha_t, alpha_bar_prev = torch.full((B,), 0.9), torch.full((B,), 0.5)
    lq = _posterior(impl)(x_t, x0, alpha_t, alpha_bar_prev, num_classes=K)
    assert lq.shape == (B, K, *S) and lq.dtype == torch.float32
    lp = _posterior(impl)(x_t, logits, alpha_t, alpha_bar_prev)
    kl = _kl(impl)(x_t, x0, logits, alpha_t, alpha_bar_prev)
    assert lp.shape == (B, K, *S) and kl.shape == (B, *S)
    for out in (lp, kl):
        (grad,) = torch.autograd.grad(out, logits, torch.ones_like(out), allow_unused=True)
        if grad is not None:  # None (unused) is a valid zero gradient
            assert grad.shape == logits.shape and bool((grad == 0).all())


def test_op_reference_backend(reference_backend):
    """PYVQ_BACKEND=reference: the op returns the reference's numbers exactly."""
    g = torch.Generator().manual_seed(61)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, 7, (3,), torch.float32)
    assert torch.equal(pyvq.ops.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes=7),
                       reference.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes=7))
    assert torch.equal(pyvq.ops.multinomial_posterior(x_t, logits, alpha_t, alpha_bar_prev),
                       reference.multinomial_posterior(x_t, logits, alpha_t, alpha_bar_prev))
    assert torch.equal(pyvq.ops.multinomial_kl(x_t, x0, logits, alpha_t, alpha_bar_prev),
                       reference.multinomial_kl(x_t, x0, logits, alpha_t, alpha_bar_prev))


def test_op_meta_tensors():
    """Shapes and dtypes on the meta device (no data is read)."""
    B, K, S = 2, 9, (4, 3)
    x_t = torch.empty(B, *S, dtype=torch.int64, device="meta")
    logits = torch.empty(B, K, *S, device="meta")
    a = torch.empty(B, dtype=torch.float64, device="meta")
    out = pyvq.ops.multinomial_posterior(x_t, logits, a, a)
    assert out.shape == (B, K, *S) and out.dtype == torch.float32 and out.device.type == "meta"
    out = pyvq.ops.multinomial_posterior(x_t, x_t, a, a, num_classes=K)
    assert out.shape == (B, K, *S) and out.dtype == torch.float64
    out = pyvq.ops.multinomial_kl(x_t, x_t, logits, a, a)
    assert out.shape == (B, *S) and out.dtype == torch.float32


def test_op_deterministic():
    """Two calls give bitwise-equal outputs and gradients, on 2 threads and on 1."""
    g = torch.Generator().manual_seed(62)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 4, 64, (8, 8), torch.float32)
    go_p = _grad_out(g, logits.shape, torch.float32)
    go_kl = _grad_out(g, x_t.shape, torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            runs.append((pyvq.ops.multinomial_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes=64),
                         *_posterior_and_grad(pyvq.ops.multinomial_posterior, x_t, logits, alpha_t,
                                              alpha_bar_prev, go_p),
                         *_kl_and_grad(pyvq.ops.multinomial_kl, x_t, x0, logits, alpha_t, alpha_bar_prev, go_kl)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# --- instruction sets (csrc/common/cpu_isa.h) ---------------------------------

@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "generic"])
def test_op_matches_reference_under_cpu_isa_cap(isa, monkeypatch):
    """PYVQ_CPU_ISA caps the posterior kernels as it does the codebook's: each
    float32 build (AVX-512, baseline) matches the reference."""
    monkeypatch.setenv("PYVQ_CPU_ISA", isa)
    g = torch.Generator().manual_seed(64)
    _compare_with_reference(*_inputs(g, 3, 64, (8, 8), torch.float32), TOL[torch.float32])


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_op_nan_or_inf_logit_gives_nan(bad, dtype, isa, monkeypatch):
    """Regression (found by tests/ops/test_fuzz.py): the float32 CPU passes
    (fast_exp / fast_log) turned a NaN into a finite number, so a position
    with a NaN or +inf logit got a finite, wrong model posterior instead of
    NaN (the reference's, torch.log_softmax's, and the float64 kernel's
    answer). Other positions are unaffected."""
    monkeypatch.setenv("PYVQ_CPU_ISA", isa)
    g = torch.Generator().manual_seed(5)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, 6, (3,), torch.float64)
    logits = logits.to(dtype)
    logits[0, 2, 1] = bad
    for fn, args in ((pyvq.ops.multinomial_posterior, (x_t, logits, alpha_t, alpha_bar_prev)),
                     (pyvq.ops.multinomial_kl, (x_t, x0, logits, alpha_t, alpha_bar_prev))):
        out = fn(*args).double()
        ref = getattr(reference, fn.__name__)(*args)
        poisoned = torch.isnan(ref.double())
        assert poisoned.any() and torch.isnan(out[poisoned]).all(), (fn.__name__, out)
        torch.testing.assert_close(out[~poisoned], ref.double()[~poisoned], rtol=1e-2, atol=1e-2)


@needs_kernel
def test_cpu_isa_generic_reaches_the_posterior(monkeypatch):
    """On an AVX-512 CPU, PYVQ_CPU_ISA=generic switches the float32 passes to
    their baseline build. The two builds round differently (the AVX-512 one
    fuses multiply-adds), so some outputs must change, while both match the
    reference; the true posterior has one build and stays bitwise equal."""
    monkeypatch.delenv("PYVQ_CPU_ISA", raising=False)
    if pyvq.info()["cpu_isa"] == "generic":
        pytest.skip("this CPU (or build) has no AVX-512 path: the float32 passes have one build")
    g = torch.Generator().manual_seed(65)
    inputs = _inputs(g, 4, 512, (16, 16), torch.float32)
    native = _compare_with_reference(*inputs, TOL[torch.float32])
    monkeypatch.setenv("PYVQ_CPU_ISA", "generic")
    generic = _compare_with_reference(*inputs, TOL[torch.float32])
    assert torch.equal(native[0], generic[0])
    changed = [not torch.equal(a, b) for a, b in zip(native[1:], generic[1:])]
    assert any(changed), "PYVQ_CPU_ISA=generic did not change the float32 posterior kernels' build"


def test_op_torch_compile_fullgraph():
    """A training-loss step traced whole by torch.compile equals eager."""
    g = torch.Generator().manual_seed(63)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, 2, 16, (4, 4), torch.float32)

    def loss_fn(lg):
        kl = pyvq.ops.multinomial_kl(x_t, x0, lg, alpha_t, alpha_bar_prev)
        lp = pyvq.ops.multinomial_posterior(x_t, lg, alpha_t, alpha_bar_prev)
        return kl.mean() + lp.exp().pow(2).mean()

    torch._dynamo.reset()
    lg = logits.clone().requires_grad_()
    eager = loss_fn(lg)
    (g_eager,) = torch.autograd.grad(eager, lg)
    compiled = torch.compile(loss_fn, fullgraph=True)(lg)
    (g_comp,) = torch.autograd.grad(compiled, lg)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_comp, g_eager)


# --- argument checks ---------------------------------------------------------

def _ok(B=2, K=5, S=(3,)):
    g = torch.Generator().manual_seed(70)
    x_t, x0, logits, alpha_t, alpha_bar_prev = _inputs(g, B, K, S, torch.float32)
    return dict(x_t=x_t, x0=x0, logits=logits, alpha_t=alpha_t, alpha_bar_prev=alpha_bar_prev)


def _with(**changes):
    def make():
        args = _ok()
        for k, v in changes.items():
            args[k] = v(args) if callable(v) else v
        return args
    return make


_F = float("nan")
BAD_POSTERIOR = [  # (make -> args, form ("index" | "logits"), num_classes, exception, message)
    (_with(x_t=lambda a: a["x_t"].float()), "logits", None, TypeError, "'x_t'.*int64"),
    (_with(x_t=lambda a: a["x_t"].int()), "index", 5, TypeError, "'x_t'.*int64"),
    (_with(x_t=lambda a: a["x_t"].tolist()), "logits", None, TypeError, "'x_t' must be a torch.Tensor"),
    (_with(x_t=torch.tensor(1)), "logits", None, ValueError, "'x_t'"),
    (_with(x_t=lambda a: a["x_t"].fill_(5)), "index", 5, ValueError, "'x_t'.*\\[0, 5\\)"),
    (_with(x_t=lambda a: a["x_t"].fill_(5)), "logits", None, ValueError, "'x_t'.*\\[0, 5\\)"),
    (_with(x_t=lambda a: a["x_t"].fill_(-1)), "logits", None, ValueError, "'x_t'"),
    (_with(x0=lambda a: a["x0"].fill_(7)), "index", 5, ValueError, "'x0'.*\\[0, 5\\)"),
    (_with(x0=lambda a: a["x0"].fill_(-2)), "index", 5, ValueError, "'x0'"),
    (_with(x0=lambda a: a["x0"].int()), "index", 5, TypeError, "'x0'"),
    (_with(x0=lambda a: a["x0"] > 0), "index", 5, TypeError, "'x0'"),
    (_with(), "index", None, ValueError, "'num_classes'"),
    (_with(), "index", 5.0, TypeError, "'num_classes'"),
    (_with(), "index", 0, ValueError, "'num_classes'"),
    (_with(), "logits", 6, ValueError, "'num_classes'"),
    (_with(x0=lambda a: a["x0"][:, :2]), "index", 5, ValueError, "'x0'"),
    (_with(x0=lambda a: a["x0"][:1]), "index", 5, ValueError, "'x0'"),
    (_with(logits=lambda a: a["logits"][:1]), "logits", None, ValueError, "'x0'"),
    (_with(logits=lambda a: a["logits"][..., :2]), "logits", None, ValueError, "'x0'"),
    (_with(logits=lambda a: a["logits"][:, 0]), "logits", None, ValueError, "'x0'"),
    (_with(logits=lambda a: a["logits"][..., None]), "logits", None, ValueError, "'x0'"),
    (_with(logits=lambda a: a["logits"][:, :0]), "logits", None, ValueError, "K"),
    (_with(alpha_t=lambda a: a["alpha_t"][:, None]), "logits", None, ValueError, "'alpha_t'.*\\(B,\\)"),
    (_with(alpha_t=lambda a: a["alpha_t"][:1]), "index", 5, ValueError, "'alpha_t'"),
    (_with(alpha_t=torch.tensor([0.5, 0.0])), "logits", None, ValueError, "'alpha_t'.*\\(0, 1\\]"),
    (_with(alpha_t=torch.tensor([1.5, 0.5])), "index", 5, ValueError, "'alpha_t'.*\\(0, 1\\]"),
    (_with(alpha_t=torch.tensor([0.5, _F])), "logits", None, ValueError, "'alpha_t'"),
    (_with(alpha_t=torch.tensor([1, 1])), "logits", None, TypeError, "'alpha_t'"),
    (_with(alpha_bar_prev=torch.tensor([-0.5, 0.5])), "logits", None, ValueError, "'alpha_bar_prev'.*\\(0, 1\\]"),
    (_with(alpha_bar_prev=torch.tensor([1.0 + 1e-6, 0.5], dtype=torch.float64)), "index", 5, ValueError,
     "'alpha_bar_prev'"),
    (_with(alpha_bar_prev=torch.tensor([_F, _F])), "index", 5, ValueError, "'alpha_bar_prev'"),
    (_with(alpha_bar_prev=0.5), "logits", None, TypeError, "'alpha_bar_prev'"),
    (_with(alpha_bar_prev=lambda a: a["alpha_bar_prev"][None]), "index", 5, ValueError, "'alpha_bar_prev'"),
    # a second device that always exists: the meta device
    (_with(logits=lambda a: a["logits"].to("meta")), "logits", None, ValueError, "same device"),
]


# The references are pure math on checked arguments; the public op checks its
# arguments whichever backend then computes (PYVQ_BACKEND=reference or kernel).
BACKENDS = [pytest.param("reference", id="reference"), pytest.param("kernel", id="pyvq_op")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,form,num_classes,exc,msg", BAD_POSTERIOR,
                         ids=[f"bad{i}" for i in range(len(BAD_POSTERIOR))])
def test_bad_input_posterior(backend, make, form, num_classes, exc, msg, monkeypatch):
    monkeypatch.setenv("PYVQ_BACKEND", backend)
    a = make()
    x0 = a["x0"] if form == "index" else a["logits"]
    with pytest.raises(exc, match=msg):
        pyvq.ops.multinomial_posterior(a["x_t"], x0, a["alpha_t"], a["alpha_bar_prev"], num_classes=num_classes)


BAD_KL = [  # (make -> args, exception, message)
    (_with(x_t=lambda a: a["x_t"].double()), TypeError, "'x_t'.*int64"),
    (_with(x0=lambda a: a["x0"].float()), TypeError, "'x0'.*int64"),
    (_with(logits=lambda a: a["logits"].long()), TypeError, "'x0_logits'.*floating"),
    (_with(logits=lambda a: a["logits"].tolist()), TypeError, "'x0_logits' must be a torch.Tensor"),
    (_with(x_t=lambda a: a["x_t"].fill_(5)), ValueError, "'x_t'.*\\[0, 5\\)"),
    (_with(x0=lambda a: a["x0"].fill_(5)), ValueError, "'x0'.*\\[0, 5\\)"),
    (_with(x0=lambda a: a["x0"][:, :1]), ValueError, "'x0'"),
    (_with(logits=lambda a: a["logits"][:1]), ValueError, "'x0_logits'"),
    (_with(logits=lambda a: a["logits"][..., 1:]), ValueError, "'x0_logits'"),
    (_with(logits=lambda a: a["logits"][:, 0]), ValueError, "'x0_logits'"),
    (_with(alpha_t=torch.tensor([0.5, 1.01])), ValueError, "'alpha_t'.*\\(0, 1\\]"),
    (_with(alpha_t=torch.tensor([0.5, _F])), ValueError, "'alpha_t'"),
    (_with(alpha_bar_prev=torch.tensor([0.5, 0.5, 0.5])), ValueError, "'alpha_bar_prev'"),
    (_with(alpha_bar_prev=torch.tensor([0.0, 0.5])), ValueError, "'alpha_bar_prev'"),
    (_with(alpha_bar_prev=torch.tensor([1, 1])), TypeError, "'alpha_bar_prev'"),
    (_with(x0=lambda a: a["x0"].to("meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,exc,msg", BAD_KL, ids=[f"bad{i}" for i in range(len(BAD_KL))])
def test_bad_input_kl(backend, make, exc, msg, monkeypatch):
    monkeypatch.setenv("PYVQ_BACKEND", backend)
    a = make()
    with pytest.raises(exc, match=msg):
        pyvq.ops.multinomial_kl(a["x_t"], a["x0"], a["logits"], a["alpha_t"], a["alpha_bar_prev"])


# Errors the dispatcher ops must raise on their own (torch.ops users skip
# the Python checks); matched on the argument they name.
BAD_CPP_POSTERIOR = [  # (make, form, num_classes, message)
    (_with(x_t=lambda a: a["x_t"].fill_(5)), "logits", 5, "x_t"),
    (_with(x_t=lambda a: a["x_t"].fill_(-1)), "index", 5, "x_t"),
    (_with(x0=lambda a: a["x0"].fill_(5)), "index", 5, "x0"),
    (_with(x_t=lambda a: a["x_t"].float()), "logits", 5, "x_t"),
    (_with(logits=lambda a: a["logits"][:1]), "logits", 5, "x0|B"),
    (_with(logits=lambda a: a["logits"][..., :2]), "logits", 5, "x0|shape"),
    (_with(x0=lambda a: a["x0"][:, :2]), "index", 5, "x0|shape"),
    (_with(), "logits", 6, "num_classes"),
    (_with(alpha_t=lambda a: a["alpha_t"][:1]), "logits", 5, "alpha_t"),
    (_with(alpha_bar_prev=lambda a: a["alpha_bar_prev"][:, None]), "index", 5, "alpha_bar_prev"),
]


@needs_kernel
@pytest.mark.parametrize("make,form,num_classes,msg", BAD_CPP_POSTERIOR,
                         ids=[f"bad{i}" for i in range(len(BAD_CPP_POSTERIOR))])
def test_bad_input_cpp_posterior(make, form, num_classes, msg):
    a = make()
    x0 = a["x0"] if form == "index" else a["logits"]
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pyvq.multinomial_posterior(a["x_t"], x0, a["alpha_t"], a["alpha_bar_prev"], num_classes)


BAD_CPP_KL = [  # (make, message)
    (_with(x_t=lambda a: a["x_t"].fill_(5)), "x_t"),
    (_with(x0=lambda a: a["x0"].fill_(-1)), "x0"),
    (_with(x0=lambda a: a["x0"].float()), "x0"),
    (_with(logits=lambda a: a["logits"].long()), "logits"),
    (_with(logits=lambda a: a["logits"][..., 1:]), "logits|shape"),
    (_with(x0=lambda a: a["x0"][:1]), "x0|shape"),
    (_with(alpha_t=lambda a: a["alpha_t"][:1]), "alpha_t"),
]


@needs_kernel
@pytest.mark.parametrize("make,msg", BAD_CPP_KL, ids=[f"bad{i}" for i in range(len(BAD_CPP_KL))])
def test_bad_input_cpp_kl(make, msg):
    a = make()
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pyvq.multinomial_kl(a["x_t"], a["x0"], a["logits"], a["alpha_t"], a["alpha_bar_prev"])


# --- the kernels' own contract ---------------------------------------------------

def _contract_inputs():
    """(id, x_t, x0, logits, alpha_t, alpha_bar_prev): small cases the four
    ops are checked on: *S of 0, 1 and 2 dims, float32 and float64, a
    non-contiguous layout, an empty batch, the schedule's ends."""
    g = torch.Generator().manual_seed(80)
    yield ("S0-f32", *_inputs(g, 3, 7, (), torch.float32))
    yield ("S5-f64", *_inputs(g, 2, 4, (5,), torch.float64))
    x_t, x0, logits, a, ab = _strided("spatial-transposed", g, 2, 6)
    yield "S4x3-transposed", x_t, x0, logits, a, ab
    x_t, x0, logits, a, ab = _inputs(g, 3, 5, (2, 3), torch.float32)
    a[0], ab[1] = 1.0, 1.0
    yield "ends", x_t, x0, logits, a, ab
    yield ("B0", *_inputs(g, 0, 5, (3,), torch.float32))


CONTRACT = list(_contract_inputs())
CONTRACT_IDS = [c[0] for c in CONTRACT]


@needs_kernel
@pytest.mark.parametrize("case", CONTRACT, ids=CONTRACT_IDS)
def test_opcheck_posterior(case):
    _, x_t, x0, logits, a, ab = case
    K = logits.shape[1]
    op = torch.ops.pyvq.multinomial_posterior.default
    torch.library.opcheck(op, (x_t, x0, a, ab, K))
    torch.library.opcheck(op, (x_t, logits.detach().requires_grad_(), a, ab, K))


@needs_kernel
@pytest.mark.parametrize("case", CONTRACT, ids=CONTRACT_IDS)
def test_opcheck_kl(case):
    _, x_t, x0, logits, a, ab = case
    torch.library.opcheck(torch.ops.pyvq.multinomial_kl.default,
                          (x_t, x0, logits.detach().requires_grad_(), a, ab))


@needs_kernel
@pytest.mark.parametrize("case", CONTRACT, ids=CONTRACT_IDS)
def test_opcheck_backward_ops(case):
    _, x_t, x0, logits, a, ab = case
    g = torch.Generator().manual_seed(81)
    grad = _grad_out(g, logits.shape, logits.dtype)
    torch.library.opcheck(torch.ops.pyvq._multinomial_posterior_backward.default, (grad, x_t, logits, a, ab))
    grad = _grad_out(g, x_t.shape, logits.dtype)
    torch.library.opcheck(torch.ops.pyvq._multinomial_kl_backward.default, (grad, x_t, x0, logits, a, ab))


@needs_kernel
@pytest.mark.parametrize("case", CONTRACT, ids=CONTRACT_IDS)
def test_backward_ops_match_reference(case):
    """The private backward ops, called directly, give the gradients autograd
    computes through the reference."""
    _, x_t, x0, logits, a, ab = case
    g = torch.Generator().manual_seed(82)
    tol = TOL[logits.dtype]
    ref_lp = reference.multinomial_posterior(x_t, logits, a, ab)
    go = _grad_out_finite(g, ref_lp)
    _, expect = _posterior_and_grad(reference.multinomial_posterior, x_t, logits, a, ab, go)
    got = torch.ops.pyvq._multinomial_posterior_backward(go, x_t, logits, a, ab)
    _assert_close(got, expect, tol, scaled=True)
    go = _grad_out(g, x_t.shape, logits.dtype)
    _, expect = _kl_and_grad(reference.multinomial_kl, x_t, x0, logits, a, ab, go)
    got = torch.ops.pyvq._multinomial_kl_backward(go, x_t, x0, logits, a, ab)
    _assert_close(got, expect, tol, scaled=True)


@needs_kernel
def test_kernel_forward_ops_match_reference():
    """torch.ops.pyvq.* called directly (no Python checks) equal the reference."""
    g = torch.Generator().manual_seed(83)
    x_t, x0, logits, a, ab = _inputs(g, 3, 11, (2, 5), torch.float64)
    K = 11
    _assert_close(torch.ops.pyvq.multinomial_posterior(x_t, x0, a, ab, K),
                  reference.multinomial_posterior(x_t, x0, a, ab, num_classes=K), TOL[torch.float64])
    _assert_close(torch.ops.pyvq.multinomial_posterior(x_t, logits, a, ab, K),
                  reference.multinomial_posterior(x_t, logits, a, ab), TOL[torch.float64])
    _assert_close(torch.ops.pyvq.multinomial_kl(x_t, x0, logits, a, ab),
                  reference.multinomial_kl(x_t, x0, logits, a, ab), TOL[torch.float64], scaled=True)


# --- CUDA ------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("K", [7, 1000, 8192])
@pytest.mark.parametrize("S", [pytest.param((), id="S0"), pytest.param((16, 16), id="S16x16")])
def test_cuda_matches_reference(S, K):
    """The CUDA kernels (float32) against the CPU reference: the three
    outputs and the logits' gradients; two calls are bitwise equal."""
    g = torch.Generator().manual_seed(90 + K)
    B = 4
    x_t, x0, logits, a, ab = _inputs(g, B, K, S, torch.float32)
    a[0], ab[1] = 1.0, 1.0
    tol = TOL[torch.float32]
    ref_lp = reference.multinomial_posterior(x_t, logits, a, ab)
    go = _grad_out_finite(g, ref_lp)
    go_kl = _grad_out(g, x_t.shape, torch.float32)
    cpu = (reference.multinomial_posterior(x_t, x0, a, ab, num_classes=K),
           *_posterior_and_grad(reference.multinomial_posterior, x_t, logits, a, ab, go),
           *_kl_and_grad(reference.multinomial_kl, x_t, x0, logits, a, ab, go_kl))
    dev = [t.cuda() for t in (x_t, x0, logits, a, ab, go, go_kl)]
    c_x_t, c_x0, c_logits, c_a, c_ab, c_go, c_go_kl = dev

    def run():
        return (pyvq.ops.multinomial_posterior(c_x_t, c_x0, c_a, c_ab, num_classes=K),
                *_posterior_and_grad(pyvq.ops.multinomial_posterior, c_x_t, c_logits, c_a, c_ab, c_go),
                *_kl_and_grad(pyvq.ops.multinomial_kl, c_x_t, c_x0, c_logits, c_a, c_ab, c_go_kl))

    first, second = run(), run()
    for got, again, expect, scaled in zip(first, second, cpu, (False, False, True, True, True)):
        assert got.is_cuda
        _assert_close(got.cpu(), expect, tol, scaled=scaled)
        assert torch.equal(got, again)
