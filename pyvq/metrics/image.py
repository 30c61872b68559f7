"""Per-image reconstruction metrics: PSNR and SSIM.

Images are (B, C, H, W) tensors; ``data_range`` is max - min of the value
range (2.0 for pyvq's [-1, 1] images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"{name}: arguments 'x' and 'y' must be tensors")
    if x.shape != y.shape:
        raise ValueError(f"{name}: 'x' and 'y' must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: 'x' must be (B, C, H, W), got shape {tuple(x.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) of each image pair: (B,) float64.

    ``10 log10(data_range^2 / MSE)``; identical images give +inf.
    """
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 2.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each image pair: (B,) float64.

    Gaussian-weighted local statistics (window ``win_size``, ``sigma``),
    population covariances, the mean over the valid (unpadded) region and
    over channels: the settings of ``skimage.metrics.structural_similarity(
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images must be at least {win_size} pixels on a side, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = _gaussian_window(win_size, sigma, x.dtype, x.device)
    wy = g.view(1, 1, -1, 1).expand(C, 1, -1, 1)
    wx = g.view(1, 1, 1, -1).expand(C, 1, 1, -1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wy, groups=C), wx, groups=C)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
