"""The main job (``pyvq demo``) in a few steps: the report and metrics hold
both baselines (mean colour, patch k-means), the labelled figure is written,
and the patch k-means baseline is what an independent computation on the
same patches gives. The quality target is the demo's own job, not asserted
here."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pyvq.demo import image_patches, patch_kmeans_baseline, patches_to_images, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def _crops(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: a few colours blended, so k-means has structure to find
    base = torch.rand(n, 3, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(n, 3, size, size, generator=g) * 0.1
    return (F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False) + noise).clamp(-1, 1)


def test_patches_round_trip_and_layout():
    x = _crops(3, 8)
    p = image_patches(x, 2)
    assert p.shape == (3 * 4 * 4, 12)
    # independent: F.unfold with stride 2 gives (B, C*f*f, L) in the same (channel, dy, dx) order
    ref = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2).reshape(-1, 12)
    assert torch.equal(p, ref)
    assert torch.equal(patches_to_images(p, x.shape), x)
    with pytest.raises(ValueError, match="multiple"):
        image_patches(torch.zeros(1, 3, 7, 8), 2)


def test_patch_kmeans_baseline_matches_an_independent_computation():
    train, val = _crops(24, 8, seed=1), _crops(6, 8, seed=2)
    out = patch_kmeans_baseline(train, val, num_codes=16, factor=2, seed=0)
    codebook = out["codebook"]
    assert codebook.shape == (16, 12)
    # nearest centroid of every held-out patch, by brute force
    vp = F.unfold(val, kernel_size=2, stride=2).transpose(1, 2).reshape(-1, 12)
    nearest = torch.cdist(vp.double(), codebook.double()).argmin(1)
    rec = F.fold(codebook[nearest].view(6, -1, 12).transpose(1, 2), output_size=(8, 8), kernel_size=2, stride=2)
    torch.testing.assert_close(out["reconstructions"], rec)
    mse = (val.double() - rec.double()).pow(2).flatten(1).mean(1)
    assert out["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-6)
    # the centroids are (close to) a Lloyd fixed point on the training patches:
    # one more plain Lloyd step barely moves them
    tp = F.unfold(train, kernel_size=2, stride=2).transpose(1, 2).reshape(-1, 12).double()
    assign = torch.cdist(tp, codebook.double()).argmin(1)
    moved = 0.0
    for k in range(16):
        members = tp[assign == k]
        if len(members):
            moved += float((members.mean(0) - codebook[k].double()).pow(2).sum())
    assert moved <= 1e-2 * float(tp.var(0).sum()) * 16
    # and they beat the trivial codebook of 16 random training patches
    random_codes = tp[torch.randperm(len(tp), generator=torch.Generator().manual_seed(0))[:16]]
    inertia = lambda c: float(torch.cdist(tp, c).min(1).values.pow(2).sum())  # noqa: E731
    assert inertia(codebook.double()) < inertia(random_codes)


def test_demo_in_a_few_steps_reports_both_baselines(tmp_path):
    out = str(tmp_path / "demo")
    report = run_demo(out, train_steps=4, finetune_steps=2, kmeans_init_step=2, batch_size=4, time_backends=False,
                      baseline_epochs=1)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["baseline_mean_color_psnr"] > 0
    pk = m["baseline_patch_kmeans"]
    assert pk["num_codes"] == 256 and pk["patch"] == 2 and pk["psnr"] > m["baseline_mean_color_psnr"]
    assert 0 < pk["ssim"] <= 1
    for key in ("before_refit", "after_codebook_rebuild", "after_refit"):
        assert {"psnr", "ssim", "codebook_usage"} <= set(m[key])
    assert m["recipe"]["kmeans_init_step"] == 2 and m["train_steps"] == 4
    text = open(report).read()
    assert "mean colour" in text and "patch k-means baseline" in text
    assert f"{pk['psnr']:.2f}" in text and f"{m['baseline_mean_color_psnr']:.2f}" in text
    png = Image.open(os.path.join(out, "reconstructions.png"))
    w, h = png.size
    assert w > 8 * 128 and h > 4 * 128  # 8 columns, 4 labelled rows of 4x-enlarged 32 px crops
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))
    assert os.path.isfile(os.path.join(out, "train", "model", "config.json"))


def test_demo_refuses_unknown_recipe_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe keys"):
        run_demo(str(tmp_path / "d"), learning_rate=1.0)
