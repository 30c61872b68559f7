"""Partial convolution (Liu et al., "Image Inpainting for Irregular Holes
Using Partial Convolutions", ECCV 2018).

Mask convention: **mask = 1 marks a VALID (known) pixel, 0 a hole.** (The
asymmetric tokenizer, ``pyvq.models.AsymmetricVQGAN``, uses the opposite
convention for its own ``mask`` argument, 1 = hole, and passes ``1 - mask``
here.)

For every output position, with ``W`` the input window and ``M`` the mask
over it::

    sum_M  = sum(M over the window)                  (zero padding counts as hole)
    out    = conv(X * M) * (window_size / sum_M) + bias   if sum_M > 0
           = 0                                            otherwise
    new_mask = 1 if sum_M > 0 else 0

``window_size`` is ``kh * kw`` for a single-channel mask and
``in_channels * kh * kw`` for a per-channel mask (``multi_channel=True``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PartialConv2d"]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"PartialConv2d: expected an int or a pair of ints, got {v!r}")
    return v


class PartialConv2d(nn.Module):
    """2-D partial convolution; see the module docstring.

    Args:
        in_ch, out_ch: channels.
        kernel_size, stride, padding: as ``nn.Conv2d`` (zero padding, which
            the mask treats as holes).
        bias: add a learnable bias (only where the window saw a valid pixel).
        multi_channel: the mask has one channel per input channel
            (B, in_ch, H, W) and the returned mask one per output channel
            (B, out_ch, H', W'), all equal; else the mask is (B, 1, H, W)
            and so is the returned one.

    ``forward(x, mask=None) -> (out, new_mask)``:
        x: (B, in_ch, H, W) floating point.
        mask: 1 = valid, 0 = hole, binary; (B, 1, H, W) (or (B, in_ch, H, W)
            with ``multi_channel``); a batch dimension of 1 broadcasts.
            ``None`` means every pixel is valid (a plain conv, apart from
            the rescaling at the zero-padded border).
        out: (B, out_ch, H', W'); new_mask: (B, 1 or out_ch, H', W'), in x's
            dtype. No gradient flows into the mask.

    Parameters ``weight`` (out_ch, in_ch, kh, kw) and ``bias`` (out_ch,) are
    initialised like ``nn.Conv2d``'s.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        multi_channel: bool = False,
    ):
        super().__init__()
        if in_ch < 1 or out_ch < 1:
            raise ValueError(f"PartialConv2d: channels must be >= 1, got in_ch={in_ch}, out_ch={out_ch}")
        self.in_channels = int(in_ch)
        self.out_channels = int(out_ch)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.multi_channel = bool(multi_channel)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_ch)) if bias else None
        self.reset_parameters()

    @property
    def window_size(self) -> int:
        kh, kw = self.kernel_size
        return kh * kw * (self.in_channels if self.multi_channel else 1)

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, multi_channel={self.multi_channel}"
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PartialConv2d: argument 'x' must have shape (B, {self.in_channels}, H, W), got "
                + (f"{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
            )
        mask_ch = self.in_channels if self.multi_channel else 1
        if mask is None:
            mask = x.new_ones(1, mask_ch, x.shape[2], x.shape[3])
        elif (
            not isinstance(mask, torch.Tensor)
            or mask.dim() != 4
            or mask.shape[1] != mask_ch
            or mask.shape[2:] != x.shape[2:]
            or mask.shape[0] not in (1, x.shape[0])
        ):
            raise ValueError(
                f"PartialConv2d: argument 'mask' must have shape (B or 1, {mask_ch}, {x.shape[2]}, {x.shape[3]}), got "
                + (f"{tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
            )
        mask = mask.detach().to(dtype=x.dtype)
        if mask.shape[0] != x.shape[0]:
            mask = mask.expand(x.shape[0], -1, -1, -1)

        with torch.no_grad():
            ones = mask.new_ones(1, mask_ch, *self.kernel_size)
            msum = F.conv2d(mask, ones, stride=self.stride, padding=self.padding)  # (B, 1, H', W')
            valid = (msum > 0).to(x.dtype)
            ratio = torch.where(msum > 0, self.window_size / msum.clamp_min(torch.finfo(x.dtype).tiny), 0.0)

        out = F.conv2d(x * mask, self.weight, None, stride=self.stride, padding=self.padding) * ratio
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1) * valid
        new_mask = valid.expand(-1, self.out_channels, -1, -1).contiguous() if self.multi_channel else valid
        return out, new_mask
