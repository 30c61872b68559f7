"""Checkpoints: atomic, pickle-free, complete round trips; schedules."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from pyvq.train import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    warmup_cosine,
)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_resumes_identically(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    path = save_checkpoint(str(tmp_path), 3, {"model": model}, optimizers={"g": opt},
                           schedulers={"g": sched}, extra={"epoch": 1, "seen": [1, 2]})
    random.random()
    np.random.rand()
    _train(model, opt, sched, 4)  # the uninterrupted run
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = _setup(seed=123)
    info = load_checkpoint(str(tmp_path), {"model": model2}, optimizers={"g": opt2}, schedulers={"g": sched2})
    assert info["step"] == 3 and info["extra"] == {"epoch": 1, "seen": [1, 2]}
    assert os.path.basename(path) == "step_000000003"
    _train(model2, opt2, sched2, 4)
    for a, b in zip(expected, model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sched2.last_epoch == sched.last_epoch


def test_rng_restored(tmp_path):
    model, opt, sched = _setup()
    save_checkpoint(str(tmp_path), 0, {"model": model})
    a = (torch.rand(3), np.random.rand(3), random.random())
    load_checkpoint(str(tmp_path), {"model": model})
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_latest_points_to_complete_and_prunes(tmp_path):
    model, _, _ = _setup()
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, {"model": model}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_000000002", "step_000000003"]
    assert latest_checkpoint(str(tmp_path)).endswith("step_000000003")
    # a crash mid-write leaves a temporary directory that is never picked up
    os.makedirs(root / ".tmp-step_000000004-999")
    assert latest_checkpoint(str(tmp_path)).endswith("step_000000003")


def test_loading_never_unpickles_code(tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(str(tmp_path), 1, {"model": model})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(path, "state.pt"), "wb") as f:
        pickle.dump({"step": 1, "evil": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, {"model": model})


def test_errors(tmp_path):
    model, _, _ = _setup()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_checkpoint(str(tmp_path / "nothing"), {"model": model})
    save_checkpoint(str(tmp_path), 1, {"model": model})
    with pytest.raises(KeyError, match="'disc'"):
        load_checkpoint(str(tmp_path), {"disc": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="'step'"):
        save_checkpoint(str(tmp_path), -1, {"model": model})


def test_warmup_cosine_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=12, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lrs[12] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(opt, warmup_steps=5, total_steps=3)
