"""pyvq.losses.gan: PatchGAN layout, output sizes and initialisation; ActNorm;
GAN loss values on hand-made logits; the adaptive weight against gradients
worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyvq.losses import (
    ActNorm,
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)


# ------------------------------------------------------------ discriminator
@pytest.mark.parametrize(
    "size, ndf, n_layers, side",
    [
        (64, 64, 3, 6),  # default network
        (256, 8, 3, 30),  # taming's 256 x 256 -> 30 x 30 patch map
        (32, 8, 3, 2),
        (64, 8, 2, 14),  # 64 / 4 - 2
    ],
)
def test_output_shape(size, ndf, n_layers, side):
    d = NLayerDiscriminator(ndf=ndf, n_layers=n_layers)
    with torch.no_grad():
        out = d(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, side, side)


def test_layout_matches_taming():
    d = NLayerDiscriminator()
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert [type(m).__name__ for m in d.main] == (
        ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3 + ["Conv2d"]
    )
    assert all(m.negative_slope == 0.2 for m in d.main if isinstance(m, nn.LeakyReLU))
    # taming's parameter names, so its discriminator weights load
    assert set(d.state_dict()) >= {"main.0.weight", "main.0.bias", "main.3.running_mean", "main.11.weight"}
    # channel multiplier caps at 8
    wide = NLayerDiscriminator(ndf=4, n_layers=5)
    assert max(m.out_channels for m in wide.main if isinstance(m, nn.Conv2d)) == 32


def test_initialisation_statistics():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    w = torch.cat([m.weight.flatten() for m in d.main if isinstance(m, nn.Conv2d)])
    assert w.numel() > 2_000_000
    assert abs(w.mean().item()) < 1e-4
    assert w.std().item() == pytest.approx(0.02, rel=0.01)
    bn = [m for m in d.main if isinstance(m, nn.BatchNorm2d)]
    g = torch.cat([m.weight for m in bn])
    assert g.numel() == 128 + 256 + 512
    assert g.mean().item() == pytest.approx(1.0, abs=0.003)  # 5 standard errors
    assert 0.017 < g.std().item() < 0.023
    assert all(torch.all(m.bias == 0) for m in bn)


def test_actnorm_variant():
    torch.manual_seed(0)
    d = NLayerDiscriminator(ndf=8, use_actnorm=True)
    norms = [m for m in d.main if isinstance(m, ActNorm)]
    assert len(norms) == 3 and not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert all(m.bias is not None for m in d.main if isinstance(m, nn.Conv2d))
    seen = []
    norms[0].register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))  # LeakyReLU next is in-place
    x = torch.randn(4, 3, 32, 32)
    d.train()(x)
    y = seen[0].transpose(0, 1).reshape(16, -1)
    assert torch.allclose(y.mean(1), torch.zeros(16), atol=1e-5)
    assert torch.allclose(y.std(1), torch.ones(16), atol=1e-4)
    assert all(int(m.initialized) == 1 for m in norms)
    loc = norms[0].loc.clone()
    d(torch.randn(4, 3, 32, 32) * 3 + 1)  # later batches do not re-initialise
    assert torch.equal(norms[0].loc, loc)
    fresh = ActNorm(2).eval()
    fresh(torch.randn(2, 2, 3, 3))  # no data-dependent init outside training
    assert int(fresh.initialized) == 0


def test_bad_layers():
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)


# ---------------------------------------------------------------- losses
REAL = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
FAKE = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)


def _softplus(v):
    return math.log1p(math.exp(v))


def test_hinge_d_loss_by_hand():
    # relu(1 - real) = [0, .5, 2] -> 2.5/3 ; relu(1 + fake) = [0, 1, 2.5] -> 3.5/3
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(1.0)
    # confident and correct -> zero loss
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)).item() == 0.0


def test_vanilla_d_loss_by_hand():
    expected = 0.5 * (
        sum(_softplus(-r) for r in REAL.tolist()) / 3 + sum(_softplus(f) for f in FAKE.tolist()) / 3
    )
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-12)
    # equals binary cross-entropy with labels 1 (real) and 0 (fake)
    bce = nn.functional.binary_cross_entropy_with_logits
    ref = 0.5 * (bce(REAL, torch.ones_like(REAL)) + bce(FAKE, torch.zeros_like(FAKE)))
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(ref.item(), rel=1e-12)


def test_generator_losses_by_hand():
    assert hinge_g_loss(FAKE).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    expected = sum(_softplus(-f) for f in FAKE.tolist()) / 3
    assert non_saturating_g_loss(FAKE).item() == pytest.approx(expected, rel=1e-12)


def test_adopt_weight():
    assert adopt_weight(0.7, 9, threshold=10) == 0.0
    assert adopt_weight(0.7, 10, threshold=10) == 0.7
    assert adopt_weight(0.7, 11, threshold=10) == 0.7
    assert adopt_weight(0.7, 3, threshold=10, value=0.25) == 0.25
    assert adopt_weight(0.7, 0) == 0.7


# ------------------------------------------------------------ adaptive weight
def _linear_decoder_losses(seed=0):
    """A linear 'decoder' y = z W^T, rec = mean((y - x)^2), g = -mean(y v)
    (a linear critic v); gradients w.r.t. W worked out by hand."""
    g = torch.Generator().manual_seed(seed)
    N, din, dout = 5, 4, 3
    z = torch.randn(N, din, generator=g, dtype=torch.float64)
    x = torch.randn(N, dout, generator=g, dtype=torch.float64)
    v = torch.randn(dout, generator=g, dtype=torch.float64)
    W = torch.randn(dout, din, generator=g, dtype=torch.float64, requires_grad=True)
    y = z @ W.t()
    rec = ((y - x) ** 2).mean()
    gl = -(y @ v).mean()
    with torch.no_grad():
        d_rec = 2.0 / (N * dout) * (y - x).t() @ z  # d/dW of mean((zW^T - x)^2)
        d_g = -torch.outer(v, z.sum(0)) / N  # d/dW of -mean(z W^T v)
    return rec, gl, W, d_rec, d_g


def test_adaptive_weight_is_ratio_of_gradient_norms():
    rec, gl, W, d_rec, d_g = _linear_decoder_losses()
    lam = adaptive_weight(rec, gl, W)
    expected = d_rec.norm() / (d_g.norm() + 1e-4)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-12)
    assert lam.dim() == 0 and not lam.requires_grad
    # the graph was retained: the caller can still backpropagate
    (rec + lam * gl).backward()
    assert torch.allclose(W.grad, d_rec + lam * d_g)


def test_adaptive_weight_clamped():
    rec, gl, W, d_rec, d_g = _linear_decoder_losses(1)
    unclamped = (d_rec.norm() / (d_g.norm() + 1e-4)).item()
    assert adaptive_weight(rec, gl, W, max=unclamped / 2).item() == pytest.approx(unclamped / 2)
    # a GAN loss with no gradient at the last layer: ||d_rec|| / 1e-4, capped at max
    flat = (W * 0).sum()
    assert adaptive_weight(rec, flat, W, max=1e4).item() == pytest.approx(min(1e4, d_rec.norm().item() / 1e-4))
    assert adaptive_weight(rec, flat, W, max=1.0).item() == 1.0
