"""pyvq.data.build_dataset: the built-in photographs or an image folder,
with the trainer's crops and flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyvq.data import BuiltinImages, ImageFolder, build_dataset


def test_builtin_splits_and_seed():
    for split in ("train", "val"):
        ds = build_dataset("builtin", 32, split, seed=3)
        assert isinstance(ds, BuiltinImages) and ds.split == split and ds.size == 32 and ds.seed == 3
        torch.testing.assert_close(ds[5], BuiltinImages(split, 32, seed=3)[5], rtol=0, atol=0)
    assert build_dataset("builtin", 32, "train", augment=False).flip  # the split decides for the photographs
    with pytest.raises(ValueError, match="split"):
        build_dataset("builtin", 32, "test")


def test_image_folder_augments_for_training(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    train = build_dataset(str(tmp_path), 16, seed=1)
    assert isinstance(train, ImageFolder) and (train.crop, train.flip, train.seed) == ("random", True, 1)
    val = build_dataset(str(tmp_path), 16, "val")
    assert (val.crop, val.flip) == ("center", False)
    fixed = build_dataset(str(tmp_path), 16, "train", augment=False)
    assert (fixed.crop, fixed.flip) == ("center", False) and fixed[0].shape == (3, 16, 16)
    torch.testing.assert_close(fixed[1], val[1], rtol=0, atol=0)
