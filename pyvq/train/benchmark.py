"""Timing training steps with the kernels and with the plain-PyTorch references."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from pyvq.train.config import TrainConfig


def time_train_steps(config: TrainConfig, backend: str, *, steps: int = 10, warmup: int = 2) -> float:
    """Median wall time (s) of one ``Trainer.train_step`` under
    ``PYVQ_BACKEND=backend`` ("kernel" or "reference"), same model, data and
    seed for every backend."""
    from pyvq.train.trainer import Trainer

    old = os.environ.get("PYVQ_BACKEND")
    os.environ["PYVQ_BACKEND"] = backend
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(config, tmp)
            trainer.logger.close()
            g = torch.Generator().manual_seed(config.seed)
            x = torch.rand(config.batch_size, 3, config.image_size, config.image_size, generator=g) * 2 - 1
            x = x.to(trainer.dist.device)
            times = []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                trainer.train_step(x)
                trainer.step += 1
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        if old is None:
            os.environ.pop("PYVQ_BACKEND", None)
        else:
            os.environ["PYVQ_BACKEND"] = old
    return statistics.median(times)


def compare_backends(config: TrainConfig, *, steps: int = 10, rounds: int = 2) -> tuple[float, float]:
    """(kernel, reference) step times: ``time_train_steps`` for each backend,
    interleaved ``rounds`` times and the best kept, so machine load that
    drifts during the measurement hits both sides alike."""
    kernel = reference = float("inf")
    for _ in range(rounds):
        kernel = min(kernel, time_train_steps(config, "kernel", steps=steps))
        reference = min(reference, time_train_steps(config, "reference", steps=steps))
    return kernel, reference
