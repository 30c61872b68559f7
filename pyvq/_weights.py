"""Locating pretrained weights that third-party packages would download.

Nothing in pyvq downloads at run time. Where a package (torchvision for
LPIPS's VGG, torch-fidelity for Inception) would fetch weights on first use,
pyvq looks for the file where that download would have put it (the torch hub
cache) and, when it is absent, raises ``MissingWeightsError`` naming the file,
the place it belongs and where it comes from. No silent random features.
"""

from __future__ import annotations

import os

import torch


class MissingWeightsError(RuntimeError):
    """Pretrained weights a metric or loss needs are not on this machine."""


def hub_checkpoint_path(filename: str) -> str:
    """Where torch.hub's download cache keeps ``filename``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def require_weights(filename: str, url: str, what: str, path: str | None = None) -> str:
    """Path of an existing weights file, or a clear ``MissingWeightsError``.

    Args:
        filename: the file name a download of ``url`` is cached under.
        url: where the weights come from (said in the message).
        what: what needs them ("LPIPS VGG16 backbone", ...).
        path: an explicit path given by the user; must exist if given.
    """
    target = path or hub_checkpoint_path(filename)
    if not os.path.isfile(target):
        raise MissingWeightsError(
            f"{what}: weights file {filename!r} not found at {target}. pyvq never downloads at run "
            f"time; fetch it from {url} and place it at that path (or pass its path explicitly)."
        )
    return target
