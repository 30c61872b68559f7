"""Typed outputs of the tokenizers.

    TokenizerOutput(x_rec, aux)               every tokenizer's ``forward``
    VQEncoding(z_q, indices, aux)             ``VQGAN.encode``
    VQAux(loss, perplexity, usage, indices)   the quantiser's terms (VQ aux)
    BRICSAux(keys, kl=None)                   ``BRICS.forward``'s aux

``TokenizerOutput`` and ``VQEncoding`` are NamedTuples, so ``x_rec, aux =
model(x)`` and ``z_q, indices, aux = vqgan.encode(x)`` unpack as before.
The aux types are frozen dataclasses (``aux.loss``) that are also read as
the dicts the models returned before were (``AuxFields``): ``aux["loss"]``,
``"kl" in aux`` (True when that field is set, not None), ``aux.get(name,
default)``, and iterating gives the names of the set fields.
``AutoencoderKL``'s aux is its posterior, a ``DiagonalGaussianDistribution``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch

__all__ = ["AuxFields", "BRICSAux", "TokenizerOutput", "VQAux", "VQEncoding"]


class AuxFields:
    """Dict-style reads of a dataclass's fields that are set (not None)."""

    def _set_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(f"{type(self).__name__}: key {key!r} must be one of the set fields "
                           f"{self._set_names()}, got {key!r}")
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self._set_names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._set_names())

    def __len__(self) -> int:
        return len(self._set_names())

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]`` when that field is set, else ``default``."""
        return getattr(self, key) if key in self else default


@dataclass(frozen=True, eq=False)
class VQAux(AuxFields):
    """The vector quantiser's terms of a batch (``VQGAN``'s aux).

    Attributes:
        loss: 0-d, the VQ loss (codebook + beta * commitment, or
            beta * codebook + commitment with ``beta_term="codebook"``,
            taming's convention; commitment only with an EMA codebook) to add
            to the reconstruction losses.
        perplexity: 0-d, exp(entropy) of the batch's code histogram.
        usage: 0-d, fraction of the codes used at least once in the batch.
        indices: (B, H/f, W/f) int64 code indices.
    """

    loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    indices: torch.Tensor


@dataclass(frozen=True, eq=False)
class BRICSAux(AuxFields):
    """``BRICS.forward``'s aux.

    Attributes:
        keys: (B, Cz, Hz, Wz), the key codes in [0, 1] the decoder was given.
        kl: (B,), the per-sample KL term of the KL variant (``kl=True``);
            None otherwise (then ``"kl" in aux`` is False).
    """

    keys: torch.Tensor
    kl: torch.Tensor | None = None


class VQEncoding(NamedTuple):
    """``VQGAN.encode``'s result.

    Attributes:
        z_q: (B, embed_dim, H/f, W/f) quantised latents, straight-through
            gradient to the encoder.
        indices: (B, H/f, W/f) int64 code indices.
        aux: a ``VQAux``.
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    aux: VQAux


class TokenizerOutput(NamedTuple):
    """A tokenizer's ``forward``: the reconstruction and what training needs.

    Attributes:
        x_rec: (B, out_channels, H, W), the reconstruction.
        aux: ``VQAux`` (``VQGAN``, an ``AsymmetricVQGAN`` on a VQGAN),
            ``BRICSAux`` (``BRICS``) or the posterior, a
            ``DiagonalGaussianDistribution`` (``AutoencoderKL``, an
            ``AsymmetricVQGAN`` on one).
    """

    x_rec: torch.Tensor
    aux: Any
