"""Evaluate a tokenizer on a dataset: PSNR, SSIM, LPIPS, codebook usage and
perplexity, and optionally rFID / IS / KID through torch-fidelity."""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import DataLoader

from pyvq.metrics import code_usage_stats, fidelity_metrics, psnr, ssim


def latents(model, x: torch.Tensor):
    """(z, indices) a tokenizer decodes ``x`` from: the quantised latents and
    code indices of a VQ model, the posterior's mode and None for KL, the
    key codes and None for BRICS."""
    enc = model.encode(x)
    if isinstance(enc, tuple):  # VQ: (z_q, indices, aux)
        return enc[0], enc[1]
    if isinstance(enc, torch.Tensor):  # continuous codes (BRICS keys)
        return enc, None
    return enc.mode(), None


@torch.no_grad()
def reconstruct(model, dataset, *, batch_size: int = 16, device="cpu", limit: int | None = None):
    """(originals, reconstructions, indices or None) over a dataset, in order."""
    model.eval()
    xs, ys, idx = [], [], []
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
        z, indices = latents(model, x)
        y = model.decode(z)
        if indices is not None:
            idx.append(indices.cpu())
        xs.append(x.cpu())
        ys.append(y.float().clamp(-1, 1).cpu())
        seen += len(x)
        if limit is not None and seen >= limit:
            break
    return torch.cat(xs), torch.cat(ys), (torch.cat(idx) if idx else None)


def evaluate(model, dataset, *, batch_size: int = 16, device="cpu", lpips=None, fid: bool = False,
             feature_extractor: str | None = None) -> dict:
    """Metrics of ``model`` on ``dataset`` (images in [-1, 1]).

    Args:
        lpips: a perceptual-distance module (``pyvq.losses.build_lpips()``),
            or None to leave LPIPS out.
        fid: compute rFID / IS / KID with torch-fidelity (Inception weights
            must be in the torch hub cache, unless ``feature_extractor``
            names another registered extractor).

    Returns:
        dict with ``num_images``, ``psnr``, ``ssim`` (means), ``lpips``
        (mean or None), and for VQ models ``codebook_usage`` (fraction of the
        codes used over the whole set) and ``perplexity``.
    """
    x, y, indices = reconstruct(model, dataset, batch_size=batch_size, device=device)
    out = {
        "num_images": int(x.shape[0]),
        "psnr": float(psnr(x, y).mean()),
        "ssim": float(ssim(x, y).mean()) if min(x.shape[-2:]) >= 11 else None,
        "lpips": None,
    }
    if lpips is not None:
        with torch.no_grad():
            out["lpips"] = float(torch.cat([lpips(a, b) for a, b in zip(x.split(batch_size), y.split(batch_size))]).mean())
    if indices is not None:
        quantizer = model.quantize if hasattr(model, "quantize") else model.base.quantize
        perplexity, usage = code_usage_stats(indices, quantizer.num_codes)
        out["codebook_usage"] = float(usage)
        out["perplexity"] = float(perplexity)
    if fid:
        out.update({k: float(v) for k, v in fidelity_metrics(x, y, feature_extractor=feature_extractor).items()})
    return out


def data_record(data: str, split: str | None, image_size: int) -> dict:
    """What an evaluation ran on, for its metrics file: ``"builtin"`` or the
    folder's absolute path, the split (None for a folder, which has none),
    the image size."""
    return {"data": data if data == "builtin" else os.path.abspath(data), "split": split, "image_size": image_size}


def write_metrics(path: str, metrics: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)
