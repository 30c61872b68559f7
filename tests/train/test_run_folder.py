"""Run folders never lose work: a non-empty folder is refused without
resume/overwrite, overwrite moves the old run aside, checkpoints and
'latest' agree, a failed start leaves nothing, unwritable outputs fail
before any work, log.jsonl holds each step once after a resume, and a
truncated model file is named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from pyvq.train.base import LOCK_NAME, RunFolderError
from pyvq.train.checkpoint import CheckpointWarning, latest_checkpoint
from pyvq.train.logger import DISCARDED_LOG, RunLogger, check_writable_dir, read_jsonl
from tests.train.toy_prior import ToyPrior, toy_recipe, toy_trainer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread", "toy_recipe")


def _bad_codes():
    """Code maps a ToyPrior's first step cannot take (a failed start)."""
    data = torch.utils.data.TensorDataset(torch.zeros(16, 5, 5, dtype=torch.long))
    data.meta = {"kind": "indices", "shape": [5, 5], "num_classes": 8}
    return data


def _steps(run) -> list[int]:
    root = os.path.join(run, "checkpoints")
    return sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))


# ------------------------------------------------------ reusing a run folder
def test_a_second_run_into_a_used_folder_is_refused_and_the_first_is_intact(tmp_path):
    run = tmp_path / "run"
    toy_trainer(run, steps=20, ckpt_every=10).train(progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(RunFolderError) as info:
        toy_trainer(run, steps=5, ckpt_every=10)
    message = str(info.value)
    for part in (str(run), "checkpoints up to step 20", "model/", "log.jsonl (20 rows)", "resume=True",
                 "--resume", "overwrite=True", "--overwrite"):
        assert part in message, (part, message)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched
    resumed = toy_trainer(run, steps=20, ckpt_every=10, resume=True)
    assert resumed.step == 20


def test_overwrite_moves_the_old_run_aside_and_starts_clean(tmp_path):
    run = tmp_path / "run"
    toy_trainer(run, steps=20, ckpt_every=10).train(progress=False)
    old_model = (run / "model" / "config.json").read_text()
    with pytest.warns(UserWarning, match=r"moved to .*run\.replaced-"):
        t = toy_trainer(run, steps=5, ckpt_every=10, overwrite=True)
    t.train(progress=False)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert _steps(aside) == [10, 20] and (aside / "model" / "config.json").read_text() == old_model
    assert [r["step"] for r in read_jsonl(str(aside / "log.jsonl"))] == list(range(1, 21))
    assert _steps(run) == [5]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000005"
    assert [r["step"] for r in read_jsonl(str(run / "log.jsonl"))] == list(range(1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert latest_checkpoint(str(run)).endswith("step_000000005")
        assert toy_trainer(run, steps=5, resume=True).step == 5
    with pytest.raises(ValueError, match="contradict"):
        toy_trainer(run, steps=5, resume=True, overwrite=True)


def test_an_empty_or_missing_folder_needs_no_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    toy_trainer(tmp_path / "empty", steps=2).train(progress=False)
    toy_trainer(tmp_path / "new" / "deeper", steps=2).train(progress=False)
    assert _steps(tmp_path / "new" / "deeper") == [1, 2]


def test_cli_train_refuses_a_used_folder_in_one_line(tmp_path, monkeypatch):
    from pyvq import cli
    from pyvq.train import base

    seen = []

    def refuse(self, resume, overwrite):  # the real check, recording the flags the CLI passed
        seen.append((resume, overwrite))
        raise RunFolderError(f"the run folder X is not empty (resume={resume}, overwrite={overwrite})")

    monkeypatch.setattr(base.BaseTrainer, "_check_run_folder", refuse)
    args = ["train", "--preset", "vqgan_tiny", "--data", "builtin", "--out", str(tmp_path), "--steps", "1",
            "--perceptual-weight", "0"]
    with pytest.raises(SystemExit, match=r"pyvq train: the run folder X is not empty \(resume=False"):
        cli.main(args)
    with pytest.raises(SystemExit, match="overwrite=True"):
        cli.main(args + ["--overwrite"])
    assert seen == [(False, False), (False, True)]


# -------------------------------------------- checkpoints found from contents
def test_resume_finds_checkpoints_when_latest_is_missing_or_stale(tmp_path):
    run = tmp_path / "run"
    toy_trainer(run, steps=6, ckpt_every=3).train(progress=False)
    latest = run / "checkpoints" / "latest"
    latest.write_text("step_000000003\n")  # stale: a writer killed between the rename and the update
    with pytest.warns(CheckpointWarning, match="names step_000000003; using .*step_000000006"):
        assert toy_trainer(run, steps=6, resume=True).step == 6
    latest.unlink()
    with pytest.warns(CheckpointWarning, match="is missing; using .*step_000000006"):
        assert toy_trainer(run, steps=6, resume=True).step == 6
    latest.write_text("step_000000099\n")  # names a deleted folder
    with pytest.warns(CheckpointWarning, match="names step_000000099; using .*step_000000006"):
        assert toy_trainer(run, steps=6, resume=True).step == 6


# ------------------------------------------------------ failed starts, outputs
def test_a_failed_start_leaves_nothing_behind(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):  # the first step fails: a bad input size, say
        toy_trainer(run, steps=3, dataset=_bad_codes()).train(progress=False)
    assert not run.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="were moved to"):
        toy_trainer(tmp_path / "mine", steps=3, dataset=_bad_codes(), overwrite=True).train(progress=False)
    assert os.listdir(tmp_path / "mine") == []  # what this start created is gone ...
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert (aside / "notes.txt").read_text() == "keep me"  # ... and what was there is kept


def test_failed_start_of_the_cli_leaves_no_folder(tmp_path):
    from pyvq import cli

    out = tmp_path / "r"
    base = ["train", "--data", "builtin", "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--perceptual-weight", "0"]
    for bad in (["--preset", "vqgan_tiny", "--image-size", "30"], ["--preset", "no_such_preset"],
                ["--preset", "vqgan_tiny", "--data", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit, match="pyvq train: "):
            cli.main(base + bad)
        assert not out.exists(), bad


def test_unwritable_out_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=re.escape(f"out_dir {blocker}/run: {blocker} is a file")):
        toy_trainer(blocker / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(PermissionError, match=re.escape(f"out_dir {tmp_path}/run is not writable: {tmp_path}, wh")):
        toy_trainer(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(PermissionError, match=re.escape(f"--out {tmp_path} is not writable: it is not writable")):
        check_writable_dir(str(tmp_path), "--out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: permissions not enforced")
def test_read_only_out_fails_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"out_dir {ro} is not writable")):
            toy_trainer(ro)
    finally:
        ro.chmod(0o700)


def test_sample_and_inpaint_check_their_output_before_loading_anything(tmp_path, monkeypatch):
    from pyvq import cli

    def no_work(*args, **kwargs):
        raise AssertionError("loaded a model before checking the output")

    monkeypatch.setattr(cli, "_load", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    is_file = re.escape(f"{blocker} is a file")
    with pytest.raises(SystemExit, match=re.escape(f"pyvq sample: the folder of --out {blocker}/x: ") + is_file):
        cli.main(["sample", "--prior", str(tmp_path), "--tokenizer", str(tmp_path), "--out",
                  str(blocker / "x" / "s.png")])
    with pytest.raises(SystemExit, match=r"pyvq sample: --prior \(where samples.png .*" + is_file):
        cli.main(["sample", "--prior", str(blocker), "--tokenizer", str(tmp_path)])
    with pytest.raises(SystemExit, match=re.escape(f"pyvq inpaint: the folder of --out {blocker}/x: ") + is_file):
        cli.main(["inpaint", "--prior", str(tmp_path), "--tokenizer", str(tmp_path), "--image", str(blocker),
                  "--box", "0", "0", "1", "1", "--out", str(blocker / "x" / "i.png")])


# -------------------------------------------------------------- logs on resume
def test_log_after_a_crash_holds_each_step_once(tmp_path):
    run = tmp_path / "run"
    t = toy_trainer(run, steps=8, ckpt_every=4)
    t.train(progress=False, stop_after=6)  # checkpoint at 4 and at 6 (the stop)
    # the run died after logging step 7 and half of step 8, before a checkpoint past 6
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "train/loss": 1.0}) + "\n" + '{"step": 8, "tra')
    resumed = toy_trainer(run, steps=8, ckpt_every=4, resume=True)
    assert resumed.step == 6
    resumed.train(progress=False)
    assert [r["step"] for r in read_jsonl(str(run / "log.jsonl"))] == list(range(1, 9))
    discarded = (run / DISCARDED_LOG).read_text().splitlines()
    assert len(discarded) == 2 and discarded[1] == '{"step": 8, "tra'


