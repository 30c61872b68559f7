"""A small real-image data set that needs no download: square crops of the
photographs bundled inside the scikit-image wheel.

The source files are read with PIL straight from scikit-image's package data
folder (``skimage/data/*.png|jpg``); scikit-image itself is not imported and
its pooch downloader is never involved, so this works offline. Only
photographs (and real scans / micrographs) are used; the synthetic images
scikit-image ships (colorwheel, chessboards, logo, horse silhouette, phantom)
are left out, and so is the 102 x 102 ``microaneurysms`` patch.

Images (scikit-image name: file, size W x H, colour) and the split
----------------------------------------------------------------------
The split is by source image, fixed, and independent of any seed.

train (15):
    astronaut            astronaut.png          512 x 512   RGB
    coffee               coffee.png             600 x 400   RGB
    motorcycle_left      motorcycle_left.png    741 x 500   RGB
    motorcycle_right     motorcycle_right.png   741 x 500   RGB   (stereo pair: same split)
    hubble_deep_field    hubble_deep_field.jpg 1000 x 872   RGB
    immunohistochemistry ihc.png                512 x 512   RGB
    retina               retina.jpg            1411 x 1411  RGB   (black border around the fundus)
    camera               camera.png             512 x 512   grey
    moon                 moon.png               512 x 512   grey
    text                 text.png               448 x 172   grey
    page                 page.png               384 x 191   grey
    brick                brick.png              512 x 512   grey
    gravel               gravel.png             512 x 512   grey
    cell                 cell.png               660 x 550   grey
    clock                clock_motion.png       300 x 400   grey  (motion-blurred photo)

val (4):
    chelsea              chelsea.png            451 x 300   RGB
    rocket               rocket.jpg             427 x 640   RGB
    coins                coins.png              384 x 303   grey
    grass                grass.png              512 x 512   grey

Greyscale images are replicated to three channels.

Crops
-----
Crop ``k`` of an image is a square whose side is a fraction ``u`` of the
image's shorter side, ``u`` uniform in ``scale``, but never fewer than
``size`` pixels (no upsampling) unless the image is smaller than that; its
position is uniform over the image; it is resized to ``size x size``
(bicubic, antialiased) and, when ``flip``, mirrored left-right with
probability 0.5.

* ``split="val"``: crops are fixed: drawn from a generator seeded by the
  image name and ``k`` only, so every instance, seed and process sees the
  same validation set (for a given ``size``, ``scale`` and
  ``crops_per_image``).
* ``split="train"``: crops are drawn from a generator seeded by
  ``(seed, epoch, index)``: reproducible with any DataLoader setup and fresh
  each epoch after ``set_epoch(epoch)`` (see ``pyvq.data.image_folder`` for
  the DataLoader details).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from pyvq._checks import check_float, check_int, check_seed
from pyvq.data._common import derived_generator, pil_to_tensor, randint, uniform

__all__ = ["BuiltinImages", "builtin_image_names", "builtin_image_path", "load_builtin_image"]

# name -> file in skimage/data. Names follow the skimage.data functions.
_FILES = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "camera": "camera.png",
    "moon": "moon.png",
    "text": "text.png",
    "page": "page.png",
    "brick": "brick.png",
    "gravel": "gravel.png",
    "cell": "cell.png",
    "clock": "clock_motion.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "coins": "coins.png",
    "grass": "grass.png",
}

_VAL = ("chelsea", "rocket", "coins", "grass")
_TRAIN = tuple(n for n in _FILES if n not in _VAL)

# Fixed key that seeds the validation crops (never the user's seed).
_VAL_KEY = "pyvq.builtin.val"


def builtin_image_names(split: str = "train") -> tuple[str, ...]:
    """Names of the source images in ``split`` ("train", "val" or "all")."""
    if split == "train":
        return _TRAIN
    if split == "val":
        return _VAL
    if split == "all":
        return _TRAIN + _VAL
    raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "BuiltinImages reads the photographs bundled with scikit-image; install scikit-image "
            "(pip install scikit-image)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def builtin_image_path(name: str) -> Path:
    """Path of the bundled file behind ``name``; FileNotFoundError if missing."""
    if name not in _FILES:
        raise ValueError(f"unknown built-in image {name!r}; choose from {sorted(_FILES)}")
    path = _skimage_data_dir() / _FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"built-in image {name!r}: expected scikit-image's bundled file '{path}', which is missing "
            "(a scikit-image install without its sample data?)"
        )
    return path


@functools.lru_cache(maxsize=None)
def _load_rgb(name: str) -> Image.Image:
    with Image.open(builtin_image_path(name)) as im:
        return im.convert("RGB")


def load_builtin_image(name: str) -> torch.Tensor:
    """The whole source image ``name`` as (3, H, W) float32 in [-1, 1]."""
    return pil_to_tensor(_load_rgb(name))


class BuiltinImages(Dataset):
    """Square crops of scikit-image's bundled photographs (see module docstring).

    ``dataset[i]`` is (3, size, size) float32 in [-1, 1]: crop
    ``i % crops_per_image`` of image ``names[i // crops_per_image]``.

    Args:
        split: "train" or "val" (disjoint by source image).
        size: output side in pixels.
        crops_per_image: crops per source image; ``len = crops_per_image * len(names)``.
        scale: (low, high), crop side as a fraction of the image's shorter
            side, 0 < low <= high <= 1.
        seed: seeds the train crops (ignored for val, whose crops are fixed).
        flip: random left-right flip; default True for train, False for val.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        *,
        crops_per_image: int = 16,
        scale: tuple[float, float] = (0.25, 1.0),
        seed: int = 0,
        flip: bool | None = None,
    ):
        super().__init__()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split = split
        self.size = check_int("size", size, minimum=1)
        self.crops_per_image = check_int("crops_per_image", crops_per_image, minimum=1)
        try:
            lo, hi = scale
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a pair (low, high), got {scale!r}") from None
        lo = check_float("scale[0]", lo, low=0.0, high=1.0, low_open=True)
        hi = check_float("scale[1]", hi, low=0.0, high=1.0, low_open=True)
        if lo > hi:
            raise ValueError(f"scale must satisfy low <= high, got {scale!r}")
        self.scale = (lo, hi)
        seed = check_seed("seed", seed)
        self.seed = 0 if seed is None else seed
        if flip is None:
            flip = split == "train"
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be a bool or None, got {flip!r}")
        self.flip = flip
        self.epoch = 0
        self.names = builtin_image_names(split)
        # Fail now, not in a worker, if a bundled file is missing.
        for name in self.names:
            builtin_image_path(name)

    def __len__(self) -> int:
        return self.crops_per_image * len(self.names)

    def __repr__(self) -> str:
        return (
            f"BuiltinImages(split={self.split!r}, size={self.size}, crops_per_image={self.crops_per_image}, "
            f"scale={self.scale}, seed={self.seed}, flip={self.flip}, images={len(self.names)})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random train crops are drawn (no effect on val)."""
        self.epoch = check_int("epoch", epoch, minimum=0)

    def as_tensor(self) -> torch.Tensor:
        """All samples of the current epoch, stacked: (len, 3, size, size) float32."""
        return torch.stack([self[i] for i in range(len(self))])

    def source(self, index: int) -> str:
        """Name of the source image of sample ``index``."""
        return self.names[self._check_index(index) // self.crops_per_image]

    def _check_index(self, index: int) -> int:
        n = len(self)
        index = check_int("index", index)
        if not -n <= index < n:
            raise IndexError(f"BuiltinImages index {index} out of range for {n} samples")
        return index % n

    def __getitem__(self, index: int) -> torch.Tensor:
        """(3, size, size) float32 in [-1, 1]."""
        index = self._check_index(index)
        name = self.names[index // self.crops_per_image]
        k = index % self.crops_per_image
        if self.split == "val":
            g = derived_generator(_VAL_KEY, name, k)
        else:
            g = derived_generator(self.seed, self.epoch, index)
        img = _load_rgb(name)
        w, h = img.size
        short = min(w, h)
        side = uniform(g, *self.scale) * short
        side = min(short, max(side, self.size))
        left = uniform(g, 0.0, w - side)
        top = uniform(g, 0.0, h - side)
        # ``box`` crops and resamples in one step, at sub-pixel position.
        out = img.resize(
            (self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )
        t = pil_to_tensor(out)
        if self.flip and randint(g, 0, 1) == 1:
            t = t.flip(-1).contiguous()
        return t
