"""Reference k-means: the twin of ``pyvq.ops.kmeans``, written as the math.

Same signature, same seeding procedures driven by the same draws of the
same ``torch.Generator``, same Lloyd iterations; where the op calls
``pyvq.ops.nearest_code``, this module builds the full (N, k) matrix of
squared distances and takes its argmin. Inputs are assumed checked (the op
checks them); this module imports torch only.

Given equal nearest-centroid results at every step, the op and this twin
return the same centroids and assignments bit for bit on the CPU: both seed
from the same points and update with the same ``index_add_`` sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyvq._checks import accumulation_dtype


class KMeansResult(NamedTuple):
    """What ``kmeans(..., return_assignments=True)`` returns.

    Attributes:
        centroids: (k, D), x's dtype.
        assignments: (N,) int64, index of the nearest centroid of every point
            (computed against the returned centroids).
        inertia: 0-d tensor in the compute dtype (float32 for half inputs,
            else x's dtype): sum over points of the squared distance to
            their centroid.
        n_iter: number of Lloyd iterations run (<= iters).
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: torch.Tensor
    n_iter: int


def _assign(x: torch.Tensor, centroids: torch.Tensor):
    """Nearest centroid of every row of x, and the squared distance to it.

    D[n, j] = ||x_n||^2 + ||c_j||^2 - 2 x_n . c_j picks the centroid (argmin:
    ties to the lowest index); the distance reported is ||x_n - c_j||^2
    computed from the difference, free of the expansion's cancellation.
    """
    d = x.pow(2).sum(1, keepdim=True) + centroids.pow(2).sum(1) - 2 * x @ centroids.t()
    idx = d.argmin(1)
    return idx, (x - centroids[idx]).pow(2).sum(1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with F(i-1) <= u < F(i), F the running sum of ``weights``
    (float64), for each u in [0, 1) scaled to F's total. An index of zero
    weight has F(i) = F(i-1), so it is never drawn."""
    cdf = torch.cumsum(weights, 0)
    i = torch.searchsorted(cdf, u * cdf[-1], right=True)
    return i.clamp_max(weights.numel() - 1)


def _uniform(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64, device=device)


def _seed_random(x, k, gen):
    """k distinct points, uniformly."""
    return x[torch.randperm(x.shape[0], generator=gen, device=x.device)[:k]].clone()


def _seed_kmeanspp(x, k, gen):
    """k-means++: c1 uniform, then each next center drawn with probability
    proportional to D(x)^2, the squared distance to the nearest center so far."""
    n = x.shape[0]
    centers = [x[int(torch.randint(n, (1,), generator=gen, device=x.device))]]
    d2 = (x - centers[0]).pow(2).sum(1)
    for _ in range(1, k):
        weights = d2.to(torch.float64)
        if weights.sum() > 0:
            j = int(_inverse_cdf(weights, _uniform(1, gen, x.device)))
        else:  # D = 0 everywhere: every point already is a center
            j = int(torch.randint(n, (1,), generator=gen, device=x.device))
        centers.append(x[j])
        d2 = torch.minimum(d2, (x - x[j]).pow(2).sum(1))
    return torch.stack(centers)


def _seed_afkmc2(x, k, m, gen):
    """AFK-MC2 (Bachem et al., 2016, Algorithm 1).

    c1 is uniform. The proposal q(y) = 1/2 d(y, c1)^2 / sum_x d(x, c1)^2
    + 1/(2n) is fixed for the run. Center i is the last state of a Markov
    chain of m states y_1..y_m drawn i.i.d. from q: from state x the chain
    moves to y when u * D(x)^2 / q(x) < D(y)^2 / q(y), u ~ U[0, 1), D being
    the distance to the nearest of the centers chosen so far.

    Draws, in order: c1's index; all (k-1) m proposals; all (k-1) m
    acceptance uniforms (the first of each chain is unused).
    """
    n = x.shape[0]
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[int(torch.randint(n, (1,), generator=gen, device=x.device))]
    if k == 1:
        return centers
    d1 = (x - centers[0]).pow(2).sum(1).to(torch.float64)
    if d1.sum() > 0:
        q = 0.5 * d1 / d1.sum() + 0.5 / n
    else:  # every point equals c1
        q = torch.full_like(d1, 1.0 / n)
    chains = _inverse_cdf(q, _uniform((k - 1) * m, gen, x.device)).view(k - 1, m)
    accept_u = _uniform((k - 1, m), gen, x.device)
    for i in range(1, k):
        y = chains[i - 1]
        _, dist = _assign(x[y], centers[:i])
        w = (dist.to(torch.float64) / q[y]).tolist()  # importance weights D(y)^2 / q(y)
        u = accept_u[i - 1].tolist()
        state = 0
        for j in range(1, m):
            if u[j] * w[state] < w[j]:
                state = j
        centers[i] = x[y[state]]
    return centers


def _seed(x, k, init, m, gen):
    if init == "random":
        return _seed_random(x, k, gen)
    if init == "kmeans++":
        return _seed_kmeanspp(x, k, gen)
    return _seed_afkmc2(x, k, m, gen)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, init: str = "afkmc2", chain_length: int = 200,
           seed: int = 0, tol: float = 1e-4, return_assignments: bool = False):
    """k-means (Lloyd) of the rows of ``x``; see ``pyvq.ops.kmeans``.

    Every Lloyd iteration: assign each point to its nearest centroid, move
    each centroid to the mean of its points; a centroid left without points
    moves to one of the points farthest from their centroid. Stop after
    ``iters`` iterations or once sum_j ||c_j' - c_j||^2 <= tol * mean_d
    var(x[:, d]).
    """
    compute = accumulation_dtype(x.dtype)
    xc = x.to(compute).contiguous()
    gen = torch.Generator(device=xc.device).manual_seed(seed)
    c = _seed(xc, k, init, chain_length, gen)

    threshold = tol * float(xc.var(0, unbiased=False).mean()) if xc.shape[0] > 1 else 0.0
    n_iter = 0
    while n_iter < iters:
        assignment, dist = _assign(xc, c)
        size = torch.bincount(assignment, minlength=k)
        total = torch.zeros_like(c).index_add_(0, assignment, xc)
        mean = total / size.clamp_min(1).to(compute).unsqueeze(1)
        lonely = torch.where(size == 0)[0]
        mean[lonely] = xc[torch.topk(dist, lonely.numel()).indices]
        moved = float((mean - c).pow(2).sum())
        c, n_iter = mean, n_iter + 1
        if moved <= threshold:
            break

    if not return_assignments:
        return c.to(x.dtype)
    assignment, dist = _assign(xc, c)
    return KMeansResult(c.to(x.dtype), assignment, dist.sum(), n_iter)
