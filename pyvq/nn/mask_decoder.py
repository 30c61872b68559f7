"""The mask-conditioned decoder of the asymmetric VQGAN (Zhu et al.,
"Designing a Better Asymmetric VQGAN for StableDiffusion", 2023): a
``Decoder`` that also sees the known part of the image.

Mask convention: **mask = 1 marks the HOLE** (the region to generate), 0 the
known pixels, (B, 1, H, W); the masked image is ``Y = (1 - mask) * x``. This
is the convention of the paper and of diffusers' ``AsymmetricAutoencoderKL``.
(``PartialConv2d`` uses the opposite one; the condition encoder passes it
``1 - mask``.)

``MaskConditionDecoder`` is ``pyvq.nn.Decoder`` (conv_in, mid, up[i],
norm_out, conv_out, taming names) plus a ``ConditionEncoder``
``condition_encoder.layers[k]`` that maps Y to one feature map per blend
point, and mask-guided blending (MGB) at ``L + 1`` points, L =
``len(ch_mult)``, the placement diffusers' ``MaskConditionDecoder`` uses:

- before the blocks of every level ``up[i]`` (i = L-1 first, right after the
  mid block; the input of ``up[i]`` has ``ch * ch_mult[i + 1]`` channels,
  ``ch * ch_mult[-1]`` for the lowest level, at resolution ``H / 2**i``);
- after ``up[0]``, before ``norm_out`` (``ch * ch_mult[0]`` channels, H).

Condition encoder layers (features taken before the ReLU that follows each):
``layers[0]`` 3x3 conv, 3 -> C_final at full resolution; ``layers[1]`` 3x3
conv, C_final -> C_in[0]; ``layers[k + 1]`` (k = 1..L-1) 4x4 stride-2 conv,
C_in[k-1] -> C_in[k]. Feature ``layers[0]`` feeds the final blend,
``layers[k + 1]`` the blend before ``up[k]``.

Blend modes (``blend``, one of ``BLEND_MODES``):

- ``"add"`` (the paper's MGB, diffusers' model): ``f = f_dec * m + f_E * (1 - m)``
  with ``m`` the mask resized (nearest) to the level: known pixels take the
  condition features, holes the decoder's (``mask_guided_blend``).
- ``"concat"``: the condition encoder is built from ``PartialConv2d`` (valid
  mask ``1 - mask``, propagated layer to layer) and
  ``f = fuse[k](cat(f_dec, f_E, m))``, a 1x1 conv initialised to pass
  ``f_dec`` through unchanged (so an untrained fuse is the plain decoder).

Without a condition (``masked_image=None``) the decoder is exactly the plain
``pyvq.nn.Decoder`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyvq.nn.blocks import Decoder
from pyvq.nn.partial_conv import PartialConv2d

__all__ = ["BLEND_MODES", "ConditionEncoder", "MaskConditionDecoder", "mask_guided_blend"]

#: The ``blend`` values ``MaskConditionDecoder`` accepts.
BLEND_MODES = ("add", "concat")


def mask_guided_blend(f_dec: torch.Tensor, f_cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MGB, add mode: ``f_dec * m + f_cond * (1 - m)``, with ``mask`` (1 = hole)
    resized by nearest neighbour to ``f_dec``'s spatial size."""
    m = mask if mask.shape[-2:] == f_dec.shape[-2:] else F.interpolate(mask, size=f_dec.shape[-2:], mode="nearest")
    return f_dec * m + f_cond * (1.0 - m)


