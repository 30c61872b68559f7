"""pyvq.ops.nearest_code's CUDA kernel (csrc/codebook/codebook_cuda.cu)
against the float64 oracle: the CUDA case of the codebook tests, run by
``make gpu-check`` (its ``-k cuda`` selects every test here). Skipped without
a CUDA device."""

from __future__ import annotations

import pytest
import torch

from pyvq import _backend, reference
from pyvq.ops import nearest_code
from pyvq.reference.codebook import distance_to
from tests.conftest import half_precision_bound
from tests.ops.test_codebook import SHAPES, assert_matches_oracle, oracle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs(n, k, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(k, d, generator=g, dtype=dtype)


def test_cuda_kernel_is_registered():
    assert _backend.has_kernel("nearest_code", "cuda"), "pyvq was built without the nearest_code CUDA kernel"


@pytest.mark.parametrize("n,k,d", SHAPES + [(4099, 1031, 77), (1024, 8192, 256)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(n, k, d, metric, dtype):
    x, cb = _inputs(n, k, d, dtype, n * 1000 + k + d)
    idx, dist = nearest_code(x.cuda(), cb.cuda(), metric=metric)
    assert idx.is_cuda and dist.is_cuda
    assert_matches_oracle(x, cb, idx.cpu(), dist.cpu(), metric, dist_tol=1e-4 if dtype == torch.float32 else 1e-10)
    if dtype == torch.float64:
        assert torch.equal(idx.cpu(), oracle(x, cb, metric)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_half_precision(dtype, metric):
    """As the CPU test: the distance to the chosen code against float64 is
    within the bound of the reference run in the same dtype."""
    x, cb = _inputs(300, 50, 24, torch.float32, 1)
    x, cb = x.to(dtype), cb.to(dtype)
    idx, dist = nearest_code(x.cuda(), cb.cuda(), metric=metric)
    idx, dist = idx.cpu(), dist.cpu()
    assert dist.dtype == dtype and idx.dtype == torch.long
    ref_idx, _ = oracle(x, cb, metric)
    assert (idx != ref_idx).double().mean() <= 0.01
    _, ref_low = reference.nearest_code(x, cb, metric=metric)
    half_precision_bound(dist, ref_low, distance_to(x.double(), cb.double()[idx], metric), atol=1e-6)


def test_cuda_non_contiguous_and_batched():
    x, cb = _inputs(2 * 3 * 40, 70, 16, torch.float32, 5)
    xs = x.view(2, 3, 40, 16).cuda().transpose(1, 2)  # (2, 40, 3, 16), strided
    cbs = cb.cuda().t().contiguous().t()  # (70, 16) column-major
    idx, dist = nearest_code(xs, cbs)
    assert idx.shape == (2, 40, 3)
    ref_idx, ref_dist = nearest_code(xs.cpu().contiguous(), cb)
    assert torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(dist.cpu(), ref_dist, rtol=1e-4, atol=1e-4)


def test_cuda_distance_gradient():
    x, cb = _inputs(64, 20, 8, torch.float64, 9)
    xg, cg = x.cuda().requires_grad_(), cb.cuda().requires_grad_()
    _, dist = nearest_code(xg, cg)
    gx, gc = torch.autograd.grad(dist.sum(), (xg, cg))
    xr, cr = x.clone().requires_grad_(), cb.clone().requires_grad_()
    _, dist_r = nearest_code(xr, cr)
    rx, rc = torch.autograd.grad(dist_r.sum(), (xr, cr))
    torch.testing.assert_close(gx.cpu(), rx)
    torch.testing.assert_close(gc.cpu(), rc)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_opcheck(metric):
    x, cb = _inputs(33, 13, 16, torch.float32, 3)
    torch.library.opcheck(torch.ops.pyvq.nearest_code.default, (x.cuda(), cb.cuda(), metric))
