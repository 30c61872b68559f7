"""Swin Transformer layers (Liu et al., "Swin Transformer"), channels-last, on
``pyvq.ops.window_attention``: the layers of the Efficient-VQGAN tokenizer.

Every layer takes and returns channels-last token grids ``(B, H, W, C)``
(``PatchEmbed`` takes images ``(B, C, H, W)``).

- ``WindowAttention``: multi-head attention inside (shifted) w x w windows,
  with Swin's relative position bias; H and W must be multiples of w.
- ``SwinBlock``: pre-norm block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``
  with drop path; pads grids that are not a multiple of the window.
- ``SwinStage``: ``depth`` blocks alternating shift 0 and ``w // 2``.
- ``PatchEmbed`` (p x p patches -> tokens), ``PatchMerging`` (2x down),
  ``PatchExpanding`` (2x up, Swin-Unet's) and ``NearestUpsample`` (the
  nearest-neighbour 2x upsampling the Efficient-VQGAN decoder ends with).

Parameter names are timm 1.0.31's (``timm.models.swin_transformer``), so
``SwinBlock.load_state_dict(timm_block.state_dict())`` and
``PatchMerging.load_state_dict(timm_merge.state_dict())`` load strictly and
then compute the same function (on grids that are multiples of the window;
see ``SwinBlock`` for the padded case). timm is a test dependency only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_bool, check_float, check_int
from pyvq.ops import window_attention
from pyvq.ops.window_attention import MAX_WINDOW

__all__ = [
    "DropPath",
    "NearestUpsample",
    "PatchEmbed",
    "PatchExpanding",
    "PatchMerging",
    "SwinBlock",
    "SwinMlp",
    "SwinStage",
    "WindowAttention",
]


def _check_tokens(x, dim: int, where: str) -> None:
    """``x`` is a floating (B, H, W, dim) channels-last grid."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{where}: argument 'x' must be a floating-point tensor, got {got}")
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ValueError(f"{where}: argument 'x' must have shape (B, H, W, {dim}) (channels last), "
                         f"got {tuple(x.shape)}")


def _check_heads(dim: int, num_heads: int, where: str) -> None:
    check_int("dim", dim, where=where, minimum=1)
    check_int("num_heads", num_heads, where=where, minimum=1)
    if dim % num_heads:
        raise ValueError(f"{where}: argument 'dim' must be divisible by num_heads={num_heads}, got {dim}")


