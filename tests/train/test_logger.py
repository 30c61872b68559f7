"""RunLogger writes JSONL, TensorBoard events and PNG grids on rank 0 only."""

from __future__ import annotations

import os

import torch
from PIL import Image

from pyvq.train.distributed import DistInfo, all_reduce_mean
from pyvq.train.logger import RunLogger, read_jsonl


def test_jsonl_tensorboard_and_images(tmp_path):
    log = RunLogger(str(tmp_path))
    log.scalars(1, {"loss": 0.5, "lr": torch.tensor(1e-3)})
    log.scalars(2, {"loss": 0.25})
    png = log.image_grid(2, "recon", torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8), nrow=2)
    log.close()
    rows = read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and abs(rows[0]["lr"] - 1e-3) < 1e-9  # a float32 tensor
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    w, h = Image.open(png).size
    assert (w, h) == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2 x 2 grid with torchvision's 2-pixel padding


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(str(tmp_path / "r1"), enabled=False)
    log.scalars(1, {"loss": 1.0})
    assert log.image_grid(1, "x", torch.zeros(1, 3, 4, 4)) is None
    log.close()
    assert not (tmp_path / "r1").exists()


def test_all_reduce_mean_single_process():
    assert all_reduce_mean({"a": 1.0, "b": 2.0}, DistInfo()) == {"a": 1.0, "b": 2.0}
