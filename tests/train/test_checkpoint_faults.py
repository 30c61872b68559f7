"""Checkpoint faults: a writer killed at every step of a save, a full disk,
and corrupt or truncated checkpoints. Each case leaves the previous
checkpoint loadable, the resume goes on from it, and a warning names the
bad file; a run whose checkpoints are all bad fails naming the folder."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from pyvq.train import checkpoint as ck
from pyvq.train.checkpoint import (
    CheckpointWarning,
    CheckpointWriteError,
    CorruptCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from tests.train.toy_prior import assert_same_state, state_of, toy_recipe, toy_trainer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _loaded_value(path) -> float:
    m = _model(0.0)
    load_checkpoint(str(path), {"model": m})
    return float(m.weight[0, 0].detach())


def _step_of(path) -> int:
    return int(os.path.basename(path).split("_")[1])


@contextlib.contextmanager
def _no_warnings():
    """A CheckpointWarning inside fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        yield


# ------------------------------------------------------- a writer killed mid-save
# One subprocess (importing torch once), forking a writer per point that dies
# (os._exit: no cleanup runs) right after that point of save_checkpoint.
_KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from pyvq.train import checkpoint as ck

    AFTER = {"weights": "_write_weights", "state": "_write_state", "meta": "_write_meta",
             "renamed": "_publish", "latest": "_atomic_write_text"}

    def dies_after(real):
        def call(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(17)
        return call

    def dies_removing(path, *args, **kwargs):  # prune: killed after one file of the old checkpoint went
        for folder, _, files in os.walk(path):
            for f in files:
                os.remove(os.path.join(folder, f))
                os._exit(17)

    def trainer_dies_saving_step_4(run):
        from pyvq.train import recipes
        from tests.train.toy_prior import ToyPrior, toy_trainer

        recipes.register_recipe(ToyPrior, recipes.PriorRecipe())
        real = ck._write_state

        def write(folder, state):
            real(folder, state)
            if state["step"] == 4:
                os._exit(17)

        ck._write_state = write
        toy_trainer(run).train(progress=False)

    for point in sys.argv[2:]:
        run = os.path.join(sys.argv[1], point)
        if point == "trainer":
            pid = os.fork()
            if pid == 0:
                trainer_dies_saving_step_4(run)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            print(point, os.waitstatus_to_exitcode(status), pid, flush=True)
            continue
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
        ck.save_checkpoint(run, 1, {"model": model}, keep=1)
        pid = os.fork()
        if pid == 0:
            if point == "prune":
                ck.shutil.rmtree = dies_removing
            else:
                setattr(ck, AFTER[point], dies_after(getattr(ck, AFTER[point])))
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(2.0)
            ck.save_checkpoint(run, 2, {"model": model}, keep=1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(point, os.waitstatus_to_exitcode(status), pid, flush=True)
""")

# point -> (the step a resume goes on from, the leftover a warning names)
_KILL_POINTS = {
    "weights": (1, ".tmp-step_000000002-"),
    "state": (1, ".tmp-step_000000002-"),
    "meta": (1, ".tmp-step_000000002-"),
    "renamed": (2, "step_000000002"),  # complete, 'latest' not yet updated: found from the folder, with a warning
    "latest": (2, None),  # committed; killed before pruning
    "prune": (2, ".del-step_000000001-"),  # the old checkpoint half removed, out of the step_ names
}


def _run_script(script: str, *args: str, timeout: int = 120) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("killed")
    lines = _run_script(_KILL_SCRIPT, str(base), *_KILL_POINTS, "trainer").split()
    codes = {lines[i]: int(lines[i + 1]) for i in range(0, len(lines), 3)}
    assert codes == {p: 17 for p in [*_KILL_POINTS, "trainer"]}, codes  # every writer died where it was told to
    return base


@pytest.mark.parametrize("point", list(_KILL_POINTS))
def test_writer_killed_at_every_point_leaves_a_loadable_checkpoint(killed_runs, point):
    run = killed_runs / point
    step, leftover = _KILL_POINTS[point]
    root = run / "checkpoints"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = latest_checkpoint(str(run))
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert _step_of(found) == step
    verify_checkpoint(found)
    assert _loaded_value(run) == float(step)  # the weights of that step, whole
    if leftover is None:
        assert messages == []
    else:
        assert any(str(root) in m and leftover in m for m in messages), messages
    # the next save removes what the dead writer left and keeps 'latest' valid
    save_checkpoint(str(run), 3, {"model": _model(3.0)}, keep=2)
    names = sorted(os.listdir(root))
    assert not [n for n in names if n.startswith(".")], names
    assert "step_000000003" in names and "latest" in names
    with _no_warnings():
        assert _step_of(latest_checkpoint(str(run))) == 3


# ------------------------------------------------------------------ a full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "weights.safetensors")


def _half_written(tensors, path, *args, **kwargs):  # writes part of the file, then the disk is full
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    _enospc()


_FULL_AT = {"weights": ("save_file", _half_written), "state": ("_write_state", _enospc),
            "meta": ("_write_meta", _enospc), "rename": ("_publish", _enospc),
            "latest": ("_atomic_write_text", _enospc)}


@pytest.mark.parametrize("where", list(_FULL_AT))
def test_full_disk_raises_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    save_checkpoint(str(tmp_path), 1, {"model": _model(1.0)})
    root = tmp_path / "checkpoints"
    before = sorted(os.listdir(root))
    name, fake = _FULL_AT[where]
    monkeypatch.setattr(ck, name, fake)
    with pytest.raises(CheckpointWriteError, match="step_000000002.*No space left on device") as err:
        save_checkpoint(str(tmp_path), 2, {"model": _model(2.0)})
    assert err.value.errno == errno.ENOSPC
    assert "step_000000001" in str(err.value)  # says what is still intact
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == before  # no temporary directory, no half checkpoint
    with _no_warnings():
        assert _step_of(latest_checkpoint(str(tmp_path))) == 1
    assert _loaded_value(tmp_path) == 1.0


# ------------------------------------------------------------ corrupt checkpoints
def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _flip_last_bytes(path):  # same size, damaged data: only the recorded SHA-256 can tell
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x7f\x7f\x7f\x7f")


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x00\xffnot a checkpoint" * 10)


# name -> (damage to the newest checkpoint (step 3) or to 'latest', the file the warning names, resume step)
_CORRUPT = {
    "weights truncated": (lambda d: _truncate(d / "step_000000003" / "weights.safetensors"),
                          "step_000000003/weights.safetensors", 2),
    "weights damaged": (lambda d: _flip_last_bytes(d / "step_000000003" / "weights.safetensors"),
                        "step_000000003/weights.safetensors", 2),
    "weights missing": (lambda d: os.remove(d / "step_000000003" / "weights.safetensors"),
                        "step_000000003/weights.safetensors", 2),
    "state garbage": (lambda d: _garbage(d / "step_000000003" / "state.pt"), "step_000000003/state.pt", 2),
    "state truncated": (lambda d: _truncate(d / "step_000000003" / "state.pt"), "step_000000003/state.pt", 2),
    "meta missing": (lambda d: os.remove(d / "step_000000003" / "meta.json"), "step_000000003/meta.json", 2),
    "meta garbage": (lambda d: _garbage(d / "step_000000003" / "meta.json"), "step_000000003/meta.json", 2),
    "latest names a missing folder": (lambda d: (d / "latest").write_text("step_000000007\n"), "latest", 3),
    "latest garbage": (lambda d: _garbage(d / "latest"), "latest", 3),
    "latest missing": (lambda d: os.remove(d / "latest"), "latest", 3),
}


@pytest.mark.parametrize("case", list(_CORRUPT))
def test_corrupt_newest_falls_back_with_a_warning_naming_the_file(tmp_path, case):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, {"model": _model(float(step))}, keep=3)
    root = tmp_path / "checkpoints"
    damage, bad_file, step = _CORRUPT[case]
    damage(root)
    with pytest.warns(CheckpointWarning) as record:
        found = latest_checkpoint(str(tmp_path))
    assert _step_of(found) == step
    assert any(str(root / bad_file) in str(w.message) for w in record), [str(w.message) for w in record]
    with pytest.warns(CheckpointWarning):
        assert _loaded_value(tmp_path) == float(step)
    if step == 2:  # the damaged checkpoint itself is refused, naming the file
        with pytest.raises(CorruptCheckpointError, match=bad_file.split("/")[1]):
            load_checkpoint(str(root / "step_000000003"), {"model": _model(0.0)})


def test_no_valid_checkpoint_is_an_error_naming_the_folder(tmp_path):
    for step in (1, 2):
        save_checkpoint(str(tmp_path), step, {"model": _model(float(step))})
    root = tmp_path / "checkpoints"
    _garbage(root / "step_000000001" / "state.pt")
    _truncate(root / "step_000000002" / "weights.safetensors")
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError) as err:
        latest_checkpoint(str(tmp_path))
    msg = str(err.value)
    assert f"no valid checkpoint in {root}" in msg and "state.pt" in msg and "weights.safetensors" in msg
    assert latest_checkpoint(str(tmp_path / "empty")) is None  # no checkpoint at all is not an error


def _touch(path):
    open(path, "w").close()


class _SideEffect:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create a file
        return (_touch, (self.path,))


def test_an_unsafe_pickle_is_refused_and_never_run(tmp_path):
    import pickle

    save_checkpoint(str(tmp_path), 1, {"model": _model(1.0)})
    path = save_checkpoint(str(tmp_path), 2, {"model": _model(2.0)})
    marker = tmp_path / "ran"
    with open(os.path.join(path, "state.pt"), "wb") as f:
        pickle.dump({"step": 2, "evil": _SideEffect(str(marker))}, f)
    with pytest.raises(pickle.UnpicklingError, match="state.pt does not load under weights_only"):
        load_checkpoint(path, {"model": _model(0.0)})
    with pytest.warns(CheckpointWarning, match="step_000000002/state.pt"):
        assert _loaded_value(tmp_path) == 1.0
    assert not marker.exists()


# ------------------------------------------------------------------------ prune
def test_prune_keeps_latest_and_only_removes_older_steps(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, {"model": _model(float(step))}, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "step_000000002", "step_000000003"]
    # a newer folder from a future the run left (it resumed from an older checkpoint): never pruned, never
    # deleted: moved to checkpoints/superseded/ before the older step is written, so 'latest' names the newest
    os.rename(root / "step_000000002", root / "step_000000009")
    with pytest.warns(CheckpointWarning, match=r"moved aside, not deleted: .*superseded/step_000000009"):
        save_checkpoint(str(tmp_path), 4, {"model": _model(4.0)}, keep=1)
    assert sorted(os.listdir(root)) == ["latest", "step_000000004", "superseded"]
    assert os.listdir(root / "superseded") == ["step_000000009"]
    assert (root / "latest").read_text().strip() == "step_000000004"
    with _no_warnings():
        assert _step_of(latest_checkpoint(str(tmp_path))) == 4
    # re-saving the committed step replaces it and 'latest' still names a whole checkpoint
    save_checkpoint(str(tmp_path), 4, {"model": _model(5.0)}, keep=1)
    with _no_warnings():
        assert _loaded_value(tmp_path) == 5.0
    # keep <= 0 still keeps the new one
    save_checkpoint(str(tmp_path / "b"), 1, {"model": _model(1.0)}, keep=0)
    save_checkpoint(str(tmp_path / "b"), 2, {"model": _model(2.0)}, keep=0)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["latest", "step_000000002"]


# -------------------------------------------------------- through a real trainer
def test_trainer_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path, toy_recipe):
    full = toy_trainer(tmp_path / "full")
    full.train(progress=False)
    expected = state_of(full)

    part = toy_trainer(tmp_path / "part", ckpt_every=1)
    part.train(progress=False, stop_after=4)
    _truncate(tmp_path / "part" / "checkpoints" / "step_000000004" / "weights.safetensors")
    with pytest.warns(CheckpointWarning, match="step_000000004/weights.safetensors"):
        resumed = toy_trainer(tmp_path / "part", resume=True)
    assert resumed.step == 3
    resumed.train(progress=False)
    assert_same_state(state_of(resumed), expected)


def test_trainer_killed_while_saving_resumes_from_the_previous_checkpoint(killed_runs, tmp_path, toy_recipe):
    run = killed_runs / "trainer"  # a toy trainer killed while writing its step-4 checkpoint
    with pytest.warns(CheckpointWarning, match=r"\.tmp-step_000000004-"):
        resumed = toy_trainer(run, resume=True)
    assert resumed.step == 3
    resumed.train(progress=False)
    full = toy_trainer(tmp_path / "full")
    full.train(progress=False)
    assert_same_state(state_of(resumed), state_of(full))
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]


def test_trainer_warns_and_goes_on_when_a_save_fails_and_raises_at_the_last(tmp_path, toy_recipe, monkeypatch):
    real = ck._write_state

    def full_at(steps):
        def write(folder, state):
            if state["step"] in steps:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(folder, "state.pt"))
            real(folder, state)
        return write

    monkeypatch.setattr(ck, "_write_state", full_at({4}))
    t = toy_trainer(tmp_path / "a", ckpt_every=2)
    with pytest.warns(CheckpointWarning, match="step 4: .*save_checkpoint: could not write checkpoint "
                                                "step_000000004.*No space left on device.*Training continues"):
        t.train(progress=False)
    assert t.step == 6 and _step_of(latest_checkpoint(str(tmp_path / "a"))) == 6

    monkeypatch.setattr(ck, "_write_state", full_at({6}))
    t = toy_trainer(tmp_path / "b", ckpt_every=2)
    with pytest.raises(CheckpointWriteError, match="step_000000006.*still names .*step_000000004"):
        t.train(progress=False)
    monkeypatch.setattr(ck, "_write_state", real)
    assert _step_of(latest_checkpoint(str(tmp_path / "b"))) == 4
    resumed = toy_trainer(tmp_path / "b", resume=True)
    assert resumed.step == 4


def test_trainer_resume_with_no_valid_checkpoint_names_the_folder(tmp_path, toy_recipe):
    toy_trainer(tmp_path, ckpt_every=3).train(progress=False, stop_after=3)
    _garbage(tmp_path / "checkpoints" / "step_000000003" / "state.pt")
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError,
                                                        match="no valid checkpoint in .*Nothing to resume from: "):
        toy_trainer(tmp_path, resume=True)


def test_checkpoint_of_another_model_is_named_on_load(tmp_path):
    path = save_checkpoint(str(tmp_path), 1, {"model": _model(1.0)}, optimizers={
        "g": torch.optim.AdamW(_model(1.0).parameters())})
    with pytest.raises(ValueError, match=r"weights of module 'model' in .*step_000000001 do not fit the Linear"):
        load_checkpoint(path, {"model": torch.nn.Linear(5, 2)})
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weights of module 'model'"):
        load_checkpoint(path, {"model": other})
