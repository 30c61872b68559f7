"""Inpainting evaluation of the Asymmetric VQGAN decoder: mask sets, the
preserving error, the four-method comparison, the report and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pyvq.models.tokenizers import VQGAN, AsymmetricVQGAN, AutoencoderKL
from pyvq.train.inpaint_eval import (
    METHODS,
    evaluate_inpainting,
    example_images,
    inpaint_masks,
    pre_error,
    write_inpaint_report,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vq():
    torch.manual_seed(0)
    base = VQGAN.from_preset("vqgan_tiny").eval()
    return base, AsymmetricVQGAN.from_base(base).eval()


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("name", ["thick", "medium", "thin", "box", "hard"])
def test_masks_shape_binary_deterministic(name):
    a = inpaint_masks(name, 6, 32, 48, seed=3)
    assert a.shape == (6, 1, 32, 48) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, inpaint_masks(name, 6, 32, 48, seed=3))
    assert not torch.equal(a, inpaint_masks(name, 6, 32, 48, seed=4))
    # mask i depends on (seed, i) only, not on n
    assert torch.equal(a[:3], inpaint_masks(name, 3, 32, 48, seed=3))
    assert (a.flatten(1).sum(1) > 0).all()  # never empty


def test_mask_set_hole_ratios():
    ratio = {name: float(inpaint_masks(name, 48, 64, 64).mean()) for name in ("thick", "medium", "thin", "box")}
    assert 0.24 <= ratio["thick"] <= 0.40, ratio
    assert 0.13 <= ratio["medium"] <= 0.26, ratio
    assert 0.07 <= ratio["thin"] <= 0.16, ratio
    assert 0.15 <= ratio["box"] <= 0.28, ratio
    assert ratio["thick"] > ratio["medium"] > ratio["thin"]


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (40, 56)])
def test_hard_masks_cover_40_to_50_percent(size):
    m = inpaint_masks("hard", 12, *size, seed=1)
    r = m.flatten(1).mean(1)
    assert ((r >= 0.4) & (r <= 0.5)).all(), r


def test_stroke_widths_differ():
    """Thin strokes are narrower: fewer hole pixels per stroke boundary pixel."""
    import torch.nn.functional as F

    def thickness(name):
        m = inpaint_masks(name, 24, 128, 128)
        eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
        boundary = (m - eroded).sum()
        return float(m.sum() / boundary)  # ~ half the stroke width in pixels

    t = {n: thickness(n) for n in ("thick", "medium", "thin")}
    assert t["thick"] > 1.5 * t["medium"] > 1.5 * 1.5 * t["thin"], t


def test_bad_mask_name():
    with pytest.raises(ValueError, match="unknown mask set"):
        inpaint_masks("huge", 2, 8, 8)


# -------------------------------------------------------------- pre_error
def test_pre_error_hand_made():
    x = torch.zeros(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :2] = 1  # top half is the hole
    y = x.clone()
    y[:, :, :2] = 5.0  # wrong only inside the hole
    assert pre_error(y, x, m) == 0.0
    y[:, :, 2:] += 0.5  # off by 0.5 everywhere outside
    assert pre_error(y, x, m) == pytest.approx(0.25)
    # one image off by 1 outside, the other exact: pooled over known pixels
    y = x.clone()
    y[0, :, 2:] = 1.0
    assert pre_error(y, x, m) == pytest.approx(0.5)
    assert math.isnan(pre_error(y, x, torch.ones(2, 1, 4, 4)))


# ----------------------------------------------------- evaluate_inpainting
def test_evaluate_inpainting_vq(tiny_vq, skimage_patches, tmp_path):
    base, asym = tiny_vq
    x = skimage_patches[:8] * 2 - 1
    masks = inpaint_masks("thick", 8, 32, 32)
    results, preds = evaluate_inpainting(base, asym, x, masks, return_predictions=True)
    assert set(results) == set(METHODS)
    for method, r in results.items():
        assert set(r) == {"pre_error", "psnr"}
        assert all(math.isfinite(v) for v in r.values()), (method, r)
        assert preds[method].shape == x.shape
    assert results["naive_blend"]["pre_error"] == 0.0
    # from_base copies the decoder: without a mask the new decoder is the vanilla one
    assert torch.allclose(preds["asymmetric"], preds["vanilla"], atol=1e-5)
    # the blend keeps the input outside the hole and the vanilla output inside it
    assert torch.equal(preds["naive_blend"] * (1 - masks), x * (1 - masks))
    assert torch.allclose(preds["naive_blend"] * masks, preds["vanilla"] * masks)

    ex = example_images("train", 32)
    ex_masks = inpaint_masks("thick", ex.shape[0], 32, 32, seed=1)
    _, ex_preds = evaluate_inpainting(base, asym, ex, ex_masks, return_predictions=True)
    report = write_inpaint_report(str(tmp_path), results, examples=(ex, ex_masks, ex_preds))
    assert os.path.isfile(tmp_path / "examples.png")
    text = open(report).read()
    assert "| method |" in text and "asymmetric_masked" in text and "Pre_error ratio" in text
    saved = json.load(open(tmp_path / "metrics.json"))["results"]
    assert saved["naive_blend"]["pre_error"] == 0.0

    from PIL import Image

    png = Image.open(tmp_path / "examples.png")
    w, h = png.size  # 5 labelled columns of 3x-enlarged 32 px crops, one row per image, below a label band
    assert w >= 5 * (3 * 32 + 2) + 2 and h > ex.shape[0] * (3 * 32 + 2) + 2


def test_example_images_text_and_page():
    ex = example_images("train", 24)
    assert ex.shape == (2, 3, 24, 24) and ex.min() >= -1 and ex.max() <= 1
    val = example_images("val", 24)  # text/page are not in val: falls back to the split's first images
    assert val.shape == (2, 3, 24, 24)


def test_evaluate_inpainting_kl_with_lpips(skimage_patches):
    from pyvq.losses import build_lpips

    torch.manual_seed(0)
    base = AutoencoderKL.from_preset("kl_tiny").eval()
    asym = AsymmetricVQGAN.from_base(base).eval()
    x = skimage_patches[:4] * 2 - 1
    masks = inpaint_masks("hard", 4, 32, 32)
    lpips = build_lpips(pretrained_backbone=False).eval()
    results = evaluate_inpainting(base, asym, x, masks, lpips=lpips)
    assert set(results) == set(METHODS)
    for r in results.values():
        assert set(r) == {"pre_error", "psnr", "lpips"} and all(math.isfinite(v) for v in r.values())
    assert results["naive_blend"]["pre_error"] == 0.0
    assert results["asymmetric"]["psnr"] == pytest.approx(results["vanilla"]["psnr"], abs=1e-3)


def test_bad_mask_shape(tiny_vq):
    base, asym = tiny_vq
    with pytest.raises(ValueError, match="masks must be"):
        evaluate_inpainting(base, asym, torch.zeros(2, 3, 32, 32), torch.zeros(3, 1, 32, 32))


# --------------------------------------------------------------------- CLI
def test_cli_eval_inpaint(tiny_vq, tmp_path):
    base, asym = tiny_vq
    tok, dec, out = tmp_path / "tok", tmp_path / "dec", tmp_path / "report"
    base.save_pretrained(str(tok / "model"))
    asym.save_pretrained(str(dec / "model"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pyvq.cli", "eval-inpaint", "--tokenizer", str(tok), "--decoder", str(dec),
         "--data", "builtin", "--split", "val", "--masks", "hard", "--num", "4", "--image-size", "32",
         "--no-lpips", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out / "report.md") in proc.stdout
    data = json.load(open(out / "metrics.json"))
    assert set(data["results"]) == set(METHODS)
    assert data["info"]["num_images"] == 4 and 0.4 <= data["info"]["mean_hole_ratio"] <= 0.5
    assert os.path.isfile(out / "examples.png")


def test_cli_eval_inpaint_missing_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyvq.cli", "eval-inpaint", "--tokenizer", str(tmp_path / "nope"),
         "--decoder", str(tmp_path / "nope"), "--no-lpips"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120,
    )
    assert proc.returncode != 0 and "has no trained model" in proc.stderr


def test_demo_inpaint_job(tiny_vq, tmp_path):
    """The demo-inpaint job end to end on a saved base, with a few steps:
    trains the decoder (base frozen), writes the report with the target lines
    and the examples at 4x the evaluation size."""
    from PIL import Image

    from pyvq.demo import run_inpaint_demo

    base, _ = tiny_vq
    base.save_pretrained(str(tmp_path / "tok" / "model"))
    report = run_inpaint_demo(str(tmp_path / "out"), base_run=str(tmp_path / "tok"), steps=2, image_size=32,
                              batch_size=4, num_images=4)
    text = open(report).read()
    assert "Pre_error ratio vanilla / asymmetric-with-mask" in text
    assert "Without the mask the asymmetric decoder's Pre_error" in text
    data = json.load(open(tmp_path / "out" / "metrics.json"))
    assert data["info"]["decoder_train_steps"] == 2 and data["info"]["masks"] == "hard"
    assert os.path.isfile(tmp_path / "out" / "train" / "model" / "config.json")
    w, h = Image.open(tmp_path / "out" / "examples.png").size
    assert w > 5 * 128 and h > 2 * 128  # 5 columns, "text" and "page" rows, 128 px crops


def test_demo_inpaint_needs_a_base(tmp_path):
    from pyvq.demo import run_inpaint_demo

    with pytest.raises(SystemExit, match="run `pyvq demo`"):
        run_inpaint_demo(str(tmp_path / "out"), base_run=str(tmp_path / "missing"), steps=1)


# ------------------------------------------- the decoder's base, the data
def _eval_inpaint(*args):
    from pyvq import cli

    return cli.main(["eval-inpaint", "--masks", "box", "--num", "2", "--image-size", "32", "--no-lpips", *args])


def test_cli_eval_inpaint_refuses_another_base(tiny_vq, tmp_path):
    # Was a report from another VQGAN's decoder on this one's latents (ratio 3.17 for 0.637).
    _, asym = tiny_vq
    torch.manual_seed(1)
    other = VQGAN.from_preset("vqgan_tiny").eval()
    other.save_pretrained(str(tmp_path / "other" / "model"))
    asym.save_pretrained(str(tmp_path / "dec" / "model"))
    with pytest.raises(SystemExit, match="is not the base of") as err:
        _eval_inpaint("--tokenizer", str(tmp_path / "other"), "--decoder", str(tmp_path / "dec"),
                      "--out", str(tmp_path / "report"))
    assert str(tmp_path / "other") in str(err.value) and str(tmp_path / "dec") in str(err.value)
    assert not os.path.exists(tmp_path / "report")


def test_cli_eval_inpaint_takes_the_base_from_the_decoder_run(tiny_vq, tmp_path):
    base, asym = tiny_vq
    base.save_pretrained(str(tmp_path / "tok" / "model"))
    asym.save_pretrained(str(tmp_path / "dec" / "model"))
    (tmp_path / "dec" / "config.json").write_text(json.dumps({"model": "asym_vqgan_tiny",
                                                              "base": str(tmp_path / "tok")}))
    assert _eval_inpaint("--decoder", str(tmp_path / "dec"), "--out", str(tmp_path / "report")) == 0
    info = json.load(open(tmp_path / "report" / "metrics.json"))["info"]
    assert info["tokenizer"] == str(tmp_path / "tok")
    (tmp_path / "dec" / "config.json").write_text(json.dumps({"model": "asym_vqgan_tiny", "base": None}))
    with pytest.raises(SystemExit, match="records no base tokenizer run"):
        _eval_inpaint("--decoder", str(tmp_path / "dec"), "--out", str(tmp_path / "report2"))


def test_cli_eval_inpaint_reports_and_shows_the_folder_it_used(tiny_vq, tmp_path):
    from PIL import Image

    base, asym = tiny_vq
    base.save_pretrained(str(tmp_path / "tok" / "model"))
    asym.save_pretrained(str(tmp_path / "dec" / "model"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / f"{i}.png")  # pure red: no built-in photo is
    assert _eval_inpaint("--tokenizer", str(tmp_path / "tok"), "--decoder", str(tmp_path / "dec"),
                         "--data", str(folder), "--out", str(tmp_path / "report")) == 0
    info = json.load(open(tmp_path / "report" / "metrics.json"))["info"]
    assert info["data"] == str(folder) and info["split"] != "val" and "folder" in info["split"]
    assert str(folder) in info["examples"]
    import numpy as np

    px = torch.from_numpy(np.array(Image.open(tmp_path / "report" / "examples.png").convert("RGB"))).int()
    red = ((px[..., 0] > 200) & (px[..., 1] < 50) & (px[..., 2] < 50)).float().mean()
    assert red > 0.05, float(red)  # the folder's images, not the built-in "text" and "page"
