"""Run logging: a JSONL file and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
import os
import time


class RunLogger:
    """Scalars to ``<run>/log.jsonl`` (one JSON object per call) and to
    TensorBoard event files under ``<run>/tensorboard``; images to PNG.

    Every method is a no-op on ranks other than 0 (``enabled=False``).
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "log.jsonl"), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: float(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)

    def image_grid(self, step: int, name: str, images, nrow: int = 8, **labels) -> str | None:
        """Save (N, 3, H, W) images in [-1, 1] as ``<run>/images/<name>_<step>.png``
        (and to TensorBoard); ``labels`` (``row_labels``, ``col_labels``,
        ``title``, ``caption``, ``scale``) go to ``pyvq.train.figures.labelled_grid``."""
        if not self.enabled:
            return None
        import numpy as np

        from pyvq.train.figures import labelled_grid

        folder = os.path.join(self.run_dir, "images")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_{step:07d}.png")
        figure = labelled_grid(images, nrow, **labels)
        figure.save(path)
        if self._tb is not None:
            self._tb.add_image(name, np.asarray(figure), step, dataformats="HWC")
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    """The rows a RunLogger wrote."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
