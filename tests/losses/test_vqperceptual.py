"""pyvq.losses.VQLPIPSWithDiscriminator: the generator loss before and after
disc_start, the adaptive GAN weight, the detached discriminator step, the KL
path, logging, bad arguments, and a few alternating GAN steps on real images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyvq.losses import (
    VQLPIPSWithDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)


class TinyAE(nn.Module):
    """A stand-in autoencoder: a 3x3 conv and a 1x1 'decoder' conv whose
    weight is the last layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return torch.tanh(self.dec(torch.relu(self.enc(x))))


@pytest.fixture
def batch(images):
    x = images[0:16:4].clone()  # one tile of each photograph
    ae = TinyAE()
    return x, ae, ae(x)


def _loss(random_lpips=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("disc_ndf", 16)
    if random_lpips is None:
        kw.setdefault("perceptual_weight", 0.0)
    return VQLPIPSWithDiscriminator(kw.pop("disc_start", 10), perceptual=random_lpips, **kw)


def _nll(loss_fn, x, r, lp=None):
    """The reconstruction term, written out."""
    out = loss_fn.pixel_weight * (x - r).abs().mean()
    if lp is not None:
        out = out + loss_fn.perceptual_weight * lp(x, r).mean()
    return out


def test_before_disc_start_is_reconstruction_plus_codebook(random_lpips, batch):
    x, ae, r = batch
    L = _loss(random_lpips, codebook_weight=0.25, perceptual_weight=0.7, pixelloss_weight=1.5)
    calls = []
    L.discriminator.register_forward_hook(lambda *a: calls.append(1))
    q = torch.tensor([0.3, 0.5], requires_grad=True)
    loss, log = L(x, r, 0, global_step=9, codebook_loss=q, last_layer=ae.dec.weight)
    expected = _nll(L, x, r, random_lpips) + 0.25 * q.mean()
    assert torch.equal(loss, expected)
    assert calls == []  # the discriminator is not run before it starts
    assert log["train/g_loss"] == 0 and log["train/d_weight"] == 0 and log["train/disc_factor"] == 0
    assert torch.equal(log["train/quant_loss"], q.mean().detach())
    assert torch.allclose(log["train/p_loss"], random_lpips(x, r).mean())
    # discriminator step: zero-weighted, zero gradients
    d_loss, dlog = L(x, r, 1, global_step=9)
    assert d_loss.item() == 0.0 and dlog["train/disc_factor"] == 0
    d_loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in L.discriminator.parameters())


def test_after_disc_start_adds_weighted_gan_term(batch):
    x, ae, r = batch
    L = _loss(disc_start=5, codebook_weight=1.0, disc_factor=0.5, disc_weight=0.8)
    q = torch.tensor(0.2)
    loss, log = L(x, r, 0, global_step=5, codebook_loss=q, last_layer=ae.dec.weight)
    # the pieces, recomputed independently
    nll = _nll(L, x, r)
    g = -L.discriminator(r).mean()  # train-mode BatchNorm: same batch, same output
    lam = adaptive_weight(nll, g, ae.dec.weight) * 0.8
    assert torch.allclose(log["train/g_loss"], g.detach())
    assert torch.allclose(log["train/d_weight"], lam, rtol=1e-5)
    assert log["train/disc_factor"] == 0.5
    assert torch.allclose(loss, nll + lam * 0.5 * g + q, rtol=1e-5)
    assert torch.allclose(log["train/total_loss"], loss.detach())
    # the generator loss reaches the decoder, including through the GAN term
    loss.backward()
    assert ae.dec.weight.grad is not None and ae.dec.weight.grad.abs().sum() > 0


def test_without_last_layer_the_gan_weight_is_disc_weight(batch):
    x, _, r = batch
    L = _loss(disc_start=0, disc_weight=0.3)
    loss, log = L(x, r, 0, global_step=0)
    assert log["train/d_weight"].item() == pytest.approx(0.3)
    g = -L.discriminator(r).mean()
    assert torch.allclose(loss, _nll(L, x, r) + 0.3 * g, rtol=1e-6)


def test_discriminator_step_does_not_reach_the_generator(batch):
    x, ae, r = batch
    L = _loss(disc_start=0)
    x = x.clone().requires_grad_(True)
    d_loss, log = L(x, r, 1, global_step=3)
    d_loss.backward()
    assert all(p.grad is None for p in ae.parameters())
    assert x.grad is None
    assert all(p.grad is not None for p in L.discriminator.parameters())
    assert sum(p.grad.abs().sum() for p in L.discriminator.parameters()) > 0
    with torch.no_grad():
        lr, lf = L.discriminator(x), L.discriminator(r)
    assert torch.allclose(d_loss, hinge_d_loss(lr, lf), rtol=1e-5)
    assert torch.allclose(log["train/logits_real"], lr.mean(), rtol=1e-5)
    assert torch.allclose(log["train/logits_fake"], lf.mean(), rtol=1e-5)


