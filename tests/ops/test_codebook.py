"""pyvq.ops.nearest_code against its plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import pyvq
from pyvq import reference
from pyvq.reference.codebook import distance_to
from pyvq.ops import nearest_code
from tests.conftest import half_precision_bound

ISAS = ["native", "generic"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Run with the CPU's best kernel and with the portable one."""
    if request.param == "generic":
        monkeypatch.setenv("PYVQ_CPU_ISA", "generic")
    return request.param


def oracle(x, codebook, metric="l2"):
    """The reference computed in float64."""
    return reference.nearest_code(x.double(), codebook.double(), metric=metric)


def assert_matches_oracle(x, codebook, idx, dist, metric="l2", dist_tol=1e-4):
    """Indices equal the float64 argmin, except where the two candidates'
    float64 distances tie within rounding; distances match."""
    ref_idx, ref_dist = oracle(x, codebook, metric)
    assert idx.shape == ref_idx.shape and idx.dtype == torch.long
    assert dist.shape == ref_dist.shape and dist.dtype == x.dtype
    flat_x = x.double().reshape(-1, x.shape[-1])
    ours = distance_to(flat_x, codebook.double()[idx.reshape(-1)], metric)
    best = ref_dist.reshape(-1)
    # Our choice must be as good as the best, up to float32 rounding.
    scale = 1 + flat_x.pow(2).sum(1) + codebook.double().pow(2).sum(1).max()
    assert bool(((ours - best) <= 1e-5 * scale).all())
    mismatch = (idx != ref_idx).double().mean().item()
    assert mismatch <= 0.01, mismatch
    torch.testing.assert_close(dist.double(), ref_dist.to(x.dtype).double(),
                               rtol=dist_tol, atol=dist_tol)


SHAPES = [  # (rows, K, D): K not a multiple of 12, rows not of 32, D odd, ...
    (1, 1, 1),
    (7, 3, 5),
    (33, 13, 16),
    (100, 25, 3),
    (257, 100, 64),
    (600, 513, 32),
    (70, 1000, 256),
]


@pytest.mark.parametrize("n,k,d", SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(n, k, d, metric, dtype, isa):
    g = torch.Generator().manual_seed(n * 1000 + k + d)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    cb = torch.randn(k, d, generator=g, dtype=dtype)
    idx, dist = nearest_code(x, cb, metric=metric)
    assert_matches_oracle(x, cb, idx, dist, metric,
                          dist_tol=1e-4 if dtype == torch.float32 else 1e-10)
    if dtype == torch.float64:  # exact ties aside, float64 agrees everywhere
        assert torch.equal(idx, oracle(x, cb, metric)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_half_precision(dtype, metric, isa):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 24, generator=g).to(dtype)
    cb = torch.randn(50, 24, generator=g).to(dtype)
    idx, dist = nearest_code(x, cb, metric=metric)
    assert dist.dtype == dtype
    ref_idx, ref64 = oracle(x, cb, metric)  # exact inputs, float64 math
    assert (idx != ref_idx).double().mean() <= 0.01
    # The distance to the chosen code against float64, as the reference
    # itself does in the same dtype.
    _, ref_low = reference.nearest_code(x, cb, metric=metric)
    ours64 = distance_to(x.double(), cb.double()[idx], metric)
    half_precision_bound(dist, ref_low, ours64, atol=1e-6)


def test_mixed_dtypes():
    x = torch.randn(50, 8)
    cb = torch.randn(20, 8, dtype=torch.float64)
    idx, dist = nearest_code(x, cb)
    assert dist.dtype == torch.float32
    assert torch.equal(idx, oracle(x, cb)[0])
    idx2, dist2 = nearest_code(x.bfloat16(), cb.float())
    assert dist2.dtype == torch.bfloat16
    assert (idx2 != oracle(x.bfloat16(), cb)[0]).double().mean() <= 0.02


def test_batch_shapes_and_channels_last():
    x = torch.randn(2, 3, 5, 16)
    cb = torch.randn(40, 16)
    idx, dist = nearest_code(x, cb)
    assert idx.shape == (2, 3, 5) and dist.shape == (2, 3, 5)
    assert torch.equal(idx.reshape(-1), nearest_code(x.reshape(-1, 16), cb)[0])


def test_non_contiguous(isa):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 100, generator=g)
    x = base.t()  # (100, 16), column-major
    assert not x.is_contiguous()
    cb = torch.randn(64, 32, generator=g)[:, ::2]  # strided codebook
    assert not cb.is_contiguous()
    idx, dist = nearest_code(x, cb)
    idx_c, dist_c = nearest_code(x.contiguous(), cb.contiguous())
    assert torch.equal(idx, idx_c) and torch.equal(dist, dist_c)
    assert_matches_oracle(x, cb, idx, dist)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 0, 8)])
