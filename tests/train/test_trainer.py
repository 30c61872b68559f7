"""The trainer: learns, resumes exactly, and DDP equals one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from pyvq.train.checkpoint import latest_checkpoint
from pyvq.train.config import TrainConfig
from pyvq.train.logger import read_jsonl
from pyvq.train.trainer import Trainer


def _config(**kw):
    base = dict(model="vqgan_tiny", data="builtin", image_size=32, batch_size=4, steps=6,
                lr=1e-3, warmup_steps=1, perceptual_weight=0.0, disc_start=3, log_every=1,
                image_every=100, ckpt_every=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_lowers_reconstruction_loss(tmp_path):
    from pyvq.data import BuiltinImages

    val = torch.stack([BuiltinImages("val", size=32)[i] for i in range(16)])  # held-out photos
    t = Trainer(_config(steps=30, disc_start=100, lr=2e-3), str(tmp_path))

    def val_l1():
        t.model.eval()
        with torch.no_grad():
            err = (t.model(val)[0] - val).abs().mean().item()
        t.model.train()
        return err

    before = val_l1()
    t.train(progress=False)
    after = val_l1()
    assert after < 0.8 * before, (before, after)
    rows = read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all("train/rec_loss" in r and "train/usage" in r for r in rows)
    assert (tmp_path / "model" / "config.json").exists()
    assert latest_checkpoint(str(tmp_path)).endswith("step_000000030")
    assert any(f.startswith("reconstruction_") for f in os.listdir(tmp_path / "images"))


def test_resume_continues_exactly(tmp_path):
    full = Trainer(_config(), str(tmp_path / "full"))
    full.train(progress=False)
    expected = _params(full.model), _params(full.disc)

    part = Trainer(_config(), str(tmp_path / "part"))
    part.train(progress=False, stop_after=4)  # past disc_start: D state matters too
    del part
    resumed = Trainer(_config(), str(tmp_path / "part"), resume=True)
    assert resumed.step == 4
    resumed.train(progress=False)
    for exp, got in zip(expected, (_params(resumed.model), _params(resumed.disc))):
        for k in exp:
            torch.testing.assert_close(got[k], exp[k], rtol=0, atol=0, msg=k)


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_config(), str(tmp_path), resume=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pyvq.train.distributed import cleanup_distributed

    t = Trainer(_config(batch_size=2, steps=3, disc_start=100, device="cpu"), os.path.join(out_dir, "run"))
    t.train(progress=False)
    torch.save(_params(t.model), os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup_distributed()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    single = Trainer(_config(batch_size=4, steps=3, disc_start=100), str(tmp_path / "single"))
    single.train(progress=False)
    ref = _params(single.model)
    # Same global batch, so the same averaged gradients up to summation
    # order. Adam divides by sqrt(v): where a gradient is ~0 (conv biases
    # followed by GroupNorm have a zero gradient in exact arithmetic) the
    # rounding noise becomes an update of up to lr per step. So: nearly every
    # element equal to 1e-5, and none further apart than steps * lr.
    floats = [k for k in ref if ref[k].is_floating_point()]
    diffs = torch.cat([(r0[k].float() - ref[k].float()).abs().reshape(-1) for k in floats])
    assert (diffs > 1e-5).double().mean().item() < 1e-3
    assert diffs.max().item() <= 3 * 1e-3


def test_bf16_autocast_and_weight_ema(tmp_path):
    t = Trainer(_config(steps=4, bf16=True, ema_decay=0.9), str(tmp_path))
    start = _params(t.model)
    out = t.train(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    ema = {k[len("module."):]: v for k, v in t.ema.state_dict().items() if k.startswith("module.")}
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], t.model.state_dict()[k])]
    assert moved
    # the EMA lags the weights: strictly between the start and the final value somewhere
    k = moved[0]
    assert not torch.equal(ema[k], t.model.state_dict()[k])
    # the saved final model is the EMA
    from pyvq.models._pretrained import load_pretrained

    final = load_pretrained(str(tmp_path / "model"))
    torch.testing.assert_close(final.state_dict()[k], ema[k])


def test_torchrun_cli_two_processes(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "pyvq.cli", "train", "--preset", "vqgan_tiny", "--data", "builtin", "--image-size", "32",
           "--batch-size", "2", "--steps", "2", "--perceptual-weight", "0", "--disc-start", "1", "--log-every", "1",
           "--device", "cpu", "--out", str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert latest_checkpoint(str(tmp_path / "run")).endswith("step_000000002")
    assert len(read_jsonl(str(tmp_path / "run" / "log.jsonl"))) == 2  # rank 0 logs alone


def test_step_masks_alternate_and_repeat(tmp_path):
    t = Trainer(_config(steps=2), str(tmp_path))
    x = torch.zeros(3, 3, 32, 32)
    t.step = 4
    m = t.step_masks(x)
    assert m.shape == (3, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0 < m.mean() < 1 and not torch.equal(m[0], m[1])
    assert torch.equal(m, t.step_masks(x))  # fixed by (seed, step, sample)
    t.step = 5
    assert bool((t.step_masks(x) == 1).all())  # odd steps: generate everything


def test_asymmetric_decoder_trains_on_a_frozen_base(tmp_path):
    from pyvq.data import BuiltinImages
    from pyvq.models import load_pretrained
    from pyvq.models.tokenizers import VQGAN
    from pyvq.train.evaluate import evaluate

    torch.manual_seed(1)
    base = VQGAN.from_preset("vqgan_tiny")
    base.save_pretrained(str(tmp_path / "base" / "model"))
    t = Trainer(_config(model="asym_vqgan_tiny", base=str(tmp_path / "base"), steps=4, disc_start=2),
                str(tmp_path / "asym"))
    before_base = _params(t.model.base)
    before_dec = _params(t.model.decoder)
    t.train(progress=False)
    for k, v in _params(t.model.base).items():
        torch.testing.assert_close(v, before_base[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, before_dec[k]) for k, v in _params(t.model.decoder).items())
    trained = load_pretrained(str(tmp_path / "asym" / "model"))
    m = evaluate(trained, BuiltinImages("val", size=32, crops_per_image=2))
    assert m["psnr"] > 0 and 0 < m["codebook_usage"] <= 1
    with pytest.raises(ValueError, match="asymmetric presets"):
        Trainer(_config(base=str(tmp_path / "base")), str(tmp_path / "bad"))
