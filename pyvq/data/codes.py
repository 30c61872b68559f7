"""Cached tokenizer codes: a prior trains on them without re-running the tokenizer.

A codes folder holds safetensors shards ``codes-00000.safetensors``, ... (one
tensor ``"codes"`` each) and ``codes.json``::

    {"kind": "indices" | "keys", "shape": [H, W] | [C, H, W], "count": N,
     "num_classes": K (indices only), "tokenizer": "<model folder>",
     "tokenizer_class": "VQGAN", "tokenizer_fingerprint": "sha256:...",
     "image_size": S, "shards": [...]}

``indices`` are a VQ tokenizer's code indices, stored int64 (H, W) per
image; ``keys`` are BRICS key codes in [0, 1], stored float32 (C, H, W).

``tokenizer_fingerprint`` (``tokenizer_fingerprint(model)``) identifies the
tokenizer's weights; a prior trained on the codes records it with the rest
of the tokenizer's description (``tokenizer_record``), so that ``pyvq
sample`` / ``pyvq inpaint`` can refuse a tokenizer whose codes mean other
things. Codes folders written before it was recorded lack the key.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from pyvq._checks import check_int
from torch.utils.data import DataLoader, Dataset

META_NAME = "codes.json"
_KINDS = ("indices", "keys")


def tokenizer_fingerprint(model) -> str:
    """``"sha256:<16 hex digits>"`` of a model's weights: every state-dict
    tensor's name, dtype, shape and bytes, in name order. Equal weights give
    equal fingerprints on any device; a tokenizer trained further, fine-tuned
    or re-fitted (ReFiT) gets a new one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def tokenizer_record(meta: dict) -> dict:
    """What a prior trained on the codes of ``meta`` (a ``codes.json``)
    records about their tokenizer: ``path`` (its model folder, None when
    unknown), ``class``, ``fingerprint`` (None for codes folders written
    before it was recorded), ``kind``, ``num_classes`` (K, indices; None for
    keys), ``shape`` (one code map) and ``image_size``."""
    return {"path": meta.get("tokenizer"), "class": meta.get("tokenizer_class"),
            "fingerprint": meta.get("tokenizer_fingerprint"), "kind": meta["kind"],
            "num_classes": meta.get("num_classes"), "shape": list(meta["shape"]),
            "image_size": meta.get("image_size")}


def tokenizer_codes(model, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(kind, codes) of a batch: VQ indices (B, H, W) or key codes (B, C, H, W)."""
    enc = model.encode(x)
    if isinstance(enc, tuple):  # VQ: (z_q, indices, aux)
        return "indices", enc[1].long()
    if isinstance(enc, torch.Tensor):  # BRICS key codes
        return "keys", enc.float()
    raise TypeError(f"encode_codes: {type(model).__name__} has no discrete indices or key codes to cache "
                    "(a KL autoencoder's latents are not supported)")


@torch.no_grad()
def encode_codes(model, dataset, out_dir: str, *, repeats: int = 1, batch_size: int = 16, shard_size: int = 4096,
                 device: str | torch.device = "cpu", tokenizer_dir: str | None = None) -> dict:
    """Encode ``dataset`` (images (3, S, S) in [-1, 1]) with a tokenizer and
    write the codes to ``out_dir``; returns the metadata.

    ``repeats`` passes over the dataset, each after ``set_epoch(pass)``
    where the dataset has it (fresh random crops and flips of the built-in
    photographs per pass: more distinct code maps from a small image set).
    """
    from safetensors.torch import save_file

    check_int("repeats", repeats, where="encode_codes", minimum=1)
    check_int("shard_size", shard_size, where="encode_codes", minimum=1)
    os.makedirs(out_dir, exist_ok=True)
    model = model.to(device).eval()
    fingerprint = tokenizer_fingerprint(model)
    kind, buffer, shards, count, size = None, [], [], 0, None

    def flush():
        nonlocal buffer
        if buffer:
            name = f"codes-{len(shards):05d}.safetensors"
            save_file({"codes": torch.cat(buffer).contiguous()}, os.path.join(out_dir, name))
            shards.append(name)
            buffer = []

    for r in range(repeats):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(r)
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
            size = x.shape[-1]
            kind, codes = tokenizer_codes(model, x)
            buffer.append(codes.cpu())
            count += len(codes)
            if sum(len(b) for b in buffer) >= shard_size:
                flush()
    flush()
    if count == 0:
        raise ValueError("encode_codes: the dataset is empty")
    shape = list(codes.shape[1:])  # one code map
    meta = {"kind": kind, "shape": shape, "count": count, "image_size": size,
            "tokenizer": os.path.abspath(tokenizer_dir) if tokenizer_dir else None,
            "tokenizer_class": type(model).__name__, "tokenizer_fingerprint": fingerprint, "shards": shards}
    if kind == "indices":
        meta["num_classes"] = int(model.config.n_embed)
    with open(os.path.join(out_dir, META_NAME), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def read_codes_meta(folder: str) -> dict:
    path = os.path.join(folder, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a codes folder: {META_NAME} is missing (write one with `pyvq encode`)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("kind") not in _KINDS:
        raise ValueError(f"{path}: 'kind' must be one of {_KINDS}, got {meta.get('kind')!r}")
    return meta


class CodesDataset(Dataset):
    """The code maps of a codes folder, in memory: int64 (H, W) indices or
    float32 (C, H, W) key codes per item; ``meta`` is its ``codes.json``."""

    def __init__(self, folder: str):
        from safetensors.torch import load_file

        self.folder = folder
        self.meta = read_codes_meta(folder)
        parts = [load_file(os.path.join(folder, name))["codes"] for name in self.meta["shards"]]
        self.codes = torch.cat(parts) if parts else torch.empty(0)
        if len(self.codes) != self.meta["count"] or list(self.codes.shape[1:]) != list(self.meta["shape"]):
            raise ValueError(f"{folder}: the shards hold {tuple(self.codes.shape)}, but {META_NAME} says "
                             f"{self.meta['count']} codes of shape {self.meta['shape']}")

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.codes[index]
