"""BuiltinImages: crops of scikit-image's bundled photographs."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import torch

from pyvq.data import BuiltinImages, builtin_image_names, builtin_image_path, load_builtin_image
from pyvq.data import builtin as builtin_mod


def test_split_disjoint_by_source():
    train, val = builtin_image_names("train"), builtin_image_names("val")
    assert len(train) == 15 and len(val) == 4
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(builtin_image_names("all"))
    # the stereo pair must not straddle the split
    assert {"motorcycle_left", "motorcycle_right"} <= set(train)
    ds = BuiltinImages("val", 16, crops_per_image=2)
    assert {ds.source(i) for i in range(len(ds))} == set(val)
    with pytest.raises(ValueError, match="split"):
        builtin_image_names("test")


def test_offline_bundled_files(monkeypatch):
    """Every image is a file inside the installed skimage package and loads
    with sockets disabled and without importing pooch."""
    skimage_dir = builtin_image_path("camera").parent
    assert skimage_dir.name == "data" and skimage_dir.parent.name == "skimage"

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    builtin_mod._load_rgb.cache_clear()
    had_pooch = "pooch" in sys.modules
    for name in builtin_image_names("all"):
        path = builtin_image_path(name)
        assert path.is_file() and path.parent == skimage_dir
        img = load_builtin_image(name)
        assert img.dim() == 3 and img.shape[0] == 3 and min(img.shape[1:]) >= 172
    assert had_pooch or "pooch" not in sys.modules


@pytest.mark.parametrize("name", ["camera", "chelsea", "immunohistochemistry", "clock"])
def test_same_pixels_as_skimage(name):
    data = pytest.importorskip("skimage.data")
    ref = getattr(data, name)()
    if ref.ndim == 2:
        ref = np.repeat(ref[..., None], 3, -1)
    ours = ((load_builtin_image(name) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, ref[..., :3])


@pytest.mark.parametrize("split", ["train", "val"])
def test_shapes_and_range(split):
    ds = BuiltinImages(split, 32, crops_per_image=2)
    assert len(ds) == 2 * len(builtin_image_names(split))
    x = ds.as_tensor()
    assert x.shape == (len(ds), 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.1  # real content, not constant crops
    # crops of one image differ from each other
    assert not torch.equal(x[0], x[1])


def test_val_fixed_across_instances_and_seeds():
    a = BuiltinImages("val", 24, crops_per_image=3, seed=0)
    b = BuiltinImages("val", 24, crops_per_image=3, seed=123)
    b.set_epoch(5)
    assert not a.flip
    for i in range(len(a)):
        assert torch.equal(a[i], b[i])


def test_train_seeded():
    idx = [0, 5, 17, 29]
    a = BuiltinImages("train", 24, crops_per_image=2, seed=1)
    b = BuiltinImages("train", 24, crops_per_image=2, seed=1)
    xa = torch.stack([a[i] for i in idx])
    assert torch.equal(xa, torch.stack([b[i] for i in idx]))
    c = BuiltinImages("train", 24, crops_per_image=2, seed=2)
    assert not torch.equal(xa, torch.stack([c[i] for i in idx]))
    a.set_epoch(1)
    assert not torch.equal(xa, torch.stack([a[i] for i in idx]))


def test_full_image_crop():
    """scale=(1, 1) on a square image without flip is the whole image resized."""
    ds = BuiltinImages("train", 16, crops_per_image=1, scale=(1.0, 1.0), flip=False)
    i = ds.names.index("astronaut")
    x = ds[i]
    ref = torch.nn.functional.interpolate(
        load_builtin_image("astronaut")[None], size=(16, 16), mode="bicubic", antialias=True, align_corners=False
    )[0]
    assert (x - ref).abs().mean() < 0.02


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        BuiltinImages("test")
    with pytest.raises(ValueError, match="size"):
        BuiltinImages("train", 0)
    with pytest.raises(ValueError, match="crops_per_image"):
        BuiltinImages("train", 8, crops_per_image=0)
    with pytest.raises(ValueError, match="scale"):
        BuiltinImages("train", 8, scale=(0.0, 0.5))
    with pytest.raises(ValueError, match="scale"):
        BuiltinImages("train", 8, scale=(0.8, 0.5))
    with pytest.raises(TypeError, match="scale"):
        BuiltinImages("train", 8, scale=0.5)
    with pytest.raises(ValueError, match="unknown built-in image"):
        builtin_image_path("lena")
    with pytest.raises(IndexError):
        BuiltinImages("val", 8, crops_per_image=1)[4]
