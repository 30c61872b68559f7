"""A folder of image files as a dataset of fixed-size RGB tensors.

Reproducibility
---------------
The random parts (crop offset, horizontal flip) are drawn from one of two
sources:

* ``seed`` given (an int): every sample uses its own ``torch.Generator``
  seeded from ``(seed, epoch, index)``. A sample then depends only on those
  three numbers, not on ``num_workers``, on which worker loads it or on any
  global RNG, so a run is reproducible with any DataLoader. Call
  ``dataset.set_epoch(e)`` at the start of each epoch (as with
  ``DistributedSampler.set_epoch``) to get fresh crops every epoch; without
  it every epoch sees the same crops. With ``persistent_workers=True`` the
  workers keep the copy of the dataset they were started with, so
  ``set_epoch`` does not reach them: leave persistent workers off or accept
  one fixed set of crops.
* ``seed=None``: torch's global RNG. With ``num_workers=0`` this is the main
  process's RNG (reproducible after ``torch.manual_seed``, but shared with
  everything else that draws from it). In worker processes the DataLoader
  seeds torch's RNG of worker ``w`` with ``base_seed + w``, where
  ``base_seed`` comes from the DataLoader's ``generator=`` (or the global
  RNG); results are then reproducible for a fixed ``num_workers`` and
  generator seed.

Corrupt files
-------------
A file that PIL cannot open or decode (truncated JPEG, not an image at all,
...) is reported once per process with a ``CorruptImageWarning`` naming the
path and the error, added to ``bad_paths``, and skipped: ``dataset[i]``
falls back to the next readable file (i + 1, i + 2, ..., wrapping around),
a deterministic choice, using the random draws of the requested index ``i``.
In DataLoader workers the skip happens in the worker, so the main process's
``bad_paths`` stays empty; call ``dataset.verify()`` once beforehand to find
(and warn about) all bad files up front, or ``dataset.drop_unreadable()`` to
also remove them from the dataset (``pyvq eval`` and ``pyvq encode`` do, so
that a count or a code map never comes from a stand-in).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from pyvq._checks import check_int, check_seed
from pyvq.data._common import derived_generator, pil_to_tensor, randint, to_rgb

__all__ = ["CorruptImageWarning", "ImageFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class CorruptImageWarning(UserWarning):
    """An image file could not be read and is skipped."""


def _normalize_extensions(extensions) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        exts = tuple(extensions)
    except TypeError:
        raise TypeError(f"extensions must be a sequence of strings, got {extensions!r}") from None
    if not exts:
        raise ValueError("extensions must not be empty")
    out = []
    for e in exts:
        if not isinstance(e, str) or not e.strip(".").strip():
            raise ValueError(f"extensions must be non-empty strings such as '.png', got {e!r}")
        e = e.lower()
        out.append(e if e.startswith(".") else "." + e)
    return tuple(dict.fromkeys(out))


def _find_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursively, following directory links) whose
    lower-cased name ends with one of ``extensions``, sorted by their path
    relative to ``root``. Hidden files and folders (name starting with '.',
    e.g. macOS '._x.jpg' resource forks) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(dirpath, name))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


class ImageFolder(Dataset):
    """Every image file under ``root``, as (3, size, size) float32 in [-1, 1].

    Each file is opened with PIL, rotated by its EXIF orientation tag,
    converted to RGB (greyscale is replicated, alpha dropped), resized so its
    shorter side is ``size`` (bicubic, antialiased), cropped to
    ``size x size`` (centre or random), and optionally flipped left-right
    with probability 0.5.

    Args:
        root: folder searched recursively; files are ordered by their path
            relative to ``root`` (deterministic across machines).
        size: output side in pixels.
        crop: ``"center"`` or ``"random"`` (uniform offset along the long side).
        flip: random horizontal flip with probability 0.5.
        extensions: file-name endings to include (case-insensitive).
        seed: see the module docstring; None uses torch's global RNG.

    Attributes:
        paths: the files found, in dataset order.
        bad_paths: files found unreadable so far in this process, in the
            order they were met.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        ValueError: no file with one of ``extensions`` under ``root``.
    """

    def __init__(
        self,
        root,
        size: int,
        *,
        crop: str = "center",
        flip: bool = False,
        extensions=IMAGE_EXTENSIONS,
        seed: int | None = None,
    ):
        super().__init__()
        self.size = check_int("size", size, minimum=1)
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be a bool, got {flip!r}")
        self.crop = crop
        self.flip = flip
        self.extensions = _normalize_extensions(extensions)
        self.seed = check_seed("seed", seed)
        self.epoch = 0

        self.root = Path(os.fspath(root)).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"ImageFolder: root folder '{self.root}' does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"ImageFolder: root '{self.root}' is not a folder")
        self.paths: list[Path] = _find_files(self.root, self.extensions)
        if not self.paths:
            raise ValueError(
                f"ImageFolder: no image files with extensions {list(self.extensions)} found under '{self.root}'"
            )
        self.bad_paths: list[Path] = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root='{self.root}', size={self.size}, crop={self.crop!r}, flip={self.flip}, "
            f"seed={self.seed}, files={len(self.paths)}, bad={len(self.bad_paths)})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops/flips ``seed`` mode draws."""
        self.epoch = check_int("epoch", epoch, minimum=0)

    # -- loading ---------------------------------------------------------

    def _open(self, index: int) -> Image.Image:
        """The decoded RGB image of file ``index``; raises on a bad file."""
        with Image.open(self.paths[index]) as im:
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while
            # the result stays at least twice the final size, so that the
            # bicubic resize below still does the last, antialiased step.
            w, h = im.size
            if w > 0 and h > 0:
                s = 2 * self.size / min(w, h)
                if s < 1:
                    im.draft(None, (math.ceil(w * s), math.ceil(h * s)))
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a malformed EXIF block is no reason to drop the pixels
                pass
            return to_rgb(im)

    def _mark_bad(self, index: int, err: BaseException) -> None:
        if index in self._bad:
            return
        self._bad.add(index)
        path = self.paths[index]
        self.bad_paths.append(path)
        warnings.warn(
            f"ImageFolder: skipping unreadable image '{path}': {type(err).__name__}: {err}",
            CorruptImageWarning,
            stacklevel=3,
        )

    def verify(self) -> list[Path]:
        """Decode every file once; warn about and record the unreadable ones.

        Returns ``bad_paths``. Takes as long as one pass over the data set.
        """
        for i in range(len(self.paths)):
            if i in self._bad:
                continue
            try:
                self._open(i)
            except Exception as err:
                self._mark_bad(i, err)
        return list(self.bad_paths)

    def drop_unreadable(self) -> list[Path]:
        """Decode every file once (as ``verify``, without the warnings) and
        keep only the readable ones in ``paths``, so that no neighbour stands
        in for an unreadable file (an evaluation's count, an encoding's
        codes). Returns the dropped paths; ``ValueError`` naming the folder
        when none is readable."""
        with warnings.catch_warnings():  # the caller reports what was dropped
            warnings.simplefilter("ignore", CorruptImageWarning)
            bad = set(self.verify())
        if len(bad) == len(self.paths):
            raise ValueError(f"ImageFolder: none of the {len(self.paths)} image files under '{self.root}' "
                             f"could be read")
        dropped = [p for p in self.paths if p in bad]
        self.paths = [p for p in self.paths if p not in bad]
        self._bad = set()
        return dropped

    def _generator(self, index: int) -> torch.Generator | None:
        if self.seed is None or (self.crop == "center" and not self.flip):
            return None
        return derived_generator(self.seed, self.epoch, index)

    def _transform(self, img: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        size = self.size
        w, h = img.size
        if w <= h:
            nw, nh = size, max(size, round(h * size / w))
        else:
            nw, nh = max(size, round(w * size / h)), size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        if self.crop == "center":
            left, top = (nw - size) // 2, (nh - size) // 2
        else:
            left, top = randint(generator, 0, nw - size), randint(generator, 0, nh - size)
        img = img.crop((left, top, left + size, top + size))
        out = pil_to_tensor(img)
        if self.flip and randint(generator, 0, 1) == 1:
            out = out.flip(-1).contiguous()
        return out

    def __getitem__(self, index: int) -> torch.Tensor:
        """(3, size, size) float32 in [-1, 1]."""
        n = len(self.paths)
        index = check_int("index", index)
        if not -n <= index < n:
            raise IndexError(f"ImageFolder index {index} out of range for {n} files")
        index %= n
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                img = self._open(j)
            except Exception as err:
                self._mark_bad(j, err)
                continue
            return self._transform(img, self._generator(index))
        raise RuntimeError(f"ImageFolder: none of the {n} files under '{self.root}' could be read")
