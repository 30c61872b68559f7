"""Which codes inpainting keeps: ``tokenizer.known_codes(mask)`` for the VQ
tokenizers (the f x f block rule) and for BRICS (its tiling), and
``inpaint_image`` / ``pyvq inpaint`` keeping exactly those (issue 15, section
4). The perturbation tests of the BRICS rule are in tests/models/test_brics.py."""

from __future__ import annotations

import os

import pytest
import torch

from pyvq.models import BRICS, VQGAN, EfficientVQGAN
from pyvq.train.generate import box_mask, inpaint_image, outpaint_canvas
from pyvq.train.prior_trainer import build_prior

pytestmark = pytest.mark.usefixtures("one_thread")


def _loop_block_rule(mask: torch.Tensor, f: int) -> torch.Tensor:
    """Code (a, b) is known when pixels [a f, (a+1) f) x [b f, (b+1) f) are unmasked."""
    H, W = mask.shape[-2:]
    return torch.tensor([[not mask[..., a * f:(a + 1) * f, b * f:(b + 1) * f].any() for b in range(W // f)]
                         for a in range(H // f)])


def _interleave_rule(mask: torch.Tensor, f: int, t: int) -> torch.Tensor:
    """Key (a, b) of an h x w map feeds feature cells (a + p h, b + q w), p, q < t,
    each decoded into the (f / t) x (f / t) pixel block at its cell."""
    H, W = mask.shape[-2:]
    h, w, s = H // f, W // f, f // t
    return torch.tensor([[not any(mask[..., (a + p * h) * s:(a + p * h + 1) * s,
                                       (b + q * w) * s:(b + q * w + 1) * s].any()
                                  for p in range(t) for q in range(t))
                          for b in range(w)] for a in range(h)])


def _masks(size: int):
    g = torch.Generator().manual_seed(0)
    yield box_mask(size, (5, 9, 14, 20))[0]
    yield outpaint_canvas(torch.zeros(3, size, size), 4)[1][0]  # a frame one f = 4 code wide
    yield (torch.rand(size, size, generator=g) < 0.02).float()  # scattered pixels
    yield torch.zeros(size, size)


@pytest.mark.parametrize("preset", ["vqgan_tiny", "effvqgan_tiny"])
def test_vq_tokenizers_keep_codes_whose_block_is_unmasked(preset):
    torch.manual_seed(0)
    model = (VQGAN if preset == "vqgan_tiny" else EfficientVQGAN).from_preset(preset)
    f = model.downsample_factor
    for mask in _masks(32):
        assert torch.equal(model.known_codes(mask), _loop_block_rule(mask, f))
    mask = box_mask(32, (8, 8, 9, 9))
    assert (~model.known_codes(mask)).sum() == 1  # one masked pixel: one code generated
    with pytest.raises(ValueError, match=rf"{type(model).__name__}.known_codes: .*multiples of {f}"):
        model.known_codes(torch.zeros(32, 30))


@pytest.mark.parametrize("tiling", ["interleave", "nearest"])
def test_brics_known_codes_follow_the_tiling(tiling):
    torch.manual_seed(0)
    model = BRICS.from_preset("brics_tiny", tiling=tiling)
    f, t = model.downsample_factor, model.config.tile_factor
    for mask in _masks(32):
        expect = _interleave_rule(mask, f, t) if tiling == "interleave" else _loop_block_rule(mask, f)
        assert torch.equal(model.known_codes(mask), expect)


def _brics_and_prior():
    torch.manual_seed(0)
    tokenizer = BRICS.from_preset("brics_tiny")  # interleave tiling, f = 4, tile factor 2
    prior = build_prior("keycode_diffusion_tiny", {"kind": "keys", "shape": [4, 8, 8]}, {"timesteps": 4})
    return tokenizer, prior


def test_inpaint_image_with_brics_keeps_the_tiling_known_keys():
    """The box covers pixels 12..19 = feature cells 6..9 of 16, which keys
    6, 7, 0, 1 (mod 8) feed on each axis: 16 keys generated, not the 4 whose
    own 4 x 4 blocks it covers."""
    tokenizer, prior = _brics_and_prior()
    image = torch.rand(3, 32, 32) * 2 - 1
    mask = box_mask(32, (12, 12, 20, 20))
    out = inpaint_image(prior, tokenizer, image, mask, steps=2)
    expect = torch.ones(8, 8, dtype=torch.bool)
    for a in (0, 1, 6, 7):
        expect[a, [0, 1, 6, 7]] = False
    assert torch.equal(out["keep"], expect)
    with torch.no_grad():
        keys = tokenizer.eval().encode(image[None])[0]
    assert torch.equal(out["codes"][:, expect], keys[:, expect])  # kept keys re-imposed exactly
    assert not torch.equal(out["codes"][:, ~expect], keys[:, ~expect])
    assert torch.equal(out["completion"][:, mask[0] == 0], image[:, mask[0] == 0])


def test_pyvq_inpaint_with_a_brics_prior_counts_the_generated_keys(tmp_path, capsys):
    from PIL import Image

    from pyvq import cli

    tokenizer, prior = _brics_and_prior()
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    prior.save_pretrained(str(tmp_path / "prior"))
    image = (torch.rand(32, 32, 3) * 255).byte().numpy()
    Image.fromarray(image).save(str(tmp_path / "image.png"))
    out = str(tmp_path / "done.png")
    code = cli.main(["inpaint", "--prior", str(tmp_path / "prior"), "--tokenizer", str(tmp_path / "tok"),
                     "--image", str(tmp_path / "image.png"), "--box", "12", "12", "20", "20", "--steps", "2",
                     "--out", out])
    assert code in (0, None) and os.path.getsize(out) > 0
    assert "16 of 64 codes generated" in capsys.readouterr().out  # as in the test above


def test_inpaint_image_needs_the_tokenizers_rule():
    tokenizer, prior = _brics_and_prior()

    class Plain(torch.nn.Module):  # a key-code tokenizer that does not say which codes a mask leaves known
        def __init__(self):
            super().__init__()
            self.inner = tokenizer

        def encode(self, x):
            return self.inner.encode(x)

        def decode(self, keys):
            return self.inner.decode(keys)

    with pytest.raises(ValueError, match="Plain tokenizer has no known_codes"):
        inpaint_image(prior, Plain(), torch.zeros(3, 32, 32), box_mask(32, (0, 0, 4, 4)), steps=1)
