"""Random inpainting masks: LaMa-style irregular brush strokes and boxes.

Every mask is (1, H, W) float32 with values in {0, 1}, 1 marking a hole
(pixels to be inpainted), 0 the known pixels.

Sizes are fractions, so the same settings work at any resolution: stroke
widths and segment lengths are fractions of the image's shorter side, box
sides fractions of the image side they run along.

Randomness: each function takes either ``seed`` (an int; the same seed gives
the same mask) or ``generator`` (a CPU ``torch.Generator``, advanced by the
call), or neither (torch's global RNG). ``MaskGenerator`` holds its own
generator, so a seeded instance yields the same sequence of masks; pass
``index=`` to make a mask depend on ``(seed, index)`` alone (e.g. fixed
validation masks, or masks that do not depend on DataLoader worker order).

Hole ratio with the default settings (fraction of pixels that are holes;
measured over 2000 square masks each at 256, 64 and 32 pixels):

* ``irregular_mask``: mean 0.22-0.24; single masks 0.004-0.63, 90% of them
  within 0.04-0.44. Never empty. Stroke sizes follow the shorter side, so
  elongated images get a smaller ratio (0.09 at 64 x 200).
* ``box_mask``: mean 0.21; single masks 0.01-0.59, 90% within 0.05-0.39.
  Never empty.
* ``MaskGenerator("mixed")`` (half and half): mean 0.21-0.22.

Documented range of the mean, which the tests check: 0.17-0.28 for each kind
on square masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from pyvq._checks import check_float, check_int, check_seed
from pyvq.data._common import derived_generator, randint, uniform

__all__ = ["MaskGenerator", "box_mask", "irregular_mask"]


def _resolve_generator(seed, generator) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got device {generator.device}")
        return generator
    seed = check_seed("seed", seed)
    return None if seed is None else torch.Generator().manual_seed(seed)


def _check_hw(height, width) -> tuple[int, int]:
    return check_int("height", height, minimum=1), check_int("width", width, minimum=1)


def _check_range(lo_name: str, lo, hi_name: str, hi, *, low: float, high: float, low_open: bool) -> tuple[float, float]:
    lo = check_float(lo_name, lo, low=low, high=high, low_open=low_open)
    hi = check_float(hi_name, hi, low=low, high=high, low_open=low_open)
    if lo > hi:
        raise ValueError(f"{lo_name} ({lo}) must be <= {hi_name} ({hi})")
    return lo, hi


@dataclass(frozen=True)
class IrregularMaskConfig:
    """Settings of ``irregular_mask`` (validated on construction).

    Each mask is ``randint(min_strokes, max_strokes)`` strokes. A stroke
    starts at a uniform point with a uniform direction and a width uniform in
    [min_width, max_width]; it is a polyline of ``randint(1, max_vertices)``
    segments, each turning by an angle uniform in [-max_angle, max_angle]
    (radians) and as long as a uniform fraction in [min_length, max_length];
    it bounces off the image border. Segments are drawn as thick lines with
    discs at every vertex (round joints and ends).
    """

    min_strokes: int = 1
    max_strokes: int = 6
    max_vertices: int = 6
    min_width: float = 0.04
    max_width: float = 0.15
    min_length: float = 0.05
    max_length: float = 0.4
    max_angle: float = math.pi / 2

    def __post_init__(self):
        check_int("min_strokes", self.min_strokes, minimum=1)
        check_int("max_strokes", self.max_strokes, minimum=1)
        if self.max_strokes < self.min_strokes:
            raise ValueError(f"min_strokes ({self.min_strokes}) must be <= max_strokes ({self.max_strokes})")
        check_int("max_vertices", self.max_vertices, minimum=1)
        _check_range("min_width", self.min_width, "max_width", self.max_width, low=0.0, high=1.0, low_open=True)
        _check_range("min_length", self.min_length, "max_length", self.max_length, low=0.0, high=2.0, low_open=False)
        check_float("max_angle", self.max_angle, low=0.0, high=2 * math.pi)


@dataclass(frozen=True)
class BoxMaskConfig:
    """Settings of ``box_mask`` (validated on construction).

    Each mask is the union of ``randint(min_boxes, max_boxes)`` axis-aligned
    rectangles. A box's height is a fraction of H uniform in [min_size,
    max_size] (its width, independently, a fraction of W); it is placed
    uniformly with at least ``margin * H`` (``margin * W``) pixels between it
    and the image border.
    """

    min_boxes: int = 1
    max_boxes: int = 3
    min_size: float = 0.1
    max_size: float = 0.6
    margin: float = 0.05

    def __post_init__(self):
        check_int("min_boxes", self.min_boxes, minimum=1)
        check_int("max_boxes", self.max_boxes, minimum=1)
        if self.max_boxes < self.min_boxes:
            raise ValueError(f"min_boxes ({self.min_boxes}) must be <= max_boxes ({self.max_boxes})")
        _check_range("min_size", self.min_size, "max_size", self.max_size, low=0.0, high=1.0, low_open=True)
        check_float("margin", self.margin, low=0.0, high=0.5)
        if self.max_size + 2 * self.margin > 1.0:
            raise ValueError(
                f"max_size + 2 * margin must be <= 1 (a box must fit inside the margins), "
                f"got max_size={self.max_size}, margin={self.margin}"
            )


def _draw_irregular(h: int, w: int, cfg: IrregularMaskConfig, g: torch.Generator | None) -> torch.Tensor:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    short = min(h, w)
    xmax, ymax = w - 1, h - 1

    def disc(x: float, y: float, r: float) -> None:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)

    for _ in range(randint(g, cfg.min_strokes, cfg.max_strokes)):
        x, y = uniform(g, 0, w), uniform(g, 0, h)
        x, y = min(x, xmax), min(y, ymax)
        direction = uniform(g, 0, 2 * math.pi)
        stroke_w = max(1, round(uniform(g, cfg.min_width, cfg.max_width) * short))
        r = stroke_w / 2
        disc(x, y, r)
        for _ in range(randint(g, 1, cfg.max_vertices)):
            direction += uniform(g, -cfg.max_angle, cfg.max_angle)
            length = uniform(g, cfg.min_length, cfg.max_length) * short
            nx, ny = x + length * math.cos(direction), y + length * math.sin(direction)
            # Bounce off the border (mirror the position and the direction).
            if nx < 0 or nx > xmax:
                nx = -nx if nx < 0 else 2 * xmax - nx
                direction = math.pi - direction
            if ny < 0 or ny > ymax:
                ny = -ny if ny < 0 else 2 * ymax - ny
                direction = -direction
            nx, ny = min(max(nx, 0.0), xmax), min(max(ny, 0.0), ymax)
            draw.line((x, y, nx, ny), fill=255, width=stroke_w)
            disc(nx, ny, r)
            x, y = nx, ny
    mask = torch.from_numpy(np.asarray(canvas) != 0).to(torch.float32)
    return mask.unsqueeze(0)


def _draw_boxes(h: int, w: int, cfg: BoxMaskConfig, g: torch.Generator | None) -> torch.Tensor:
    mask = torch.zeros(1, h, w, dtype=torch.float32)
    for _ in range(randint(g, cfg.min_boxes, cfg.max_boxes)):
        spans = []
        for n in (h, w):
            m = math.floor(cfg.margin * n)
            side = max(1, round(uniform(g, cfg.min_size, cfg.max_size) * n))
            side = min(side, max(1, n - 2 * m))
            lo, hi = (m, n - m - side) if n - 2 * m >= side else (0, n - side)
            start = randint(g, lo, max(lo, hi))
            spans.append((start, start + side))
        (t, b), (l, r) = spans
        mask[:, t:b, l:r] = 1.0
    return mask


def irregular_mask(
    height: int,
    width: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **settings,
) -> torch.Tensor:
    """A LaMa-style irregular mask of thick random brush strokes.

    Args:
        height, width: mask size in pixels.
        seed / generator: randomness (see the module docstring).
        **settings: fields of ``IrregularMaskConfig`` (min_strokes,
            max_strokes, max_vertices, min_width, max_width, min_length,
            max_length, max_angle).

    Returns:
        (1, height, width) float32, 1 = hole.
    """
    h, w = _check_hw(height, width)
    cfg = IrregularMaskConfig(**settings)
    return _draw_irregular(h, w, cfg, _resolve_generator(seed, generator))


def box_mask(
    height: int,
    width: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **settings,
) -> torch.Tensor:
    """A mask of one or more random axis-aligned rectangles.

    Args:
        height, width: mask size in pixels.
        seed / generator: randomness (see the module docstring).
        **settings: fields of ``BoxMaskConfig`` (min_boxes, max_boxes,
            min_size, max_size, margin).

    Returns:
        (1, height, width) float32, 1 = hole.
    """
    h, w = _check_hw(height, width)
    cfg = BoxMaskConfig(**settings)
    return _draw_boxes(h, w, cfg, _resolve_generator(seed, generator))


class MaskGenerator:
    """Callable source of inpainting masks.

    Args:
        kind: "irregular", "box" or "mixed" (each mask is irregular with
            probability ``irregular_prob``, else a box mask).
        seed: seeds the instance's generator (None: torch's global RNG).
        irregular_prob: used by "mixed" only.
        irregular: dict of ``IrregularMaskConfig`` settings.
        box: dict of ``BoxMaskConfig`` settings.

    ``gen(height, width)`` draws the next mask of the instance's stream;
    ``gen(height, width, index=i)`` the mask fixed by ``(seed, i)``, leaving
    the stream untouched (needs a seed). Returns (1, height, width) float32
    in {0, 1}, 1 = hole.

    In DataLoader workers every worker gets a copy of the instance with the
    same generator state, so the plain stream would repeat the same masks in
    each worker: there, call it with ``index=`` (the sample index; masks are
    then reproducible whatever the worker layout) or use ``seed=None``
    (torch's global RNG, which the DataLoader seeds per worker).
    """

    def __init__(
        self,
        kind: str = "mixed",
        *,
        seed: int | None = None,
        irregular_prob: float = 0.5,
        irregular: dict | None = None,
        box: dict | None = None,
    ):
        if kind not in ("mixed", "irregular", "box"):
            raise ValueError(f"kind must be 'mixed', 'irregular' or 'box', got {kind!r}")
        self.kind = kind
        self.seed = check_seed("seed", seed)
        self.irregular_prob = check_float("irregular_prob", irregular_prob, low=0.0, high=1.0)
        for name, value in (("irregular", irregular), ("box", box)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of settings or None, got {type(value).__name__}")
        self.irregular_config = IrregularMaskConfig(**(irregular or {}))
        self.box_config = BoxMaskConfig(**(box or {}))
        self._generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(kind={self.kind!r}, seed={self.seed}, irregular_prob={self.irregular_prob}, "
            f"irregular={self.irregular_config}, box={self.box_config})"
        )

    def reset(self) -> None:
        """Restart the seeded stream from its first mask."""
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, height: int, width: int, *, index: int | None = None) -> torch.Tensor:
        h, w = _check_hw(height, width)
        if index is None:
            g = self._generator
        else:
            if self.seed is None:
                raise ValueError("MaskGenerator: index= needs a seeded generator (seed=None was given)")
            g = derived_generator(self.seed, check_int("index", index, minimum=0))
        kind = self.kind
        if kind == "mixed":
            kind = "irregular" if uniform(g) < self.irregular_prob else "box"
        if kind == "irregular":
            return _draw_irregular(h, w, self.irregular_config, g)
        return _draw_boxes(h, w, self.box_config, g)
