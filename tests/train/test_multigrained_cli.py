"""MultiGrainedTransformer through the workflow: `pyvq encode` a tiny
Efficient-VQGAN's codes, `pyvq train --preset mgt_tiny --codes ...` (the
recipe, PriorTrainer, resume), `pyvq sample`, and `pyvq inpaint` with a
mask, an outpainting frame and a box edit with a class label."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pyvq.cli import main
from pyvq.data.codes import CodesDataset
from pyvq.models import MultiGrainedTransformer, load_run
from pyvq.train.config import TrainConfig
from pyvq.train.logger import read_jsonl
from pyvq.train.prior_trainer import PriorTrainer, build_prior
from pyvq.train.recipes import MultiGrainedRecipe, recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_thread(fn):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """A tiny Efficient-VQGAN (4 x 4 codes of K = 256 at 32 px) trained a few
    steps, its codes of the built-in train and val photographs, and an
    mgt_tiny prior trained on the train codes with the CLI."""
    root = tmp_path_factory.mktemp("mgt")
    run, train_codes, val_codes, prior = (str(root / n) for n in ("tok", "codes", "val", "prior"))

    def build():
        assert main(["train", "--preset", "effvqgan_tiny", "--data", "builtin", "--image-size", "32",
                     "--batch-size", "4", "--perceptual-weight", "0", "--disc-start", "100", "--steps", "6",
                     "--log-every", "3", "--out", run]) == 0
        assert main(["encode", "--tokenizer", run, "--image-size", "32", "--repeats", "2",
                     "--out", train_codes]) == 0
        assert main(["encode", "--tokenizer", run, "--image-size", "32", "--split", "val", "--out", val_codes]) == 0
        assert main(["train", "--preset", "mgt_tiny", "--codes", train_codes, "--out", prior, "--steps", "60",
                     "--batch-size", "16", "--log-every", "20", "--ckpt-every", "30"]) == 0

    _one_thread(build)
    return {"root": root, "tokenizer": run, "codes": train_codes, "val": val_codes, "prior": prior}


def _inputs(folder):
    """A built-in photograph and a mask (a white box = region to generate) as 64 px PNGs."""
    from PIL import Image

    from pyvq.data import load_builtin_image

    img = ((load_builtin_image("chelsea")[:, :256, 100:356] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).resize((64, 64)).save(os.path.join(folder, "image.png"))
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[16:40, 24:48] = 255  # at 32 px: rows 8..19, columns 12..23 -> codes rows 1..2, columns 1..2 (f = 8)
    Image.fromarray(mask.numpy()).save(os.path.join(folder, "mask.png"))
    return os.path.join(folder, "image.png"), os.path.join(folder, "mask.png")


def test_trained_prior_lowers_masked_token_ce_on_held_out_codes(workflow):
    prior = load_run(workflow["prior"])
    assert type(prior) is MultiGrainedTransformer and isinstance(recipe_for(prior), MultiGrainedRecipe)
    assert (prior.config.num_codes, prior.config.latent_size, prior.config.num_classes) == (256, 4, 0)
    config = json.load(open(os.path.join(workflow["prior"], "config.json")))
    assert config["betas"] == [0.9, 0.96] and config["weight_decay"] == 0.045 and config["lr"] == 1e-3
    rows = read_jsonl(os.path.join(workflow["prior"], "log.jsonl"))
    assert [r["step"] for r in rows] == [20, 40, 60] and all("train/ce" in r for r in rows)
    assert sorted(os.listdir(os.path.join(workflow["prior"], "checkpoints")))

    held_out = CodesDataset(workflow["val"])
    torch.manual_seed(0)  # the trainer's seed: the prior's initial weights
    initial = build_prior("mgt_tiny", held_out.meta)

    def ce(model):
        with torch.no_grad():
            return sum(model.eval().training_loss(held_out.codes, torch.Generator().manual_seed(s))[0].item()
                       for s in range(4)) / 4

    before, after = ce(initial), ce(prior)
    assert after < before - 0.3, (before, after)


def test_sample_writes_a_grid(workflow):
    from PIL import Image

    out = str(workflow["root"] / "samples.png")
    assert main(["sample", "--prior", workflow["prior"], "--tokenizer", workflow["tokenizer"], "--n", "4",
                 "--steps", "2", "--order", "random", "--temperature", "0.8", "--out", out]) == 0
    assert Image.open(out).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2 grid, torchvision padding 2
    with pytest.raises(SystemExit, match="'labels' was given but the model is unconditional"):
        main(["sample", "--prior", workflow["prior"], "--tokenizer", workflow["tokenizer"], "--n", "1",
              "--label", "1", "--out", out])


def test_inpaint_outpaint_and_box_edit(workflow, capsys):
    from PIL import Image

    image, mask = _inputs(str(workflow["root"]))
    common = ["inpaint", "--prior", workflow["prior"], "--tokenizer", workflow["tokenizer"], "--image", image]
    for name, region, generated in (("mask", ["--mask", mask], 4), ("outpaint", ["--outpaint", "1"], 12),
                                    ("box", ["--box", "0", "0", "16", "8"], 2)):
        out = str(workflow["root"] / f"{name}.png")
        assert main([*common, *region, "--steps", "2", "--out", out]) == 0
        assert f"{generated} of 16 codes generated" in capsys.readouterr().out, name
        assert Image.open(out).size == (32, 32)
        w, h = Image.open(str(workflow["root"] / f"{name}_panel.png")).size  # 4 labelled columns, 4x enlarged
        assert w >= 4 * 128 + 5 * 2 and h > 128 + 2 * 2
    with pytest.raises(SystemExit, match=r"--outpaint: .*'border' must be an int in \[1, 15\]"):
        main([*common, "--outpaint", "2", "--out", out])  # 2 codes = 16 px: no centre left at 32 px
    with pytest.raises(SystemExit, match=r"--box: .*must satisfy 0 <= y0 < y1 <= 32"):
        main([*common, "--box", "0", "0", "40", "8", "--out", out])
    with pytest.raises(SystemExit):  # one region only
        main([*common, "--mask", mask, "--outpaint", "1"])


def test_inpaint_and_outpaint_never_change_a_kept_code(workflow):
    from pyvq.data.codes import tokenizer_codes
    from pyvq.train.generate import inpaint_image, outpaint_canvas

    prior, tokenizer = load_run(workflow["prior"]), load_run(workflow["tokenizer"])
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 32, 32)
    mask[:, 3:12, 17:30] = 1  # codes rows 0..1, columns 2..3
    canvas, frame = outpaint_canvas(image, 8)
    for img, m, unknown in ((image, mask, 4), (canvas, frame, 12)):
        out = inpaint_image(prior, tokenizer, img, m, steps=2, order="center_out")
        keep = out["keep"]
        assert int((~keep).sum()) == unknown
        with torch.no_grad():
            codes = tokenizer_codes(tokenizer, img[None])[1][0]
        assert torch.equal(out["codes"][keep], codes[keep])
        assert torch.equal(out["completion"][:, m[0] == 0], img[:, m[0] == 0])  # known pixels pasted back
    assert torch.equal(frame[0, 8:24, 8:24], torch.zeros(16, 16)) and frame.sum() == 32 * 32 - 16 * 16


def test_box_edit_with_a_class_label(workflow, tmp_path, capsys):
    """A class-conditional prior (model_overrides from a YAML config; codes
    folders carry no labels, so it trains on the null class) regenerates a
    box as a given class."""
    cfg = tmp_path / "prior.yaml"
    cfg.write_text("model: mgt_tiny\nmodel_overrides:\n  num_classes: 4\n")
    prior = str(tmp_path / "cond")
    _one_thread(lambda: main(["train", "--config", str(cfg), "--codes", workflow["codes"], "--out", prior,
                              "--steps", "2", "--batch-size", "8"]))
    assert load_run(prior).config.num_classes == 4
    image, _ = _inputs(str(tmp_path))
    out = str(tmp_path / "edit.png")
    common = ["inpaint", "--prior", prior, "--tokenizer", workflow["tokenizer"], "--image", image,
              "--box", "8", "8", "24", "24", "--out", out]
    assert main([*common, "--label", "2", "--guidance", "2.0"]) == 0
    assert "4 of 16 codes generated" in capsys.readouterr().out and os.path.getsize(out) > 0
    with pytest.raises(SystemExit, match=r"'labels' must hold classes in \[0, 4\]"):
        main([*common, "--label", "9"])


def test_diffusion_priors_keep_their_behaviour_and_reject_the_transformer_flags(workflow, tmp_path):
    meta = CodesDataset(workflow["codes"]).meta
    folder = str(tmp_path / "vqddm")
    build_prior("vqddm_tiny", meta, {"timesteps": 10, "attention_resolutions": (4,)}).save_pretrained(folder)
    out = str(tmp_path / "s.png")
    common = ["sample", "--prior", folder, "--tokenizer", workflow["tokenizer"], "--n", "1", "--out", out]
    with pytest.raises(SystemExit, match="--label is not an option of a MultinomialDiffusion prior"):
        main([*common, "--label", "1"])
    assert main([*common, "--steps", "2"]) == 0 and os.path.getsize(out) > 0
    image, _ = _inputs(str(tmp_path))
    assert main(["inpaint", "--prior", folder, "--tokenizer", workflow["tokenizer"], "--image", image,
                 "--outpaint", "1", "--steps", "2", "--out", out]) == 0  # no --order default forced on it


def test_build_prior_sizes_codebook_and_grid_and_the_trainer_resumes(tmp_path):
    prior = build_prior("mgt_tiny", {"kind": "indices", "shape": [4, 4], "num_classes": 64})
    c = prior.config
    assert (c.num_codes, c.latent_size, c.num_classes) == (64, 4, 0)  # num_classes is the labels' count
    with pytest.raises(ValueError, match=r"field 'latent_size' \(6 x 6\) must be a multiple of field 'block_size'"):
        build_prior("mgt_tiny", {"kind": "indices", "shape": [6, 6], "num_classes": 64}, {"block_size": 4})

    codes = torch.randint(0, 16, (32, 4, 4))
    data = torch.utils.data.TensorDataset(codes)
    data.meta = {"kind": "indices", "shape": [4, 4], "num_classes": 16}
    base = dict(model="mgt_tiny", steps=4, batch_size=8, log_every=1, ckpt_every=2, seed=0)
    run = str(tmp_path / "run")
    PriorTrainer(TrainConfig(**base), run, dataset=data).train(progress=False, stop_after=2)
    trainer = PriorTrainer(TrainConfig(**base), run, dataset=data, resume=True)
    assert trainer.step == 2
    trainer.train(progress=False)
    rows = read_jsonl(os.path.join(run, "log.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["train/ce"] > 0 for r in rows)
    assert load_run(run).config.num_codes == 16