def test_empty_x(shape):
    idx, dist = nearest_code(torch.randn(shape), torch.randn(5, 8))
    assert idx.shape == shape[:-1] and dist.shape == shape[:-1]
    assert idx.dtype == torch.long


def test_zero_dim_codes():
    idx, dist = nearest_code(torch.randn(4, 0), torch.randn(3, 0))
    assert torch.equal(idx, torch.zeros(4, dtype=torch.long))
    assert torch.equal(dist, torch.zeros(4))


def test_ties_break_to_lowest_index(isa):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(10, 6, generator=g)
    cb = torch.cat([base, base, base])  # codes i, i+10, i+20 identical
    x = base[torch.randint(0, 10, (200,), generator=g)] + 0.01 * torch.randn(200, 6, generator=g)
    idx, _ = nearest_code(x, cb)
    assert bool((idx < 10).all())
    # every code at the same distance: index 0
    idx0, _ = nearest_code(torch.zeros(5, 4), torch.ones(37, 4))
    assert torch.equal(idx0, torch.zeros(5, dtype=torch.long))


def test_nan_rows_and_codes(isa):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 8, generator=g)
    cb = torch.randn(30, 8, generator=g)
    x[3, 2] = float("nan")
    x[40] = float("nan")
    idx, dist = nearest_code(x, cb)
    ref_idx, _ = reference.nearest_code(x, cb)
    assert torch.equal(idx, ref_idx)
    assert idx[3] == 0 and idx[40] == 0
    assert torch.isnan(dist[3]) and torch.isnan(dist[40])
    assert not torch.isnan(dist[[0, 1, 2, 4]]).any()
    # A NaN code is chosen by every row, as torch.argmin would.
    cb[17, 0] = float("nan")
    cb[23, 5] = float("nan")
    idx, dist = nearest_code(torch.randn(50, 8, generator=g), cb)
    assert bool((idx == 17).all()) and bool(torch.isnan(dist).all())


def test_huge_values_take_careful_path(isa):
    x = torch.randn(64, 4) * 1e18
    cb = torch.randn(20, 4) * 1e18
    idx, _ = nearest_code(x, cb)
    assert torch.equal(idx, oracle(x, cb)[0])


def test_deterministic_and_thread_invariant():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5000, 32, generator=g)
    cb = torch.randn(300, 32, generator=g)
    a = nearest_code(x, cb)
    b = nearest_code(x, cb)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = nearest_code(x, cb)
    finally:
        torch.set_num_threads(threads)
    for u, v in ((a, b), (a, c)):
        assert torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])


def test_generic_and_native_agree(monkeypatch):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(999, 40, generator=g, dtype=torch.float64)
    cb = torch.randn(77, 40, generator=g, dtype=torch.float64)
    a = nearest_code(x, cb)
    monkeypatch.setenv("PYVQ_CPU_ISA", "generic")
    b = nearest_code(x, cb)
    assert torch.equal(a[0], b[0])


def test_reference_backend(reference_backend):
    x, cb = torch.randn(30, 8), torch.randn(9, 8)
    idx, dist = nearest_code(x, cb)
    ref_idx, ref_dist = reference.nearest_code(x, cb)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert pyvq.backend() == "reference"


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("PYVQ_BACKEND", "fast")
    with pytest.raises(ValueError, match="PYVQ_BACKEND"):
        nearest_code(torch.randn(3, 2), torch.randn(2, 2))