class ConditionEncoder(nn.Module):
    """Masked image -> one feature map per blend point (see the module
    docstring).

    Args:
        in_ch: channels of the masked image.
        channels: output channels of ``layers[k]``, one entry per blend point
            (the first two layers are 3x3 stride-1 convs, the rest 4x4
            stride-2).
        partial: build the layers from ``PartialConv2d``, driven by a valid
            mask (1 = known) propagated layer to layer.

    ``forward(y, valid)``: y (B, in_ch, H, W), valid (B, 1, H, W) (ignored
    unless ``partial``). Returns ``len(channels)`` feature maps, each taken
    before the ReLU that feeds the next layer.
    """

    def __init__(self, in_ch: int, channels: list[int], partial: bool):
        super().__init__()
        self.partial = bool(partial)
        layers, c_in = [], in_ch
        for k, c_out in enumerate(channels):
            if k < 2:
                args = dict(kernel_size=3, stride=1, padding=1)
            else:
                args = dict(kernel_size=4, stride=2, padding=1)
            layers.append(PartialConv2d(c_in, c_out, **args) if partial else nn.Conv2d(c_in, c_out, **args))
            c_in = c_out
        self.layers = nn.ModuleList(layers)

    def forward(self, y: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            if self.partial:
                y, valid = layer(y, valid)
            else:
                y = layer(y)
            feats.append(y)
            y = torch.relu(y)
        return feats


class MaskConditionDecoder(Decoder):
    """``pyvq.nn.Decoder`` with a masked-image condition and mask-guided
    blending; see the module docstring.

    Args: those of ``pyvq.nn.Decoder`` (``norm_num_groups`` included: the
    condition encoder has no GroupNorm, so only the decoder's channel
    counts must be multiples of it), plus
        blend: ``"add"`` or ``"concat"``.
        cond_ch: condition-encoder width: its feature at a blend point with
            ``ch * mult`` decoder channels has ``cond_ch * mult`` channels.
            Must equal ``ch`` for ``"add"`` (the default, ``None``, means ``ch``).
        cond_in_channels: channels of the masked image (default ``out_ch``).

    ``forward(z, masked_image=None, mask=None)``: z (B, z_channels, h, w);
    masked_image (B, cond_in_channels, h*f, w*f); mask (B or 1, 1, h*f, w*f),
    1 = hole. Both or neither. Returns (B, out_ch, h*f, w*f).
    """

    def __init__(self, *, blend: str = "add", cond_ch: int | None = None, cond_in_channels: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if blend not in BLEND_MODES:
            raise ValueError(f"MaskConditionDecoder: argument 'blend' must be one of {BLEND_MODES}, got {blend!r}")
        ch_mult = tuple(int(m) for m in kwargs.get("ch_mult", (1, 1, 2, 2, 4)))
        cond_ch = self.ch if cond_ch is None else int(cond_ch)
        if blend == "add" and cond_ch != self.ch:
            raise ValueError(f"MaskConditionDecoder: blend='add' needs cond_ch == ch ({self.ch}), got {cond_ch}")
        if cond_ch < 1:
            raise ValueError(f"MaskConditionDecoder: argument 'cond_ch' must be >= 1, got {cond_ch}")
        self.blend = blend
        self.cond_ch = cond_ch
        # Decoder-feature multipliers at the blend points: final, then the input of up[0], ..., up[L-1].
        mults = [ch_mult[0]] + [ch_mult[min(i + 1, len(ch_mult) - 1)] for i in range(len(ch_mult))]
        self.blend_channels = [self.ch * m for m in mults]
        cond_channels = [cond_ch * m for m in mults]
        cond_in = self.out_ch if cond_in_channels is None else int(cond_in_channels)
        self.cond_in_channels = cond_in
        self.condition_encoder = ConditionEncoder(cond_in, cond_channels, partial=(blend == "concat"))
        if blend == "concat":
            self.fuse = nn.ModuleList(nn.Conv2d(c + ce + 1, c, kernel_size=1) for c, ce in zip(self.blend_channels, cond_channels))
            with torch.no_grad():
                for conv, c in zip(self.fuse, self.blend_channels):
                    conv.weight.zero_()
                    conv.bias.zero_()
                    conv.weight[:, :c, 0, 0].copy_(torch.eye(c))

    def _blend(self, k: int, f_dec: torch.Tensor, f_cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.blend == "add":
            return mask_guided_blend(f_dec, f_cond, mask)
        m = F.interpolate(mask, size=f_dec.shape[-2:], mode="nearest").expand(f_dec.shape[0], 1, -1, -1)
        return self.fuse[k](torch.cat([f_dec, f_cond, m], dim=1))

    def condition_features(self, masked_image: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The condition encoder's features: [final, input of up[0], ..., input of up[L-1]]."""
        return self.condition_encoder(masked_image, 1.0 - mask)

    def forward(
        self, z: torch.Tensor, masked_image: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if masked_image is None and mask is None:
            return super().forward(z)
        if masked_image is None or mask is None:
            raise ValueError("MaskConditionDecoder: pass both 'masked_image' and 'mask', or neither")
        f = 2 ** (self.num_resolutions - 1)
        size = (z.shape[2] * f, z.shape[3] * f)
        if masked_image.dim() != 4 or masked_image.shape[1] != self.cond_in_channels or tuple(masked_image.shape[2:]) != size:
            raise ValueError(
                f"MaskConditionDecoder: argument 'masked_image' must have shape (B, {self.cond_in_channels}, "
                f"{size[0]}, {size[1]}), got {tuple(masked_image.shape)}"
            )
        if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != size:
            raise ValueError(
                f"MaskConditionDecoder: argument 'mask' must have shape (B, 1, {size[0]}, {size[1]}), "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(dtype=masked_image.dtype)
        feats = self.condition_features(masked_image, mask)

        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            h = self._blend(i + 1, h, feats[i + 1], mask)
            level = self.up[i]
            h = level.run_blocks(h)
            if i != 0:
                h = level.upsample(h)
        h = self._blend(0, h, feats[0], mask)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
