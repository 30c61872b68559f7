"""Data: image datasets and inpainting masks.

* ``ImageFolder``: every image file under a folder, as (3, S, S) float32 in [-1, 1].
* ``BuiltinImages``: crops of the photographs bundled with scikit-image
  (no download), with a fixed train/val split by source image.
* ``irregular_mask``, ``box_mask``, ``MaskGenerator``: seeded (1, H, W)
  {0, 1} inpainting masks, 1 = hole.
* ``build_dataset(data, image_size, split)``: ``"builtin"`` or an image
  folder, with the trainer's crops and flips.

Needs Pillow (and scikit-image's bundled files for ``BuiltinImages``).
"""

from pyvq.data.build import build_dataset
from pyvq.data.builtin import BuiltinImages, builtin_image_names, builtin_image_path, load_builtin_image
from pyvq.data.image_folder import IMAGE_EXTENSIONS, CorruptImageWarning, ImageFolder
from pyvq.data.masks import BoxMaskConfig, IrregularMaskConfig, MaskGenerator, box_mask, irregular_mask

__all__ = [
    "BuiltinImages",
    "builtin_image_names",
    "builtin_image_path",
    "load_builtin_image",
    "ImageFolder",
    "CorruptImageWarning",
    "IMAGE_EXTENSIONS",
    "MaskGenerator",
    "IrregularMaskConfig",
    "BoxMaskConfig",
    "irregular_mask",
    "box_mask",
    "build_dataset",
]
