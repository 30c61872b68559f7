"""Which codes of a tokenizer an inpainting mask leaves known.

A tokenizer's ``known_codes(mask)`` maps a pixel mask (1 / True = region to
generate) to a bool map over its code grid (True = the code is kept from the
image); ``pyvq inpaint`` re-imposes exactly those codes and generates the
rest. The rule follows where each code's information lands in the decoder:

* VQ tokenizers (``VQGAN``, ``EfficientVQGAN``): code (a, b) is the latent at
  (a, b), which the decoder upsamples into the f x f pixel block
  ``[a f, (a + 1) f) x [b f, (b + 1) f)``; the code is known when that block
  has no masked pixel (``block_known_codes``).
* ``BRICS``: code (a, b) is queried at every feature position the tiling
  gives it (``tile_codes``); each feature position becomes an s x s pixel
  block (s = the synthesis network's upsampling); the code is known when
  none of those blocks has a masked pixel (``BRICS.known_codes``).

Both rules are about ownership: the feature (or latent) cells a known code
writes never lie over the mask. The decoders' convolutions, attention and
(BRICS) global style then spread every code's influence a few pixels (or,
through attention and the style, weakly over the whole image), so decoded
pixels near the mask's edge mix known and generated codes; ``paste`` in
``pyvq.train.generate.inpaint_image`` puts the known pixels back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyvq._checks import check_int

__all__ = ["BlockKnownCodes", "block_known_codes", "masked_blocks"]


def masked_blocks(mask, block: int, *, where: str, multiple: int | None = None) -> torch.Tensor:
    """Which ``block`` x ``block`` pixel blocks of ``mask`` hold a masked pixel.

    Args:
        mask: (H, W), (1, H, W) or (B, 1, H, W); non-zero / True = masked
            (region to generate). H and W must be multiples of
            ``multiple``.
        block: block side length in pixels.
        where: the caller's name, for error messages.
        multiple: what H and W must be multiples of (a multiple of
            ``block``; default ``block``): the tokenizer's downsampling
            factor.

    Returns:
        bool (H / block, W / block), or (B, H / block, W / block) for a
        (B, 1, H, W) mask; True where the block has a masked pixel.
    """
    check_int("block", block, where=where, minimum=1)
    multiple = block if multiple is None else multiple
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: argument 'mask' must be a tensor (H, W), (1, H, W) or (B, 1, H, W), "
                        f"got {type(mask).__name__}")
    if mask.dim() not in (2, 3, 4) or (mask.dim() >= 3 and mask.shape[-3] != 1):
        raise ValueError(f"{where}: argument 'mask' must have shape (H, W), (1, H, W) or (B, 1, H, W), "
                         f"got {tuple(mask.shape)}")
    H, W = mask.shape[-2:]
    if H % multiple or W % multiple or H == 0 or W == 0:
        raise ValueError(f"{where}: argument 'mask' must have height and width that are positive multiples of "
                         f"{multiple} (the tokenizer's downsampling factor), got {H} x {W}")
    batched = mask.dim() == 4
    m = (mask != 0).reshape(-1, 1, H, W).float()
    out = F.max_pool2d(m, kernel_size=block, stride=block)[:, 0] > 0
    return out if batched else out[0]


def block_known_codes(mask, factor: int, *, where: str) -> torch.Tensor:
    """The block rule: code (a, b) is known when its ``factor`` x ``factor``
    pixel block has no masked pixel. Shapes as ``masked_blocks``."""
    return ~masked_blocks(mask, factor, where=where)


class BlockKnownCodes:
    """``known_codes`` by the block rule, for tokenizers whose code (a, b)
    is the decoder's latent at (a, b) (``VQGAN``, ``EfficientVQGAN``); the
    class needs a ``downsample_factor``."""

    def known_codes(self, mask: torch.Tensor) -> torch.Tensor:
        """Which codes an inpainting mask leaves known.

        Args:
            mask: (H, W), (1, H, W) or (B, 1, H, W) pixels, non-zero / True
                = region to generate; H and W multiples of the
                downsampling factor f.

        Returns:
            bool (H / f, W / f) (or (B, H / f, W / f)): True where the code
            is known (kept from the image), i.e. its f x f pixel block has
            no masked pixel.

        The decoder's receptive field reaches beyond the block (a few
        pixels through its convolutions, the whole image through its
        attention), so a known code next to the mask still shapes decoded
        pixels inside it, and a generated code those just outside it;
        likewise the encoder saw the pixels around each block, masked ones
        included, when it made the known codes.
        """
        return block_known_codes(mask, self.downsample_factor, where=f"{type(self).__name__}.known_codes")
