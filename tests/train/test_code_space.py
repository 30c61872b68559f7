"""Mismatched inputs of the prior workflow are refused (issue 15, section 3):
a prior's recorded tokenizer against the tokenizer given to `pyvq sample` /
`pyvq inpaint` (K, code channels, weights' fingerprint), the record and
config.json a prior run writes, out-of-range code indices, and the mask and
image sizes of `pyvq inpaint`. Untrained tiny models, a few sampling steps."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

from pyvq import cli
from pyvq.data.codes import encode_codes
from pyvq.models import get_preset
from pyvq.models.tokenizers import BRICS, VQGAN, EfficientVQGAN
from pyvq.train.generate import sample_images
from pyvq.train.prior_trainer import build_prior

pytestmark = pytest.mark.usefixtures("one_thread")


def tokenizer_fingerprint(model):
    from pyvq.data.codes import tokenizer_fingerprint

    return tokenizer_fingerprint(model)


def check_code_space(prior, tokenizer):
    from pyvq.train.generate import check_code_space

    return check_code_space(prior, tokenizer)


def _vqgan(n_embed: int = 256, seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(dataclasses.replace(get_preset("vqgan_tiny"), n_embed=n_embed)).eval()


def _images(n: int = 2, size: int = 32) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
                                          * 2 - 1)


def _prior_on(tokenizer, folder, name: str = "vqddm_tiny"):
    """A prior sized and recorded for the codes of ``tokenizer`` (saved in
    ``folder/tok``), saved in ``folder/prior``; returns the two folders."""
    tok_dir, prior_dir = os.path.join(folder, "tok"), os.path.join(folder, "prior")
    tokenizer.save_pretrained(tok_dir)
    meta = encode_codes(tokenizer, _images(), os.path.join(folder, "codes"), tokenizer_dir=tok_dir)
    build_prior(name, meta, {"timesteps": 10}).save_pretrained(prior_dir)
    return tok_dir, prior_dir


@pytest.fixture(scope="module")
def vq256(tmp_path_factory):
    """A K = 256 tokenizer and a prior recorded for it."""
    return _prior_on(_vqgan(256), str(tmp_path_factory.mktemp("vq256")))


def _sample(prior_dir, tok_dir, out, *extra):
    return cli.main(["sample", "--prior", prior_dir, "--tokenizer", tok_dir, "--n", "1", "--steps", "2",
                     "--out", str(out), *extra])


# ------------------------------------------------------- code-space checks
def test_prior_of_more_codes_than_the_tokenizer_is_refused(vq256, tmp_path):
    # Was an IndexError deep in the embedding lookup.
    small = str(tmp_path / "tok128")
    _vqgan(128).save_pretrained(small)
    with pytest.raises(SystemExit, match=r"K = 256 .* K = 128"):
        _sample(vq256[1], small, tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_prior_of_fewer_codes_than_the_tokenizer_is_refused(tmp_path):
    # Was a PNG, written silently from the first 128 of 256 codes.
    _, prior_dir = _prior_on(_vqgan(128), str(tmp_path / "a"))
    big = str(tmp_path / "tok256")
    _vqgan(256).save_pretrained(big)
    with pytest.raises(SystemExit, match=r"K = 128 .* K = 256"):
        _sample(prior_dir, big, tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_other_tokenizer_of_the_same_k_needs_force(vq256, tmp_path, capsys):
    tok_dir, prior_dir = vq256
    other = str(tmp_path / "other")
    _vqgan(256, seed=1).save_pretrained(other)
    with pytest.raises(SystemExit, match="other weights") as err:
        _sample(prior_dir, other, tmp_path / "x.png")
    message = str(err.value)
    assert tok_dir in message and other in message and "--force-tokenizer" in message
    recorded = tokenizer_fingerprint(VQGAN.from_pretrained(tok_dir))
    assert recorded in message and tokenizer_fingerprint(VQGAN.from_pretrained(other)) in message

    assert _sample(prior_dir, other, tmp_path / "x.png", "--force-tokenizer") == 0
    assert os.path.getsize(tmp_path / "x.png") > 0
    assert "pyvq sample: warning:" in capsys.readouterr().err
    assert _sample(prior_dir, tok_dir, tmp_path / "y.png") == 0  # its own tokenizer passes


def test_prior_without_a_record_warns_and_checks_k():
    tok = _vqgan(256)
    old = build_prior("vqddm_tiny", {"kind": "indices", "shape": [8, 8], "num_classes": 256}, {"timesteps": 10})
    old = type(old)(dataclasses.replace(old.config, tokenizer=None))  # as saved before the record existed
    with pytest.warns(UserWarning, match="records no tokenizer"):
        images, _ = sample_images(old, tok, 1, steps=2)
    assert images.shape == (1, 3, 32, 32)
    wrong = type(old)(dataclasses.replace(old.config, num_classes=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="K = 300 .* K = 256"):
            sample_images(wrong, tok, 1, steps=2)


def test_key_code_channels_are_checked():
    torch.manual_seed(0)
    brics = BRICS.from_preset("brics_tiny").eval()
    C = brics.config.code_channels
    prior = build_prior("keycode_diffusion_tiny", {"kind": "keys", "shape": [C + 1, 8, 8]}, {"timesteps": 10})
    with pytest.raises(ValueError, match=rf"{C + 1} channels .* makes {C}"):
        check_code_space(prior, brics)
    with pytest.raises(ValueError, match="models keys but"):
        check_code_space(prior, _vqgan())


def test_record_that_disagrees_with_the_prior_is_refused(vq256):
    from pyvq.models import load_run

    prior = load_run(vq256[1])
    record = dict(prior.config.tokenizer, shape=[4, 4])
    edited = type(prior)(dataclasses.replace(prior.config, tokenizer=record))
    with pytest.raises(ValueError, match=r"shape \[4, 4\].*shape \[8, 8\]"):
        check_code_space(edited, load_run(vq256[0]))


def test_fingerprint_is_of_the_weights():
    a, b = _vqgan(seed=0), _vqgan(seed=0)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_out.bias.add_(1e-3)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


# ------------------------------------------------------------ prior runs
def test_prior_run_records_its_tokenizer_and_codes(tmp_path):
    from pyvq.models import load_run
    from pyvq.train.config import TrainConfig
    from pyvq.train.prior_trainer import PriorTrainer

    tok = _vqgan(256)
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    encode_codes(tok, _images(4), str(tmp_path / "codes"), tokenizer_dir=tok_dir)
    run = str(tmp_path / "prior")
    config = TrainConfig(model="vqddm_tiny", codes=str(tmp_path / "codes"), steps=1, batch_size=2, log_every=1,
                         model_overrides={"timesteps": 10})
    PriorTrainer(config, run).train(progress=False)
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["codes"] == str(tmp_path / "codes")
    for field in ("data", "base", "image_size", "disc_start", "disc_weight", "perceptual_weight", "pixel_loss"):
        assert field not in saved, field
    record = load_run(run).config.tokenizer
    assert record["path"] == tok_dir and record["class"] == "VQGAN" and record["num_classes"] == 256
    assert record["fingerprint"] == tokenizer_fingerprint(tok) and list(record["shape"]) == [8, 8]


# ----------------------------------------------------------- index ranges
@pytest.mark.parametrize("bad", [256, -1])
def test_decode_indices_out_of_range(bad):
    tok = _vqgan(256)
    codes = torch.zeros(1, 4, 4, dtype=torch.int64)
    codes[0, 1, 2] = bad
    with pytest.raises(ValueError, match=rf"VQGAN.decode_indices: argument 'indices' .*\[0, 256\).*{bad}"):
        tok.decode_indices(codes)
    with pytest.raises(ValueError, match=rf"codes_from_indices: argument 'indices' .*\[0, 256\).*{bad}"):
        tok.quantize.codes_from_indices(codes)


def test_efficient_vqgan_decode_indices_out_of_range():
    torch.manual_seed(0)
    tok = EfficientVQGAN.from_preset("effvqgan_tiny").eval()
    K = tok.config.n_embed
    with pytest.raises(ValueError, match=rf"EfficientVQGAN.decode_indices: .*\[0, {K}\).*{K + 5}"):
        tok.decode_indices(torch.full((1, 4, 4), K + 5))


# ------------------------------------------------------ inpaint's inputs
def _png(path, w, h, value=128):
    from PIL import Image

    Image.new("L" if value in (0, 255) else "RGB", (w, h), value if value in (0, 255) else (value, 90, 30)).save(path)
    return str(path)


def _mask_png(path, w, h):
    from PIL import Image

    img = Image.new("L", (w, h), 0)
    img.paste(255, (w // 4, h // 4, w // 2, h // 2))
    img.save(path)
    return str(path)


def test_inpaint_refuses_a_mask_of_another_size(vq256, tmp_path):
    tok_dir, prior_dir = vq256
    image = _png(tmp_path / "image.png", 96, 64)
    mask = _mask_png(tmp_path / "mask.png", 64, 64)
    with pytest.raises(SystemExit, match=r"64 x 64 pixels but the image is 96 x 64"):
        cli.main(["inpaint", "--prior", prior_dir, "--tokenizer", tok_dir, "--image", image, "--mask", mask,
                  "--steps", "2", "--out", str(tmp_path / "out.png")])
    assert not os.path.exists(tmp_path / "out.png")


def test_inpaint_says_the_image_was_resized(vq256, tmp_path, capsys):
    from PIL import Image

    tok_dir, prior_dir = vq256
    image = _png(tmp_path / "image.png", 96, 64)
    mask = _mask_png(tmp_path / "mask.png", 96, 64)
    assert cli.main(["inpaint", "--prior", prior_dir, "--tokenizer", tok_dir, "--image", image, "--mask", mask,
                     "--steps", "2", "--out", str(tmp_path / "out.png")]) == 0
    out = capsys.readouterr().out
    assert "96 x 64" in out and "resized to 32 x 32" in out and "completion is 32 x 32" in out
    assert Image.open(tmp_path / "out.png").size == (32, 32)


# ------------------------------------------------------ wrong kinds of run
def test_runs_of_the_wrong_kind_are_named(vq256, tmp_path):
    from pyvq.models.tokenizers import AsymmetricVQGAN

    tok_dir, prior_dir = vq256
    with pytest.raises(SystemExit, match=r"--tokenizer .* holds a prior \(MultinomialDiffusion.*expected a tokenizer"):
        _sample(prior_dir, prior_dir, tmp_path / "x.png")
    with pytest.raises(SystemExit, match=r"--prior .* holds a .*VQGAN.*expected a prior"):
        _sample(tok_dir, tok_dir, tmp_path / "x.png")
    asym = str(tmp_path / "asym")
    AsymmetricVQGAN.from_base(_vqgan()).save_pretrained(asym)
    with pytest.raises(SystemExit, match="an AsymmetricVQGAN, which makes neither code indices nor key codes"):
        _sample(prior_dir, asym, tmp_path / "x.png")


def test_class_conditional_prior_on_codes_without_labels_warns(tmp_path):
    from pyvq.train.config import TrainConfig
    from pyvq.train.prior_trainer import PriorTrainer

    data = torch.utils.data.TensorDataset(torch.randint(0, 16, (8, 4, 4)))
    data.meta = {"kind": "indices", "shape": [4, 4], "num_classes": 16}
    config = TrainConfig(model="mgt_tiny", steps=1, batch_size=2, model_overrides={"num_classes": 3})
    with pytest.warns(UserWarning, match="holds no class labels"):
        trainer = PriorTrainer(config, str(tmp_path / "run"), dataset=data)
    trainer.logger.close()