def _check_window(window_size: int, shift: int, where: str, shift_name: str) -> None:
    check_int("window_size", window_size, where=where, minimum=1, maximum=MAX_WINDOW)
    check_int(shift_name, shift, where=where, minimum=0)
    if shift >= window_size:
        raise ValueError(f"{where}: argument '{shift_name}' must be in [0, window_size) = [0, {window_size}), "
                         f"got {shift}")


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows (Swin's W-MSA / SW-MSA).

    Args:
        dim: channels C.
        num_heads: heads; ``dim`` must be divisible by it (head_dim = C / heads).
        window_size: window side w (1 to 32).
        shift: Swin's cyclic shift in [0, w) (0: W-MSA, w // 2: SW-MSA).
        qkv_bias: bias in the ``qkv`` projection.

    Parameters (timm's names): ``qkv`` Linear(C, 3C), ``proj`` Linear(C, C),
    ``relative_position_bias_table`` ((2w - 1)^2, heads), truncated-normal
    initialised with std 0.02 as in timm.

    Shapes: (B, H, W, C) -> (B, H, W, C), H and W multiples of w (a
    ``SwinBlock`` pads to that). The qkv output is split into q, k, v views
    of shape (B, heads, H, W, head_dim) without copies and passed to
    ``pyvq.ops.window_attention`` (which takes any strides).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int = 0, qkv_bias: bool = True):
        super().__init__()
        where = "WindowAttention"
        _check_heads(dim, num_heads, where)
        _check_window(window_size, shift, where, "shift")
        check_bool("qkv_bias", qkv_bias, where=where)
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.window_size = int(window_size)
        self.shift = int(shift)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift={self.shift}"

    def forward(self, x: torch.Tensor, shift: int | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); ``shift`` overrides the layer's own
        (``SwinBlock`` turns it off on a grid that fits in one window)."""
        _check_tokens(x, self.dim, "WindowAttention")
        shift = self.shift if shift is None else shift
        B, H, W, C = x.shape
        w = self.window_size
        if H % w or W % w:
            raise ValueError(f"WindowAttention: the grid H x W of 'x' must be a multiple of window_size {w} in "
                             f"both axes, got {H} x {W} (SwinBlock pads; this layer does not)")
        heads = self.num_heads
        # Unbinding before permuting lets autograd assemble the qkv gradient
        # without a copy of the permuted (3, B, heads, H, W, hd) tensor.
        q, k, v = (t.permute(0, 3, 1, 2, 4) for t in self.qkv(x).view(B, H, W, 3, heads, C // heads).unbind(3))
        out = window_attention(q, k, v, window_size=w, shift=shift, bias_table=self.relative_position_bias_table)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is zeroed
    with probability ``p`` and the kept ones scaled by 1 / (1 - p); the
    identity in eval mode or with p = 0. Shapes: any (B, ...) -> same."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = check_float("p", p, where="DropPath", low=0.0, high=1.0, high_open=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


class SwinMlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` on the last axis (timm's ``Mlp`` names):
    (..., dim) -> (..., dim) through ``hidden`` features."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin Transformer block on a (B, H, W, C) grid.

        x = x + drop_path(attn(norm1(x)))      (W-MSA, or SW-MSA with shift_size)
        x = x + drop_path(mlp(norm2(x)))

    Args:
        dim: channels C.
        num_heads: attention heads (``dim`` divisible by it).
        window_size: window side w.
        shift_size: cyclic shift in [0, w); Swin alternates 0 and w // 2.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias in the qkv projection.
        drop_path: stochastic-depth rate of both residual branches.

    Parameter names equal timm's ``SwinTransformerBlock`` (``norm1``,
    ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``,
    ``norm2``, ``mlp.fc1``, ``mlp.fc2``).

    Grids: any H, W >= 1. When a side is not a multiple of w, the normalised
    tokens are padded with zeros at the bottom / right to the next multiple,
    attention runs on the padded grid (shifted, with the mask of the padded
    grid; padded tokens take part as keys like any token) and the result is
    cropped: the original Swin's order (pad, then roll). timm 1.0.31 rolls
    the unpadded grid first and pads after, which differs from this only
    when a grid is both padded and shifted. When the grid fits in one window
    (H <= w and W <= w) the shift is turned off, as Swin and timm do (the
    op's shift is one value for both axes, so a grid with only one side
    <= w is shifted in both, where timm would shift only the longer side).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        where = "SwinBlock"
        _check_heads(dim, num_heads, where)
        _check_window(window_size, shift_size, where, "shift_size")
        check_float("mlp_ratio", mlp_ratio, where=where, low=0.0, low_open=True, high=math.inf, high_open=True)
        self.dim = int(dim)
        self.window_size = int(window_size)
        self.shift_size = int(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift=shift_size, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        w = self.window_size
        shift = 0 if (H <= w and W <= w) else self.shift_size
        pad_h, pad_w = (-H) % w, (-W) % w
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = self.attn(x, shift=shift)
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        _check_tokens(x, self.dim, "SwinBlock")
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """``depth`` ``SwinBlock``s on one grid, the odd ones shifted by w // 2
    (``blocks[i]``); (B, H, W, C) -> (B, H, W, C).

    ``drop_path`` is one rate for every block or a sequence of ``depth``
    rates (Swin's linearly increasing stochastic depth)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float | Sequence[float] = 0.0):
        super().__init__()
        check_int("depth", depth, where="SwinStage", minimum=1)
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) else [float(r) for r in drop_path]
        if len(rates) != depth:
            raise ValueError(f"SwinStage: argument 'drop_path' must be a number or {depth} rates (one per block), "
                             f"got {len(rates)}")
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                      mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[i])
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed(nn.Module):
    """Image -> token grid: a ``patch_size``-strided conv (``proj``) and a
    LayerNorm (``norm``, when ``norm``), timm's names.

    Shapes: (B, in_chans, H, W) -> (B, H / p, W / p, embed_dim), H and W
    divisible by p.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True):
        super().__init__()
        where = "PatchEmbed"
        self.patch_size = check_int("patch_size", patch_size, where=where, minimum=1)
        self.in_chans = check_int("in_chans", in_chans, where=where, minimum=1)
        check_int("embed_dim", embed_dim, where=where, minimum=1)
        check_bool("norm", norm, where=where)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H / p, W / p, embed_dim)."""
        p = self.patch_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PatchEmbed: argument 'x' must have shape (B, {self.in_chans}, H, W), got {got}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"PatchEmbed: the height and width of 'x' must be divisible by patch_size {p}, "
                             f"got {tuple(x.shape[2:])}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2x downsampling: each 2 x 2 neighbourhood is concatenated into
    4C channels, normalised (``norm``, LayerNorm(4C)) and projected
    (``reduction``, Linear(4C, out_dim) without bias), timm's names.

    Concatenation order (Swin's x0, x1, x2, x3; timm 1.0.31's reshape
    (B, H/2, 2, W/2, 2, C) -> permute (0, 1, 3, 4, 2, 5)): channel block
    ``2 * dc + dr`` holds the token at (2i + dr, 2j + dc), i.e. (0, 0),
    (1, 0), (0, 1), (1, 1).

    Shapes: (B, H, W, dim) -> (B, H / 2, W / 2, out_dim), H and W even.
    """

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.dim = check_int("dim", dim, where="PatchMerging", minimum=1)
        self.out_dim = 2 * dim if out_dim is None else check_int("out_dim", out_dim, where="PatchMerging", minimum=1)
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.dim, "PatchMerging")
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"PatchMerging: the grid H x W of 'x' must have even sides, got {H} x {W}")
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """2x upsampling of a token grid (Swin-Unet's patch expanding): a linear
    map (``expand``, Linear(dim, 4 * out_dim) without bias) whose output
    channels are read as (2, 2, out_dim) (row offset, column offset,
    channel) and spread over each token's 2 x 2 neighbourhood, then a
    LayerNorm(out_dim) (``norm``).

    Shapes: (B, H, W, dim) -> (B, 2H, 2W, out_dim); ``out_dim`` defaults to
    dim // 2 (Swin-Unet's halving).
    """

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.dim = check_int("dim", dim, where="PatchExpanding", minimum=1)
        out = dim // 2 if out_dim is None else out_dim
        self.out_dim = check_int("out_dim", out, where="PatchExpanding", minimum=1)
        self.expand = nn.Linear(dim, 4 * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.dim, "PatchExpanding")
        B, H, W, _ = x.shape
        c = self.out_dim
        x = self.expand(x).view(B, H, W, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, c)
        return self.norm(x)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling of a channels-last grid by an integer
    ``scale`` (2: the Efficient-VQGAN decoder's last upsampling, before its
    output conv): (B, H, W, C) -> (B, scale * H, scale * W, C)."""

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = check_int("scale", scale, where="NearestUpsample", minimum=1)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"NearestUpsample: argument 'x' must have shape (B, H, W, C), got {got}")
        B, H, W, C = x.shape
        s = self.scale
        return x[:, :, None, :, None].expand(B, H, s, W, s, C).reshape(B, s * H, s * W, C)
