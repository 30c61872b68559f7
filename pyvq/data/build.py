"""``build_dataset``: the image dataset a data argument names (the trainer,
``pyvq train / eval / encode / eval-inpaint`` all open their data here)."""

from __future__ import annotations

from pyvq.data.builtin import BuiltinImages
from pyvq.data.image_folder import ImageFolder

__all__ = ["build_dataset"]


def build_dataset(data: str, image_size: int, split: str = "train", *, seed: int = 0,
                  augment: bool | None = None):
    """The dataset ``data`` names: ``"builtin"`` (scikit-image's photographs,
    ``BuiltinImages``) or an image folder (``ImageFolder``), as (3, S, S)
    float32 images in [-1, 1] with S = ``image_size``.

    Args:
        data: ``"builtin"`` or the path of an image folder.
        image_size: S, the side length of every sample.
        split: ``"train"`` or ``"val"``; for ``"builtin"`` the source
            photographs of that split (its crops and flips are fixed by the
            split: random seeded crops with flips for train, fixed crops for
            val; ``BuiltinImages`` checks it); a folder has no splits.
        seed: the seed of the random crops and flips.
        augment: an image folder's random crops and horizontal flips
            (otherwise a centre crop); default ``split == "train"``.
            ``BuiltinImages`` ignores it (its split decides).
    """
    if data == "builtin":
        return BuiltinImages(split=split, size=image_size, seed=seed)
    if augment is None:
        augment = split == "train"
    return ImageFolder(data, image_size, crop="random" if augment else "center", flip=augment, seed=seed)
