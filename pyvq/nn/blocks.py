"""Convolutional autoencoder blocks of VQGAN (taming-transformers) and the
Stable Diffusion / latent-diffusion autoencoders.

The submodule names are those of taming-transformers'
``taming/modules/diffusionmodules/model.py`` (and latent-diffusion's copy of
it), so a checkpoint of either maps onto these modules key for key:

- ``ResnetBlock``: ``norm1, conv1, norm2, dropout, conv2`` and, when the
  channel count changes, ``nin_shortcut`` (1x1) or ``conv_shortcut`` (3x3).
  No ``temb_proj``: the autoencoders have no timestep embedding.
- ``AttnBlock``: ``norm, q, k, v, proj_out`` (1x1 convs).
- ``Encoder``: ``conv_in``, ``down[i].block[j]``, ``down[i].attn[j]``,
  ``down[i].downsample.conv``, ``mid.block_1``, ``mid.attn_1``,
  ``mid.block_2``, ``norm_out``, ``conv_out``.
- ``Decoder``: ``conv_in``, ``mid.*``, ``up[i].block[j]``, ``up[i].attn[j]``,
  ``up[i].upsample.conv``, ``norm_out``, ``conv_out``. ``up[i]`` is the level
  of resolution ``resolution / 2**i``, the same index as the encoder's
  ``down[i]``, although the decoder runs them from the last to the first.

Every GroupNorm of a block has ``norm_num_groups`` groups (diffusers' name;
32 in taming and in every Stable Diffusion VAE, the default), so each
normalised channel count must be a multiple of it.

All tensors are channels-first, (B, C, H, W).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_float, check_int, check_positive_fields, check_positive_ints, int_tuple

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "Normalize",
    "ResnetBlock",
    "Upsample",
]


def Normalize(ch: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 (taming's name)
    """GroupNorm with ``num_groups`` groups, eps 1e-6 and an affine transform.

    ``ch`` must be divisible by ``num_groups`` (32 for every taming / SD
    configuration; the blocks pass their ``norm_num_groups``).
    """
    num_groups = check_int("num_groups", num_groups, where="Normalize", minimum=1)
    if ch % num_groups != 0:
        raise ValueError(f"Normalize: channel count {ch} is not divisible by num_groups={num_groups}")
    return nn.GroupNorm(num_groups=num_groups, num_channels=ch, eps=1e-6, affine=True)


def norm_channels(ch: int, ch_mult: Sequence[int], *, encoder: bool = True) -> tuple[int, ...]:
    """The channel counts an ``Encoder`` (``encoder=True``: its first block
    also normalises ``ch``, the output of ``conv_in``) or a ``Decoder``
    normalises: sorted, without repeats."""
    counts = {ch * int(m) for m in ch_mult} | ({ch} if encoder else set())
    return tuple(sorted(counts))


def check_norm_groups(norm_num_groups, channels: Sequence[int], *, where: str, what: str = "argument") -> int:
    """``norm_num_groups`` as an int >= 1 that divides every count of
    ``channels`` (each a GroupNorm's channel count); the error names the
    field and the counts that are not multiples of it."""
    groups = check_int("norm_num_groups", norm_num_groups, where=where, minimum=1, what=what)
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"{where}: {what} 'norm_num_groups' must divide every GroupNorm's channel count "
            f"{list(channels)} (from 'ch' and 'ch_mult'), got {groups}: {bad} are not multiples of it"
        )
    return groups


class ResnetBlock(nn.Module):
    """Pre-activation residual block: x + conv2(drop(silu(norm2(conv1(silu(norm1(x))))))).

    Args:
        in_ch: input channels.
        out_ch: output channels (default ``in_ch``).
        dropout: dropout probability before ``conv2``.
        conv_shortcut: when ``in_ch != out_ch``, project the skip path with a
            3x3 conv (``conv_shortcut``) instead of a 1x1 one (``nin_shortcut``).
        norm_num_groups: groups of ``norm1`` and ``norm2``; must divide
            ``in_ch`` and ``out_ch``.

    Shapes: (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        dropout: float = 0.0,
        conv_shortcut: bool = False,
        *,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.in_channels = in_ch
        self.out_channels = out_ch
        self.use_conv_shortcut = bool(conv_shortcut)
        self.norm1 = Normalize(in_ch, norm_num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_ch, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1)
        if in_ch != out_ch:
            if self.use_conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual.

    ``x + proj_out(softmax(q^T k / sqrt(C)) v)`` where q, k, v are 1x1 convs of
    ``norm(x)``; computed by ``F.scaled_dot_product_attention`` (its default
    scale is 1/sqrt(C), the one taming uses).

    ``norm_num_groups``: groups of ``norm``; must divide ``ch``.

    Shapes: (B, ch, H, W) -> (B, ch, H, W).
    """

    def __init__(self, ch: int, *, norm_num_groups: int = 32):
        super().__init__()
        self.in_channels = ch
        self.norm = Normalize(ch, norm_num_groups)
        self.q = nn.Conv2d(ch, ch, kernel_size=1)
        self.k = nn.Conv2d(ch, ch, kernel_size=1)
        self.v = nn.Conv2d(ch, ch, kernel_size=1)
        self.proj_out = nn.Conv2d(ch, ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(2, 3)

        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W.

    ``with_conv``: zero-pad one row at the bottom and one column at the right,
    then a 3x3 stride-2 conv without padding (``conv``), as taming does; else
    a 2x2 average pool. (B, ch, H, W) -> (B, ch, floor(H/2), floor(W/2)).
    """

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.with_conv = bool(with_conv)
        if self.with_conv:
            self.conv = nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then (``with_conv``) a 3x3 conv
    (``conv``). (B, ch, H, W) -> (B, ch, 2H, 2W)."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.with_conv = bool(with_conv)
        if self.with_conv:
            self.conv = nn.Conv2d(ch, ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Mid(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, ch: int, dropout: float, norm_num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, dropout=dropout, norm_num_groups=norm_num_groups)
        self.attn_1 = AttnBlock(ch, norm_num_groups=norm_num_groups)
        self.block_2 = ResnetBlock(ch, ch, dropout=dropout, norm_num_groups=norm_num_groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution level: ``block[j]`` each followed by ``attn[j]`` when the
    level has attention, then ``downsample`` / ``upsample`` if present."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


def _check_ch_mult(ch_mult: tuple[int, ...], where: str, what: str) -> None:
    if not ch_mult or min(ch_mult) < 1:
        raise ValueError(f"{where}: {what} 'ch_mult' must be a non-empty sequence of ints >= 1, got {ch_mult!r}")


def _check_arch(
    name: str, ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int, norm_num_groups: int
) -> tuple[tuple[int, ...], int]:
    ch_mult = int_tuple("ch_mult", ch_mult, where=name, what="argument")
    _check_ch_mult(ch_mult, name, "argument")
    check_positive_ints(dict(ch=ch, num_res_blocks=num_res_blocks, resolution=resolution), where=name)
    channels = norm_channels(ch, ch_mult, encoder=name == "Encoder")
    return ch_mult, check_norm_groups(norm_num_groups, channels, where=name)


class Encoder(nn.Module):
    """Image -> latent, downsampling by ``2 ** (len(ch_mult) - 1)``.

    Args:
        in_channels: image channels.
        ch: base channel count; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: channel multipliers, one per resolution level.
        num_res_blocks: ResnetBlocks per level.
        attn_resolutions: nominal resolutions (side lengths, starting from
            ``resolution`` and halving per level) whose blocks are followed
            by an AttnBlock. The mid block always has one.
        z_channels: latent channels.
        resolution: nominal input side length; it only decides where
            attention goes. Inputs of any size divisible by the downsampling
            factor work.
        dropout: ResnetBlock dropout.
        resamp_with_conv: strided conv (True) or average pool downsampling.
        double_z: output ``2 * z_channels`` channels (mean and log-variance
            of a Gaussian posterior, AutoencoderKL), else ``z_channels``.
        norm_num_groups: groups of every GroupNorm; must divide ``ch`` and
            every ``ch * ch_mult[i]``.

    Shapes: (B, in_channels, H, W) -> (B, z_channels * (2 if double_z else 1), H/f, W/f).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        z_channels: int = 256,
        resolution: int = 256,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        double_z: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        ch_mult, groups = _check_arch("Encoder", ch, ch_mult, num_res_blocks, resolution, norm_num_groups)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.double_z = bool(double_z)
        self.norm_num_groups = groups

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1,) + ch_mult
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_num_groups=groups))
                block_in = block_out
                if res in attn_resolutions:
                    attn.append(AttnBlock(block_in, norm_num_groups=groups))
            level = _Level(blocks, attn)
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, groups)
        self.norm_out = Normalize(block_in, groups)
        out = 2 * z_channels if self.double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level.run_blocks(h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image, upsampling by ``2 ** (len(ch_mult) - 1)``.

    Args: as ``Encoder`` (``ch_mult``, ``attn_resolutions``, ``resolution``
    describe the same levels, run in reverse), plus
        out_ch: image channels.
        give_pre_end: return the features before ``norm_out`` / ``conv_out``,
            (B, ch * ch_mult[0], H, W).
        tanh_out: apply tanh to the output.
        norm_num_groups: groups of every GroupNorm; must divide every
            ``ch * ch_mult[i]``.

    Each level has ``num_res_blocks + 1`` ResnetBlocks.

    Shapes: (B, z_channels, h, w) -> (B, out_ch, h*f, w*f).
    """

    def __init__(
        self,
        *,
        out_ch: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        z_channels: int = 256,
        resolution: int = 256,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        ch_mult, groups = _check_arch("Decoder", ch, ch_mult, num_res_blocks, resolution, norm_num_groups)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.out_ch = out_ch
        self.z_channels = z_channels
        self.give_pre_end = bool(give_pre_end)
        self.tanh_out = bool(tanh_out)
        self.norm_num_groups = groups

        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, groups)

        levels: list[_Level] = []
        for i in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_num_groups=groups))
                block_in = block_out
                if res in attn_resolutions:
                    attn.append(AttnBlock(block_in, norm_num_groups=groups))
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            levels.append(level)
        # Built from the lowest resolution up; stored so that up[i] is level i.
        self.up = nn.ModuleList(reversed(levels))

        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            h = level.run_blocks(h)
            if i != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


ARCH_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
               "dropout", "resamp_with_conv", "norm_num_groups")


def check_arch_fields(config, *, where: str, positive: tuple[str, ...] = ()) -> None:
    """Normalise and check the Encoder/Decoder fields of a tokenizer config
    (frozen dataclass): ``ch_mult`` and ``attn_resolutions`` become tuples of
    ints, ``ch_mult`` is non-empty with entries >= 1, ``ch``,
    ``num_res_blocks``, ``z_channels``, ``resolution`` and the fields in
    ``positive`` are ints >= 1, ``dropout`` is in [0, 1), and
    ``norm_num_groups`` is an int >= 1 dividing ``ch`` and every
    ``ch * ch_mult[i]``."""
    for name in ("ch_mult", "attn_resolutions"):
        object.__setattr__(config, name, int_tuple(name, getattr(config, name), where=where))
    check_positive_fields(config, ("ch", "num_res_blocks", "z_channels", "resolution") + tuple(positive), where=where)
    _check_ch_mult(config.ch_mult, where, "field")
    check_float("dropout", config.dropout, where=where, what="field", low=0.0, high=1.0, high_open=True)
    groups = check_norm_groups(config.norm_num_groups, norm_channels(config.ch, config.ch_mult), where=where, what="field")
    object.__setattr__(config, "norm_num_groups", groups)


def arch_kwargs(config) -> dict:
    """The Encoder/Decoder arguments a tokenizer config carries (``ARCH_FIELDS``)."""
    return {name: getattr(config, name) for name in ARCH_FIELDS}
