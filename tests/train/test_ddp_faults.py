"""DDP failures and world-size changes, on gloo with 2 processes.

A dying rank (SIGKILL, an exception) or a stuck one must not hang the
others: they stop with a one-line ``DistributedFailure`` within the
collective timeout. A run checkpointed on 2 processes resumes on 1 and vice
versa at the right step and position in the data.

Every multi-process case runs a tiny worker script (written to tmp_path) in
subprocesses with a hard timeout, so a hang fails the test. Faults are
injected by the worker (a wrapped ``train_step``), never by pyvq itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pyvq.train.config import TrainConfig
from pyvq.train.distributed import (
    TIMEOUT_ENV,
    DistInfo,
    DistributedFailure,
    collective_guard,
    dist_timeout_s,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The worker: a one-weight "prior" trained by PriorTrainer on a dataset whose
# sample i is the number i, so every step records which samples it saw.
WORKER = r'''
import json, os, signal, sys, time, warnings

import torch
from torch import nn

from pyvq.train.config import TrainConfig
from pyvq.train.distributed import cleanup_distributed
from pyvq.train.prior_trainer import PriorTrainer
from pyvq.train.recipes import PriorRecipe, register_recipe


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return (self.lin(x / 32) - 0.5 * x / 32).pow(2).mean(), {}

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)


register_recipe(Tiny, PriorRecipe())


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)])


def run(args):
    rank = int(os.environ.get("RANK", "0"))
    config = TrainConfig(model="tiny", batch_size=args["batch_size"], steps=args["steps"], lr=1e-2, warmup_steps=2,
                         log_every=1, image_every=1000, ckpt_every=1000, device="cpu",
                         dist_timeout_s=args.get("timeout"))
    torch.manual_seed(0)  # the same initial weights in every run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = PriorTrainer(config, args["out"], resume=args.get("resume", False), model=Tiny(),
                               dataset=Indexed(args["n"]))
    start_step, seen, fault = trainer.step, [], args.get("fault")
    step = trainer.train_step

    def train_step(x):
        if fault and rank == fault["rank"] and trainer.step == fault["step"]:
            print(f"worker: rank {rank} injects {fault['mode']} before step {trainer.step + 1}", flush=True)
            if fault["mode"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault["mode"] == "raise":
                raise RuntimeError("injected failure")
            if fault["mode"] == "hang":
                time.sleep(3600)
            if fault["mode"] == "recv":  # stuck inside a collective: a receive nobody sends
                torch.distributed.recv(torch.zeros(1), src=0)
        seen.append(sorted(int(v) for v in x.flatten().tolist()))
        return step(x)

    trainer.train_step = train_step
    trainer.train(progress=False, stop_after=args.get("stop_after"))
    result = {"start_step": start_step, "step": trainer.step, "epoch": trainer.epoch,
              "sample_in_epoch": trainer.sample_in_epoch, "seen": seen,
              "warnings": [str(w.message) for w in caught], "lr": trainer.opt_g.param_groups[0]["lr"],
              "weights": [p.item() for p in trainer.model.parameters()]}
    if args.get("record"):
        with open(args["record"].format(rank=rank), "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(json.loads(sys.argv[1]))
    cleanup_distributed()
'''

N = 22  # samples: 5 global batches of 4 per epoch (2 left over)
LAUNCH_TIMEOUT_S = 240  # hard limit of one 2-process launch (imports dominate on a loaded 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_path(tmp_path) -> str:
    path = tmp_path / "ddp_worker.py"
    if not path.exists():
        path.write_text(WORKER)
    return str(path)


def _load_worker(tmp_path):
    spec = importlib.util.spec_from_file_location("ddp_worker", _worker_path(tmp_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", TIMEOUT_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun(tmp_path, args: dict, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), _worker_path(tmp_path), json.dumps(args)]
    return _communicate(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=_env(**env), start_new_session=True))


def _communicate(proc) -> tuple[int, str, float]:
    """(exit code, output, seconds) of ``proc``; a run past the limit is
    killed (its whole session) and fails the test."""
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the launch hung for more than {LAUNCH_TIMEOUT_S} s; output:\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - start


def _direct_launch(tmp_path, args: dict, **env) -> list[tuple[int, str, float]]:
    """Both ranks started as plain processes (env:// rendezvous), no elastic
    agent to tear the survivor down: what each rank does on its own."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, _worker_path(tmp_path), json.dumps(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r),
                                       LOCAL_RANK=str(r), **env))
             for r in (0, 1)]
    try:
        return [_communicate(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


def _failure_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if "DistributedFailure: " in ln]
    assert lines, f"no DistributedFailure in the output:\n{out[-3000:]}"
    return lines[-1].split("DistributedFailure: ", 1)[1]


# ---------------------------------------------------------------- unit parts
def test_timeout_comes_from_argument_env_or_default(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert dist_timeout_s() == 300.0
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert dist_timeout_s() == 7.5
    assert dist_timeout_s(3) == 3.0  # the argument (TrainConfig.dist_timeout_s) wins
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$PYVQ_DIST_TIMEOUT must be a number of seconds > 0, got 'soon'"):
        dist_timeout_s()
    for bad in (0, -1.0, float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="argument 'timeout_s' must be a finite number of seconds > 0"):
            dist_timeout_s(bad)
    for bad in (0, -2.0, "60"):
        with pytest.raises(ValueError, match="'dist_timeout_s' must be None or > 0 seconds"):
            TrainConfig(dist_timeout_s=bad)
    assert TrainConfig(dist_timeout_s=30).dist_timeout_s == 30


GLOO_CLOSED = "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4242"
GLOO_TIMEOUT = "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"


@pytest.mark.parametrize("world, rank, peer", [(2, 0, "rank 1"), (2, 1, "rank 0"), (4, 2, "another rank")])
def test_collective_errors_become_one_line_failures(world, rank, peer):
    info = DistInfo(rank=rank, world_size=world, timeout_s=5)
    with pytest.raises(DistributedFailure) as got:
        with collective_guard(info, "step 4"):
            raise RuntimeError(GLOO_CLOSED)
    msg = str(got.value)
    assert "\n" not in msg and msg.startswith(f"rank {rank} of {world}: step 4 failed: {peer} closed its connection")
    assert not got.value.timed_out and got.value.peer == (1 - rank if world == 2 else None)
    assert isinstance(got.value.__cause__, RuntimeError)
    with pytest.raises(DistributedFailure, match=f"step 4 timed out after dist_timeout_s=5 s: {peer} did not join"):
        with collective_guard(info, "step 4"):
            raise RuntimeError(GLOO_TIMEOUT)
    with pytest.raises(RuntimeError, match="^out of memory$") as other:  # not a collective error: unchanged
        with collective_guard(info, "step 4"):
            raise RuntimeError("out of memory")
    assert not isinstance(other.value, DistributedFailure)
    with pytest.raises(RuntimeError, match="Connection closed by peer") as single:  # one process: not guarded
        with collective_guard(DistInfo(), "step 4"):
            raise RuntimeError(GLOO_CLOSED)
    assert not isinstance(single.value, DistributedFailure)


def test_a_missing_rank_fails_the_start_within_the_timeout(monkeypatch):
    import torch.distributed as dist

    from pyvq.train.distributed import init_distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(DistributedFailure, match=r"^rank 0 of 2: joining the process group failed within "
                                                 r"dist_timeout_s=1 s \(are all 2 ranks running\?\)"):
        init_distributed("cpu", timeout_s=1)  # rank 1 never comes
    assert time.monotonic() - start < 60 and not dist.is_initialized()


def test_cli_reports_a_distributed_failure_in_one_line(tmp_path, monkeypatch):
    import pyvq.train.trainer
    from pyvq import cli

    class Failing:
        def __init__(self, *args, **kwargs):
            raise DistributedFailure("rank 0 of 2: step 4 failed: rank 1 closed its connection", rank=0,
                                     world_size=2, peer=1, timed_out=False)

    monkeypatch.setattr(pyvq.train.trainer, "Trainer", Failing)
    with pytest.raises(SystemExit) as got:
        cli.main(["train", "--preset", "vqgan_tiny", "--out", str(tmp_path / "run")])
    assert got.value.code == "pyvq train: rank 0 of 2: step 4 failed: rank 1 closed its connection"


# ---------------------------------------------------------------- dying ranks
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_a_dying_rank_stops_the_other_with_a_clear_message(tmp_path, mode):
    # No torchrun agent: rank 0 must notice on its own. A killed peer's
    # sockets close at once; a raising peer's close when its interpreter
    # exits (or rank 0 hits the 60 s timeout first on a very loaded machine).
    args = dict(out=str(tmp_path / "run"), n=N, batch_size=2, steps=50, timeout=60,
                fault=dict(rank=1, step=3, mode=mode))
    (rc0, out0, t0), (rc1, out1, _) = _direct_launch(tmp_path, args)
    assert f"rank 1 injects {mode} before step 4" in out1
    assert rc1 != 0 and rc0 != 0, (rc0, out0[-2000:])
    line = _failure_line(out0)
    assert line.startswith("rank 0 of 2: step 4 "), line
    if mode == "kill":
        assert "rank 1 closed its connection (it crashed, was killed or exited" in line, line
    else:
        assert "rank 1 closed its connection" in line or "dist_timeout_s=60 s: rank 1" in line, line
        assert "RuntimeError: injected failure" in out1


@pytest.mark.slow
def test_a_rank_stuck_in_a_collective_times_out_without_an_agent(tmp_path):
    # Rank 1 waits in a receive that never comes, rank 0 in the step's
    # gradient all-reduce: both stop after about the 10 s timeout, no agent
    # needed.
    args = dict(out=str(tmp_path / "run"), n=N, batch_size=2, steps=50, timeout=10,
                fault=dict(rank=1, step=3, mode="recv"))
    (rc0, out0, _), (rc1, out1, _) = _direct_launch(tmp_path, args)
    assert "rank 1 injects recv before step 4" in out1
    assert rc0 != 0 and rc1 != 0
    lines = [_failure_line(out0), _failure_line(out1)]
    assert lines[0].startswith("rank 0 of 2: step 4 ") and lines[1].startswith("rank 1 of 2: step 4 "), lines
    # whichever times out first exits; the other then sees it gone (or times out too)
    timed_out = [f"timed out after dist_timeout_s=10 s: rank {1 - r} did not join" in ln for r, ln in enumerate(lines)]
    gone = [f"rank {1 - r} closed its connection" in ln for r, ln in enumerate(lines)]
    assert any(timed_out) and all(t or g for t, g in zip(timed_out, gone)), lines


@pytest.mark.slow
def test_a_stuck_rank_times_out_under_torchrun(tmp_path):
    # Nobody dies, so torchrun's agent would wait forever (gloo's own default
    # is 30 minutes); the 10 s collective timeout stops rank 0, then the agent
    # tears the stuck rank down.
    args = dict(out=str(tmp_path / "run"), n=N, batch_size=2, steps=50, fault=dict(rank=1, step=3, mode="hang"))
    rc, out, seconds = _torchrun(tmp_path, args, **{TIMEOUT_ENV: "10"})
    assert "rank 1 injects hang before step 4" in out
    assert rc != 0, out[-3000:]
    line = _failure_line(out)
    assert line.startswith("rank 0 of 2: step 4 timed out after dist_timeout_s=10 s: rank 1 did not join"), line
    assert seconds < LAUNCH_TIMEOUT_S


# ------------------------------------------------------- world-size changes
def _resume_warning(result: dict) -> str:
    found = [w for w in result["warnings"] if "resuming" in w]
    assert len(found) == 1, result["warnings"]
    return found[0]


def _merged(records: list[dict]) -> list[list[int]]:
    """The global batch of every step: the ranks' samples together."""
    return [sorted(sum(batches, [])) for batches in zip(*(r["seen"] for r in records))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One process, batch 4, 8 steps without a break: the run the resumed
    ones must reproduce (global batch 4 throughout)."""
    tmp = tmp_path_factory.mktemp("reference")
    return _load_worker(tmp).run(dict(out=str(tmp / "run"), n=N, batch_size=4, steps=8))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """2 processes x batch 2, stopped (and checkpointed) after 3 of 8 steps."""
    tmp = tmp_path_factory.mktemp("two")
    args = dict(out=str(tmp / "run"), n=N, batch_size=2, steps=8, stop_after=3, record=str(tmp / "rank{rank}.json"))
    rc, out, _ = _torchrun(tmp, args)
    assert rc == 0, out[-3000:]
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_checkpoint_stores_world_size_and_position(two_process_run):
    tmp, _ = two_process_run
    from pyvq.train.checkpoint import latest_checkpoint

    state = torch.load(os.path.join(latest_checkpoint(str(tmp / "run")), "state.pt"), weights_only=True)
    assert state["step"] == 3
    assert state["extra"] == {"epoch": 0, "batch_in_epoch": 3, "sample_in_epoch": 12, "world_size": 2,
                              "batch_size": 2, "nonfinite_steps": 0}


@pytest.mark.slow
def test_two_processes_resume_on_one(tmp_path, two_process_run, reference_run):
    import shutil

    tmp, ranks = two_process_run
    assert [r["step"] for r in ranks] == [3, 3]
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    worker = _load_worker(tmp_path)
    resumed = worker.run(dict(out=str(run), n=N, batch_size=4, steps=8, resume=True))
    assert re.search(r"written by 2 process\(es\) x batch_size 2\) on 1 process\(es\) x batch_size 4: the global "
                     r"batch is 4 \(was 4\); kept: step 3", _resume_warning(resumed))
    assert resumed["start_step"] == 3 and resumed["step"] == 8
    # 3 steps on 2 x 2, 5 on 1 x 4: the same global batches, in the same
    # order, across the epoch boundary (5 batches per epoch) as one process.
    assert _merged(ranks) + resumed["seen"] == reference_run["seen"]
    assert (resumed["epoch"], resumed["sample_in_epoch"]) == (reference_run["epoch"], reference_run["sample_in_epoch"])
    assert resumed["lr"] == pytest.approx(reference_run["lr"], rel=1e-12)  # the schedule continued by step
    assert resumed["weights"] == pytest.approx(reference_run["weights"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_resume_with_a_smaller_global_batch_keeps_the_position_in_samples(tmp_path, two_process_run):
    import shutil

    tmp, ranks = two_process_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    worker = _load_worker(tmp_path)
    resumed = worker.run(dict(out=str(run), n=N, batch_size=2, steps=9, resume=True))
    assert re.search(r"the global batch is 2 \(was 4\).*12 samples into epoch 0\); an epoch now has 11 steps "
                     r"\(5 left in this one\)", _resume_warning(resumed))
    assert resumed["step"] == 9
    first = _merged(ranks)  # 12 samples of epoch 0
    rest = resumed["seen"][:5]  # the 10 samples left in epoch 0: 22 = 12 + 5 x 2
    epoch0 = sum(first, []) + sum(rest, [])
    assert sorted(epoch0) == list(range(N))  # each sample once: nothing skipped or repeated
    assert (resumed["epoch"], resumed["sample_in_epoch"]) == (1, 2)  # step 9 is epoch 1's first batch


@pytest.mark.slow
def test_one_process_resumes_on_two(tmp_path, reference_run):
    worker = _load_worker(tmp_path)
    part = worker.run(dict(out=str(tmp_path / "run"), n=N, batch_size=4, steps=8, stop_after=3))
    assert part["step"] == 3
    args = dict(out=str(tmp_path / "run"), n=N, batch_size=2, steps=8, resume=True,
                record=str(tmp_path / "rank{rank}.json"))
    rc, out, _ = _torchrun(tmp_path, args)
    assert rc == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["start_step"] for r in ranks] == [3, 3] and [r["step"] for r in ranks] == [8, 8]
    assert "written by 1 process(es) x batch_size 4) on 2 process(es) x batch_size 2" in _resume_warning(ranks[0])
    assert not [w for w in ranks[1]["warnings"] if "resuming" in w]  # rank 0 alone warns
    assert part["seen"] + _merged(ranks) == reference_run["seen"]
    assert ranks[0]["lr"] == pytest.approx(reference_run["lr"], rel=1e-12)
    for r in ranks:
        assert r["weights"] == pytest.approx(reference_run["weights"], rel=1e-4, abs=1e-6)
