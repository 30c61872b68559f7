"""pyvq.nn.blocks: shapes, the attention math, asymmetric downsampling
padding, and taming-transformers' submodule names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyvq.nn import AttnBlock, Decoder, Downsample, Encoder, Normalize, ResnetBlock, Upsample


pytestmark = pytest.mark.usefixtures("one_thread")


def test_normalize_is_groupnorm_32_eps_1e6():
    norm = Normalize(64)
    assert isinstance(norm, torch.nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.eps, norm.affine) == (32, 64, 1e-6, True)
    with pytest.raises(ValueError, match="divisible"):
        Normalize(48)


@pytest.mark.parametrize(
    "in_ch, out_ch, conv_shortcut, shortcut",
    [(32, None, False, None), (32, 64, False, "nin_shortcut"), (64, 32, True, "conv_shortcut")],
)
def test_resnet_block(in_ch, out_ch, conv_shortcut, shortcut):
    torch.manual_seed(0)
    block = ResnetBlock(in_ch, out_ch, dropout=0.1, conv_shortcut=conv_shortcut).eval()
    out = block(torch.randn(2, in_ch, 6, 5))
    assert out.shape == (2, out_ch or in_ch, 6, 5)
    names = {k.rsplit(".", 1)[0] for k in block.state_dict()}
    expected = {"norm1", "conv1", "norm2", "conv2"} | ({shortcut} if shortcut else set())
    assert names == expected
    assert isinstance(block.dropout, torch.nn.Dropout)
    if shortcut == "conv_shortcut":
        assert block.conv_shortcut.kernel_size == (3, 3)
    if shortcut == "nin_shortcut":
        assert block.nin_shortcut.kernel_size == (1, 1)


def test_resnet_block_identity_skip_math():
    torch.manual_seed(0)
    block = ResnetBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h)))
    torch.testing.assert_close(block(x), x + h)


@pytest.mark.parametrize("shape", [(2, 32, 4, 4), (1, 64, 3, 7)])
def test_attn_block_matches_handwritten_softmax(shape):
    torch.manual_seed(0)
    b, c, h, w = shape
    attn = AttnBlock(c).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = attn.norm(x)
    q = attn.q(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    k = attn.k(y).reshape(b, c, h * w)  # (B, C, HW)
    v = attn.v(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    weights = torch.softmax(q @ k / math.sqrt(c), dim=-1)  # (B, HW query, HW key)
    out = (weights @ v).transpose(1, 2).reshape(b, c, h, w)
    expected = x + attn.proj_out(out)
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)
    assert sorted({k.rsplit(".", 1)[0] for k in attn.state_dict()}) == ["k", "norm", "proj_out", "q", "v"]


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
@pytest.mark.parametrize("with_conv", [True, False])
def test_downsample_upsample_shapes(size, with_conv):
    x = torch.randn(2, 32, *size)
    d = Downsample(32, with_conv)(x)
    assert d.shape == (2, 32, size[0] // 2, size[1] // 2)
    u = Upsample(32, with_conv)(x)
    assert u.shape == (2, 32, 2 * size[0], 2 * size[1])
    if not with_conv:
        torch.testing.assert_close(u, x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_downsample_pads_only_bottom_right():
    # Output (0, 0) sees input rows/cols 0..2 (no top-left padding); output
    # (-1, -1) of an even-sized input overlaps the one padded row/col.
    torch.manual_seed(0)
    down = Downsample(4, True).double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    out = down(x)
    w, bias = down.conv.weight, down.conv.bias
    torch.testing.assert_close(out[0, :, 0, 0], (w * x[0, :, 0:3, 0:3]).sum((1, 2, 3)) + bias)
    padded = F.pad(x, (0, 1, 0, 1))[0, :, 6:9, 6:9]
    torch.testing.assert_close(out[0, :, -1, -1], (w * padded).sum((1, 2, 3)) + bias)


TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)


@pytest.mark.parametrize(
    "arch, z_channels, double_z, size",
    [
        (TINY, 8, True, (32, 32)),
        (TINY, 4, False, (16, 24)),
        (dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2, attn_resolutions=(), resolution=32), 16, False, (32, 32)),
        (dict(ch=32, ch_mult=(2,), num_res_blocks=1, attn_resolutions=(8,), resolution=8), 4, True, (8, 8)),
    ],
)
def test_encoder_decoder_shapes(arch, z_channels, double_z, size):
    torch.manual_seed(0)
    f = 2 ** (len(arch["ch_mult"]) - 1)
    enc = Encoder(in_channels=3, z_channels=z_channels, double_z=double_z, **arch)
    dec = Decoder(out_ch=3, z_channels=z_channels, **arch)
    x = torch.randn(2, 3, *size)
    z = enc(x)
    assert z.shape == (2, z_channels * (2 if double_z else 1), size[0] // f, size[1] // f)
    y = dec(z[:, :z_channels])
    assert y.shape == x.shape


def test_decoder_pre_end_tanh_and_avgpool():
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8) * 10
    pre = Decoder(out_ch=3, z_channels=4, give_pre_end=True, **TINY)(z)
    assert pre.shape == (1, 32, 32, 32)
    out = Decoder(out_ch=3, z_channels=4, tanh_out=True, **TINY)(z)
    assert out.abs().max() <= 1
    enc = Encoder(in_channels=3, z_channels=4, double_z=False, resamp_with_conv=False, **TINY)
    assert not any("downsample" in k for k in enc.state_dict())
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 4, 8, 8)


def test_taming_submodule_names_and_attention_placement():
    enc = Encoder(in_channels=3, z_channels=8, double_z=True, **TINY)
    dec = Decoder(out_ch=3, z_channels=8, **TINY)
    ek, dk = set(enc.state_dict()), set(dec.state_dict())
    for key in [
        "conv_in.weight",
        "down.0.block.0.norm1.weight",
        "down.0.block.0.conv1.bias",
        "down.0.downsample.conv.weight",
        "down.1.block.0.nin_shortcut.weight",
        "down.1.attn.0.q.weight",
        "down.1.attn.0.proj_out.bias",
        "mid.block_1.conv2.weight",
        "mid.attn_1.k.weight",
        "mid.attn_1.norm.bias",
        "mid.block_2.norm2.weight",
        "norm_out.weight",
        "conv_out.weight",
    ]:
        assert key in ek, key
    for key in [
        "conv_in.weight",
        "mid.attn_1.v.weight",
        "up.0.block.1.conv2.weight",
        "up.0.block.0.nin_shortcut.weight",
        "up.1.attn.1.q.weight",
        "up.1.upsample.conv.weight",
        "up.2.upsample.conv.weight",
        "norm_out.bias",
        "conv_out.bias",
    ]:
        assert key in dk, key
    assert not any(k.startswith("down.2.downsample") for k in ek)  # last level keeps its size
    assert not any(k.startswith("up.0.upsample") for k in dk)  # first level is the output one
    assert not any("temb" in k for k in ek | dk)
    # Attention only at nominal resolution 16 (level 1 for resolution 32).
    assert [len(level.attn) for level in enc.down] == [0, 1, 0]
    assert [len(level.attn) for level in dec.up] == [0, 2, 0]
    assert [len(level.block) for level in dec.up] == [2, 2, 2]
    # up[i] has the channels of down[i]: 32, 64, 64.
    assert [level.block[-1].out_channels for level in dec.up] == [32, 64, 64]
    assert enc.conv_out.out_channels == 16
