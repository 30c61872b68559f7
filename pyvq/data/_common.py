"""Helpers shared by the datasets and mask generators: per-sample random
generators, PIL <-> tensor conversion (argument checks: ``pyvq._checks``)."""

from __future__ import annotations

import zlib

import numpy as np
import torch
from PIL import Image


def _key_to_int(key) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8"))
    return int(key)


def derived_generator(*keys) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a tuple of non-negative ints or
    strings (strings enter through their CRC32).

    The keys are mixed by numpy's ``SeedSequence``, so nearby tuples such as
    (seed, epoch, 7) and (seed, epoch, 8) give unrelated streams. The result
    depends on nothing but ``keys``: not on worker ids, call order or any
    global RNG state.
    """
    state = np.random.SeedSequence([_key_to_int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    """One float from U[low, high) using ``generator`` (torch's global RNG when None)."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """One int from [low, high] inclusive (torch's global RNG when ``generator`` is None)."""
    if high <= low:
        return low
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB. 16-bit greyscale is scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs decode as "I;16" or "I"; map the full 16-bit range to 8 bits.
        a = np.clip(a / 257.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(a)
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8))
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> (3, H, W) float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {a.shape}")
    t = torch.from_numpy(a.copy()).permute(2, 0, 1).to(torch.float32)
    return t.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).contiguous()
