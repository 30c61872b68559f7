"""ImageFolder on a small tree of files written with PIL."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pyvq.data import CorruptImageWarning, ImageFolder


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour image (gradients + a few blobs): resizing it is benign."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fx, fy = rng.uniform(0.5, 3, 2)
        chans.append(127.5 + 127.5 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + c))
    return Image.fromarray(np.stack(chans, -1).round().astype(np.uint8))


@pytest.fixture
def tree(tmp_path):
    """root/
        a.png (80x60 RGB), b/c.jpg (50x90 RGB), b/d/e.PNG (64x64 greyscale),
        b/d/f.webp (100x40 RGBA), broken.jpg (not an image), notes.txt, .hidden.png
    """
    (tmp_path / "b" / "d").mkdir(parents=True)
    _photo(80, 60, 0).save(tmp_path / "a.png")
    _photo(50, 90, 1).save(tmp_path / "b" / "c.jpg", quality=95)
    _photo(64, 64, 2).convert("L").save(tmp_path / "b" / "d" / "e.PNG")
    _photo(100, 40, 3).convert("RGBA").save(tmp_path / "b" / "d" / "f.webp", lossless=True)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    (tmp_path / "notes.txt").write_text("not an image")
    _photo(10, 10, 4).save(tmp_path / ".hidden.png")
    return tmp_path


def test_files_found_sorted_recursively(tree):
    ds = ImageFolder(tree, 32)
    rel = [p.relative_to(tree).as_posix() for p in ds.paths]
    assert rel == ["a.png", "b/c.jpg", "b/d/e.PNG", "b/d/f.webp", "broken.jpg"]
    assert len(ds) == 5
    assert ImageFolder(tree, 32, extensions=("png",)).paths == [tree / "a.png", tree / "b/d/e.PNG"]


def test_shapes_range_and_center_determinism(tree):
    ds = ImageFolder(tree, 32)
    with pytest.warns(CorruptImageWarning):
        xs = [ds[i] for i in range(len(ds))]
    for x in xs:
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert x.is_contiguous()
    # greyscale file: three equal channels
    assert torch.equal(xs[2][0], xs[2][1]) and torch.equal(xs[2][1], xs[2][2])
    # a second instance gives the same centre crops
    ds2 = ImageFolder(tree, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        assert all(torch.equal(a, ds2[i]) for i, a in enumerate(xs))


def test_center_crop_matches_reference(tree):
    """a.png is 80x60: short side 60 -> 32 gives 43x32, centre crop x in [5, 37)."""
    x = ImageFolder(tree, 32)[0]
    ref = Image.open(tree / "a.png").convert("RGB").resize((43, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x, ref, atol=1e-6)


def test_flip_flips(tree):
    plain = ImageFolder(tree, 24, seed=3)
    flipped = ImageFolder(tree, 24, flip=True, seed=3)
    seen = set()
    for epoch in range(4):
        flipped.set_epoch(epoch)
        for i in (0, 1, 3):
            a, b = plain[i], flipped[i]
            if torch.equal(a, b):
                seen.add("same")
            else:
                assert torch.equal(b, a.flip(-1))
                seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_random_crop_seeded(tree):
    ds = ImageFolder(tree, 24, crop="random", flip=True, seed=7)
    a = torch.stack([ds[i] for i in (0, 1, 3)])
    b = torch.stack([ImageFolder(tree, 24, crop="random", flip=True, seed=7)[i] for i in (0, 1, 3)])
    assert torch.equal(a, b)
    # other epochs and seeds give other crops
    ds.set_epoch(1)
    assert not torch.equal(a, torch.stack([ds[i] for i in (0, 1, 3)]))
    c = ImageFolder(tree, 24, crop="random", flip=True, seed=8)
    assert not torch.equal(a, torch.stack([c[i] for i in (0, 1, 3)]))


def test_seeded_dataloader_independent_of_workers(tree):
    ds = ImageFolder(tree, 16, crop="random", flip=True, seed=1, extensions=(".png", ".webp"))
    ref = torch.stack([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat(list(loader))
    assert torch.equal(ref, got)


def test_corrupt_file_skipped_with_warning(tree):
    ds = ImageFolder(tree, 16)
    i = [p.name for p in ds.paths].index("broken.jpg")  # the last file: falls back to index 0
    with pytest.warns(CorruptImageWarning, match="broken.jpg"):
        x = ds[i]
    assert ds.bad_paths == [tree / "broken.jpg"]
    assert torch.equal(x, ds[0])
    # warned once only: the next access is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[i]
    assert ds.bad_paths == [tree / "broken.jpg"]


def test_truncated_jpeg_and_verify(tree):
    data = (tree / "b" / "c.jpg").read_bytes()
    (tree / "b" / "c.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolder(tree, 16)
    with pytest.warns(CorruptImageWarning) as rec:
        bad = ds.verify()
    assert bad == [tree / "b" / "c.jpg", tree / "broken.jpg"]
    assert any("c.jpg" in str(w.message) for w in rec)
    # index 1 (c.jpg) falls forward to index 2 (e.PNG) without warning again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1].shape == (3, 16, 16)


def test_all_corrupt_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    ds = ImageFolder(tmp_path, 8)
    with pytest.warns(CorruptImageWarning), pytest.raises(RuntimeError, match="could be read"):
        ds[0]


def test_missing_and_empty_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(missing, 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        ImageFolder(tmp_path / "empty", 8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolder(tmp_path / "file.png", 8)


def test_bad_arguments(tree):
    with pytest.raises(ValueError, match="size"):
        ImageFolder(tree, 0)
    with pytest.raises(TypeError, match="size"):
        ImageFolder(tree, 32.0)
    with pytest.raises(ValueError, match="crop"):
        ImageFolder(tree, 32, crop="middle")
    with pytest.raises(ValueError, match="seed"):
        ImageFolder(tree, 32, seed=-1)
    with pytest.raises(ValueError, match="extensions"):
        ImageFolder(tree, 32, extensions=())
    ds = ImageFolder(tree, 32)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)