class _Posterior:
    def __init__(self, kl):
        self._kl = kl

    def kl(self):
        return self._kl


def test_kl_path_uses_posterior_kl(batch):
    x, _, r = batch
    L = _loss(kl_weight=0.01)
    post = _Posterior(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    loss, log = L(x, r, 0, global_step=0, posterior=post)
    assert torch.allclose(loss, _nll(L, x, r) + 0.01 * 5.0)
    assert log["train/kl_loss"].item() == 5.0
    assert "train/quant_loss" not in log
    with pytest.raises(ValueError, match="codebook_loss.*posterior"):
        L(x, r, 0, global_step=0, posterior=post, codebook_loss=torch.tensor(1.0))
    # neither: a plain autoencoder (e.g. a decoder fine-tuned on a frozen encoder)
    loss, log = L(x, r, 0, global_step=0)
    assert torch.equal(loss, _nll(L, x, r))


def test_l2_pixel_loss_and_weight(batch):
    x, _, r = batch
    L = _loss(pixel_loss="l2", pixelloss_weight=2.0)
    loss, log = L(x, r, 0, global_step=0)
    mse = ((x - r) ** 2).mean()
    assert torch.allclose(log["train/rec_loss"], mse)
    assert torch.allclose(loss, 2.0 * mse)


def test_vanilla_loss_and_generator_choice(batch):
    x, _, r = batch
    L = _loss(disc_start=0, disc_loss="vanilla")
    assert L.gen_loss_name == "non_saturating"
    d_loss, _ = L(x, r, 1, global_step=0)
    with torch.no_grad():
        lr, lf = L.discriminator(x), L.discriminator(r)
    assert torch.allclose(d_loss, vanilla_d_loss(lr, lf), rtol=1e-5)
    _, log = L(x, r, 0, global_step=0)
    assert torch.allclose(log["train/g_loss"], non_saturating_g_loss(lf), rtol=1e-5)
    taming = _loss(disc_loss="vanilla", gen_loss="hinge")  # taming: -mean(logits) always
    assert taming.gen_loss_name == "hinge"


def test_logs_are_detached_scalars_with_split_prefix(batch):
    x, ae, r = batch
    L = _loss(disc_start=0)
    _, log = L(x, r, 0, global_step=1, codebook_loss=torch.tensor(0.1), last_layer=ae.dec.weight, split="val")
    assert set(log) == {
        "val/total_loss", "val/nll_loss", "val/rec_loss", "val/p_loss", "val/g_loss",
        "val/d_weight", "val/disc_factor", "val/quant_loss",
    }  # fmt: skip
    _, dlog = L(x, r, 1, global_step=1, split="val")
    assert set(dlog) == {"val/d_loss", "val/logits_real", "val/logits_fake", "val/disc_factor"}
    for v in list(log.values()) + list(dlog.values()):
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


def test_evaluation_under_no_grad(batch):
    """No gradients to balance: the GAN term drops out (taming's behaviour)."""
    x, ae, r = batch
    L = _loss(disc_start=0).eval()
    with torch.no_grad():
        loss, log = L(x, r.detach(), 0, global_step=1, codebook_loss=torch.tensor(0.1), last_layer=ae.dec.weight)
    assert log["train/d_weight"] == 0
    assert torch.allclose(loss, _nll(L, x, r.detach()) + 0.1)


def test_bad_arguments(batch):
    x, _, r = batch
    with pytest.raises(ValueError, match="'disc_loss'"):
        _loss(disc_loss="wgan")
    with pytest.raises(ValueError, match="'pixel_loss'"):
        _loss(pixel_loss="l3")
    with pytest.raises(ValueError, match="'gen_loss'"):
        _loss(gen_loss="softplus")
    with pytest.raises(ValueError, match="'codebook_weight'"):
        _loss(codebook_weight=-1.0)
    L = _loss()
    with pytest.raises(ValueError, match="'optimizer_idx'"):
        L(x, r, 2, global_step=0)
    with pytest.raises(ValueError, match="same shape"):
        L(x, r[:, :, :16], 0, global_step=0)


def test_alternating_gan_steps_on_real_images(random_lpips, images):
    """Two optimizers, as a trainer would use them: the reconstruction
    improves and nothing in the graph handling breaks."""
    x = images[0:16:4]
    ae = TinyAE()
    L = _loss(random_lpips, disc_start=2, disc_ndf=8)
    opt_g = torch.optim.Adam(ae.parameters(), lr=3e-3)
    opt_d = torch.optim.Adam(L.discriminator.parameters(), lr=1e-3)
    recs = []
    for step in range(4):
        r = ae(x)
        loss, log = L(x, r, 0, step, last_layer=ae.dec.weight)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d_loss, dlog = L(x, r, 1, step)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        recs.append(log["train/rec_loss"].item())
        assert torch.isfinite(loss) and torch.isfinite(d_loss)
        assert (log["train/d_weight"] > 0) == (step >= 2)
    assert recs[-1] < recs[0]