BAD = [
    (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(5, 8)), TypeError, "'x'.*floating"),
    (lambda: (torch.randn(4, 8), torch.randn(5, 8, dtype=torch.complex64)), TypeError, "'codebook'.*floating"),
    (lambda: (torch.randn(4, 8), torch.randn(5, 7)), ValueError, "last dimension of 'x' \\(8\\).*\\(7\\)"),
    (lambda: (torch.randn(4, 8), torch.randn(0, 8)), ValueError, "'codebook' must hold at least one"),
    (lambda: (torch.randn(4, 8), torch.randn(8)), ValueError, "'codebook' must be 2-D"),
    (lambda: (torch.randn(4, 8), torch.randn(2, 5, 8)), ValueError, "'codebook' must be 2-D"),
    (lambda: (torch.tensor(1.0), torch.randn(5, 1)), ValueError, "'x' must have at least 1"),
    (lambda: (torch.randn(4, 8), torch.randn(5, 8, device="meta")), ValueError, "same device"),
]


@pytest.mark.parametrize("make,exc,msg", BAD)
def test_bad_input_python(make, exc, msg):
    x, cb = make()
    with pytest.raises(exc, match=msg):
        nearest_code(x, cb)


def test_bad_metric():
    with pytest.raises(ValueError, match="'metric'"):
        nearest_code(torch.randn(3, 2), torch.randn(2, 2), metric="l1")


@pytest.mark.parametrize("make,exc,msg", BAD[:6])
def test_bad_input_cpp(make, exc, msg):
    """The dispatcher op checks its inputs itself (for torch.ops users)."""
    x, cb = make()
    with pytest.raises(RuntimeError, match=msg.replace("\\(8\\)", "\\(8\\)")):
        torch.ops.pyvq.nearest_code(x, cb, "l2")
    with pytest.raises(RuntimeError, match="'metric'"):
        torch.ops.pyvq.nearest_code(torch.randn(3, 2), torch.randn(2, 2), "l1")


# --- autograd, opcheck, compile --------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradcheck(metric):
    g = torch.Generator().manual_seed(8)
    # Well separated codes so a tiny perturbation never changes the index.
    cb = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    x = (cb.detach()[torch.tensor([0, 2, 2, 5, 1, 3, 4])] +
         0.1 * torch.randn(7, 5, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nearest_code(a, b, metric=metric)[1], (x, cb))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradient_matches_reference(metric):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, 10, generator=g, requires_grad=True)
    cb = torch.randn(15, 10, generator=g, requires_grad=True)
    w = torch.randn(4, 6, generator=g)
    (nearest_code(x, cb, metric=metric)[1] * w).sum().backward()
    gx, gc = x.grad.clone(), cb.grad.clone()
    x.grad = cb.grad = None
    (reference.nearest_code(x, cb, metric=metric)[1] * w).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gc, cb.grad)


def _opcheck_samples():
    g = torch.Generator().manual_seed(10)
    yield torch.randn(20, 8, generator=g), torch.randn(7, 8, generator=g), "l2"
    yield torch.randn(3, 4, 8, generator=g), torch.randn(5, 8, generator=g), "cosine"
    yield (torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True),
           torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True), "l2")
    yield torch.randn(0, 8, generator=g), torch.randn(7, 8, generator=g), "l2"
    yield torch.randn(16, 3, generator=g).bfloat16(), torch.randn(7, 3, generator=g).bfloat16(), "l2"
    yield torch.randn(8, 12, generator=g).t(), torch.randn(5, 8, generator=g), "l2"


@pytest.mark.parametrize("sample", list(_opcheck_samples()), ids=lambda s: "x".join(map(str, s[0].shape)) + s[2])
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.pyvq.nearest_code.default, sample)


