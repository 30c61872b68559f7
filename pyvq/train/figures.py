"""Labelled image grids: the one figure helper behind the trainer's image
logs, the demo's ``reconstructions.png``, ``pyvq inpaint``'s panel and
``eval-inpaint``'s ``examples.png``.

``labelled_grid(images, nrow, row_labels=..., col_labels=...)`` lays
(N, 3, H, W) images out row by row, ``nrow`` per row, on a white canvas, with
each row's label in a band on the left, each column's label in a band on top
and an optional title and caption; every tile is enlarged by the integer
``scale`` (nearest neighbour, so pixels stay pixels). ``save_labelled_grid``
writes it as a PNG.

Layout (all in output pixels): a tile is ``H * scale`` x ``W * scale``; a
column is as wide as its widest item (tile or label) and tiles are centred
in it; ``pad`` pixels separate the cells and surround the grid. The label
bands are as wide / tall as their longest label plus a margin, and absent
when there are no labels of that kind.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["EDGE_NOTE", "labelled_grid", "save_labelled_grid", "tint_holes", "to_uint8"]

# Caption of reconstruction grids: what the coloured fringes of early reconstructions are.
EDGE_NOTE = ("Coloured fringes along a reconstruction's edges (strongest early in a run) are the decoder's\n"
             "edge artefacts: its convolutions zero-pad the image border, and the outermost pixels have\n"
             "the largest error until training corrects them. White lines separate the tiles.")

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_MARGIN = 4  # pixels around a label


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) images with values in ``value_range`` (clamped) as an
    (N, H, W, 3) uint8 array; one-channel images are shown grey."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"figures: argument 'images' must be an (N, 1 or 3, H, W) tensor, got {shape}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"figures: argument 'value_range' must be (low, high) with high > low, got {value_range}")
    x = images.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = ((x.clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def tint_holes(x: torch.Tensor, mask: torch.Tensor, color=(1.0, -1.0, 1.0)) -> torch.Tensor:
    """``x`` (B, 3, H, W) or (3, H, W) in [-1, 1] with the holes of ``mask``
    (same leading shape, one channel; 1 = hole) painted ``color`` (default
    magenta): a masked input made readable (a decoder's ``(1 - mask) * x``
    has zeros, mid-grey, in its holes)."""
    tint = torch.tensor(color, device=x.device, dtype=x.dtype).view(3, 1, 1)
    mask = mask.to(x.dtype)
    return x * (1 - mask) + mask * tint


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _check_labels(name: str, labels, count: int, what: str) -> list[str]:
    labels = [] if labels is None else [str(s) for s in labels]
    if labels and len(labels) != count:
        raise ValueError(f"figures: argument '{name}' must have one label per {what} ({count}), "
                         f"got {len(labels)}: {labels}")
    return labels


def labelled_grid(images: torch.Tensor, nrow: int, *, row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, title: str | None = None, caption: str | None = None,
                  scale: int = 1, pad: int = 2, font_size: int = 12,
                  value_range: tuple[float, float] = (-1.0, 1.0)):
    """A PIL image of ``images`` ((N, 1 or 3, H, W), values in
    ``value_range``) in rows of ``nrow``, labelled.

    Args:
        nrow: tiles per row (the number of columns), >= 1.
        row_labels: one label per row (``ceil(N / nrow)``), or None.
        col_labels: one label per column (``nrow``), or None.
        title: a line above the grid; caption: text below it (may hold
            newlines).
        scale: integer enlargement of every tile (nearest neighbour).
        pad: pixels between cells and around the grid.
        font_size: label font size in pixels.
    """
    from PIL import Image, ImageDraw

    for name, v, low in (("nrow", nrow, 1), ("scale", scale, 1), ("pad", pad, 0), ("font_size", font_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"figures: argument '{name}' must be an integer >= {low}, got {v!r}")
    tiles = to_uint8(images, value_range)
    n, h, w = tiles.shape[0], tiles.shape[1] * scale, tiles.shape[2] * scale
    if n == 0:
        raise ValueError("figures: argument 'images' must hold at least one image, got 0")
    rows = -(-n // nrow)
    cols = min(nrow, n) if rows == 1 else nrow
    row_labels = _check_labels("row_labels", row_labels, rows, "row")
    col_labels = _check_labels("col_labels", col_labels, cols, "column")

    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    band_w = max([_text_size(measure, s, font)[0] for s in row_labels] + [0])
    band_w = band_w + 2 * _MARGIN if row_labels else 0
    label_h = max([_text_size(measure, s, font)[1] for s in col_labels] + [0])
    band_h = label_h + 2 * _MARGIN if col_labels else 0
    col_w = [max(w, _text_size(measure, col_labels[j], font)[0] + 2 * _MARGIN if col_labels else 0)
             for j in range(cols)]
    title_h = _text_size(measure, title, font)[1] + 2 * _MARGIN if title else 0
    caption_h = _text_size(measure, caption, font)[1] + 2 * _MARGIN if caption else 0
    grid_w = sum(col_w) + pad * (cols + 1)
    width = band_w + grid_w
    if title:
        width = max(width, _text_size(measure, title, font)[0] + 2 * _MARGIN)
    if caption:
        width = max(width, _text_size(measure, caption, font)[0] + 2 * _MARGIN)
    top = title_h + band_h
    height = top + rows * h + pad * (rows + 1) + caption_h

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    xs = [band_w + pad + sum(col_w[:j]) + pad * j for j in range(cols)]
    for k in range(n):
        i, j = divmod(k, nrow)
        tile = Image.fromarray(tiles[k])
        if scale > 1:
            tile = tile.resize((w, h), Image.NEAREST)
        canvas.paste(tile, (xs[j] + (col_w[j] - w) // 2, top + pad + i * (h + pad)))
    if title:
        draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=font, anchor="la")
    for j, s in enumerate(col_labels):
        draw.text((xs[j] + col_w[j] / 2, title_h + band_h - _MARGIN), s, fill=_INK, font=font, anchor="md")
    for i, s in enumerate(row_labels):
        draw.multiline_text((band_w - _MARGIN, top + pad + i * (h + pad) + h / 2), s, fill=_INK, font=font,
                            anchor="rm", align="right")
    if caption:
        draw.multiline_text((_MARGIN, height - caption_h + _MARGIN), caption, fill=_INK, font=font)
    return canvas


def save_labelled_grid(path: str, images: torch.Tensor, nrow: int, **kwargs) -> str:
    """Write ``labelled_grid(images, nrow, **kwargs)`` to ``path`` (PNG); returns ``path``."""
    image = labelled_grid(images, nrow, **kwargs)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    image.save(path)
    return path