def test_logger_resume_step_keeps_earlier_rows(tmp_path):
    log = RunLogger(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        log.scalars(step, {"x": float(step)})
    log.close()
    log = RunLogger(str(tmp_path), tensorboard=False, resume_step=2)
    log.scalars(3, {"x": 30.0})
    log.close()
    rows = read_jsonl(str(tmp_path / "log.jsonl"))
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ------------------------------------------------------------ corrupt files
def test_truncated_model_file_is_named(tmp_path):
    from pyvq.models import VQGAN, get_preset, load_pretrained, load_run

    VQGAN(get_preset("vqgan_tiny")).save_pretrained(str(tmp_path / "model"))
    weights = tmp_path / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    for load in (load_pretrained, load_run):
        with pytest.raises(ValueError, match=re.escape(str(weights)) + " is not a readable safetensors file.*damaged"):
            load(str(tmp_path / "model") if load is load_pretrained else str(tmp_path))


def test_final_model_is_replaced_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    toy_trainer(run, steps=2).train(progress=False)
    good = (run / "model" / "config.json").read_text()

    def dies_half_way(self, directory):  # writes part of the model, then the disk is full
        os.makedirs(directory, exist_ok=True)
        (open(os.path.join(directory, "config.json"), "w")).close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ToyPrior, "save_pretrained", dies_half_way)
    resumed = toy_trainer(run, steps=2, resume=True)  # at its final step: train() writes model/ again
    with pytest.raises(OSError, match="No space"):
        resumed.train(progress=False)
    assert (run / "model" / "config.json").read_text() == good  # the previous model, whole
    assert sorted(os.listdir(run)) == [LOCK_NAME, "checkpoints", "config.json", "log.jsonl", "model", "tensorboard"]


