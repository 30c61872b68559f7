"""Labelled figures (issue 15, section 5): the shared grid helper draws its
labels where its layout says, the trainer's grid of an asymmetric run shows
the mask it conditions on, and the inpainting panel / eval-inpaint examples
carry column labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyvq.train.figures import labelled_grid, save_labelled_grid, tint_holes, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")

WHITE = np.array([255, 255, 255], dtype=np.uint8)


def _images(n=6, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def test_unlabelled_grid_layout_and_tile_content():
    x = _images(6, 8, 10)
    img = np.asarray(labelled_grid(x, 3, scale=2, pad=3))
    assert img.shape == (2 * 16 + 3 * 3, 3 * 20 + 4 * 3, 3)
    tiles = to_uint8(x)
    for k in range(6):
        i, j = divmod(k, 3)
        y0, x0 = 3 + i * (16 + 3), 3 + j * (20 + 3)
        expect = tiles[k].repeat(2, axis=0).repeat(2, axis=1)  # nearest-neighbour 2x
        np.testing.assert_array_equal(img[y0:y0 + 16, x0:x0 + 20], expect)
    # the gaps are background
    assert (img[:3] == WHITE).all() and (img[:, :3] == WHITE).all()


def test_labels_are_drawn_in_their_bands():
    x = torch.full((4, 3, 16, 16), 0.2)  # plain tiles: any ink outside them is a label
    plain = np.asarray(labelled_grid(x, 2))
    img = np.asarray(labelled_grid(x, 2, row_labels=["input", "reconstruction"], col_labels=["a", "b"],
                                   title="step 7"))
    assert img.shape[0] > plain.shape[0] and img.shape[1] > plain.shape[1]  # a top band and a left band
    band_w = img.shape[1] - plain.shape[1]  # columns are tile-wide: the extra width is the row band
    band_h = img.shape[0] - plain.shape[0]
    top = img[band_h:]  # the grid part, below the title and column-label bands
    for i in range(2):  # each row's band has ink beside its tiles
        y0 = 2 + i * 18
        assert (top[y0:y0 + 16, :band_w] != WHITE).any(axis=-1).any(), i
    for j in range(2):  # each column label has ink above its column
        x0 = band_w + 2 + j * 18
        assert (img[:band_h, x0:x0 + 16] != WHITE).any(axis=-1).any(), j
    # the tiles themselves are untouched by the labels
    np.testing.assert_array_equal(top[2:18, band_w + 2:band_w + 18], to_uint8(x)[0])


def test_wide_column_labels_widen_columns_and_caption_adds_height():
    x = _images(2, 8, 8)
    narrow = labelled_grid(x, 2, col_labels=["a", "b"])
    wide = labelled_grid(x, 2, col_labels=["a much longer label", "b"])
    assert wide.size[0] > narrow.size[0]
    assert labelled_grid(x, 2, caption="one\ntwo").size[1] > labelled_grid(x, 2).size[1]


@pytest.mark.parametrize("kwargs, match", [
    ({"row_labels": ["only one"]}, "row_labels"),
    ({"col_labels": ["a", "b", "c"]}, "col_labels"),
    ({"scale": 0}, "scale"),
    ({"nrow": 0}, "nrow"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"nrow": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        labelled_grid(_images(4), **args)


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="images"):
        labelled_grid(torch.zeros(3, 8, 8), 2)


def test_tint_holes_paints_only_the_holes():
    x = _images(2, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:6] = 1
    y = tint_holes(x, mask)
    assert torch.equal(y * (1 - mask), x * (1 - mask))
    assert torch.equal(y[:, :, 2:5, 3:6], torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 3, 3))


def test_saved_grid_is_a_png(tmp_path):
    path = save_labelled_grid(str(tmp_path / "sub" / "g.png"), _images(2), 2, col_labels=["x", "y"])
    assert Image.open(path).size == labelled_grid(_images(2), 2, col_labels=["x", "y"]).size


def test_asymmetric_grid_shows_the_mask(tmp_path, monkeypatch):
    """The trainer's reconstruction grid of an asymmetric run has a labelled
    mask row equal to the masks the decoder is given, and the decoder-input
    row is the input with exactly those holes tinted (no unexplained black
    tile)."""
    from pyvq.data import MaskGenerator
    from pyvq.models.tokenizers import VQGAN
    from pyvq.train.config import TrainConfig
    from pyvq.train.trainer import Trainer

    torch.manual_seed(0)
    base = VQGAN.from_preset("vqgan_tiny")
    base.save_pretrained(str(tmp_path / "base" / "model"))
    config = TrainConfig(model="asym_vqgan_tiny", base=str(tmp_path / "base"), data="builtin", image_size=32,
                         batch_size=4, steps=2, perceptual_weight=0.0, disc_start=10, image_every=2, seed=3)
    t = Trainer(config, str(tmp_path / "asym"))
    seen = {}
    real = t.logger.image_grid

    def spy(step, name, images, nrow=8, **labels):
        seen.update(images=images.clone(), nrow=nrow, **labels)
        return real(step, name, images, nrow, **labels)

    monkeypatch.setattr(t.logger, "image_grid", spy)
    t.train(progress=False)
    labels, nrow = seen["row_labels"], seen["nrow"]
    assert nrow == 4 and len(labels) == 5 and seen["images"].shape[0] == 5 * nrow
    rows = seen["images"].view(5, nrow, 3, 32, 32)
    gen = MaskGenerator(kind="mixed", seed=3)
    mask = torch.stack([gen(32, 32, index=i) for i in range(nrow)]).float()
    assert 0 < float(mask.mean()) < 1
    mask_row = [i for i, s in enumerate(labels) if s.startswith("mask")]
    assert mask_row == [1]
    torch.testing.assert_close(rows[1], (mask * 2 - 1).expand(-1, 3, -1, -1))
    holes = rows[2]
    torch.testing.assert_close(holes * (1 - mask), rows[0] * (1 - mask))
    assert torch.equal(holes[:, 1][mask[:, 0] > 0], torch.full_like(holes[:, 1][mask[:, 0] > 0], -1.0))
    png = Image.open(tmp_path / "asym" / "images" / "reconstruction_0000002.png")
    assert png.size[1] > 5 * 64  # five labelled rows of 2x-enlarged 32 px tiles


def test_plain_grid_has_input_and_reconstruction_rows(tmp_path, monkeypatch):
    from pyvq.train.config import TrainConfig
    from pyvq.train.trainer import Trainer

    config = TrainConfig(model="vqgan_tiny", data="builtin", image_size=32, batch_size=2, steps=1,
                         perceptual_weight=0.0, disc_start=10, image_every=1)
    t = Trainer(config, str(tmp_path / "r"))
    seen = {}
    monkeypatch.setattr(t.logger, "image_grid", lambda step, name, images, nrow=8, **kw: seen.update(step=step, **kw))
    t.train(progress=False)
    assert seen["row_labels"] == ["input", "reconstruction"] and seen["title"] == "step 1"
    assert "edge" in seen["caption"]
