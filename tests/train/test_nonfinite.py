"""Non-finite losses and gradients: the step is skipped (no weight,
optimizer, scheduler, EMA or buffer change), counted and warned about;
training goes on after isolated bad steps; more than
``max_nonfinite_steps`` in a row stop the run with NonFiniteLossError and
no checkpoint of the bad state; the CLI prints that as one line."""

from __future__ import annotations

import math

import pytest
import torch

from pyvq.train.base import NonFiniteLossError, NonFiniteStepWarning
from pyvq.train.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
from pyvq.train.config import TrainConfig
from pyvq.train.logger import read_jsonl
from tests.train.toy_prior import ToyPrior, assert_same_state, state_of, toy_recipe, toy_trainer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _counts(run) -> dict:
    return {r["step"]: r["train/nonfinite_steps"] for r in read_jsonl(str(run / "log.jsonl"))}


def test_a_nan_loss_skips_the_step_and_training_goes_on(tmp_path, toy_recipe):
    t = toy_trainer(tmp_path, bad={2}, ema_decay=0.5)  # the third step's loss is NaN
    t.train(progress=False, stop_after=2)
    before = state_of(t)
    with pytest.warns(NonFiniteStepWarning, match=r"step 3 skipped .*optimizer 'g': loss nan; train/loss=nan "
                                                   r"\(1 in a row, max_nonfinite_steps=10; 1 in the run\)"):
        t.train(progress=False, stop_after=3)
    assert t.step == 3
    assert_same_state(state_of(t), before)  # weights, buffer, AdamW state, schedule, EMA: all untouched
    t.train(progress=False)
    assert t.step == 6 and t.nonfinite_steps == 1
    after = state_of(t)
    assert not torch.equal(after["module.lin.weight"], before["module.lin.weight"])  # it trained on
    assert after["sched.g"].item() == 5  # five real steps
    assert _counts(tmp_path) == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}


def test_isolated_bad_steps_never_stop_the_run(tmp_path, toy_recipe):
    t = toy_trainer(tmp_path, bad={0, 2, 4}, max_nonfinite_steps=1, log_every=100)
    with pytest.warns(NonFiniteStepWarning):
        t.train(progress=False)
    assert t.step == 6 and t.nonfinite_steps == 3
    assert _counts(tmp_path) == {1: 1, 3: 2, 5: 3, 6: 3}  # a bad step always writes its row


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped(tmp_path, toy_recipe, grad_clip):
    t = toy_trainer(tmp_path, bad={1}, bad_kind="grad", grad_clip=grad_clip)
    t.train(progress=False, stop_after=1)
    before = state_of(t)
    with pytest.warns(NonFiniteStepWarning, match="step 2 skipped .*optimizer 'g': gradient norm nan"):
        t.train(progress=False, stop_after=2)
    assert_same_state(state_of(t), before)
    assert math.isfinite(read_jsonl(str(tmp_path / "log.jsonl"))[-1]["train/loss"])  # the loss itself was fine


def test_too_many_bad_steps_in_a_row_stop_without_saving_the_bad_state(tmp_path, toy_recipe):
    t = toy_trainer(tmp_path, bad=set(range(3, 100)), max_nonfinite_steps=2, ckpt_every=2)
    t.train(progress=False, stop_after=3)
    good = state_of(t)
    with pytest.warns(NonFiniteStepWarning), pytest.raises(NonFiniteLossError) as err:
        t.train(progress=False)
    msg = str(err.value)
    assert err.value.step == 6 and "optimizer 'g': loss nan" in err.value.terms
    assert "stopped at step 6: 3 consecutive steps with a non-finite loss" in msg
    assert "max_nonfinite_steps=2" in msg and "train/loss=nan" in msg and "step_000000004" in msg
    # step 6 is the run's last step, where a checkpoint is normally written: not this time
    found = latest_checkpoint(str(tmp_path))
    assert found.endswith("step_000000004")
    verify_checkpoint(found)
    model = ToyPrior()
    load_checkpoint(found, {"model": model})
    for k, v in model.state_dict().items():  # the last good weights (a skipped step changes none)
        torch.testing.assert_close(v, good[f"module.{k}"], rtol=0, atol=0)
    assert _counts(tmp_path)[6] == 3  # the stopping step is logged too
    assert not (tmp_path / "model").exists()


def test_zero_tolerance_stops_at_the_first_bad_step(tmp_path, toy_recipe):
    t = toy_trainer(tmp_path, bad={1}, max_nonfinite_steps=0)
    with pytest.raises(NonFiniteLossError, match="stopped at step 2: 1 consecutive .*max_nonfinite_steps=0"):
        t.train(progress=False)
    assert latest_checkpoint(str(tmp_path)).endswith("step_000000001")


