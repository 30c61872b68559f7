"""k-means clustering: ``pyvq.ops.kmeans``.

Seeding by AFK-MC2 (Bachem, Lucic, Hassani and Krause, "Fast and Provably
Good Seedings for k-Means", NeurIPS 2016), exact k-means++ (D^2) seeding, or
k distinct random points; then Lloyd iterations whose assignment step is
``pyvq.ops.nearest_code`` (the compiled kernel, or its reference under
``PYVQ_BACKEND=reference``).

ReFiT (pyvq.refit) uses it to re-build a VQGAN codebook from encoder outputs.
There is no kernel of its own: the cost is the nearest-code search, which
already has one. Reference: pyvq/reference/kmeans.py (the same algorithm
over a full distance matrix; it also defines ``KMeansResult``).
"""

from __future__ import annotations

import torch

from pyvq._checks import accumulation_dtype, check_choice, check_floating, check_int
from pyvq.ops.codebook import nearest_code
from pyvq.reference.kmeans import KMeansResult

_OP = "pyvq.kmeans"
INITS = ("afkmc2", "kmeans++", "random")


def _check(x, k, iters, init, chain_length, tol, seed) -> None:
    check_floating(x, "x", _OP)
    if x.dim() != 2:
        raise ValueError(f"{_OP}: argument 'x' must be 2-D (N, D), got shape {tuple(x.shape)}")
    check_int("k", k, where=_OP, minimum=1)
    if k > x.shape[0]:
        raise ValueError(
            f"{_OP}: argument 'k' ({k}) must not exceed the number of points "
            f"in 'x' ({x.shape[0]})"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{_OP}: argument 'x' must have at least one feature, got shape {tuple(x.shape)}")
    check_int("iters", iters, where=_OP, minimum=0)
    check_choice("init", init, INITS, where=_OP)
    check_int("chain_length", chain_length, where=_OP, minimum=1)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"{_OP}: argument 'tol' must be a number >= 0, got {tol!r}")
    check_int("seed", seed, where=_OP)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{_OP}: argument 'x' contains {bad} non-finite (NaN or inf) values")


