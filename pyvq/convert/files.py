"""Reading weights files safely: ``torch.load`` restricted to tensors (with a
message that says how to re-save a checkpoint holding pickled objects), and a
diffusers ``save_pretrained`` folder's ``config.json`` and weights (single or
sharded safetensors, or a ``.bin``). diffusers itself is never imported.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any

import torch

__all__ = ["read_diffusers_config", "read_diffusers_weights", "torch_load"]

_CONFIG_NAME = "config.json"
_WEIGHTS_STEM = "diffusion_pytorch_model"


def _unpickler_detail(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, flags=re.S)
    return " ".join((match.group(1) if match else text.splitlines()[0] if text else "").split())


def torch_load(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ``ValueError`` naming ``what`` if it refuses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "Unsupported global" in detail:
            reason = (
                "the file contains non-tensor Python objects (pickled classes or functions, typically the "
                "Lightning hyper-parameters), and pyvq never unpickles code"
            )
        else:
            reason = "it is not a checkpoint that torch.load(weights_only=True) can read"
        raise ValueError(
            f"{what}: cannot load {path!r} safely: {reason} ({detail}). If you trust the file, re-save only its "
            "weights once, in a separate Python session:\n"
            f"    ckpt = torch.load({path!r}, map_location='cpu', weights_only=False)\n"
            "    torch.save({'state_dict': ckpt['state_dict']}, 'weights.ckpt')\n"
            "and pass 'weights.ckpt' (or pass the state dict itself)."
        ) from exc


def read_diffusers_config(directory: str) -> dict:
    what = "from_diffusers"
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what}: no such directory {directory!r}")
    config_path = os.path.join(directory, _CONFIG_NAME)
    if not os.path.isfile(config_path):
        hint = ""
        if os.path.isfile(os.path.join(directory, "vae", _CONFIG_NAME)):
            hint = f" (it looks like a pipeline; pass {os.path.join(directory, 'vae')!r})"
        raise FileNotFoundError(f"{what}: {directory!r} has no {_CONFIG_NAME}{hint}")
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ValueError(f"{what}: {config_path!r} is not a diffusers model config (no '_class_name')")
    return cfg


def read_diffusers_weights(directory: str, variant: str | None) -> dict:
    what = "from_diffusers"
    stem = _WEIGHTS_STEM + (f".{variant}" if variant else "")
    single = os.path.join(directory, stem + ".safetensors")
    index = single + ".index.json"
    binary = os.path.join(directory, stem + ".bin")
    if os.path.isfile(single):
        from safetensors.torch import load_file

        state = load_file(single, device="cpu")
    elif os.path.isfile(index):
        from safetensors.torch import load_file

        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(os.path.join(directory, shard), device="cpu"))
    elif os.path.isfile(binary):
        state = torch_load(binary, what)
    else:
        raise FileNotFoundError(
            f"{what}: {directory!r} has none of {os.path.basename(single)}, {os.path.basename(index)}, "
            f"{os.path.basename(binary)}"
            + ("" if variant else " (pass variant='fp16' for a half-precision variant)")
        )
    return dict(state)
