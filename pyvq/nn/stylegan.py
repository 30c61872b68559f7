"""StyleGAN2-style layers (Karras et al., "Analyzing and Improving the Image
Quality of StyleGAN"): a style MLP, weight-modulated convolutions, a
skip-architecture synthesis network and a residual discriminator.

Choices, kept small and readable:

* Equalized learning rate everywhere here: weights are stored N(0, 1) (times
  ``1 / lr_mul``) and scaled at run time by ``lr_mul / sqrt(fan_in)``, so Adam
  at StyleGAN2's lr (2e-3) moves every layer at the same relative rate.
* Upsampling is bilinear x2 followed by the 3x3 (modulated) conv, and the
  skip images are upsampled bilinearly; StyleGAN2's transposed conv + FIR
  blur is not reproduced.
* Downsampling in the discriminator is a 2x2 average pool (after the second
  conv on the main path, before the 1x1 conv on the skip path).
* No per-pixel noise inputs: the synthesis network is deterministic, as a
  tokenizer decoder must be.
* Activations are leaky ReLU (0.2) times sqrt(2) (StyleGAN2's gain).

Shapes are channels-first, (B, C, H, W); styles are (B, style_dim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_int, check_positive_ints

__all__ = [
    "EqualConv2d",
    "EqualLinear",
    "MinibatchStddev",
    "ModulatedConv2d",
    "ResidualDiscriminator",
    "StyleMLP",
    "StyledConv",
    "SynthesisBlock",
    "SynthesisNetwork",
    "ToRGB",
    "lrelu_gain",
]

_SQRT2 = math.sqrt(2.0)


def lrelu_gain(x: torch.Tensor) -> torch.Tensor:
    """leaky_relu(x, 0.2) * sqrt(2) (keeps the signal's second moment)."""
    return F.leaky_relu(x, 0.2) * _SQRT2


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate.

    Args:
        in_dim, out_dim: sizes.
        bias_init: initial bias value.
        lr_mul: learning-rate multiplier (StyleGAN2's mapping network: 0.01).
        activation: apply ``lrelu_gain`` after the bias.
    """

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        check_positive_ints(dict(in_dim=in_dim, out_dim=out_dim), where="EqualLinear")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init) / lr_mul)) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = bool(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        out = F.linear(x, self.weight * self.scale, bias)
        return lrelu_gain(out) if self.activation else out


class EqualConv2d(nn.Module):
    """Conv2d (stride 1, "same" padding) with equalized learning rate."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, bias: bool = True):
        super().__init__()
        check_positive_ints(dict(in_ch=in_ch, out_ch=out_ch, kernel_size=kernel_size), where="EqualConv2d")
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class StyleMLP(nn.Module):
    """Mapping network: ``num_layers`` EqualLinear + lrelu layers.

    Args:
        in_dim: input size.
        style_dim: output (style) size; hidden layers have this width.
        num_layers: >= 1.
        lr_mul: learning-rate multiplier of every layer (StyleGAN2: 0.01).
        normalize_input: divide the input by its root mean square first
            (StyleGAN2's normalisation of z).

    Shapes: (B, in_dim) -> (B, style_dim).
    """

    def __init__(self, in_dim: int, style_dim: int, num_layers: int = 2, *, lr_mul: float = 0.01,
                 normalize_input: bool = True):
        super().__init__()
        check_positive_ints(dict(in_dim=in_dim, style_dim=style_dim, num_layers=num_layers), where="StyleMLP")
        self.normalize_input = bool(normalize_input)
        dims = [in_dim] + [style_dim] * num_layers
        self.layers = nn.Sequential(
            *[EqualLinear(dims[i], dims[i + 1], lr_mul=lr_mul, activation=True) for i in range(num_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            x = x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)
        return self.layers(x)


class ModulatedConv2d(nn.Module):
    """Conv2d whose weight is scaled per input channel by a style (and,
    with ``demodulate``, renormalised per output channel).

    ``w'_{b,o,i,k} = w_{o,i,k} * s_{b,i}``, then (demodulate)
    ``w''_{b,o,i,k} = w' / sqrt(sum_{i,k} w'^2 + 1e-8)``; the batch is run as
    one grouped convolution (``groups=B``) with the per-sample weights.

    Args:
        in_ch, out_ch, kernel_size: the convolution ("same" padding).
        style_dim: size of the style vector; an ``EqualLinear`` (``affine``,
            bias initialised to 1) maps it to the ``in_ch`` scales.
        demodulate: weight demodulation (False for toRGB layers).
        upsample: bilinear x2 upsampling of the input before the conv.

    Shapes: x (B, in_ch, H, W), style (B, style_dim) -> (B, out_ch, H', W'),
    H' = 2H with ``upsample``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, *, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        check_positive_ints(dict(in_ch=in_ch, out_ch=out_ch, kernel_size=kernel_size, style_dim=style_dim), where="ModulatedConv2d")
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.demodulate = bool(demodulate)
        self.upsample = bool(upsample)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.affine = EqualLinear(style_dim, in_ch, bias_init=1.0)

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, demodulate={self.demodulate}, "
                f"upsample={self.upsample}")

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.in_ch:
            raise ValueError(f"ModulatedConv2d: expected {self.in_ch} input channels, got {C}")
        s = self.affine(style)  # (B, in_ch)
        weight = self.scale * self.weight.unsqueeze(0) * s.view(B, 1, C, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            H, W = 2 * H, 2 * W
        out = F.conv2d(
            x.reshape(1, B * C, H, W),
            weight.reshape(B * self.out_ch, C, self.kernel_size, self.kernel_size),
            padding=self.kernel_size // 2,
            groups=B,
        )
        return out.reshape(B, self.out_ch, H, W)


class StyledConv(nn.Module):
    """Modulated 3x3 conv (demodulated) + bias + lrelu; optional x2 upsampling."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, *, upsample: bool = False, kernel_size: int = 3):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return lrelu_gain(self.conv(x, style) + self.bias.view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, without demodulation, plus a
    bias; adds the bilinearly x2-upsampled ``skip`` image when given."""

    def __init__(self, in_ch: int, style_dim: int, out_channels: int = 3):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_channels, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias.view(1, -1, 1, 1)
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2.0, mode="bilinear", align_corners=False)
        return out


class SynthesisBlock(nn.Module):
    """One x2 resolution step of the skip generator: ``conv0`` (upsampling),
    ``conv1``, ``torgb``; returns the features and the running image."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, out_channels: int = 3):
        super().__init__()
        self.conv0 = StyledConv(in_ch, out_ch, style_dim, upsample=True)
        self.conv1 = StyledConv(out_ch, out_ch, style_dim)
        self.torgb = ToRGB(out_ch, style_dim, out_channels)

    def forward(self, x: torch.Tensor, img: torch.Tensor, style: torch.Tensor):
        x = self.conv1(self.conv0(x, style), style)
        return x, self.torgb(x, style, skip=img)


class SynthesisNetwork(nn.Module):
    """StyleGAN2 "skip" generator that starts from a feature map instead of a
    learned constant.

    Args:
        in_channels: channels of the input feature map.
        channels: channels per resolution, starting at the input's: a
            ``StyledConv`` + ``ToRGB`` at the input resolution (``input``,
            ``input_rgb``), then one ``SynthesisBlock`` (x2) per further entry.
        style_dim: style size (one style for every layer).
        out_channels: image channels.

    Shapes: x (B, in_channels, H, W), style (B, style_dim) ->
    (B, out_channels, H * 2**(len(channels) - 1), W * 2**(len(channels) - 1)),
    the sum of the ToRGB outputs of all resolutions (no output activation).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], style_dim: int, out_channels: int = 3):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(
                f"SynthesisNetwork: argument 'channels' must be non-empty with entries >= 1, got {channels}"
            )
        check_positive_ints(dict(in_channels=in_channels, style_dim=style_dim, out_channels=out_channels), where="SynthesisNetwork")
        self.upsample_factor = 2 ** (len(channels) - 1)
        self.input = StyledConv(in_channels, channels[0], style_dim)
        self.input_rgb = ToRGB(channels[0], style_dim, out_channels)
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels[i], channels[i + 1], style_dim, out_channels) for i in range(len(channels) - 1)
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.input(x, style)
        img = self.input_rgb(x, style)
        for block in self.blocks:
            x, img = block(x, img, style)
        return img

    def last_layer(self) -> torch.Tensor:
        """The weight of the last ToRGB conv."""
        last = self.blocks[-1].torgb if len(self.blocks) else self.input_rgb
        return last.conv.weight


class MinibatchStddev(nn.Module):
    """Append the mean standard deviation over groups of samples as
    ``num_channels`` extra feature maps (StyleGAN2's minibatch-stddev layer).

    The group size is ``min(group_size, B)``, reduced until it divides B.
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        check_positive_ints(dict(group_size=group_size, num_channels=num_channels), where="MinibatchStddev")
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g = min(self.group_size, B)
        while B % g:
            g -= 1
        c = self.num_channels
        if C % c:
            raise ValueError(f"MinibatchStddev: {C} channels are not divisible by num_channels={c}")
        y = x.reshape(g, B // g, c, C // c, H, W)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (B/g, c, C/c, H, W)
        y = y.mean(dim=(2, 3, 4)).reshape(B // g, c, 1, 1)
        y = y.repeat(g, 1, H, W)  # sample n belongs to group n % (B/g)
        return torch.cat([x, y], dim=1)


class _DiscriminatorBlock(nn.Module):
    """Residual block: main path conv0, conv1 (3x3 lrelu) then 2x2 average
    pool; skip path average pool then 1x1 conv without bias; the sum is
    scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_ch, in_ch, 3)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(F.avg_pool2d(x, 2))
        x = F.avg_pool2d(lrelu_gain(self.conv1(lrelu_gain(self.conv0(x)))), 2)
        return (x + y) / _SQRT2


class ResidualDiscriminator(nn.Module):
    """StyleGAN2's "resnet" discriminator.

    ``fromrgb`` (1x1 conv + lrelu) at the input resolution, one residual
    block per halving down to 4x4, then (optionally) the minibatch-stddev
    layer, a 3x3 conv, and two linear layers (``fc`` + lrelu, ``out``) to one
    logit per image.

    Args:
        resolution: input side length, a power of two >= 4; inputs must be
            (B, in_channels, resolution, resolution).
        in_channels: image channels.
        channels: channels at the input resolution; each halving doubles
            them, up to ``max_channels``.
        max_channels: channel cap.
        mbstd_group: minibatch-stddev group size; 0 leaves the layer out.

    Shapes: (B, in_channels, resolution, resolution) -> (B, 1).
    """

    def __init__(self, resolution: int, in_channels: int = 3, channels: int = 64, max_channels: int = 512,
                 mbstd_group: int = 4):
        super().__init__()
        check_positive_ints(dict(resolution=resolution, in_channels=in_channels, channels=channels,
                  max_channels=max_channels), where="ResidualDiscriminator")
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(
                f"ResidualDiscriminator: argument 'resolution' must be a power of two >= 4, got {resolution}"
            )
        check_int("mbstd_group", mbstd_group, where="ResidualDiscriminator", minimum=0)
        self.resolution, self.in_channels = resolution, in_channels

        def ch(res: int) -> int:
            return min(max_channels, channels * (resolution // res))

        self.fromrgb = EqualConv2d(in_channels, ch(resolution), 1)
        blocks, res = [], resolution
        while res > 4:
            blocks.append(_DiscriminatorBlock(ch(res), ch(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = ch(4)
        self.mbstd = MinibatchStddev(mbstd_group) if mbstd_group else None
        self.conv = EqualConv2d(c4 + (1 if mbstd_group else 0), c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, activation=True)
        self.out = EqualLinear(c4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(
                f"ResidualDiscriminator: input must have shape (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}), got {tuple(x.shape)}"
            )
        h = self.blocks(lrelu_gain(self.fromrgb(x)))
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = lrelu_gain(self.conv(h))
        return self.out(self.fc(h.flatten(1)))
