"""pyvq.nn.mask_decoder: the condition encoder's layers and features, the
mask-conditioned decoder's blend points, its argument checks, and the
concat fuse's identity initialisation."""

from __future__ import annotations

import pytest
import torch

from pyvq.nn import BLEND_MODES, ConditionEncoder, Decoder, MaskConditionDecoder, PartialConv2d, mask_guided_blend


pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = dict(out_ch=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=32)


def test_blend_modes():
    assert BLEND_MODES == ("add", "concat")


@pytest.mark.parametrize("partial", [False, True])
def test_condition_encoder_layers_and_features(partial):
    torch.manual_seed(0)
    channels = [8, 16, 24, 32]
    enc = ConditionEncoder(3, channels, partial=partial)
    kind = PartialConv2d if partial else torch.nn.Conv2d
    assert len(enc.layers) == 4 and all(isinstance(layer, kind) for layer in enc.layers)
    assert [layer.kernel_size for layer in enc.layers] == [(3, 3), (3, 3), (4, 4), (4, 4)]
    assert [layer.stride for layer in enc.layers] == [(1, 1), (1, 1), (2, 2), (2, 2)]
    assert [layer.out_channels for layer in enc.layers] == channels
    y, valid = torch.randn(2, 3, 16, 16), torch.ones(2, 1, 16, 16)
    feats = enc(y, valid)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 16), (2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4)]
    # features are taken before the ReLU: negative values survive, and the next layer sees relu(feature)
    assert all((f < 0).any() for f in feats)
    if not partial:
        torch.testing.assert_close(feats[1], enc.layers[1](torch.relu(feats[0])))


def test_partial_condition_encoder_with_all_valid_mask_is_a_conv():
    """With every pixel valid and no padding reached, a PartialConv2d is the
    plain convolution: the centre of the first feature map matches."""
    torch.manual_seed(0)
    enc = ConditionEncoder(3, [8, 8], partial=True)
    y = torch.randn(1, 3, 12, 12)
    f0 = enc(y, torch.ones(1, 1, 12, 12))[0]
    plain = torch.nn.functional.conv2d(y, enc.layers[0].weight, enc.layers[0].bias, padding=1)
    torch.testing.assert_close(f0[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1])


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_decoder_blend_channels_and_condition_features(blend):
    torch.manual_seed(0)
    cond_ch = 32 if blend == "add" else 16
    dec = MaskConditionDecoder(blend=blend, cond_ch=cond_ch, **ARCH)
    assert isinstance(dec, Decoder)
    # final blend, then the inputs of up[0], up[1], up[2] (ch * ch_mult[i + 1], ch_mult[-1] for the lowest)
    assert dec.blend_channels == [32, 64, 64, 64]
    assert [layer.out_channels for layer in dec.condition_encoder.layers] == [cond_ch * m for m in (1, 2, 2, 2)]
    assert dec.cond_in_channels == 3
    assert hasattr(dec, "fuse") == (blend == "concat")
    y, mask = torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)
    feats = dec.condition_features(y, mask)
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8]
    out = dec(torch.randn(2, 4, 8, 8), y, mask)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_concat_fuse_starts_as_identity():
    torch.manual_seed(0)
    dec = MaskConditionDecoder(blend="concat", cond_ch=16, **ARCH)
    f_dec, f_cond = torch.randn(2, 64, 8, 8), torch.randn(2, 32, 8, 8)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    torch.testing.assert_close(dec._blend(3, f_dec, f_cond, mask), f_dec)


def test_add_blend_is_mask_guided_blend():
    torch.manual_seed(0)
    dec = MaskConditionDecoder(blend="add", **ARCH)
    f_dec, f_cond = torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    torch.testing.assert_close(dec._blend(3, f_dec, f_cond, mask), mask_guided_blend(f_dec, f_cond, mask))


def test_mask_guided_blend_resizes_the_mask_by_nearest():
    f_dec, f_cond = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0  # the top-left quarter is hole
    out = mask_guided_blend(f_dec, f_cond, mask)
    expected = torch.ones(1, 2, 2, 2)
    expected[..., 0, 0] = 0.0
    torch.testing.assert_close(out, expected)


def test_decoder_argument_checks():
    with pytest.raises(ValueError, match="'blend' must be one of"):
        MaskConditionDecoder(blend="mul", **ARCH)
    with pytest.raises(ValueError, match=r"blend='add' needs cond_ch == ch \(32\), got 16"):
        MaskConditionDecoder(blend="add", cond_ch=16, **ARCH)
    with pytest.raises(ValueError, match="'cond_ch' must be >= 1, got 0"):
        MaskConditionDecoder(blend="concat", cond_ch=0, **ARCH)
    dec = MaskConditionDecoder(**ARCH)
    z, y, mask = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match="both 'masked_image' and 'mask'"):
        dec(z, mask=mask)
    with pytest.raises(ValueError, match=r"'masked_image' must have shape \(B, 3, 32, 32\), got \(1, 3, 16, 16\)"):
        dec(z, y[..., :16, :16], mask)
    with pytest.raises(ValueError, match=r"'mask' must have shape \(B, 1, 32, 32\), got \(1, 3, 32, 32\)"):
        dec(z, y, y)

