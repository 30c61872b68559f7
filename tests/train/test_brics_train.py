"""Training BRICS: the WGAN losses and penalties, the model's training
defaults in TrainConfig, the trainer on real images, the CLI with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyvq.losses import ReconstructionWGANLoss, gradient_penalty, r1_penalty, wgan_d_loss, wgan_g_loss
from pyvq.train.checkpoint import latest_checkpoint
from pyvq.train.config import TrainConfig
from pyvq.train.logger import read_jsonl
from pyvq.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw):
    base = dict(model="brics_tiny", data="builtin", image_size=32, batch_size=4, steps=3, perceptual_weight=0.0,
                log_every=1, image_every=100, ckpt_every=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class _Linear(torch.nn.Module):
    """D(x) = <a, x> per image: its input gradient is a everywhere."""

    def __init__(self, shape):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return (x * self.a).flatten(1).sum(1, keepdim=True)


# ------------------------------------------------------------------ losses
def test_wgan_losses_and_penalties():
    torch.manual_seed(0)
    real, fake = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    d = _Linear((3, 5, 5))
    lr, lf = d(real), d(fake)
    torch.testing.assert_close(wgan_d_loss(lr, lf), lf.mean() - lr.mean())
    torch.testing.assert_close(wgan_g_loss(lf), -lf.mean())
    sq = d.a.detach().square().sum()
    penalty, logits = r1_penalty(d, real)
    torch.testing.assert_close(penalty, sq)
    torch.testing.assert_close(logits, lr)
    penalty.backward()  # differentiable in the critic's parameters: d/da ||a||^2 = 2a
    torch.testing.assert_close(d.a.grad, 2 * d.a.detach())
    torch.testing.assert_close(gradient_penalty(d, real, fake), (sq.sqrt() - 1).square())


class _Perceptual(torch.nn.Module):
    """A stand-in perceptual distance (per-image mean absolute difference)."""

    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3))


def test_reconstruction_wgan_loss(skimage_patches):
    torch.manual_seed(0)
    perceptual = _Perceptual()
    x = skimage_patches[:4] * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    d = _Linear((3, 32, 32))
    loss = ReconstructionWGANLoss(d, perceptual=perceptual, disc_start=2)
    # before disc_start: 20 * L2 + 5 * LPIPS, no critic call
    total, log = loss(x, y, 0, 1)
    l2 = (x - y).square().mean()
    p = perceptual(x, y).mean()
    torch.testing.assert_close(total, 20 * l2 + 5 * p)
    assert log["train/g_loss"] == 0 and log["train/disc_factor"] == 0 and log["train/p_loss"] > 0
    # after: + WGAN generator term, + KL
    kl = torch.tensor([3.0, 5.0])
    total, log = loss(x, y, 0, 2, kl=kl, last_layer=torch.ones(1))
    torch.testing.assert_close(total, 20 * l2 + 5 * p - d(y).mean() + 1e-6 * 4.0)
    assert log["train/kl_loss"] == 4.0
    total.backward()
    assert y.grad.abs().sum() > 0
    # critic: WGAN + 4 * R1
    d_loss, log = loss(x, y, 1, 2)
    torch.testing.assert_close(d_loss, d(y).mean() - d(x).mean() + 4 * d.a.square().sum())
    assert set(log) == {f"train/{k}" for k in ("d_loss", "wgan_loss", "penalty", "logits_real", "logits_fake",
                                               "disc_factor")}
    gp = ReconstructionWGANLoss(d, perceptual_weight=0, penalty="gp", penalty_every=2, drift_weight=0.1)
    assert gp.perceptual is None
    d_loss, _ = gp(x, y, 1, 4)
    expected = d(y).mean() - d(x).mean() + 4 * 2 * (d.a.norm() - 1).square() + 0.1 * d(x).square().mean()
    torch.testing.assert_close(d_loss, expected)
    d_loss, log = gp(x, y, 1, 5)  # lazy: no penalty on odd steps
    assert log["train/penalty"] == 0
    with pytest.raises(ValueError, match="penalty"):
        ReconstructionWGANLoss(d, penalty="r2", perceptual_weight=0)
    with pytest.raises(ValueError, match="pixel_weight"):
        ReconstructionWGANLoss(d, pixel_weight=-1, perceptual_weight=0)


# --------------------------------------------------------- config defaults
def test_model_training_defaults_fill_unset_fields(tmp_path):
    t = Trainer(_config(lr=1e-3), str(tmp_path / "a"))
    c = t.config
    assert c.lr == 1e-3  # the user's value
    assert c.betas == (0.0, 0.99) and c.adam_eps == 1e-15 and c.disc_adam_eps == 1e-8
    assert (c.pixel_loss, c.pixel_weight, c.disc_weight, c.grad_clip) == ("l2", 20.0, 1.0, 0.0)
    assert c.perceptual_weight == 0.0  # the user's value, not BRICS' 5
    assert c.disc_start == TrainConfig().disc_start
    assert t.opt_g.defaults["eps"] == 1e-15 and t.opt_d.defaults["eps"] == 1e-8
    assert t.opt_g.param_groups[0]["betas"] == (0.0, 0.99)
    assert isinstance(t.loss, ReconstructionWGANLoss) and t.loss.pixel_weight == 20.0
    assert t.disc.resolution == 32
    assert json.load(open(tmp_path / "a" / "config.json"))["adam_eps"] == 1e-15
    kept = Trainer(_config(model_defaults=False), str(tmp_path / "b")).config
    assert kept == _config(model_defaults=False)
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig().with_model_defaults({"bogus": 1})
    # perceptual_weight left at TrainConfig's default: BRICS' 5, on the injected module
    perceptual = _Perceptual()
    lp = Trainer(_config(perceptual_weight=1.0), str(tmp_path / "d"), perceptual=perceptual).loss
    assert lp.perceptual_weight == 5.0 and lp.perceptual is perceptual
    # a model without train_defaults keeps TrainConfig's values
    v = Trainer(_config(model="vqgan_tiny"), str(tmp_path / "c"))
    assert v.config == _config(model="vqgan_tiny") and v.opt_g.defaults["eps"] == 1e-8


# ------------------------------------------------------------------ trainer
def test_training_lowers_reconstruction_loss(tmp_path):
    from pyvq.data import BuiltinImages

    val = torch.stack([BuiltinImages("val", size=32)[i] for i in range(16)])  # held-out photos
    t = Trainer(_config(steps=30, batch_size=8, disc_start=100, log_every=5), str(tmp_path))

    def val_l2():
        t.model.eval()
        with torch.no_grad():
            err = (t.model(val)[0] - val).square().mean().item()
        t.model.train()
        return err

    before = val_l2()
    t.train(progress=False)
    after = val_l2()
    assert after < 0.6 * before, (before, after)
    rows = read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert all("train/rec_loss" in r and "train/d_loss" not in r for r in rows)
    assert (tmp_path / "model" / "config.json").exists()


def test_gan_steps_kl_and_ema(tmp_path):
    t = Trainer(_config(disc_start=1, ema_decay=0.9, model_overrides={"kl": True}), str(tmp_path))
    disc_before = {k: v.clone() for k, v in t.disc.state_dict().items()}
    t.train(progress=False)
    rows = read_jsonl(str(tmp_path / "log.jsonl"))
    assert "train/d_loss" not in rows[0] and rows[0]["train/g_loss"] == 0
    for r in rows[1:]:
        assert r["train/penalty"] > 0 and r["train/g_loss"] != 0
    assert all(r["train/kl_loss"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for v in r.values())
    assert any(not torch.equal(v, t.disc.state_dict()[k]) for k, v in disc_before.items())
    from pyvq.models import BRICS, load_pretrained

    final = load_pretrained(str(tmp_path / "model"))
    assert isinstance(final, BRICS) and final.config.kl


def test_cli_train_and_resume(tmp_path):
    run = str(tmp_path / "run")
    args = ["--preset", "brics_tiny", "--data", "builtin", "--image-size", "32", "--batch-size", "2",
            "--perceptual-weight", "0", "--disc-start", "1", "--log-every", "1", "--out", run]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def pyvq(*extra):
        out = subprocess.run([sys.executable, "-m", "pyvq.cli", "train", *args, *extra], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    pyvq("--steps", "2")
    assert latest_checkpoint(run).endswith("step_000000002")
    assert os.path.isdir(os.path.join(run, "model"))
    pyvq("--steps", "3", "--resume")
    assert latest_checkpoint(run).endswith("step_000000003")
    rows = read_jsonl(os.path.join(run, "log.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "train/d_loss" in rows[-1]
