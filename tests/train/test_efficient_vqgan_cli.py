"""EfficientVQGAN through the CLI and the trainer: `pyvq train --preset
effvqgan_tiny --data builtin`, `pyvq eval`, `pyvq encode`, and ReFiT
(codebook re-built from the encoder, decoder fine-tuned with the trainer)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pyvq.cli import main
from pyvq.data import BuiltinImages
from pyvq.data.codes import read_codes_meta
from pyvq.models import EfficientVQGAN, load_run
from pyvq.refit import freeze_encoder, rebuild_codebook
from pyvq.train.config import TrainConfig
from pyvq.train.recipes import EfficientVQRecipe, recipe_for
from pyvq.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--preset", "effvqgan_tiny", "--data", "builtin", "--image-size", "32", "--batch-size", "4",
         "--perceptual-weight", "0", "--disc-start", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("effvqgan") / "run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *SMALL, "--out", run, "--steps", "4"]) == 0
    finally:
        torch.set_num_threads(n)
    return run


def test_train_writes_a_model_with_the_recipe_defaults(trained_run):
    assert isinstance(recipe_for(EfficientVQGAN), EfficientVQRecipe)
    model = load_run(trained_run)
    assert type(model) is EfficientVQGAN
    config = json.load(open(os.path.join(trained_run, "config.json")))
    assert config["model"] == "effvqgan_tiny" and config["pixel_loss"] == "l2"  # the recipe's default
    rows = [json.loads(line) for line in open(os.path.join(trained_run, "log.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["train/usage"] <= 1 and r["train/perplexity"] >= 1 for r in rows)
    assert "train/d_loss" in rows[-1]  # the discriminator started at step 2


def test_eval_and_encode_the_run(trained_run, tmp_path):
    assert main(["eval", "--run", trained_run, "--no-lpips", "--image-size", "32"]) == 0
    metrics = json.load(open(os.path.join(trained_run, "metrics.json")))
    assert metrics["num_images"] > 0 and metrics["psnr"] > 0
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1
    codes = str(tmp_path / "codes")
    assert main(["encode", "--tokenizer", trained_run, "--image-size", "32", "--out", codes]) == 0
    meta = read_codes_meta(codes)
    assert meta["kind"] == "indices" and meta["tokenizer_class"] == "EfficientVQGAN"
    assert tuple(meta["shape"]) == (4, 4) and meta["num_classes"] == 256 and meta["count"] > 0


def test_refit_then_decoder_fine_tuning(trained_run, tmp_path):
    model = load_run(trained_run)
    images = torch.stack([BuiltinImages(split="train", size=32)[i] for i in range(16)])
    res = rebuild_codebook(model.encoder, images, model.config.n_embed, num_samples=256, seed=0,
                           quantizer=model.quantize, apply=True)
    assert res.applied
    freeze_encoder(model)
    model.quantize.codebook.requires_grad_(False)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = model.decoder.conv_out.weight.detach().clone()
    config = TrainConfig(model="effvqgan_tiny", image_size=32, batch_size=4, steps=2, perceptual_weight=0.0,
                         disc_start=10**9, log_every=1, warmup_steps=0)
    Trainer(config, str(tmp_path / "refit"), model=model).train()
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert torch.equal(model.quantize.codebook.detach(), res.codebook.to(model.quantize.codebook.dtype))
    assert not torch.equal(model.decoder.conv_out.weight.detach(), decoder_before)
    assert type(load_run(str(tmp_path / "refit"))) is EfficientVQGAN
