"""Fixtures for the loss tests: a random-backbone LPIPS built once, real
images in [-1, 1], and an empty torch hub cache."""

from __future__ import annotations

import pytest
import torch

from pyvq.losses import build_lpips


@pytest.fixture(scope="session")
def random_lpips():
    """VGG LPIPS with lpips' calibrated heads and a random backbone (tests only)."""
    torch.manual_seed(0)
    return build_lpips("vgg", pretrained_backbone=False)


@pytest.fixture(scope="session")
def images(skimage_patches):
    """(16, 3, 32, 32) real photo tiles in [-1, 1]."""
    return skimage_patches * 2 - 1


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Point torch.hub at an empty directory; the previous setting (including
    "unset", which set_dir cannot express) is restored afterwards."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub"