def test_a_second_process_cannot_train_into_a_folder_in_use(tmp_path):
    run = tmp_path / "run"
    toy_trainer(run, steps=4, ckpt_every=2).train(progress=False, stop_after=2)
    holder = subprocess.Popen(  # another process holding the folder's lock, as a running trainer does
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(run / LOCK_NAME)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.ftruncate(fd, 0)\nos.write(fd, str(os.getpid()).encode())\n"
         "print('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunFolderError, match=f"another process \\(pid {holder.pid}\\) is training into"):
                toy_trainer(run, steps=4, **kwargs)
    finally:
        holder.communicate("", timeout=30)
    resumed = toy_trainer(run, steps=4, ckpt_every=2, resume=True)  # free again
    resumed.train(progress=False)
    assert resumed.step == 4


def test_a_failed_resume_keeps_the_rows_it_moved_out_of_the_log(tmp_path):
    run = tmp_path / "run"
    toy_trainer(run, steps=8, ckpt_every=4).train(progress=False, stop_after=4)
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "train/loss": 1.0}) + "\n")  # logged by the run that died at step 5
    with pytest.raises(RuntimeError):
        toy_trainer(run, steps=8, ckpt_every=4, resume=True, dataset=_bad_codes()).train(progress=False)
    assert json.loads((run / DISCARDED_LOG).read_text())["step"] == 5
    assert _steps(run) == [4] and (run / "config.json").exists()
