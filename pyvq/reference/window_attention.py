"""Plain-PyTorch windowed (shifted) multi-head attention: Swin's W-MSA / SW-MSA
core (Liu et al., "Swin Transformer"; Efficient-VQGAN's local attention).

The definition every kernel (csrc/window_attention/, triton_kernels/
window_attention.py) must reproduce, written the way Swin computes it:

- ``q``, ``k``, ``v`` are ``(B, heads, H, W, head_dim)`` on a token grid
  whose H and W are multiples of the window ``w``.
- cyclic shift: the grid is rolled by ``-shift`` in both axes
  (``torch.roll(x, (-shift, -shift))``), so rolled position ``p`` holds the
  token from ``(p + shift) mod H``;
- partition: the rolled grid is cut into ``(H / w) * (W / w)`` windows of
  ``w * w`` tokens, numbered row-major inside a window;
- attention inside each window: ``softmax(q k^T * scale + bias + mask) v``
  with ``scale = head_dim ** -0.5`` by default;
- ``bias[h, i, j] = bias_table[index(i, j), h]`` with Swin's relative
  position index ``index(i, j) = (ri - rj + w - 1) * (2w - 1) + (ci - cj + w - 1)``
  for in-window coordinates ``i = (ri, ci)``, ``j = (rj, cj)``;
- shifted-window mask (``shift > 0``): each axis of the rolled grid splits
  into three regions, ``[0, H - w)``, ``[H - w, H - shift)``,
  ``[H - shift, H)`` (Swin's slices), and a token's region id is
  ``3 * row_region + col_region``; tokens of different regions do not attend
  to each other (their score is ``-inf``, where Swin adds ``-100``);
- reverse: windows are merged and the grid rolled back by ``+shift``, so the
  output of a token is written at its original position.

Scores, softmax and the weighted sum are computed in float32 (float64 for
float64 inputs); the output has the inputs' dtype.
"""

from __future__ import annotations

import torch

from pyvq._checks import accumulation_dtype


def relative_position_index(window_size: int, device=None) -> torch.Tensor:
    """(w*w, w*w) int64: Swin's index into the ``((2w - 1)^2, heads)`` bias table."""
    w = window_size
    r = torch.arange(w, device=device)
    rows = r.repeat_interleave(w)  # in-window row of each of the w*w tokens
    cols = r.repeat(w)
    dr = rows[:, None] - rows[None, :] + (w - 1)
    dc = cols[:, None] - cols[None, :] + (w - 1)
    return dr * (2 * w - 1) + dc


def _axis_regions(n: int, window_size: int, shift: int, device) -> torch.Tensor:
    """(n,) region id (0, 1, 2) of each position of a rolled axis of length n."""
    region = torch.zeros(n, dtype=torch.int64, device=device)
    region[n - window_size:] = 1
    region[n - shift:] = 2
    return region


def _partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, h, H, W, d) -> (B, h, nW, w*w, d), windows row-major over the grid."""
    B, h, H, W, d = x.shape
    x = x.reshape(B, h, H // w, w, W // w, w, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, h, (H // w) * (W // w), w * w, d)


def _reverse(x: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """(B, h, nW, w*w, d) -> (B, h, H, W, d), the inverse of ``_partition``."""
    B, h, _, _, d = x.shape
    x = x.reshape(B, h, H // w, W // w, w, w, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, h, H, W, d)


def shift_mask(H: int, W: int, window_size: int, shift: int, device=None) -> torch.Tensor | None:
    """(nW, w*w, w*w) bool, True where two tokens of a window of the rolled
    grid come from different regions (must not attend); None without a shift."""
    if shift == 0:
        return None
    w = window_size
    rh = _axis_regions(H, w, shift, device)
    rw = _axis_regions(W, w, shift, device)
    region = (3 * rh[:, None] + rw[None, :]).to(torch.float64)  # (H, W)
    windows = _partition(region[None, None, :, :, None], w)[0, 0, :, :, 0]  # (nW, w*w)
    return windows[:, :, None] != windows[:, None, :]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int, shift: int = 0,
                     bias_table: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """(B, heads, H, W, head_dim) attention inside shifted windows; see the module docstring."""
    B, heads, H, W, d = q.shape
    w = window_size
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype)
    if scale is None:
        scale = d ** -0.5
    qa, ka, va = (t.to(acc) for t in (q, k, v))
    if shift:
        qa, ka, va = (torch.roll(t, shifts=(-shift, -shift), dims=(2, 3)) for t in (qa, ka, va))
    qw, kw, vw = (_partition(t, w) for t in (qa, ka, va))  # (B, h, nW, w*w, d)
    scores = (qw * scale) @ kw.transpose(-2, -1)  # (B, h, nW, w*w, w*w)
    if bias_table is not None:
        index = relative_position_index(w, device=q.device)
        bias = bias_table.to(acc)[index.reshape(-1)].reshape(w * w, w * w, heads).permute(2, 0, 1)
        scores = scores + bias[None, :, None]
    mask = shift_mask(H, W, w, shift, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(mask[None, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vw
    out = _reverse(out, w, H, W)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
    return out.to(q.dtype)