def _sample(cum: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn with replacement, P(i) proportional to the
    i-th weight, given the float64 running sum ``cum`` of the weights.

    Inverse-CDF sampling: it is deterministic for a generator state, O(log N)
    a draw, and never returns an index whose weight is zero (searchsorted
    with right=True returns the first i with cum[i] > u, so cum[i] > cum[i-1]).
    """
    u = torch.rand(count, generator=gen, dtype=cum.dtype, device=cum.device) * cum[-1]
    return torch.searchsorted(cum, u, right=True).clamp_max_(cum.numel() - 1)


def _sq_dist_to(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distance of every row of x (N, D) to one point c (D,).

    ||x||^2 + ||c||^2 - 2 x.c: one matrix-vector product, no (N, D)
    temporary. Clamped at 0 against cancellation.
    """
    return (x_sq + c.dot(c) - 2 * torch.mv(x, c)).clamp_min_(0)


def _init_random(x, k, gen):
    idx = torch.randperm(x.shape[0], generator=gen, device=x.device)[:k]
    return x[idx].clone()


def _init_kmeanspp(x, k, gen):
    """Exact D^2 seeding (Arthur and Vassilvitskii, 2007), one candidate a step.

    Keeps the squared distance of every point to its nearest chosen center
    (N,) and updates it with one matrix-vector product per new center:
    O(N k D) time, O(N) extra memory.
    """
    n = x.shape[0]
    centers = x.new_empty(k, x.shape[1])
    first = int(torch.randint(n, (1,), generator=gen, device=x.device))
    centers[0] = x[first]
    x_sq = x.pow(2).sum(1)
    d2 = _sq_dist_to(x, x_sq, centers[0])
    for i in range(1, k):
        cum = torch.cumsum(d2, 0, dtype=torch.float64)
        if cum[-1] <= 0:  # every point sits on a center: any choice is as good
            j = int(torch.randint(n, (1,), generator=gen, device=x.device))
        else:
            j = int(_sample(cum, 1, gen))
        centers[i] = x[j]
        torch.minimum(d2, _sq_dist_to(x, x_sq, centers[i]), out=d2)
    return centers


def _init_afkmc2(x, k, chain_length, gen):
    """AFK-MC2 seeding (Bachem et al., 2016, Algorithm 1).

    c1 is uniform; the proposal is q(x) = 1/2 d(x, c1)^2 / sum d^2 + 1/(2n),
    fixed for the whole run. Center i is the last state of a Markov chain of
    m = chain_length steps whose proposals y are drawn i.i.d. from q and
    accepted with probability min(1, d(y)^2 q(x) / (d(x)^2 q(y))), d being
    the distance to the nearest center chosen so far.

    Vectorised: all (k-1) * m proposals are drawn at once; for each new
    center the m proposals' distances to the current centers come from one
    ``nearest_code`` call, so the cost is O(m k^2 D) instead of k-means++'s
    O(N k D). The accept/reject walk itself is sequential, so it runs over
    Python floats (m comparisons a center). Written with the importance
    weight w = d^2 / q, the test is ``u * w(x) < w(y)``, which is also
    well defined when d(x) = 0 (a proposal that is already a center is
    left at once for any y with d(y) > 0).
    """
    n = x.shape[0]
    dev = x.device
    centers = x.new_empty(k, x.shape[1])
    first = int(torch.randint(n, (1,), generator=gen, device=dev))
    centers[0] = x[first]
    if k == 1:
        return centers
    _, d1 = nearest_code(x, centers[:1])
    d1 = d1.to(torch.float64).clamp_min_(0)
    total = d1.sum()
    if total > 0:
        q = 0.5 * d1 / total + 0.5 / n
    else:  # all points equal c1: q is uniform
        q = torch.full_like(d1, 1.0 / n)
    proposals = _sample(torch.cumsum(q, 0), (k - 1) * chain_length, gen).view(k - 1, chain_length)
    q_props = q[proposals]  # (k-1, m)
    uniforms = torch.rand(k - 1, chain_length, generator=gen, dtype=torch.float64, device=dev)
    for i in range(1, k):
        props = proposals[i - 1]
        _, dy = nearest_code(x[props], centers[:i])
        w = (dy.to(torch.float64).clamp_min(0) / q_props[i - 1]).tolist()
        u = uniforms[i - 1].tolist()
        cur = 0
        w_cur = w[0]
        for j in range(1, chain_length):
            if u[j] * w_cur < w[j]:
                cur, w_cur = j, w[j]
        centers[i] = x[props[cur]]
    return centers


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    init: str = "afkmc2",
    chain_length: int = 200,
    seed: int = 0,
    tol: float = 1e-4,
    return_assignments: bool = False,
):
    """k-means (Lloyd) clustering of the rows of ``x``.

    Args:
        x: (N, D) float16/bfloat16/float32/float64, finite, N >= k.
            Half-precision inputs are clustered in float32.
        k: number of clusters, 1 <= k <= N.
        iters: maximum number of Lloyd iterations (0: return the seeding).
        init: "afkmc2" (AFK-MC2 Markov-chain seeding, default),
            "kmeans++" (exact D^2 seeding) or "random" (k distinct points).
        chain_length: AFK-MC2 chain length m (ignored by the other inits).
        seed: seed of the ``torch.Generator`` that drives every random
            choice; the same seed, input and device give the same result.
        tol: stop when the summed squared centroid shift of an iteration is
            at most ``tol * mean_j var(x[:, j])`` (scikit-learn's rule).
        return_assignments: also return the assignments and the inertia.

    Returns:
        centroids (k, D) in x's dtype; or, with ``return_assignments=True``,
        a :class:`KMeansResult` (centroids, assignments (N,) int64, inertia,
        n_iter) whose assignments are against the returned centroids.

    A cluster left empty by an update is re-seeded at the points farthest
    from their current centroid (the largest contributions to the inertia),
    so no centroid is ever NaN. When x has fewer than k distinct points some
    centroids are necessarily duplicates.

    Host synchronisation: k-means is an iterative algorithm that reads the
    device every iteration (the seeding's draws, the convergence test), so
    unlike the other ops it synchronises on CUDA by design, and checks that
    ``x`` is finite with a plain ``ValueError`` on every device.

    The assignment step is ``pyvq.ops.nearest_code`` (ties to the lowest
    index); updates use ``index_add_`` and ``bincount``. On CPU every step is
    deterministic. On CUDA ``index_add_`` accumulates with atomics, so
    centroids may differ in the last bits between runs.
    """
    _check(x, k, iters, init, chain_length, tol, seed)
    compute = accumulation_dtype(x.dtype)
    xc = x.to(compute).contiguous()
    n, dim = xc.shape
    gen = torch.Generator(device=xc.device)
    gen.manual_seed(seed)

    if init == "random":
        centroids = _init_random(xc, k, gen)
    elif init == "kmeans++":
        centroids = _init_kmeanspp(xc, k, gen)
    else:
        centroids = _init_afkmc2(xc, k, chain_length, gen)

    tol_abs = float(tol) * float(xc.var(0, unbiased=False).mean()) if n > 1 else 0.0
    n_iter = 0
    for _ in range(iters):
        idx, dist = nearest_code(xc, centroids)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, idx, xc)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(compute)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            far = torch.topk(dist, empty.numel()).indices
            new[empty] = xc[far]
        shift = float((new - centroids).pow(2).sum())
        centroids = new
        n_iter += 1
        if shift <= tol_abs:
            break

    out = centroids.to(x.dtype)
    if not return_assignments:
        return out
    idx, dist = nearest_code(xc, centroids)
    return KMeansResult(out, idx, dist.sum(), n_iter)
