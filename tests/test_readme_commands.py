"""Every `pyvq ...` command line the README prints runs, as printed, with a few steps.

The commands are read from the README's code blocks, in order, and run
in-process through ``pyvq.cli.main`` in one working folder, so that later
commands find what earlier ones wrote (encode -> train --codes -> sample ->
inpaint). Only the amount of work is rewritten: ``--steps`` to 2, ``--n`` to
2, ``--repeats`` to 1, ``--num`` to 2, and a ``train`` without them gets
``--image-size 32 --batch-size 2``; ``[optional]`` parts are left out;
``/path/to/images``, ``my.yaml``, ``img.png`` and ``mask.png`` are made here.
A command the CLI no longer accepts, or that fails, fails its test.

Left out, each for a reason given in ``EXCLUDED``: ``pyvq demo`` /
``demo-inpaint`` (minutes of training; tests/train/test_cli.py runs the demo
on a few steps) and ``pyvq bench`` (benchmarks, never run by tests). The
run ``runs/demo/train`` that ``pyvq demo`` writes is stood in for by a
2-step ``vqgan_tiny`` run. The README's ``torchrun ... -m pyvq.cli train ...``
line is a template (its ``...``), not a `pyvq` line; tests/train/test_trainer.py
runs the CLI under torchrun. The tests depend on one another, in file order.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

EXCLUDED = {
    "demo": "trains for minutes; tests/train/test_cli.py runs run_demo on a few steps",
    "demo-inpaint": "trains for minutes; the inpainting demo is tested through pyvq.demo",
    "bench": "benchmarks measure and are never run by tests",
}


def readme_commands(text: str) -> list[str]:
    """The `pyvq ...` lines of the README's plain code blocks (in a block
    with ``$ `` prompts only the prompted lines, the rest is output; a
    trailing ``# comment`` dropped), each distinct line once, in order."""
    blocks, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block = [] if line[3:].strip() in ("", "sh", "bash", "console") else False
            else:
                if block is not False:
                    blocks.append(block)
                block = None
        elif block is not False and block is not None:
            block.append(line.strip())
    out = []
    for lines in blocks:
        if any(line.startswith("$ ") for line in lines):
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("pyvq ") and line not in out:
                out.append(line)
    return out


_WORK = {"--steps": "2", "--n": "2", "--repeats": "1", "--num": "2"}


def rewrite(command: str) -> list[str]:
    """argv for ``pyvq.cli.main``: the command with less work to do."""
    line = re.sub(r"\s*\[[^\]]*\]", "", command)  # optional parts
    argv = shlex.split(line)[1:]
    for i, arg in enumerate(argv[:-1]):
        if arg in _WORK:
            argv[i + 1] = _WORK[arg]
    sub = argv[0]
    extra = {"train": {"--steps": "2", "--image-size": "32", "--batch-size": "2"},
             "sample": {"--steps": "2"}, "inpaint": {"--steps": "2"}, "eval-inpaint": {"--num": "2"}}.get(sub, {})
    for flag, value in extra.items():
        if flag not in argv:
            argv += [flag, value]
    return argv


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the commands run in, with the files they name and the
    demo's tokenizer run."""
    import numpy as np
    from PIL import Image

    from pyvq.cli import main

    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    photo = np.stack([xx * 3 % 256, yy * 2 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(root / "img.png")
    mask = np.zeros((96, 80), np.uint8)
    mask[30:60, 25:55] = 255
    Image.fromarray(mask).save(root / "mask.png")
    images = root / "path" / "to" / "images"
    images.mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 48), (64, 36), (50, 50), (33, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(images / "grey.jpg")
    (images / "truncated.jpg").write_bytes((images / "grey.jpg").read_bytes()[:200])
    (images / "empty.png").write_bytes(b"")  # a user's folder: the trainer skips these with a warning
    (root / "my.yaml").write_text("model: vqgan_tiny\nimage_size: 32\nbatch_size: 2\nsteps: 2\n")
    cwd = os.getcwd()
    os.chdir(root)
    try:  # stands in for `pyvq demo`'s tokenizer run
        assert main(["train", "--preset", "vqgan_tiny", "--data", "builtin", "--image-size", "32",
                     "--batch-size", "2", "--steps", "2", "--no-lpips", "--out", "runs/demo/train"]) == 0
    finally:
        os.chdir(cwd)
    return root


def test_the_readme_prints_the_workflow():
    subs = {shlex.split(c)[1] for c in COMMANDS}
    assert {"info", "train", "eval", "encode", "sample", "inpaint", "eval-inpaint"} <= subs, subs
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_readme_command_runs(command, workdir, monkeypatch):
    from pyvq.cli import main

    sub = shlex.split(command)[1]
    if sub in EXCLUDED:
        pytest.skip(f"pyvq {sub}: {EXCLUDED[sub]}")
    argv = rewrite(command.replace("/path/to/images", str(workdir / "path" / "to" / "images")))
    monkeypatch.chdir(workdir)
    try:
        code = main(argv)
    except SystemExit as exc:
        pytest.fail(f"README command `{command}` (run as {argv}) exited: {exc.code}")
    assert code == 0, f"README command `{command}` returned {code}"
