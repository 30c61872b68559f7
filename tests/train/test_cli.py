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


def test_bad_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: vqgan_tiny\nlearning_rate: 0.1\n")
    code, msg = _cli("train", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert code != 0 and "learning_rate" in msg and "valid fields" in msg


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


# ---------------------------------------------------------------- issue 15: the CLI's edges, in-process

VGG = "vgg16-397923af.pth"
TINY = ["--preset", "vqgan_tiny", "--data", "builtin", "--image-size", "32", "--batch-size", "2", "--steps", "1",
        "--disc-start", "100", "--log-every", "1"]


def _no_vgg():
    if os.path.isfile(hub_checkpoint_path(VGG)):
        pytest.skip("the real VGG16 weights are in the torch hub cache, so nothing is missing")


def _cli(*argv):
    """(exit code, the SystemExit message or None) of pyvq.cli.main."""
    from pyvq.cli import main

    try:
        return main(list(argv)), None
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), (exc.code if isinstance(exc.code, str) else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Saved models of each kind of run (random weights, no training): a
    tokenizer, a prior and an asymmetric decoder on that tokenizer."""
    from pyvq.models import MultinomialDiffusion
    from pyvq.models.tokenizers import VQGAN, AsymmetricVQGAN, AutoencoderKL

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    vq = VQGAN.from_preset("vqgan_tiny")
    vq.save_pretrained(str(root / "vq" / "model"))
    MultinomialDiffusion.from_preset("vqddm_tiny").save_pretrained(str(root / "prior" / "model"))
    AsymmetricVQGAN.from_base(vq).save_pretrained(str(root / "asym" / "model"))
    AutoencoderKL.from_preset("kl_tiny").save_pretrained(str(root / "kl" / "model"))
    return root


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """A user's image folder: mixed sizes, greyscale, RGBA, a 16-bit PNG, a
    truncated JPEG and an empty file."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 36), dtype=np.uint8), "L").save(root / "b_grey.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8), "RGBA").save(root / "c_rgba.png")
    Image.fromarray(rng.integers(0, 65536, (48, 48), dtype=np.uint16)).save(root / "d_16bit.png")
    buf = root / "e_full.jpg"
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(buf, quality=90)
    (root / "f_truncated.jpg").write_bytes(buf.read_bytes()[: len(buf.read_bytes()) // 3])
    (root / "g_empty.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("preset", ["vqgan_tiny", "brics_tiny"])
def test_train_without_lpips_weights_goes_on_with_a_note(tmp_path, capsys, preset):
    _no_vgg()
    run = tmp_path / "run"
    code, msg = _cli("train", *TINY, "--preset", preset, "--out", str(run))
    assert code == 0, msg
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "perceptual" in line]
    assert len(notes) == 1 and VGG in notes[0] and "--lpips" in notes[0], err
    assert json.load(open(run / "config.json"))["perceptual_weight"] == 0.0


@pytest.mark.parametrize("flags, named", [(["--perceptual-weight", "1"], "--perceptual-weight"),
                                          (["--lpips"], "--lpips")])
def test_train_asked_for_lpips_without_weights_fails_naming_the_flag(tmp_path, flags, named):
    _no_vgg()
    code, msg = _cli("train", *TINY, *flags, "--out", str(tmp_path / "run"))
    assert code != 0 and msg.startswith("pyvq train: ") and "\n" not in msg
    assert f"Drop {named}" in msg and VGG in msg and "--no-lpips" in msg
    assert not (tmp_path / "run").exists()


def test_train_yaml_perceptual_weight_counts_as_asked(tmp_path):
    _no_vgg()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("perceptual_weight: 2.0\n")
    code, msg = _cli("train", *TINY, "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert code != 0 and "perceptual_weight: 2.0 in" in msg and VGG in msg


@pytest.mark.parametrize("flags", [["--no-lpips", "--perceptual-weight", "1"], ["--lpips", "--perceptual-weight", "0"]])
def test_train_lpips_flags_that_contradict_are_one_error(tmp_path, flags):
    code, msg = _cli("train", *TINY, *flags, "--out", str(tmp_path / "run"))
    assert code != 0 and "contradicts" in msg and "drop one" in msg


def test_train_no_lpips_means_weight_zero(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli("train", *TINY, "--no-lpips", "--out", str(run))[0] == 0
    assert "perceptual" not in capsys.readouterr().err  # asked for: no note
    assert json.load(open(run / "config.json"))["perceptual_weight"] == 0.0


def test_eval_without_lpips_weights_notes_and_records_null(runs, tmp_path, capsys):
    _no_vgg()
    out = tmp_path / "m.json"
    code, msg = _cli("eval", "--run", str(runs / "vq"), "--image-size", "32", "--out", str(out))
    assert code == 0, msg
    notes = [line for line in capsys.readouterr().err.splitlines() if "LPIPS" in line]
    assert len(notes) == 1 and VGG in notes[0] and "checkpoints" in notes[0]
    assert json.load(open(out))["lpips"] is None
    code, msg = _cli("eval", "--run", str(runs / "vq"), "--image-size", "32", "--lpips", "--out", str(out))
    assert code != 0 and "Drop --lpips" in msg and VGG in msg


def test_eval_inpaint_lpips_flag_without_weights(runs, tmp_path):
    _no_vgg()
    code, msg = _cli("eval-inpaint", "--tokenizer", str(runs / "vq"), "--decoder", str(runs / "asym"), "--lpips",
                     "--num", "2", "--out", str(tmp_path / "r"))
    assert code != 0 and msg.startswith("pyvq eval-inpaint: ") and "Drop --lpips" in msg


def _broken_runs(runs, tmp_path):
    """A run whose weights file is truncated, one whose config.json is not JSON."""
    import shutil

    root = tmp_path / "broken"
    for name in ("trunc", "badjson"):
        shutil.copytree(runs / "vq", root / name)
    weights = root / "trunc" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    (root / "badjson" / "model" / "config.json").write_text("{bad")
    return str(root)


def _bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: [1, 2\nlr: :\n")
    return str(p)


def _overrides_yaml(tmp_path):
    p = tmp_path / "over.yaml"
    p.write_text("model: vqgan_tiny\nmodel_overrides:\n  chanels: 8\n")
    return str(p)


# (argv, words the one line must hold); {tmp} is a fresh folder
USER_ERRORS = [
    (["train", "--preset", "nope", "--data", "builtin", "--out", "{tmp}/r"], ["'nope'", "vqgan_tiny", "brics_tiny"]),
    (["train", "--preset", "vqgan_tiny", "--data", "{tmp}/missing", "--out", "{tmp}/r"], ["--data", "does not exist"]),
    (["train", "--preset", "vqddm_tiny", "--codes", "{tmp}/missing", "--out", "{tmp}/r"], ["--codes", "missing"]),
    (["train", "--preset", "vqgan_tiny", "--image-size", "7", "--out", "{tmp}/r"],
     ["image_size", "multiple of 4", "7"]),
    (["train", "--preset", "vqgan_tiny", "--steps", "0", "--out", "{tmp}/r"], ["steps", ">= 1", "0"]),
    (["train", "--preset", "vqgan_tiny", "--lr", "-0.1", "--out", "{tmp}/r"], ["lr", "> 0", "-0.1"]),
    (["train", "--config", "{tmp}/none.yaml", "--out", "{tmp}/r"], ["--config", "none.yaml", "does not exist"]),
    (["train", "--config", "{bad_yaml}", "--out", "{tmp}/r"], ["bad.yaml", "not readable YAML"]),
    (["train", "--config", "{overrides_yaml}", "--out", "{tmp}/r"], ["model_overrides", "chanels", "valid fields",
                                                                    "ch_mult"]),
    (["eval", "--run", "{tmp}/missing"], ["--run", "missing"]),
    (["eval", "--run", "{runs}/vq", "--data", "{tmp}/missing"], ["missing", "does not exist"]),
    (["eval", "--run", "{runs}/vq", "--image-size", "30"], ["--image-size", "multiple of 4", "30"]),
    (["encode", "--tokenizer", "{tmp}/missing", "--out", "{tmp}/c"], ["--tokenizer", "missing"]),
    (["encode", "--tokenizer", "{runs}/vq", "--repeats", "0", "--out", "{tmp}/c"], ["--repeats", ">= 1"]),
    (["sample", "--prior", "{tmp}/missing", "--tokenizer", "{runs}/vq"], ["--prior", "missing"]),
    (["sample", "--prior", "{runs}/prior", "--tokenizer", "{runs}/vq", "--n", "0"], ["--n", ">= 1", "got 0"]),
    (["sample", "--prior", "{runs}/prior", "--tokenizer", "{runs}/vq", "--steps", "-1"], ["--steps", ">= 1"]),
    (["inpaint", "--prior", "{runs}/prior", "--tokenizer", "{runs}/vq", "--image", "x.png", "--box", "0", "0", "4",
      "4", "--steps", "0"], ["--steps", ">= 1"]),
    (["eval-inpaint", "--tokenizer", "{runs}/vq", "--decoder", "{tmp}/missing"], ["--decoder", "missing"]),
    (["eval-inpaint", "--tokenizer", "{runs}/vq", "--decoder", "{runs}/asym", "--num", "0"], ["--num", ">= 1"]),
    (["train", "--preset", "vqgan_tiny", "--ema-decay", "2", "--out", "{tmp}/r"], ["ema_decay", "[0, 1)", "2"]),
    (["train", "--preset", "vqgan_tiny", "--num-workers", "-1", "--out", "{tmp}/r"], ["num_workers", ">= 0"]),
    (["train", "--preset", "vqgan_tiny", "--base", "{runs}/vq", "--out", "{tmp}/r"], ["--base", "asymmetric",
                                                                                     "VQGAN"]),
    (["train", "--preset", "asym_vqgan_tiny", "--base", "{runs}/prior", "--out", "{tmp}/r"],
     ["--base", "MultinomialDiffusion", "expected a VQGAN or AutoencoderKL"]),
    (["eval", "--run", "{broken}/trunc"], ["model.safetensors", "truncated"]),
    (["encode", "--tokenizer", "{broken}/trunc", "--out", "{tmp}/c"], ["model.safetensors", "truncated"]),
    (["sample", "--prior", "{broken}/badjson", "--tokenizer", "{runs}/vq"], ["config.json", "not valid JSON"]),
    # wrong kinds of run: the kind given and the kind expected
    (["eval", "--run", "{runs}/prior"], ["prior", "MultinomialDiffusion", "tokenizer"]),
    (["eval", "--run", "{runs}/asym"], ["AsymmetricVQGAN", "eval-inpaint"]),
    (["encode", "--tokenizer", "{runs}/prior", "--out", "{tmp}/c"], ["prior", "MultinomialDiffusion", "tokenizer"]),
    (["encode", "--tokenizer", "{runs}/asym", "--out", "{tmp}/c"], ["AsymmetricVQGAN", "base"]),
    (["encode", "--tokenizer", "{runs}/kl", "--out", "{tmp}/c"], ["AutoencoderKL", "continuous", "VQ"]),
    (["sample", "--prior", "{runs}/prior", "--tokenizer", "{runs}/prior"],
     ["--tokenizer", "holds a prior", "tokenizer"]),
    (["sample", "--prior", "{runs}/vq", "--tokenizer", "{runs}/vq"], ["--prior", "VQGAN", "expected a prior"]),
    (["train", "--preset", "vqddm_tiny", "--data", "builtin", "--out", "{tmp}/r"], ["vqddm_tiny", "prior",
                                                                                   "--codes"]),
    (["train", "--preset", "vqgan_tiny", "--codes", "{runs}", "--out", "{tmp}/r"], ["vqgan_tiny", "tokenizer",
                                                                                   "--codes"]),
]


@pytest.mark.parametrize("argv, words", USER_ERRORS, ids=[" ".join(a[:3]) + f"#{i}" for i, (a, _) in
                                                          enumerate(USER_ERRORS)])
def test_user_errors_are_one_line_without_traceback(argv, words, runs, tmp_path):
    subs = {"tmp": str(tmp_path), "runs": str(runs), "broken": _broken_runs(runs, tmp_path),
            "bad_yaml": _bad_yaml(tmp_path), "overrides_yaml": _overrides_yaml(tmp_path)}
    argv = [a.format(**subs) for a in argv]
    code, msg = _cli(*argv)
    assert code != 0 and msg is not None, f"{argv} did not fail with a message"
    assert msg.startswith(f"pyvq {argv[0]}: ") and "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    assert not (tmp_path / "r").exists()  # a refused train leaves no run folder


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    from pyvq.cli import main

    argv = ["train", "--preset", "nope", "--out", str(tmp_path / "r")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="valid presets"):
        main(argv)


def test_eval_fid_without_inception_weights_fails_before_any_work(runs, tmp_path, monkeypatch):
    from pyvq.metrics.fidelity import INCEPTION_FILE

    if os.path.isfile(hub_checkpoint_path(INCEPTION_FILE)):
        pytest.skip("torch-fidelity's Inception weights are in the torch hub cache")
    import pyvq.train.evaluate as ev

    monkeypatch.setattr(ev, "reconstruct", lambda *a, **k: pytest.fail("reconstructed before checking --fid"))
    code, msg = _cli("eval", "--run", str(runs / "vq"), "--fid", "--no-lpips", "--out", str(tmp_path / "m.json"))
    assert code != 0 and INCEPTION_FILE in msg and "drop --fid" in msg


def test_train_on_cuda_without_a_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here, so --device cuda is fine")
    code, msg = _cli("train", *TINY, "--no-lpips", "--device", "cuda", "--out", str(tmp_path / "r"))
    assert code != 0 and "--device cuda" in msg and "--device cpu" in msg
    assert not (tmp_path / "r").exists()


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    import pyvq.cli as cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_eval", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["eval", "--run", str(tmp_path)])


def test_one_line_through_the_command(tmp_path):
    out = _pyvq("train", "--preset", "nope", "--out", str(tmp_path / "r"), timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "valid presets" in out.stderr


def test_eval_on_a_messy_folder_counts_only_what_it_read(runs, messy_folder, tmp_path, capsys):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(runs / "vq", run)
    code, msg = _cli("eval", "--run", str(run), "--data", str(messy_folder), "--image-size", "32", "--no-lpips")
    assert code == 0, msg
    written = [p for p in os.listdir(run) if p.startswith("metrics")]
    assert len(written) == 1 and written[0] != "metrics.json"  # named after the data
    m = json.load(open(run / written[0]))
    assert m["num_images"] == 5 and m["data"]["num_images"] == 5
    assert sorted(os.path.basename(p) for p in m["data"]["skipped"]) == ["f_truncated.jpg", "g_empty.png"]
    assert m["data"]["data"] == str(messy_folder) and m["data"]["image_size"] == 32
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s) of 7" in err and "f_truncated.jpg" in err
    # the built-in split goes to metrics.json beside it, keeping the folder's file
    assert _cli("eval", "--run", str(run), "--image-size", "32", "--no-lpips")[0] == 0
    assert json.load(open(run / "metrics.json"))["data"]["data"] == "builtin"
    assert json.load(open(run / written[0]))["data"]["data"] == str(messy_folder)
    # an explicit --out holding other data is refused, unless --overwrite
    code, msg = _cli("eval", "--run", str(run), "--image-size", "32", "--no-lpips", "--out", str(run / written[0]))
    assert code != 0 and "--overwrite" in msg and str(messy_folder) in msg
    assert _cli("eval", "--run", str(run), "--image-size", "32", "--no-lpips", "--out", str(run / written[0]),
                "--overwrite")[0] == 0
    assert json.load(open(run / written[0]))["data"]["data"] == "builtin"


def test_encode_on_a_messy_folder_encodes_only_what_it_read(runs, messy_folder, tmp_path, capsys):
    code, msg = _cli("encode", "--tokenizer", str(runs / "vq"), "--data", str(messy_folder), "--image-size", "16",
                     "--out", str(tmp_path / "codes"))
    assert code == 0, msg
    assert json.load(open(tmp_path / "codes" / "codes.json"))["count"] == 5
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s) of 7" in err and "g_empty.png" in err


def test_image_folder_drop_unreadable(messy_folder, tmp_path):
    from pyvq.data import ImageFolder

    ds = ImageFolder(messy_folder, 16)
    dropped = ds.drop_unreadable()
    assert [p.name for p in dropped] == ["f_truncated.jpg", "g_empty.png"] and len(ds) == 5
    assert all(ds[i].shape == (3, 16, 16) for i in range(len(ds))) and ds.bad_paths == dropped
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 image files"):
        ImageFolder(tmp_path, 16).drop_unreadable()


def test_eval_defaults_to_the_trained_image_size(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "vq", run)
    (run / "config.json").write_text(json.dumps({"image_size": 16}))
    assert _cli("eval", "--run", str(run), "--no-lpips")[0] == 0
    assert json.load(open(run / "metrics.json"))["data"]["image_size"] == 16
