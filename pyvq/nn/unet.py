"""The denoising UNet shared by pyvq's diffusion priors (VQ-DDM's
multinomial diffusion over code indices, BRICS' Gaussian diffusion over key
codes).

The layout is that of DDPM (Ho et al. 2020) with the refinements of
improved DDPM / ADM (Nichol & Dhariwal 2021, Dhariwal & Nichol 2021):
multi-head attention at chosen resolutions, scale-shift ("adaptive group
norm") time conditioning, class-label embeddings, and zero-initialised last
layers so that every residual branch and the network output start at 0.

Encoder ``down[i]`` and decoder ``up[i]`` are the levels of side
``image_size / 2**i``; ``up`` is stored in that order although the decoder
runs it from the lowest resolution up. All tensors are channels-first,
(B, C, H, W).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_int, is_int
from pyvq.nn.blocks import Downsample, Upsample

__all__ = ["AttentionBlock", "TimeResBlock", "UNet", "timestep_features"]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, as in DDPM.

    ``[cos(t * f_0), ..., cos(t * f_{k-1}), sin(t * f_0), ..., sin(t * f_{k-1})]``
    with ``k = dim // 2`` frequencies ``f_j = max_period ** (-j / k)``
    (a zero column is appended when ``dim`` is odd).

    Shapes: t (B,) of any real dtype -> (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(feats, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimeResBlock(nn.Module):
    """Residual block conditioned on an embedding (ADM's ResBlock).

    ``h = conv1(silu(norm1(x)))``; the embedding, through ``emb_proj`` (SiLU,
    Linear), either gives ``(scale, shift)`` and ``h = norm2(h) * (1 + scale)
    + shift`` (``scale_shift=True``) or is added, ``h = norm2(h + e)``; then
    ``out = skip(x) + conv2(dropout(silu(h)))`` with ``conv2`` zero-initialised
    and ``skip`` a 1x1 conv when the channel count changes.

    Shapes: x (B, in_ch, H, W), emb (B, emb_dim) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float = 0.0,
                 scale_shift: bool = True, num_groups: int = 32):
        super().__init__()
        self.in_channels, self.out_channels = in_ch, out_ch
        self.scale_shift = bool(scale_shift)
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if self.scale_shift else out_ch))
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual:
    ``x + proj(attention(qkv(norm(x))))``, ``proj`` zero-initialised.

    ``qkv`` is one 1x1 conv whose 3C output channels are ``[q | k | v]``,
    each split into ``num_heads`` consecutive groups of C / num_heads
    channels; attention runs through ``F.scaled_dot_product_attention``
    (scale 1 / sqrt(head channels)).

    Shapes: (B, ch, H, W) -> (B, ch, H, W).
    """

    def __init__(self, ch: int, num_heads: int, num_groups: int = 32):
        super().__init__()
        if ch % num_heads != 0:
            raise ValueError(f"AttentionBlock: channel count {ch} is not divisible by num_heads={num_heads}")
        self.channels, self.num_heads = ch, num_heads
        self.norm = nn.GroupNorm(num_groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, kernel_size=1)
        self.proj = _zero(nn.Conv2d(ch, ch, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.num_heads
        # (B, 3C, H, W) -> 3 x (B, heads, H*W, d)
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, d, h * w).transpose(3, 4).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, d)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj(out)


class _Level(nn.Module):
    """One resolution level: ``res[j]`` then ``attn[j]`` (an AttentionBlock,
    or Identity where the level has no attention), and an optional
    ``resample`` (Downsample in the encoder, Upsample in the decoder)."""

    def __init__(self, resolution: int, res: list[TimeResBlock], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.resolution = resolution
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample

    @property
    def has_attention(self) -> bool:
        return any(isinstance(a, AttentionBlock) for a in self.attn)


class _Mid(nn.Module):
    """res_1 -> attn -> res_2 at the lowest resolution."""

    def __init__(self, ch: int, emb_dim: int, heads: int, **block_kw):
        super().__init__()
        self.res_1 = TimeResBlock(ch, ch, emb_dim, **block_kw)
        self.attn = AttentionBlock(ch, heads, block_kw["num_groups"])
        self.res_2 = TimeResBlock(ch, ch, emb_dim, **block_kw)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res_2(self.attn(self.res_1(h, emb)), emb)


class UNet(nn.Module):
    """DDPM / ADM denoising UNet with time and optional class conditioning.

    Args:
        in_channels: channels of the noisy input.
        out_channels: channels of the prediction (e.g. ``in_channels`` for
            epsilon, twice that with learned variances, the codebook size
            for multinomial diffusion logits).
        image_size: nominal input side; only decides which levels have
            attention. Level i has side ``image_size / 2**i``.
        model_channels: base width; level i has ``model_channels *
            channel_mult[i]`` channels, the time embedding ``4 *
            model_channels``.
        channel_mult: one multiplier per level; ``len(channel_mult) - 1``
            halvings.
        num_res_blocks: residual blocks per encoder level (the decoder has
            one more per level, for the extra skip connection).
        attention_resolutions: level sides (absolute, e.g. 16) whose
            residual blocks are each followed by self-attention; the middle
            block always has attention.
        dropout: dropout in every residual block.
        num_heads: attention heads (ignored when ``head_channels`` is set).
        head_channels: channels per head; the head count then varies with
            the level's width.
        scale_shift: condition by ``norm(h) * (1 + scale) + shift`` (ADM)
            rather than by adding the projected embedding (DDPM).
        num_classes: size of the class-label vocabulary; its embedding is
            added to the time embedding. None for an unconditional model.
        num_groups: GroupNorm groups; every level width must be divisible.
        resample_with_conv: strided 3x3 conv for downsampling and a 3x3 conv
            after nearest upsampling, else average pooling and bare nearest
            upsampling.

    Shapes:
        x: (B, in_channels, H, W), H and W divisible by
            ``2 ** (len(channel_mult) - 1)``;
        t: (B,) integer or float timesteps, or a scalar for the whole batch
            (used as is by the sinusoidal features: scale continuous times
            in [0, 1] up, e.g. by 1000);
        y: (B,) int64 class labels, given iff ``num_classes`` is set;
        returns (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        image_size: int,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_heads: int = 4,
        head_channels: int | None = None,
        scale_shift: bool = True,
        num_classes: int | None = None,
        num_groups: int = 32,
        resample_with_conv: bool = True,
    ):
        super().__init__()
        in_channels = check_int("in_channels", in_channels, where="UNet", minimum=1)
        out_channels = check_int("out_channels", out_channels, where="UNet", minimum=1)
        image_size = check_int("image_size", image_size, where="UNet", minimum=1)
        model_channels = check_int("model_channels", model_channels, where="UNet", minimum=1)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks, where="UNet", minimum=1)
        num_groups = check_int("num_groups", num_groups, where="UNet", minimum=1)
        num_heads = check_int("num_heads", num_heads, where="UNet", minimum=1)
        if head_channels is not None:
            head_channels = check_int("head_channels", head_channels, where="UNet", minimum=1)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, where="UNet", minimum=1)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: argument 'dropout' must be in [0, 1), got {dropout!r}")
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(not is_int(m) or m < 1
                                   for m in channel_mult):
            raise ValueError(f"UNet: argument 'channel_mult' must be a non-empty sequence of ints >= 1, "
                             f"got {channel_mult!r}")
        levels = len(channel_mult)
        self.downsample_factor = 2 ** (levels - 1)
        if image_size % self.downsample_factor != 0:
            raise ValueError(f"UNet: argument 'image_size'={image_size} must be divisible by "
                             f"2**(len(channel_mult) - 1) = {self.downsample_factor}")
        sizes = [image_size // 2**i for i in range(levels)]
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        missing = sorted(set(attention_resolutions) - set(sizes))
        if missing:
            raise ValueError(f"UNet: argument 'attention_resolutions' has sizes {missing} that no level has; "
                             f"the level sizes are {sizes}")
        widths = [model_channels * m for m in channel_mult]
        for w in widths:
            if w % num_groups != 0:
                raise ValueError(f"UNet: channel count {w} (model_channels * channel_mult) is not divisible "
                                 f"by argument 'num_groups'={num_groups}")

        def heads(ch: int) -> int:
            if head_channels is not None:
                if ch % head_channels != 0:
                    raise ValueError(f"UNet: channel count {ch} is not divisible by argument "
                                     f"'head_channels'={head_channels}")
                return ch // head_channels
            if ch % num_heads != 0:
                raise ValueError(f"UNet: channel count {ch} is not divisible by argument 'num_heads'={num_heads}")
            return num_heads

        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size = image_size
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.num_classes = num_classes

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None
        block_kw = dict(dropout=dropout, scale_shift=scale_shift, num_groups=num_groups)

        def attention(ch: int, size: int) -> nn.Module:
            return AttentionBlock(ch, heads(ch), num_groups) if size in attention_resolutions else nn.Identity()

        # Encoder; skip_chs records the width of every tensor pushed for the decoder.
        ch = widths[0]
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        skip_chs = [ch]
        down = []
        for i, (width, size) in enumerate(zip(widths, sizes)):
            res, attn = [], []
            for _ in range(num_res_blocks):
                res.append(TimeResBlock(ch, width, emb_dim, **block_kw))
                ch = width
                attn.append(attention(ch, size))
                skip_chs.append(ch)
            resample = None
            if i != levels - 1:
                resample = Downsample(ch, resample_with_conv)
                skip_chs.append(ch)
            down.append(_Level(size, res, attn, resample))
        self.down = nn.ModuleList(down)

        self.mid = _Mid(ch, emb_dim, heads(ch), **block_kw)

        # Decoder, built from the lowest resolution up, stored so up[i] is level i.
        up = []
        for i in reversed(range(levels)):
            res, attn = [], []
            for _ in range(num_res_blocks + 1):
                res.append(TimeResBlock(ch + skip_chs.pop(), widths[i], emb_dim, **block_kw))
                ch = widths[i]
                attn.append(attention(ch, sizes[i]))
            resample = Upsample(ch, resample_with_conv) if i != 0 else None
            up.append(_Level(sizes[i], res, attn, resample))
        self.up = nn.ModuleList(reversed(up))

        self.norm_out = nn.GroupNorm(num_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels, kernel_size=3, padding=1))

    def _embedding(self, t, y, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"UNet: argument 't' must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_features(t, self.model_channels).to(dtype))
        if self.class_embed is None:
            if y is not None:
                raise ValueError("UNet: argument 'y' was given but the model is unconditional (num_classes=None)")
            return emb
        if y is None:
            raise ValueError(f"UNet: argument 'y' (class labels, shape ({batch},)) is required: num_classes="
                             f"{self.num_classes}")
        if y.shape != (batch,) or y.is_floating_point():
            raise ValueError(f"UNet: argument 'y' must be integer labels of shape ({batch},), "
                             f"got {y.dtype} {tuple(y.shape)}")
        return emb + self.class_embed(y)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: argument 'x' must have shape (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"UNet: the height and width of argument 'x' must be divisible by {f}, "
                             f"got {tuple(x.shape[2:])}")
        emb = self._embedding(t, y, x.shape[0], x.device)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid(h, emb)
        for level in reversed(self.up):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
