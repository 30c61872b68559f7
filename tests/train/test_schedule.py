"""The trainer's LR schedule: short runs warm up over a tenth of the run
and then decay, long runs keep their warm-up, and a resumed run follows the
saved schedule step by step (with more steps, held at its final rate;
a checkpoint past the given steps is refused)."""

from __future__ import annotations

import math

import pytest

from pyvq.train.logger import read_jsonl
from tests.train.toy_prior import toy_recipe, toy_trainer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread", "toy_recipe")

LR = 1e-2  # toy_trainer's


def _lrs(run) -> list[float]:
    return [r["train/lr"] for r in read_jsonl(str(run / "log.jsonl"))]


def test_a_short_run_warms_up_then_decays(tmp_path):
    t = toy_trainer(tmp_path, steps=20, warmup_steps=50, ckpt_every=100)
    t.train(progress=False)
    lrs = _lrs(tmp_path)  # the rate each step used, logged after its scheduler step
    assert len(lrs) == 20
    peak = max(range(20), key=lambda i: (lrs[i], i))  # the last step at the peak rate
    assert peak <= 2, lrs  # warm-up over the first tenth (2 steps), not the whole run
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1:])), lrs  # then cosine decay
    assert lrs[-1] == pytest.approx(LR * t.config.min_lr_ratio, abs=1e-12)  # down to min_lr_ratio at the end


@pytest.mark.parametrize("steps,warmup,expected", [(1000, 50, 50), (500, 50, 50), (100, 50, 10), (6, 2, 0)])
def test_warm_up_is_at_most_a_tenth_of_the_run(tmp_path, steps, warmup, expected):
    t = toy_trainer(tmp_path, steps=steps, warmup_steps=warmup)
    factor = t.sched_g.lr_lambdas[0]
    rising = [factor(k) for k in range(expected)]
    assert rising == [pytest.approx((k + 1) / expected) for k in range(expected)]
    assert factor(expected) == pytest.approx(1.0)  # the peak, then decay
    assert factor(steps) == pytest.approx(t.config.min_lr_ratio)


def test_a_resumed_run_follows_the_uninterrupted_schedule_step_by_step(tmp_path):
    full = tmp_path / "full"
    toy_trainer(full, steps=30, warmup_steps=5, ckpt_every=10).train(progress=False)
    part = tmp_path / "part"
    toy_trainer(part, steps=30, warmup_steps=5, ckpt_every=10).train(progress=False, stop_after=20)
    toy_trainer(part, steps=30, warmup_steps=5, ckpt_every=10, resume=True).train(progress=False)
    expected, got = _lrs(full), _lrs(part)
    assert len(got) == len(expected) == 30
    for step, (a, b) in enumerate(zip(expected, got), start=1):
        assert math.isclose(a, b, rel_tol=0, abs_tol=0), (step, a, b)


def test_resume_with_more_steps_keeps_the_saved_schedule(tmp_path):
    toy_trainer(tmp_path, steps=20, warmup_steps=5, ckpt_every=10).train(progress=False)
    done = _lrs(tmp_path)
    with pytest.warns(UserWarning, match=r"going on from .*step_000000020 with steps=30.*follows the schedule the "
                                         r"run was saved with \(warm-up over 2 steps, cosine decay to 0.1 x lr at "
                                         r"step 20\).*steps 21 to 30 hold its final rate"):
        t = toy_trainer(tmp_path, steps=30, warmup_steps=5, ckpt_every=10, resume=True)
    t.train(progress=False)
    lrs = _lrs(tmp_path)
    assert lrs[:20] == done
    assert lrs[20:] == [pytest.approx(LR * t.config.min_lr_ratio, rel=1e-12)] * 10  # no jump back up
    assert _lrs(tmp_path)[19] == pytest.approx(LR * t.config.min_lr_ratio, rel=1e-12)


def test_resume_past_the_given_steps_is_refused(tmp_path):
    toy_trainer(tmp_path, steps=20, ckpt_every=10).train(progress=False)
    with pytest.raises(ValueError, match=r"step_000000020 is at step 20, past this run's steps=10 \(--steps\)"):
        toy_trainer(tmp_path, steps=10, resume=True)
    assert toy_trainer(tmp_path, steps=20, resume=True).step == 20