def test_config_checks_max_nonfinite_steps():
    with pytest.raises(ValueError, match="'max_nonfinite_steps' must be an int >= 0, got -1"):
        TrainConfig(max_nonfinite_steps=-1)


# ------------------------------------------------------------ the tokenizer trainer
def _tokenizer_config(**kw):
    base = dict(model="vqgan_tiny", data="builtin", image_size=32, batch_size=2, steps=3, lr=1e-3, warmup_steps=1,
                perceptual_weight=0.0, disc_start=0, log_every=1, image_every=100, ckpt_every=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _nan_at(loss_module, monkeypatch, bad: dict):
    """The loss returns NaN for (step, 0 = generator / 1 = discriminator) in ``bad``."""
    real = loss_module.forward

    def forward(x, x_rec, optimizer_idx, step, **kw):
        loss, log = real(x, x_rec, optimizer_idx, step, **kw)
        return (loss * float("nan"), log) if (step, optimizer_idx) in bad else (loss, log)

    monkeypatch.setattr(loss_module, "forward", forward)


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_trainer_skips_the_generator_and_discriminator_steps_apart(tmp_path, monkeypatch):
    from pyvq.train.trainer import Trainer

    t = Trainer(_tokenizer_config(ema_decay=0.5), str(tmp_path))
    _nan_at(t.loss, monkeypatch, {(1, 0), (2, 1)})  # step 2: generator NaN; step 3: discriminator NaN
    t.train(progress=False, stop_after=1)
    g, d, ema = _params(t.model), _params(t.disc), _params(t.ema)
    sched = t.sched_g.last_epoch, t.sched_d.last_epoch
    with pytest.warns(NonFiniteStepWarning, match="step 2 skipped .*optimizer 'g': loss nan"):
        t.train(progress=False, stop_after=2)
    assert _same(_params(t.model), g) and _same(_params(t.ema), ema) and t.sched_g.last_epoch == sched[0]
    assert not _same(_params(t.disc), d) and t.sched_d.last_epoch == sched[1] + 1  # D stepped
    d = _params(t.disc)
    with pytest.warns(NonFiniteStepWarning, match="step 3 skipped .*optimizer 'd': loss nan"):
        t.train(progress=False)
    assert _same(_params(t.disc), d) and t.sched_d.last_epoch == sched[1] + 1
    assert not _same(_params(t.model), g) and t.step == 3 and t.nonfinite_steps == 2


def test_cli_prints_the_stop_as_one_line(tmp_path, monkeypatch, capsys):
    from pyvq import cli
    from pyvq.losses.vqperceptual import VQLPIPSWithDiscriminator

    real = VQLPIPSWithDiscriminator.forward

    def always_nan(self, *args, **kw):
        loss, log = real(self, *args, **kw)
        return loss * float("nan"), log

    monkeypatch.setattr(VQLPIPSWithDiscriminator, "forward", always_nan)
    with pytest.warns(NonFiniteStepWarning, match="step 1 skipped"):
        code = cli.main(["train", "--preset", "vqgan_tiny", "--data", "builtin", "--out", str(tmp_path / "run"),
                         "--steps", "3", "--image-size", "32", "--batch-size", "2", "--perceptual-weight", "0",
                         "--max-nonfinite-steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("pyvq train:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "stopped at step 2: 2 consecutive" in lines[0] and "max_nonfinite_steps=1" in lines[0]


# ------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, out_dir):
    import os
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pyvq.train import recipes
    from pyvq.train.distributed import cleanup_distributed

    recipes.register_recipe(ToyPrior, recipes.PriorRecipe())
    # rank 1's second loss is inf, its gradients finite: only the all-reduced flag makes rank 0 skip too
    t = toy_trainer(os.path.join(out_dir, "run"), bad={1} if rank == 1 else set(), bad_kind="inf", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteStepWarning)
        t.train(progress=False)
    torch.save({"state": state_of(t), "skipped": t.nonfinite_steps}, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup_distributed()


@pytest.mark.slow
def test_ddp_ranks_skip_together(tmp_path):
    import torch.multiprocessing as mp

    from tests.train.test_trainer import _free_port

    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for _ in range(240):  # a desynchronised rank would hang in a collective: fail instead
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the DDP run did not finish in 240 s (ranks out of step?)")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1  # rank 0's loss was fine, and it skipped too
    assert_same_state(r0["state"], r1["state"])
    assert r0["state"]["sched.g"].item() == 5
