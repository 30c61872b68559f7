"""pyvq.ops.kmeans: seeding quality, Lloyd fixed points, re-seeding, errors;
the op against its reference twin pyvq.reference.kmeans, and both against
faiss's Lloyd iterations."""

import importlib
import inspect

import pytest
import torch

import pyvq
from pyvq import reference
from pyvq.ops import kmeans, nearest_code
from pyvq.ops.kmeans import KMeansResult

pytestmark = pytest.mark.usefixtures("one_thread")

INITS = ["afkmc2", "kmeans++", "random"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _blobs(centers, per, std, seed):
    g = _gen(seed)
    labels = torch.arange(centers.shape[0]).repeat_interleave(per)
    x = centers[labels] + std * torch.randn(labels.numel(), centers.shape[1], generator=g)
    return x, labels


def _min_dist(c, x):
    """Exact distance of each row of c to its nearest row of x (no matmul trick)."""
    return (c[:, None, :] - x[None, :, :]).pow(2).sum(-1).min(1).values.sqrt()


def _inertia(x, c):
    return float(nearest_code(x.double(), c.double())[1].sum())


def test_exported():
    assert "kmeans" in pyvq.ops.__all__
    assert pyvq.ops.kmeans is kmeans


@pytest.mark.parametrize("init", ["afkmc2", "kmeans++"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_separated_blobs(init, seed):
    # 8 blobs 20 apart (std 0.5, in 4-D): D^2 seeding puts one seed in every
    # blob, and Lloyd then converges to exactly the per-blob means.
    g = _gen(100 + seed)
    centers = 20 * torch.randn(8, 4, generator=g)
    while torch.cdist(centers, centers).add(torch.eye(8) * 1e9).min() < 10:
        centers = 20 * torch.randn(8, 4, generator=g)
    x, labels = _blobs(centers, 150, 0.5, seed)
    means = torch.stack([x[labels == j].mean(0) for j in range(8)])
    c = kmeans(x, 8, init=init, seed=seed)
    assert c.shape == (8, 4) and c.dtype == x.dtype
    # match up to permutation: every true mean has its own nearest centroid
    match = torch.cdist(means, c).argmin(1)
    assert sorted(match.tolist()) == list(range(8))
    torch.testing.assert_close(c[match], means, atol=1e-4, rtol=1e-4)


def test_seeded_inits_beat_random_on_average():
    # one large blob and 15 small far-away ones: uniform seeds mostly land in
    # the large blob and Lloyd cannot move them out; D^2-type seeds cover
    # every blob.
    g = _gen(7)
    centers = 30 * torch.randn(16, 8, generator=g)
    big = centers[0] + torch.randn(3000, 8, generator=g)
    small = centers[1:].repeat_interleave(20, 0) + 0.5 * torch.randn(300, 8, generator=g)
    x = torch.cat([big, small])
    res = {init: [] for init in INITS}
    seeding = {init: [] for init in INITS}
    for seed in range(5):
        for init in INITS:
            seeding[init].append(_inertia(x, kmeans(x, 16, iters=0, init=init, seed=seed)))
            res[init].append(_inertia(x, kmeans(x, 16, iters=10, init=init, seed=seed)))
    mean = {k: sum(v) / len(v) for k, v in res.items()}
    mean_seed = {k: sum(v) / len(v) for k, v in seeding.items()}
    assert mean["afkmc2"] < mean["random"]
    assert mean["kmeans++"] < mean["random"]
    assert mean_seed["afkmc2"] < mean_seed["random"]
    # Lloyd never increases the inertia of its seeding
    for init in INITS:
        assert all(r <= s * (1 + 1e-6) for r, s in zip(res[init], seeding[init]))


def test_afkmc2_close_to_kmeanspp():
    # The paper's claim: with m = 200 AFK-MC2 matches k-means++'s seeding
    # quality. Mixture of 40 overlapping Gaussians, mean over 4 seeds.
    g = _gen(3)
    centers = 3 * torch.randn(40, 16, generator=g)
    x = centers[torch.randint(40, (4000,), generator=g)] + torch.randn(4000, 16, generator=g)
    af = [_inertia(x, kmeans(x, 40, iters=0, seed=s)) for s in range(4)]
    pp = [_inertia(x, kmeans(x, 40, iters=0, init="kmeans++", seed=s)) for s in range(4)]
    assert sum(af) / 4 < 1.1 * sum(pp) / 4
    af_l = [_inertia(x, kmeans(x, 40, iters=15, seed=s)) for s in range(4)]
    pp_l = [_inertia(x, kmeans(x, 40, iters=15, init="kmeans++", seed=s)) for s in range(4)]
    assert sum(af_l) / 4 < 1.05 * sum(pp_l) / 4


@pytest.mark.parametrize("init", ["afkmc2", "kmeans++"])
def test_second_center_follows_d2_distribution(init):
    # Given the first center c1, the second must be drawn with probability
    # d(x, c1)^2 / sum d^2: exactly for kmeans++, as the stationary law of
    # the Markov chain for AFK-MC2 (which mixes fast here: q is close to it).
    x = torch.tensor([[0.0], [1.0], [2.0], [4.0], [7.0]], dtype=torch.float64)
    runs = 2000
    freq = torch.zeros(5, 5, dtype=torch.float64)
    for s in range(runs):
        c = kmeans(x, 2, iters=0, init=init, seed=s)
        i = int((x[:, 0] == c[0, 0]).nonzero())
        j = int((x[:, 0] == c[1, 0]).nonzero())
        freq[i, j] += 1
    first = freq.sum(1)
    assert (first > runs / 5 * 0.75).all()  # first center is uniform
    d2 = (x - x.t()).pow(2)
    expected = d2 / d2.sum(1, keepdim=True)
    empirical = freq / first.unsqueeze(1)
    assert (empirical - expected).abs().max() < 0.08
    assert (freq.diagonal() == 0).all()  # never the same point twice


def test_afkmc2_chain_of_length_one_samples_the_proposal():
    # With m = 1 the chain is just its first proposal, so the second center
    # follows q(x) = 1/2 d(x, c1)^2 / sum d^2 + 1/(2n) itself.
    x = torch.tensor([[0.0], [1.0], [2.0], [4.0], [7.0]], dtype=torch.float64)
    runs = 2000
    freq = torch.zeros(5, 5, dtype=torch.float64)
    for s in range(runs):
        c = kmeans(x, 2, iters=0, chain_length=1, seed=s)
        i = int((x[:, 0] == c[0, 0]).nonzero())
        j = int((x[:, 0] == c[1, 0]).nonzero())
        freq[i, j] += 1
    d2 = (x - x.t()).pow(2)
    q = 0.5 * d2 / d2.sum(1, keepdim=True) + 0.5 / 5
    empirical = freq / freq.sum(1, keepdim=True)
    assert (empirical - q).abs().max() < 0.08


@pytest.mark.parametrize("seed", range(6))
def test_empty_clusters_reseeded_duplicates(seed):
    # 3 distinct points repeated 10 times, k = 3: random seeding often picks
    # duplicates, which leaves clusters empty; re-seeding must recover all
    # three points (inertia 0) and never produce NaN.
    base = torch.tensor([[1.0, 2.0], [5.0, 1.0], [-3.0, 4.0]])
    x = base.repeat(10, 1)
    for init in INITS:
        r = kmeans(x, 3, init=init, seed=seed, return_assignments=True)
        assert torch.isfinite(r.centroids).all()
        got = sorted(map(tuple, r.centroids.tolist()))
        assert got == sorted(map(tuple, base.tolist()))
        assert float(r.inertia) == 0.0


def test_fewer_distinct_points_than_k_gives_no_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat(4, 1)  # n = 8, 2 distinct
    for init in INITS:
        c = kmeans(x, 6, init=init, seed=1)
        assert torch.isfinite(c).all()
        # every centroid is one of the two points
        assert (_min_dist(c, x[:2]) < 1e-6).all()


def test_k_equals_n_puts_every_point_in_its_own_cluster():
    x = torch.randn(40, 3, generator=_gen(0))
    for init in INITS:
        r = kmeans(x, 40, init=init, seed=0, return_assignments=True)
        assert sorted(r.assignments.tolist()) == list(range(40))
        assert float(r.inertia) < 1e-10


def test_return_assignments_consistent():
    x = torch.randn(500, 6, generator=_gen(1))
    r = kmeans(x, 12, seed=4, return_assignments=True)
    assert isinstance(r, KMeansResult)
    idx, dist = pyvq.reference.nearest_code(x, r.centroids)
    assert torch.equal(r.assignments, idx)
    torch.testing.assert_close(r.inertia, dist.sum())
    assert 1 <= r.n_iter <= 20
    torch.testing.assert_close(r.centroids, kmeans(x, 12, seed=4))


def test_iters_zero_returns_data_points():
    x = torch.randn(300, 5, generator=_gen(2))
    for init in INITS:
        c = kmeans(x, 10, iters=0, init=init, seed=3)
        assert (_min_dist(c, x) == 0).all()
        if init == "random":
            assert torch.unique(c, dim=0).shape[0] == 10


def test_lloyd_fixed_point():
    # after convergence each centroid is the mean of the points assigned to it
    x = torch.randn(1000, 4, generator=_gen(5), dtype=torch.float64)
    r = kmeans(x, 7, iters=100, tol=0.0, seed=0, return_assignments=True)
    for j in range(7):
        torch.testing.assert_close(r.centroids[j], x[r.assignments == j].mean(0))


@pytest.mark.parametrize("init", INITS)
def test_deterministic_for_a_seed(init):
    x = torch.randn(2000, 8, generator=_gen(9))
    a = kmeans(x, 32, init=init, seed=11)
    b = kmeans(x, 32, init=init, seed=11)
    assert torch.equal(a, b)
    c = kmeans(x, 32, init=init, seed=12)
    assert not torch.equal(a, c)


def test_does_not_touch_global_rng():
    x = torch.randn(200, 3, generator=_gen(0))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    kmeans(x, 5, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_computed_in_float32(dtype):
    x = torch.randn(1500, 8, generator=_gen(4)).to(dtype)
    c = kmeans(x, 16, seed=2)
    assert c.dtype == dtype and c.shape == (16, 8)
    assert torch.isfinite(c).all()
    expected = kmeans(x.float(), 16, seed=2).to(dtype)
    assert torch.equal(c, expected)


def test_float64_stays_float64():
    x = torch.randn(200, 3, generator=_gen(0), dtype=torch.float64)
    r = kmeans(x, 4, return_assignments=True)
    assert r.centroids.dtype == torch.float64 and r.inertia.dtype == torch.float64


def test_non_contiguous_input():
    x = torch.randn(8, 600, generator=_gen(6)).t()  # (600, 8), not contiguous
    assert not x.is_contiguous()
    assert torch.equal(kmeans(x, 9, seed=1), kmeans(x.contiguous(), 9, seed=1))


def test_reference_backend_agrees(monkeypatch):
    x, _ = _blobs(torch.randn(6, 5, generator=_gen(8)) * 10, 50, 0.3, 0)
    kernel = kmeans(x, 6, seed=0, return_assignments=True)
    monkeypatch.setenv("PYVQ_BACKEND", "reference")
    ref = kmeans(x, 6, seed=0, return_assignments=True)
    assert torch.equal(kernel.assignments, ref.assignments)
    torch.testing.assert_close(kernel.centroids, ref.centroids)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(k=0), ValueError, "'k'"),
        (dict(k=11), ValueError, "'k'"),
        (dict(k=2.0), TypeError, "'k'"),
        (dict(k=2, iters=-1), ValueError, "'iters'"),
        (dict(k=2, init="kmeans||"), ValueError, "'init'"),
        (dict(k=2, chain_length=0), ValueError, "'chain_length'"),
        (dict(k=2, tol=-1.0), ValueError, "'tol'"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    x = torch.randn(10, 3)
    with pytest.raises(exc, match=match):
        kmeans(x, **kwargs)


def test_bad_x():
    with pytest.raises(ValueError, match="'x'.*2-D"):
        kmeans(torch.randn(4, 3, 2), 2)
    with pytest.raises(ValueError, match="'x'.*2-D"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(TypeError, match="'x'.*floating"):
        kmeans(torch.arange(12).view(6, 2), 2)
    with pytest.raises(TypeError, match="'x'"):
        kmeans([[0.0, 1.0]], 1)
    x = torch.randn(10, 3)
    x[2, 1] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match="'x' contains 2 non-finite"):
        kmeans(x, 2)


# ---------------------------------------------------------------------------
# The op against pyvq.reference.kmeans. Both make the same generator draws
# and update with the same sums, so wherever their nearest-centroid searches
# agree (the kernel's blocked argmin against the reference's full distance
# matrix) every result is equal bit for bit.


def _same_result(a, b):
    assert torch.equal(a.assignments, b.assignments)
    assert torch.equal(a.centroids, b.centroids)
    assert a.centroids.dtype == b.centroids.dtype
    assert a.n_iter == b.n_iter
    assert a.inertia.dtype == b.inertia.dtype
    torch.testing.assert_close(a.inertia, b.inertia, rtol=1e-5, atol=0)


def test_reference_exported_with_the_op_signature():
    assert "kmeans" in reference.__all__
    assert inspect.signature(reference.kmeans) == inspect.signature(kmeans)
    assert reference.kmeans is not kmeans
    assert pyvq.ops.kmeans.__module__ == "pyvq.ops.kmeans"
    assert pyvq.reference.kmeans.__module__ == "pyvq.reference.kmeans"
    # one result type, defined by the reference and used by the op
    assert KMeansResult is importlib.import_module("pyvq.reference.kmeans").KMeansResult


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, d, k", [(600, 4, 8), (2000, 8, 32), (64, 3, 64), (1000, 2, 5)])
@pytest.mark.parametrize("init", INITS)
def test_op_equals_reference(dtype, n, d, k, init):
    x = torch.randn(n, d, generator=_gen(n + k), dtype=dtype)
    for seed in (0, 1):
        a = kmeans(x, k, init=init, seed=seed, return_assignments=True)
        b = reference.kmeans(x, k, init=init, seed=seed, return_assignments=True)
        _same_result(a, b)
        assert torch.equal(reference.kmeans(x, k, init=init, seed=seed), a.centroids)
    # a different seed gives a different clustering (the draws matter)
    if k < n:
        assert not torch.equal(reference.kmeans(x, k, init=init, seed=2), a.centroids)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("iters", [0, 1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_equals_reference_with_exact_ties(init, iters, dtype):
    # Points of {0, 1, 2, 3}^3, many repeated: seeds are data points, so
    # the first assignment has exact ties (equidistant seeds, duplicate
    # seeds), which both must give to the lowest index; duplicates also
    # leave clusters empty and exercise the re-seeding.
    x = torch.randint(0, 4, (400, 3), generator=_gen(5)).to(dtype)
    for seed in range(3):
        a = kmeans(x, 16, init=init, iters=iters, seed=seed, return_assignments=True)
        b = reference.kmeans(x, 16, init=init, iters=iters, seed=seed, return_assignments=True)
        _same_result(a, b)
        if iters == 0:
            # ties to the lowest index, from exact (integer) distances
            d = (x[:, None, :] - a.centroids[None]).pow(2).sum(-1)
            first_min = (d == d.min(1, keepdim=True).values).int().argmax(1)
            assert torch.equal(a.assignments, first_min)


def test_reference_ties_go_to_the_lowest_index():
    # 1-D: 1.0 is equidistant from centroids 0.0 and 2.0, 3.0 from 2.0 and
    # 4.0; centroid 2.0 is listed twice.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    r = reference.kmeans(x, 4, init="random", iters=0, seed=0, return_assignments=True)
    c = r.centroids[:, 0].tolist()
    for i, xi in enumerate(x[:, 0].tolist()):
        d = [(xi - cj) ** 2 for cj in c]
        assert int(r.assignments[i]) == d.index(min(d))
    assert torch.equal(r.assignments, kmeans(x, 4, init="random", iters=0, seed=0,
                                             return_assignments=True).assignments)


@pytest.mark.parametrize("init", INITS)
def test_op_on_reference_backend_equals_reference(init, reference_backend):
    # with nearest_code's reference both searches are the same formula: the
    # results must agree on any input, here overlapping blobs in float32
    g = _gen(13)
    x = (3 * torch.randn(12, 8, generator=g))[torch.randint(12, (1500,), generator=g)]
    x = x + torch.randn(1500, 8, generator=g)
    for seed in range(3):
        _same_result(kmeans(x, 24, init=init, seed=seed, return_assignments=True),
                     reference.kmeans(x, 24, init=init, seed=seed, return_assignments=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_input(dtype):
    x = torch.randn(1200, 6, generator=_gen(4)).to(dtype)
    a = kmeans(x, 10, seed=3, return_assignments=True)
    b = reference.kmeans(x, 10, seed=3, return_assignments=True)
    assert b.centroids.dtype == dtype and b.inertia.dtype == torch.float32
    _same_result(a, b)


def test_reference_edge_cases_equal_the_op():
    x = torch.randn(30, 4, generator=_gen(2))
    for init in INITS:
        for k in (1, 30):  # a single cluster; every point its own cluster
            _same_result(kmeans(x, k, init=init, seed=1, return_assignments=True),
                         reference.kmeans(x, k, init=init, seed=1, return_assignments=True))
        # all points equal: every seeding falls back to uniform choices
        same = torch.ones(12, 3)
        _same_result(kmeans(same, 4, init=init, return_assignments=True),
                     reference.kmeans(same, 4, init=init, return_assignments=True))
        # non-contiguous input
        xt = torch.randn(5, 300, generator=_gen(3)).t()
        _same_result(kmeans(xt, 7, init=init, return_assignments=True),
                     reference.kmeans(xt, 7, init=init, return_assignments=True))


def test_reference_stops_at_tol_like_the_op():
    x = torch.randn(3000, 5, generator=_gen(21))
    for tol in (1e-1, 1e-3, 0.0):
        a = kmeans(x, 20, tol=tol, iters=50, seed=0, return_assignments=True)
        b = reference.kmeans(x, 20, tol=tol, iters=50, seed=0, return_assignments=True)
        _same_result(a, b)
    assert kmeans(x, 20, tol=1e-1, iters=50, return_assignments=True).n_iter < a.n_iter


def test_reference_lloyd_fixed_point():
    # Oracle-free: at convergence every centroid is the mean of its points
    # and every point's centroid is its nearest one (brute force, float64).
    x = torch.randn(800, 3, generator=_gen(8), dtype=torch.float64)
    r = reference.kmeans(x, 9, iters=200, tol=0.0, init="kmeans++", seed=2, return_assignments=True)
    assert r.n_iter < 200
    d = (x[:, None, :] - r.centroids[None]).pow(2).sum(-1)
    assert torch.equal(r.assignments, d.argmin(1))
    torch.testing.assert_close(r.inertia, d.min(1).values.sum())
    for j in range(9):
        torch.testing.assert_close(r.centroids[j], x[r.assignments == j].mean(0), rtol=1e-12, atol=1e-12)


def test_reference_does_not_touch_global_rng():
    x = torch.randn(200, 3, generator=_gen(0))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    reference.kmeans(x, 5, seed=0)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------
# faiss (the public peer) as an external oracle.


def _faiss_lloyd(x, k, iters, init_centroids):
    faiss = pytest.importorskip("faiss")
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=0, max_points_per_centroid=x.shape[0])
    km.train(x.numpy(), init_centroids=init_centroids.numpy())
    _, idx = km.index.search(x.numpy(), 1)
    return torch.from_numpy(km.centroids), torch.from_numpy(idx[:, 0]).long()


@pytest.mark.parametrize("seed", range(3))
def test_lloyd_matches_faiss_from_the_same_seeding(seed):
    # faiss's Lloyd iterations, started from pyvq's own seeding, must reach
    # the same partition and centroids as pyvq's op and reference.
    g = _gen(30 + seed)
    centers = 3 * torch.randn(40, 16, generator=g)
    x = centers[torch.randint(40, (4000,), generator=g)] + torch.randn(4000, 16, generator=g)
    seeds = reference.kmeans(x, 40, iters=0, seed=seed)
    assert torch.equal(seeds, kmeans(x, 40, iters=0, seed=seed))
    fc, fi = _faiss_lloyd(x, 40, 60, seeds)
    for impl in (kmeans, reference.kmeans):
        r = impl(x, 40, iters=60, tol=0.0, seed=seed, return_assignments=True)
        assert r.n_iter < 60  # converged
        assert torch.equal(r.assignments, fi)
        torch.testing.assert_close(r.centroids, fc, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["afkmc2", "kmeans++"])
def test_separated_blobs_inertia_at_least_as_good_as_faiss(init):
    # 10 blobs 20 apart: pyvq reaches the blob means' inertia (the optimum
    # here); faiss's best of 5 random seedings cannot do better.
    faiss = pytest.importorskip("faiss")
    g = _gen(100)
    centers = 20 * torch.randn(10, 6, generator=g)
    while torch.cdist(centers, centers).add(torch.eye(10) * 1e9).min() < 10:
        centers = 20 * torch.randn(10, 6, generator=g)
    x, labels = _blobs(centers, 100, 0.5, 1)
    optimum = _inertia(x, torch.stack([x[labels == j].mean(0) for j in range(10)]))
    km = faiss.Kmeans(6, 10, niter=20, seed=1, nredo=5, max_points_per_centroid=1000)
    km.train(x.numpy())
    peer = _inertia(x, torch.from_numpy(km.centroids))
    for impl in (kmeans, reference.kmeans):
        ours = _inertia(x, impl(x, 10, init=init, seed=1))
        assert ours == pytest.approx(optimum, rel=1e-6)
        assert ours <= peer * (1 + 1e-6)
