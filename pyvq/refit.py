"""ReFiT: re-build a VQ codebook from encoder outputs, then fine-tune.

From Hu et al., "Global Context with Discrete Diffusion in Vector Quantised
Modelling for Image Generation" (VQ-DDM): a trained VQGAN uses few of its
codes; re-building the codebook by k-means on the encoder's
pre-quantisation latents restores usage, and the decoder is then fine-tuned
with the encoder frozen.

``rebuild_codebook`` samples latent vectors and clusters them with
``pyvq.ops.kmeans`` (AFK-MC2 seeding by default); ``freeze_encoder`` freezes
the encoder for the fine-tuning stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_int
from pyvq.nn.vector_quantizer import VectorQuantizer, code_usage_stats
from pyvq.ops import kmeans, nearest_code

__all__ = ["RefitResult", "rebuild_codebook", "sample_latents", "freeze_encoder"]


@dataclass
class RefitResult:
    """What ``rebuild_codebook`` returns.

    Attributes:
        codebook: (num_codes, dim) float32 k-means centroids (unit rows
            when the latents were normalised).
        num_samples: number of latent vectors clustered (P).
        num_images: number of images seen.
        usage_before / usage_after: fraction of the quantizer's codes that
            the sampled latents use with the old / new codebook (None when
            no quantizer was given).
        perplexity_before / perplexity_after: exp(entropy) of those code
            histograms (None without a quantizer).
        applied: whether the codebook was loaded into the quantizer.
    """

    codebook: torch.Tensor
    num_samples: int
    num_images: int
    usage_before: Optional[float] = None
    usage_after: Optional[float] = None
    perplexity_before: Optional[float] = None
    perplexity_after: Optional[float] = None
    applied: bool = False


def _batches(images, batch_size: int):
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"pyvq.refit: argument 'images' must be (N, C, H, W) or an iterable of "
                f"such batches, got a tensor of shape {tuple(images.shape)}"
            )
        for s in range(0, images.shape[0], batch_size):
            yield images[s : s + batch_size]
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise ValueError(
                "pyvq.refit: every batch of 'images' must be an (B, C, H, W) tensor "
                "(or a tuple/list whose first item is one)"
            )
        yield batch


def _module_device(encoder) -> Optional[torch.device]:
    if isinstance(encoder, nn.Module):
        for p in encoder.parameters():
            return p.device
        for b in encoder.buffers():
            return b.device
    return None


def _lookup_stats(latents: torch.Tensor, codes: torch.Tensor, normalize: bool):
    if normalize:
        latents = F.normalize(latents, dim=1)
        codes = F.normalize(codes, dim=1)
    idx, _ = nearest_code(latents, codes.to(latents.dtype))
    perplexity, usage = code_usage_stats(idx, codes.shape[0])
    return float(usage), float(perplexity)


@torch.no_grad()
def sample_latents(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images,
    num_samples: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    device=None,
    expected_dim: Optional[int] = None,
):
    """Draw latent vectors uniformly from an image set, in one pass.

    Each of the P samples is an image drawn uniformly with replacement, then
    a position drawn uniformly in its (h, w) latent grid. The images are
    streamed once: every sample slot is a reservoir of size one that, after
    a batch of b images brings the count to n, switches to that batch with
    probability b / n (then to a uniform image of it), which leaves each
    slot uniform over all images seen. Only (P, dim) latents are kept.

    Args:
        encoder: callable, (B, C, H, W) -> (B, dim, h, w); run under no_grad.
        images: (N, C, H, W) tensor or iterable of (B, C, H, W) batches (or of
            tuples/lists whose first item is one).
        num_samples: P >= 1.
        batch_size: batch size used to split a tensor ``images``.
        seed: seed of the private CPU generator behind every draw.
        device: where the samples are kept (default: the latents' device).
        expected_dim: raise ValueError unless the latents have this dim.

    Returns:
        (samples, num_images): (P, dim) float32 and the number of images seen.
    """
    check_int("num_samples", num_samples, where="sample_latents", minimum=1)
    check_int("batch_size", batch_size, where="sample_latents", minimum=1)
    enc_device = _module_device(encoder)
    gen = torch.Generator().manual_seed(seed)  # CPU: the draws are tiny
    samples = None  # (P, dim) float32 on `device`
    seen = 0
    for batch in _batches(images, batch_size):
        if enc_device is not None:
            batch = batch.to(enc_device)
        lat = encoder(batch)
        if not isinstance(lat, torch.Tensor) or lat.dim() != 4 or lat.shape[0] != batch.shape[0]:
            raise ValueError(
                "pyvq.refit: 'encoder' must return (B, dim, h, w) latents for a (B, C, H, W) "
                f"batch, got {tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__} "
                f"for a batch of shape {tuple(batch.shape)}"
            )
        b, dim, h, w = lat.shape
        if b == 0:
            continue
        if samples is None:
            if expected_dim is not None and expected_dim != dim:
                raise ValueError(
                    f"pyvq.refit: the encoder's latent dim ({dim}) must equal the quantizer's dim ({expected_dim})"
                )
            device = torch.device(device) if device is not None else lat.device
            samples = torch.zeros(num_samples, dim, dtype=torch.float32, device=device)
        elif dim != samples.shape[1]:
            raise ValueError(f"pyvq.refit: the encoder's latent dim changed from {samples.shape[1]} to {dim}")
        seen += b
        # After this batch each sample slot holds a uniformly drawn image of
        # the `seen` so far: it switches to this batch with probability b/seen.
        take = (torch.rand(num_samples, generator=gen) < b / seen).nonzero().squeeze(1)
        if take.numel() == 0:
            continue
        img = torch.randint(b, (take.numel(),), generator=gen)
        pos = torch.randint(h * w, (take.numel(),), generator=gen)
        vecs = lat.flatten(2)[img.to(lat.device), :, pos.to(lat.device)]  # (T, dim)
        samples[take.to(samples.device)] = vecs.to(device=samples.device, dtype=torch.float32)
    if samples is None:
        raise ValueError("pyvq.refit: argument 'images' yielded no images")
    bad = int((~torch.isfinite(samples)).sum())
    if bad:
        raise ValueError(f"pyvq.refit: the encoder produced {bad} non-finite latent values")

    return samples, seen


@torch.no_grad()
def rebuild_codebook(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images,
    num_codes: int,
    num_samples: int = 65536,
    *,
    batch_size: int = 32,
    kmeans_iters: int = 20,
    init: str = "afkmc2",
    chain_length: int = 200,
    seed: int = 0,
    quantizer: Optional[VectorQuantizer] = None,
    normalize: Optional[bool] = None,
    apply: bool = False,
    device=None,
) -> RefitResult:
    """Re-build a codebook by k-means on sampled encoder latents (ReFiT).

    Args:
        encoder: callable mapping a (B, C, H, W) image batch to (B, dim, h, w)
            pre-quantisation latents. Called under ``torch.no_grad``; its
            train/eval mode is left as the caller set it (use eval).
        images: an (N, C, H, W) tensor (split into ``batch_size`` batches) or
            an iterable of (B, C, H, W) batches, or of tuples/lists whose
            first item is such a batch (a DataLoader of (image, label)).
            Iterated once.
        num_codes: codebook size K (k of k-means); must not exceed
            ``num_samples``.
        num_samples: P, the number of latent vectors clustered. Each is an
            image drawn uniformly with replacement, then a latent position
            drawn uniformly in it. Drawn in one streaming pass (a reservoir
            of size one per sample, advanced a batch at a time), so only
            (P, dim) latents are kept whatever the dataset size.
        batch_size: batch size used to split a tensor ``images``.
        kmeans_iters, init, chain_length: passed to ``pyvq.ops.kmeans``.
        seed: seeds the sampling and k-means (a private generator; the global
            RNG is untouched).
        quantizer: optional ``VectorQuantizer``; its dim must match. When
            given, usage and perplexity of the sampled latents under the old
            and the new codebook are reported.
        normalize: cluster unit-normalised latents (spherical codebook).
            Default: ``quantizer.l2_normalize`` if a quantizer is given, else
            False.
        apply: load the new codebook into ``quantizer``
            (``quantizer.load_codebook``, which also resets its statistics).
        device: where latents are gathered and clustered; default the
            device the encoder's latents come out on. Image batches are moved
            to the encoder's parameter device first.

    Returns:
        RefitResult with ``codebook`` (num_codes, dim) float32.
    """
    check_int("num_codes", num_codes, where="rebuild_codebook", minimum=1)
    check_int("num_samples", num_samples, where="rebuild_codebook", minimum=num_codes)
    check_int("batch_size", batch_size, where="rebuild_codebook", minimum=1)
    if apply and quantizer is None:
        raise ValueError("rebuild_codebook: apply=True needs a 'quantizer' to load the codebook into")
    if quantizer is not None and quantizer.num_codes != num_codes:
        raise ValueError(
            f"rebuild_codebook: argument 'num_codes' ({num_codes}) must equal the quantizer's "
            f"num_codes ({quantizer.num_codes})"
        )
    if normalize is None:
        normalize = bool(quantizer.l2_normalize) if quantizer is not None else False

    samples, seen = sample_latents(
        encoder, images, num_samples, batch_size=batch_size, seed=seed, device=device,
        expected_dim=quantizer.dim if quantizer is not None else None,
    )

    data = F.normalize(samples, dim=1) if normalize else samples
    codebook = kmeans(data, num_codes, iters=kmeans_iters, init=init, chain_length=chain_length, seed=seed)
    if normalize:
        codebook = F.normalize(codebook, dim=1)

    result = RefitResult(codebook=codebook, num_samples=num_samples, num_images=seen)
    if quantizer is not None:
        old = quantizer.codebook.detach().to(device=samples.device, dtype=torch.float32)
        result.usage_before, result.perplexity_before = _lookup_stats(samples, old, quantizer.l2_normalize)
        result.usage_after, result.perplexity_after = _lookup_stats(samples, codebook, quantizer.l2_normalize)
        if apply:
            quantizer.load_codebook(codebook)
            result.applied = True
    return result


def freeze_encoder(model: nn.Module, *, attr: Optional[str] = "encoder", also: Iterable[str] = ()) -> list[str]:
    """Freeze the encoder for ReFiT's decoder fine-tuning.

    Sets ``requires_grad=False`` on every parameter of the encoder and puts
    it in eval mode (BatchNorm statistics and dropout frozen too).

    Args:
        model: a tokenizer with an encoder submodule named ``attr``, or the
            encoder itself (when it has no such attribute, or attr is None).
        attr: name of the encoder submodule of ``model``.
        also: names of further submodules of ``model`` to freeze with it
            (e.g. ``("quant_conv",)``), as accepted by ``get_submodule``.

    Returns:
        The names of the frozen parameters, qualified from ``model``
        (e.g. "encoder.conv_in.weight").

    Note: a later ``model.train()`` switches the encoder back to train mode
    (requires_grad stays off); call ``model.encoder.eval()`` after it, or
    freeze after setting the mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_encoder: argument 'model' must be an nn.Module, got {type(model).__name__}")
    names = []
    if attr is not None and isinstance(getattr(model, attr, None), nn.Module):
        targets = [attr]
    else:
        targets = [""]
    targets += list(also)
    for prefix in targets:
        sub = model.get_submodule(prefix)
        sub.eval()
        for name, p in sub.named_parameters():
            p.requires_grad_(False)
            full = f"{prefix}.{name}" if prefix else name
            if full not in names:
                names.append(full)
    return names
