"""pyvq.nn.stylegan: the grouped-conv modulation against a per-sample conv,
demodulation, the skip generator, minibatch stddev, the residual critic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyvq.nn.stylegan import (
    EqualConv2d,
    EqualLinear,
    MinibatchStddev,
    ModulatedConv2d,
    ResidualDiscriminator,
    StyleMLP,
    SynthesisNetwork,
    ToRGB,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_equalized_layers_scale_weights_at_run_time():
    torch.manual_seed(0)
    lin = EqualLinear(16, 8, bias_init=0.5, lr_mul=0.1)
    x = torch.randn(3, 16)
    expected = x @ (lin.weight * 0.1 / 4).t() + 0.5
    torch.testing.assert_close(lin(x), expected)
    conv = EqualConv2d(4, 6, 3)
    y = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(y), F.conv2d(y, conv.weight / 6, conv.bias, padding=1))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.2)  # stored N(0, 1)


@pytest.mark.parametrize("demodulate, upsample", [(True, False), (False, False), (True, True)])
def test_modulated_conv_equals_per_sample_conv(demodulate, upsample):
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, style_dim=6, demodulate=demodulate, upsample=upsample)
    x, w = torch.randn(3, 5, 6, 4), torch.randn(3, 6)
    out = conv(x, w)
    s = conv.affine(w)
    for b in range(3):
        weight = conv.weight * s[b].view(1, 5, 1, 1) / math.sqrt(5 * 9)
        if demodulate:
            weight = weight / weight.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        xb = x[b : b + 1]
        if upsample:
            xb = F.interpolate(xb, scale_factor=2.0, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[b : b + 1], F.conv2d(xb, weight, padding=1), rtol=1e-4, atol=1e-5)
    assert out.shape == ((3, 7, 12, 8) if upsample else (3, 7, 6, 4))


def test_demodulation_removes_the_style_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    demod, plain = ModulatedConv2d(4, 3, 3, 2), ModulatedConv2d(4, 3, 3, 2, demodulate=False)
    outs = {}
    for c in (1.0, 3.0):
        for name, conv in (("demod", demod), ("plain", plain)):
            with torch.no_grad():  # style scales s = c for every input channel
                conv.affine.weight.zero_()
                conv.affine.bias.fill_(c)
            outs[name, c] = conv(x, torch.randn(2, 2))
    torch.testing.assert_close(outs["demod", 3.0], outs["demod", 1.0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["plain", 3.0], 3 * outs["plain", 1.0], rtol=1e-5, atol=1e-5)


def test_style_mlp():
    torch.manual_seed(0)
    mlp = StyleMLP(10, 16, num_layers=3)
    x = torch.randn(4, 10)
    assert mlp(x).shape == (4, 16)
    torch.testing.assert_close(mlp(5 * x), mlp(x))  # input normalisation
    assert len(mlp.layers) == 3


def test_synthesis_network_skip_output_and_gradients():
    torch.manual_seed(0)
    net = SynthesisNetwork(8, (16, 8, 4), style_dim=6, out_channels=3)
    x, w = torch.randn(2, 8, 4, 5), torch.randn(2, 6)
    img = net(x, w)
    assert img.shape == (2, 3, 16, 20) and net.upsample_factor == 4
    assert net.last_layer() is net.blocks[-1].torgb.conv.weight
    img.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # skip architecture: the image is the upsampled sum of every ToRGB output
    with torch.no_grad():
        h = net.input(x, w)
        expected = net.input_rgb(h, w)
        for block in net.blocks:
            h = block.conv1(block.conv0(h, w), w)
            expected = F.interpolate(expected, scale_factor=2.0, mode="bilinear", align_corners=False)
            expected = expected + block.torgb(h, w)
        torch.testing.assert_close(net(x, w), expected)


def test_torgb_adds_upsampled_skip():
    torch.manual_seed(0)
    rgb = ToRGB(4, 3)
    x, w, skip = torch.randn(2, 4, 6, 6), torch.randn(2, 3), torch.randn(2, 3, 3, 3)
    up = F.interpolate(skip, scale_factor=2.0, mode="bilinear", align_corners=False)
    torch.testing.assert_close(rgb(x, w, skip), rgb(x, w) + up)


def test_minibatch_stddev():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    out = MinibatchStddev(group_size=2)(x)
    assert out.shape == (4, 4, 2, 2)
    # groups are samples {0, 2} and {1, 3}
    for members in ((0, 2), (1, 3)):
        std = x[list(members)].std(dim=0, unbiased=False).mean()
        for n in members:
            torch.testing.assert_close(out[n, 3], torch.full((2, 2), std.item()), rtol=1e-4, atol=1e-6)
    assert MinibatchStddev(4)(torch.randn(3, 2, 2, 2)).shape == (3, 3, 2, 2)  # group shrinks to divide B


def test_residual_discriminator():
    torch.manual_seed(0)
    d = ResidualDiscriminator(32, channels=8, max_channels=32)
    assert len(d.blocks) == 3  # 32 -> 16 -> 8 -> 4
    assert [b.conv1.weight.shape[0] for b in d.blocks] == [16, 32, 32]
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = d(x)
    assert out.shape == (4, 1)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.parameters())
    assert ResidualDiscriminator(8, channels=4, mbstd_group=0)(torch.randn(3, 3, 8, 8)).shape == (3, 1)
    with pytest.raises(ValueError, match="shape"):
        d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="resolution"):
        ResidualDiscriminator(24)
    with pytest.raises(ValueError, match="mbstd_group"):
        ResidualDiscriminator(16, mbstd_group=-1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        SynthesisNetwork(4, (), 8)
    with pytest.raises(ValueError, match="style_dim"):
        ModulatedConv2d(4, 4, 3, 0)
    with pytest.raises(ValueError, match="input channels"):
        ModulatedConv2d(4, 4, 3, 2)(torch.randn(1, 5, 4, 4), torch.randn(1, 2))
