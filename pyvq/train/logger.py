"""Run logging: a JSONL file and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
import os
import time

__all__ = ["DISCARDED_LOG", "RunLogger", "check_writable_dir", "read_jsonl"]

DISCARDED_LOG = "log.discarded.jsonl"  # rows of steps a resumed run repeats, moved out of log.jsonl


def check_writable_dir(path: str, what: str) -> None:
    """Fail now, before any work, when the directory ``path`` cannot be
    created or written: ``what`` (an argument's name, e.g. ``--out``) and
    the path are named in the message. The directory need not exist; its
    nearest existing ancestor must be a writable directory.

    Raises:
        NotADirectoryError: ``path`` or one of its ancestors is a file.
        PermissionError: the directory (or the ancestor where it would be
            created) is not writable by this user.
    """
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"{what} {path}: {probe} is a file, not a directory; choose another {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "it is" if probe == path else f"{probe}, where it would be created, is"
        raise PermissionError(f"{what} {path} is not writable: {where} not writable by this user; "
                              f"choose another {what} or change its permissions")


def _split_log(path: str, keep_through: int) -> list[str]:
    """Keep in ``path`` the rows of steps <= ``keep_through`` (JSON lines
    that parse); return the other lines (rows a resumed run repeats, a line
    cut short by a crash)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.splitlines()
    kept, dropped = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("step", -1)) <= keep_through
        except (ValueError, TypeError):
            ok = False
        (kept if ok else dropped).append(line)
    if dropped or not text.endswith("\n") and text:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class RunLogger:
    """Scalars to ``<run>/log.jsonl`` (one JSON object per call) and to
    TensorBoard event files under ``<run>/tensorboard``; images to PNG.

    ``resume_step``: the step a resumed run goes on from. Rows of later
    steps in ``log.jsonl`` (logged after the checkpoint the run resumes
    from, by a run that then died) and a last line cut short by a crash
    are moved to ``log.discarded.jsonl``, so ``log.jsonl`` holds each step
    once; TensorBoard hides the events of those steps (``purge_step``).

    Every method is a no-op on ranks other than 0 (``enabled=False``).
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "log.jsonl")
        if resume_step is not None and os.path.isfile(path):
            dropped = _split_log(path, resume_step)
            if dropped:
                with open(os.path.join(run_dir, DISCARDED_LOG), "a", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in dropped))
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step else None
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)

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
