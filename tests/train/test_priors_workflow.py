"""Priors end to end on the built-in photographs: `pyvq encode` caches a
tokenizer's codes, `pyvq train --codes` trains a prior on them (VQ-DDM on a
tiny VQGAN's indices, key-code diffusion on a tiny BRICS's keys), `pyvq
sample` and `pyvq inpaint` write images; plus the codes folder, the prior
trainer's resume and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyvq.data.codes import CodesDataset, encode_codes, read_codes_meta
from pyvq.train.config import TrainConfig
from pyvq.train.logger import read_jsonl
from pyvq.train.prior_trainer import PriorTrainer, build_prior

pytestmark = pytest.mark.usefixtures("one_thread")


def _pyvq(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "pyvq.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _tokenizer(kind: str, folder: str) -> str:
    """A tiny tokenizer trained a few steps on the built-in photographs (32 px)."""
    from pyvq.train.trainer import Trainer

    model = "vqgan_tiny" if kind == "vq" else "brics_tiny"
    config = TrainConfig(model=model, data="builtin", image_size=32, batch_size=4, steps=4, perceptual_weight=0.0,
                         disc_start=100, log_every=2, image_every=100, ckpt_every=100, seed=0)
    Trainer(config, folder).train(progress=False)
    return folder


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    return _tokenizer("vq", str(tmp_path_factory.mktemp("vqgan")))


@pytest.fixture(scope="module")
def brics_run(tmp_path_factory):
    return _tokenizer("brics", str(tmp_path_factory.mktemp("brics")))


def _write_inputs(folder):
    """A built-in photograph and a mask (a white box = region to generate) as PNGs."""
    from PIL import Image

    from pyvq.data import load_builtin_image

    img = ((load_builtin_image("chelsea")[:, :256, 100:356] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).save(os.path.join(folder, "image.png"))
    mask = torch.zeros(256, 256, dtype=torch.uint8)
    mask[64:160, 96:192] = 255
    Image.fromarray(mask.numpy()).save(os.path.join(folder, "mask.png"))
    return os.path.join(folder, "image.png"), os.path.join(folder, "mask.png")


@pytest.mark.slow
def test_vqddm_on_vqgan_codes_end_to_end(tmp_path, vq_run):
    codes = str(tmp_path / "codes")
    _pyvq("encode", "--tokenizer", vq_run, "--image-size", "32", "--repeats", "2", "--out", codes)
    meta = read_codes_meta(codes)
    assert meta["kind"] == "indices" and meta["shape"] == [8, 8] and meta["num_classes"] == 256
    assert meta["count"] == 2 * 15 * 16  # 2 passes over 15 train photographs x 16 crops

    prior_dir = str(tmp_path / "prior")
    _pyvq("train", "--preset", "vqddm_tiny", "--codes", codes, "--out", prior_dir, "--steps", "60",
          "--batch-size", "16", "--log-every", "10", "--lr", "1e-3")
    rows = read_jsonl(os.path.join(prior_dir, "log.jsonl"))
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert all("train/vlb" in r and "train/kl" in r for r in rows)

    # The VLB (nats per code) of the training codes goes down: the trained
    # prior against the same preset at its initial weights (same seed).
    from pyvq.models import load_run

    data = CodesDataset(codes)
    x = data.codes[::30][:16]
    trained = load_run(prior_dir)
    torch.manual_seed(0)
    initial = build_prior("vqddm_tiny", data.meta)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = initial.nll(x, generator=g()).mean().item()
    after = trained.nll(x, generator=g()).mean().item()
    assert after < 0.9 * before, (before, after)

    samples = str(tmp_path / "samples.png")
    _pyvq("sample", "--prior", prior_dir, "--tokenizer", vq_run, "--n", "4", "--steps", "10", "--out", samples)
    from PIL import Image

    assert Image.open(samples).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2 grid, torchvision padding 2

    image, mask = _write_inputs(str(tmp_path))
    out = str(tmp_path / "completion.png")
    log = _pyvq("inpaint", "--prior", prior_dir, "--tokenizer", vq_run, "--image", image, "--mask", mask,
                "--steps", "10", "--out", out)
    assert "codes generated" in log.stdout
    assert Image.open(out).size == (32, 32) and Image.open(str(tmp_path / "completion_panel.png")).size[0] > 4 * 32


@pytest.mark.slow
def test_keycode_diffusion_on_brics_codes(tmp_path, brics_run):
    codes = str(tmp_path / "keys")
    _pyvq("encode", "--tokenizer", brics_run, "--image-size", "32", "--out", codes)
    data = CodesDataset(codes)
    assert data.kind == "keys" and tuple(data.codes.shape[1:]) == (4, 8, 8)
    assert data.codes.dtype == torch.float32 and 0 <= data.codes.min() and data.codes.max() <= 1

    config = TrainConfig(model="keycode_diffusion_tiny", codes=codes, steps=60, batch_size=16, log_every=10,
                         lr=1e-3, warmup_steps=0, seed=0)
    trainer = PriorTrainer(config, str(tmp_path / "prior"))
    torch.manual_seed(0)
    initial = build_prior("keycode_diffusion_tiny", data.meta)
    trainer.train(progress=False)

    # The denoising loss on the training keys goes down (fixed t and noise).
    x = data.codes[:32]
    t = torch.arange(len(x)) % trainer.model.config.timesteps + 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = initial.training_loss(x, t=t, noise=noise)[0].item()
        after = trainer.model.training_loss(x, t=t, noise=noise)[0].item()
    assert after < 0.8 * before, (before, after)

    out = str(tmp_path / "samples.png")
    _pyvq("sample", "--prior", str(tmp_path / "prior"), "--tokenizer", brics_run, "--n", "2", "--steps", "5",
          "--out", out)
    assert os.path.getsize(out) > 0


def test_inpaint_image_keeps_known_codes_and_pixels(vq_run):
    from pyvq.models import load_run
    from pyvq.train.generate import inpaint_image

    tokenizer = load_run(vq_run)
    torch.manual_seed(0)
    prior = build_prior("vqddm_tiny", {"kind": "indices", "shape": [8, 8], "num_classes": 256},
                        {"timesteps": 10})
    image = torch.rand(3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 32, 32)
    mask[:, 5:14, 9:20] = 1  # covers code rows 1..3, cols 2..4 (f = 4)
    out = inpaint_image(prior, tokenizer, image, mask, steps=3)
    expect_keep = torch.ones(8, 8, dtype=torch.bool)
    expect_keep[1:4, 2:5] = False
    assert torch.equal(out["keep"], expect_keep)
    _, codes, _ = tokenizer.encode(image[None])
    assert torch.equal(out["codes"][expect_keep], codes[0][expect_keep])
    assert torch.equal(out["completion"][:, mask[0] == 0], image[:, mask[0] == 0])  # pasted back
    assert torch.equal(out["completion"][:, mask[0] == 1], out["decoded"][:, mask[0] == 1])


def test_codes_folder_round_trip_and_shards(tmp_path):
    from pyvq.models.tokenizers import VQGAN

    torch.manual_seed(0)
    tok = VQGAN.from_preset("vqgan_tiny")
    images = torch.utils.data.TensorDataset(torch.rand(10, 3, 32, 32) * 2 - 1)
    meta = encode_codes(tok, images, str(tmp_path), batch_size=4, shard_size=4)
    assert meta["count"] == 10 and len(meta["shards"]) == 3  # flushed every 4 (whole batches)
    data = CodesDataset(str(tmp_path))
    with torch.no_grad():
        expect = tok.encode(images.tensors[0])[1]
    assert torch.equal(data.codes, expect) and data[3].shape == (8, 8)


def test_codes_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="codes.json"):
        CodesDataset(str(tmp_path))
    (tmp_path / "codes.json").write_text(json.dumps({"kind": "latents"}))
    with pytest.raises(ValueError, match="'kind'"):
        CodesDataset(str(tmp_path))
    from pyvq.models.tokenizers import VQGAN

    with pytest.raises(ValueError, match="repeats"):
        encode_codes(VQGAN.from_preset("vqgan_tiny"), [], str(tmp_path), repeats=0)


def test_build_prior_checks_kind_and_sizes_from_codes():
    prior = build_prior("vqddm_tiny", {"kind": "indices", "shape": [8, 8], "num_classes": 32})
    assert prior.config.num_classes == 32 and prior.config.code_size == 8
    prior = build_prior("keycode_diffusion_tiny", {"kind": "keys", "shape": [3, 8, 8]})
    assert prior.config.channels == 3 and prior.config.code_size == 8
    with pytest.raises(ValueError, match="models indices but the codes hold keys"):
        build_prior("vqddm_tiny", {"kind": "keys", "shape": [4, 8, 8]})
    with pytest.raises(ValueError, match="not a prior"):
        build_prior("vqgan_tiny", {"kind": "indices", "shape": [8, 8], "num_classes": 32})
    with pytest.raises(ValueError, match="square"):
        build_prior("vqddm_tiny", {"kind": "indices", "shape": [8, 4], "num_classes": 32})


def test_prior_trainer_resumes(tmp_path):
    codes = torch.randint(0, 16, (64, 8, 8))
    data = torch.utils.data.TensorDataset(codes)
    data.meta = {"kind": "indices", "shape": [8, 8], "num_classes": 16}
    base = dict(model="vqddm_tiny", steps=4, batch_size=8, log_every=1, ckpt_every=2,
                model_overrides={"timesteps": 10}, seed=0)
    run = str(tmp_path / "run")
    PriorTrainer(TrainConfig(**base), run, dataset=data).train(progress=False, stop_after=2)
    trainer = PriorTrainer(TrainConfig(**base), run, dataset=data, resume=True)
    assert trainer.step == 2
    trainer.train(progress=False)
    assert [r["step"] for r in read_jsonl(os.path.join(run, "log.jsonl"))] == [1, 2, 3, 4]
    assert os.path.isfile(os.path.join(run, "model", "model.safetensors"))
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["betas"] == [0.9, 0.999]  # the prior's train_defaults()


def test_prior_trainer_needs_codes(tmp_path):
    with pytest.raises(ValueError, match="codes"):
        PriorTrainer(TrainConfig(model="vqddm_tiny"), str(tmp_path))
