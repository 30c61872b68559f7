"""Inpainting masks: irregular strokes, boxes, MaskGenerator."""

from __future__ import annotations

import pytest
import torch

from pyvq.data import MaskGenerator, box_mask, irregular_mask


def _check_mask(m, h, w):
    assert m.shape == (1, h, w) and m.dtype == torch.float32
    assert torch.all((m == 0) | (m == 1))


@pytest.mark.parametrize("fn", [irregular_mask, box_mask])
@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (5, 3), (1, 1)])
def test_shape_dtype_binary_nonempty(fn, hw):
    for seed in range(5):
        m = fn(*hw, seed=seed)
        _check_mask(m, *hw)
        assert m.sum() > 0


@pytest.mark.parametrize("kind", ["irregular", "box", "mixed"])
def test_generator_shapes_and_determinism(kind):
    a, b = MaskGenerator(kind, seed=3), MaskGenerator(kind, seed=3)
    ma = [a(40, 56) for _ in range(6)]
    mb = [b(40, 56) for _ in range(6)]
    for x, y in zip(ma, mb):
        _check_mask(x, 40, 56)
        assert torch.equal(x, y)
    assert len({x.numpy().tobytes() for x in ma}) == 6  # a stream, not one mask repeated
    c = MaskGenerator(kind, seed=4)
    assert not all(torch.equal(x, c(40, 56)) for x in ma)
    a.reset()
    assert torch.equal(a(40, 56), ma[0])


def test_index_mode_independent_of_stream():
    g = MaskGenerator(seed=5)
    m7 = g(32, 32, index=7)
    g(32, 32)
    g(32, 32)
    assert torch.equal(g(32, 32, index=7), m7)
    assert torch.equal(MaskGenerator(seed=5)(32, 32, index=7), m7)
    assert not torch.equal(g(32, 32, index=8), m7)
    with pytest.raises(ValueError, match="index"):
        MaskGenerator(seed=None)(32, 32, index=0)


@pytest.mark.parametrize("fn", [irregular_mask, box_mask])
def test_seeds_and_generators(fn):
    assert torch.equal(fn(32, 32, seed=11), fn(32, 32, seed=11))
    assert not torch.equal(fn(32, 32, seed=11), fn(32, 32, seed=12))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    first = fn(32, 32, generator=g1)
    assert torch.equal(first, fn(32, 32, generator=g2))
    assert not torch.equal(first, fn(32, 32, generator=g1))  # the generator advanced
    with pytest.raises(ValueError, match="seed or generator"):
        fn(8, 8, seed=1, generator=g1)


@pytest.mark.parametrize("kind", ["irregular", "box", "mixed"])
def test_hole_ratio_in_documented_range(kind):
    g = MaskGenerator(kind, seed=0)
    ratios = torch.stack([g(48, 48).mean() for _ in range(150)])
    assert 0.17 <= ratios.mean().item() <= 0.28, ratios.mean().item()
    assert ratios.min() > 0 and ratios.max() < 0.8


def test_box_mask_single_box_is_a_rectangle():
    for seed in range(20):
        m = box_mask(40, 60, seed=seed, min_boxes=1, max_boxes=1, margin=0.1)[0]
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        t, b, l, r = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        # filled exactly over its bounding box, and inside the margins
        assert m[t:b, l:r].all() and m.sum() == (b - t) * (r - l)
        assert t >= 4 and b <= 36 and l >= 6 and r <= 54
        assert 0.1 * 40 - 1 <= b - t <= 0.6 * 40 + 1 and 0.1 * 60 - 1 <= r - l <= 0.6 * 60 + 1


def test_irregular_strokes_have_width():
    """Thick strokes: eroding the mask by a 3x3 window keeps most of it."""
    m = irregular_mask(128, 128, seed=0, min_width=0.08, max_width=0.1)
    eroded = -torch.nn.functional.max_pool2d(-m[None], 3, stride=1, padding=1)[0]
    assert eroded.sum() > 0.5 * m.sum()


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(max_strokes=0), ValueError, "max_strokes"),
        (dict(min_strokes=3, max_strokes=2), ValueError, "min_strokes"),
        (dict(max_vertices=1.5), TypeError, "max_vertices"),
        (dict(max_width=0.0), ValueError, "max_width"),
        (dict(min_width=0.2, max_width=0.1), ValueError, "min_width"),
        (dict(max_length=-1.0), ValueError, "max_length"),
        (dict(max_angle=float("nan")), ValueError, "max_angle"),
        (dict(bogus=1), TypeError, "bogus"),
    ],
)
def test_irregular_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        irregular_mask(16, 16, **kwargs)
    with pytest.raises(exc, match=name):
        MaskGenerator("irregular", irregular=kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(max_boxes=0), ValueError, "max_boxes"),
        (dict(min_boxes=2, max_boxes=1), ValueError, "min_boxes"),
        (dict(min_size=0.0), ValueError, "min_size"),
        (dict(max_size=1.5), ValueError, "max_size"),
        (dict(margin=0.3, max_size=0.5), ValueError, "margin"),
    ],
)
def test_box_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        box_mask(16, 16, **kwargs)
    with pytest.raises(exc, match=name):
        MaskGenerator("box", box=kwargs)


def test_common_bad_arguments():
    with pytest.raises(ValueError, match="height"):
        irregular_mask(0, 8)
    with pytest.raises(TypeError, match="width"):
        box_mask(8, 8.0)
    with pytest.raises(ValueError, match="seed"):
        irregular_mask(8, 8, seed=-3)
    with pytest.raises(TypeError, match="generator"):
        box_mask(8, 8, generator=123)
    with pytest.raises(ValueError, match="kind"):
        MaskGenerator("circles")
    with pytest.raises(ValueError, match="irregular_prob"):
        MaskGenerator(irregular_prob=1.5)
    with pytest.raises(TypeError, match="box"):
        MaskGenerator(box=[1, 2])
    with pytest.raises(ValueError, match="height"):
        MaskGenerator(seed=0)(-1, 8)