def test_torch_compile_fullgraph():
    class Quantize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codebook = torch.nn.Parameter(torch.randn(32, 8))

        def forward(self, z):
            idx, dist = nearest_code(z, self.codebook)
            return self.codebook[idx], dist.mean()

    torch._dynamo.reset()
    m = Quantize()
    z = torch.randn(50, 8, requires_grad=True)
    eager_q, eager_loss = m(z)
    compiled = torch.compile(m, fullgraph=True)
    q, loss = compiled(z)
    torch.testing.assert_close(q, eager_q)
    torch.testing.assert_close(loss, eager_loss)
    loss.backward()
    gz = z.grad.clone()
    z.grad = None
    eager_loss.backward()
    torch.testing.assert_close(gz, z.grad)


# --- bf16 screening (CPUs with AVX512_BF16, float32, D >= 64) --------------

def _screening_available():
    return pyvq.info()["cpu_isa"] == "avx512-bf16"


needs_bf16 = pytest.mark.skipif(
    not _screening_available(),
    reason="this CPU (or PYVQ_CPU_ISA) lacks AVX512_BF16, so the bf16 screening path does not run",
)


def _screened_and_plain(x, cb, metric, monkeypatch):
    monkeypatch.delenv("PYVQ_CPU_ISA", raising=False)
    a = nearest_code(x, cb, metric=metric)
    monkeypatch.setenv("PYVQ_CPU_ISA", "avx512")  # float32 kernel, no screening
    b = nearest_code(x, cb, metric=metric)
    monkeypatch.delenv("PYVQ_CPU_ISA")
    return a, b


def _near_tie_codebook(g, clusters, per_cluster, d, spread):
    """Codes in tight clusters: neighbours differ by far less than bf16's
    resolution, so screening must keep (or overflow on) many candidates."""
    base = torch.randn(clusters, 1, d, generator=g) * 3
    codes = base + spread * torch.randn(clusters, per_cluster, d, generator=g)
    return codes.reshape(-1, d)


@needs_bf16
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(300, 500, 64), (257, 97, 65), (100, 1200, 256), (64, 40, 129)])
def test_screening_is_bit_identical(n, k, d, metric, monkeypatch):
    g = torch.Generator().manual_seed(n + k + d)
    x = torch.randn(n, d, generator=g)
    cb = torch.randn(k, d, generator=g)
    (ia, da), (ib, db) = _screened_and_plain(x, cb, metric, monkeypatch)
    assert torch.equal(ia, ib) and torch.equal(da, db)
    assert_matches_oracle(x, cb, ia, da, metric)


@needs_bf16
@pytest.mark.parametrize("per_cluster,spread", [(8, 1e-3), (20, 1e-4), (200, 1e-3), (50, 0.0)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_screening_near_ties_and_overflow(per_cluster, spread, metric, monkeypatch):
    g = torch.Generator().manual_seed(per_cluster)
    cb = _near_tie_codebook(g, 5, per_cluster, 96, spread)
    x = cb[torch.randint(0, cb.shape[0], (150,), generator=g)] + 1e-3 * torch.randn(150, 96, generator=g)
    (ia, da), (ib, db) = _screened_and_plain(x, cb, metric, monkeypatch)
    assert torch.equal(ia, ib) and torch.equal(da, db)
    if spread == 0.0:  # exact duplicates: the lowest index of each cluster
        assert bool((ia % per_cluster == 0).all())


@needs_bf16
def test_screening_with_nan_and_tiny_rows(monkeypatch):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(100, 80, generator=g)
    x[5, 3] = float("nan")
    x[70] = 1e-30 * torch.randn(80, generator=g)  # products below float32's normal range
    x[71] = 0.0
    cb = torch.randn(50, 80, generator=g)
    (ia, da), (ib, db) = _screened_and_plain(x, cb, "l2", monkeypatch)
    assert torch.equal(ia, ib)
    assert torch.equal(da.nan_to_num(-1), db.nan_to_num(-1))
    assert ia[5] == 0 and torch.isnan(da[5])
