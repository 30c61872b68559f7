"""`pyvq train` / `pyvq eval` / `pyvq demo` end to end on tiny settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pyvq._weights import hub_checkpoint_path

SMALL = ["--preset", "vqgan_tiny", "--data", "builtin", "--image-size", "32", "--batch-size", "4",
         "--perceptual-weight", "0", "--disc-start", "2", "--log-every", "1"]


def _pyvq(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pyvq.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_train_resume_and_eval(tmp_path):
    run = str(tmp_path / "run")
    out = _pyvq("train", *SMALL, "--out", run, "--steps", "6", "--ckpt-every", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.isdir(os.path.join(run, "model"))
    # as if killed after the step-4 checkpoint: the step-6 one and model/ never written
    for gone in ("checkpoints/step_000000006", "model"):
        shutil.rmtree(os.path.join(run, gone))
    out = _pyvq("train", *SMALL, "--out", run, "--steps", "6", "--ckpt-every", "2", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 5, not restarted; the first run's 5 and 6 moved out
    assert os.path.isdir(os.path.join(run, "model"))
    out = _pyvq("eval", "--run", run, "--no-lpips", "--image-size", "32")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["num_images"] > 0 and metrics["psnr"] > 0
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1


def test_eval_without_lpips_weights_says_what_is_missing(tmp_path):
    if os.path.isfile(hub_checkpoint_path("vgg16-397923af.pth")):
        pytest.skip("the real VGG16 weights are in the torch hub cache, so nothing is missing")
    from pyvq.models.tokenizers import VQGAN

    run = tmp_path / "run"
    VQGAN.from_preset("vqgan_tiny").save_pretrained(str(run / "model"))
    out = _pyvq("eval", "--run", str(run), "--image-size", "32")
    assert out.returncode != 0
    assert "vgg16-397923af.pth" in out.stderr and "checkpoints" in out.stderr


def test_bad_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: vqgan_tiny\nlearning_rate: 0.1\n")
    out = _pyvq("train", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert out.returncode != 0 and "learning_rate" in out.stderr


def test_evaluate_with_lpips_module(skimage_patches):
    from pyvq.losses import build_lpips
    from pyvq.models.tokenizers import VQGAN
    from pyvq.train.evaluate import evaluate

    torch.manual_seed(0)
    model = VQGAN.from_preset("vqgan_tiny")
    data = torch.utils.data.TensorDataset(skimage_patches[:8] * 2 - 1)
    m = evaluate(model, data, lpips=build_lpips(pretrained_backbone=False), batch_size=4)
    assert m["num_images"] == 8 and m["lpips"] > 0 and m["ssim"] < 1
    assert 0 < m["codebook_usage"] <= 1


@pytest.mark.slow
def test_demo_writes_report(tmp_path):
    from pyvq.demo import run_demo

    report = run_demo(str(tmp_path), train_steps=6, finetune_steps=2)
    text = open(report).read()
    for name in ("reconstructions.png", "loss_curve.png"):
        assert os.path.isfile(tmp_path / name) and name in text
    m = json.load(open(tmp_path / "metrics.json"))
    for stage in ("before_refit", "after_codebook_rebuild", "after_refit"):
        assert m[stage]["psnr"] > 0 and 0 < m[stage]["codebook_usage"] <= 1
    sampled = m["refit_sampled_latents"]
    assert sampled["usage_after"] >= sampled["usage_before"]
    assert f"{m['after_refit']['psnr']:.2f}" in text
    assert m["train_step_seconds"]["kernel"] > 0 and "reference / kernel" in text


def test_evaluate_fidelity_with_registered_extractor(registered_extractor, skimage_patches):
    from pyvq.models.tokenizers import VQGAN
    from pyvq.train.evaluate import evaluate

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(skimage_patches * 2 - 1)
    m = evaluate(VQGAN.from_preset("vqgan_tiny"), data, fid=True, feature_extractor=registered_extractor)
    assert m["frechet_inception_distance"] > 0 and m["inception_score_mean"] >= 1


from tests.metrics.test_metrics import registered_extractor  # noqa: E402,F401  (fixture)
