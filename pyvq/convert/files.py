"""Reading weights files safely: ``torch.save`` files (Lightning checkpoints
included) with a restricted unpickler that runs no code and keeps the
tensors, and a
diffusers ``save_pretrained`` folder's ``config.json`` and weights (single or
sharded safetensors, or a ``.bin``). diffusers itself is never imported.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from torch.serialization import SourceChangeWarning

from pyvq.convert import _safe_unpickle
from pyvq.convert._safe_unpickle import check_container, recording, tensors_only

__all__ = ["read_diffusers_config", "read_diffusers_weights", "torch_load"]

_CONFIG_NAME = "config.json"
_WEIGHTS_STEM = "diffusion_pytorch_model"


def _outside_convert() -> int:
    """The ``stacklevel`` that, from the caller's frame, points at the first frame outside pyvq.convert."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


def torch_load(path: str, what: str) -> dict:
    """The tensors of a ``torch.save`` file, read on the CPU without running any code it holds.

    Any pickled object beside the tensors (a Lightning checkpoint's callbacks
    and hyper-parameters, numpy scalars, ...) is read as an inert placeholder
    and dropped (``pyvq.convert._safe_unpickle`` says how); what is returned
    are the file's dicts (str keys) down to their tensors. A ``ValueError``
    naming ``what`` and the file when it is not such a file, or holds no
    tensor.
    """
    expected = "expected a torch.save file holding a state dict (or a Lightning .ckpt with a 'state_dict')"
    try:
        with open(path, "rb") as f:
            refused = check_container(f)
            if refused is None:
                with recording() as placeholders, warnings.catch_warnings():
                    # legacy files name a pickled module's class with its source: torch compares it with a
                    # placeholder's and would warn that it changed
                    warnings.simplefilter("ignore", SourceChangeWarning)
                    obj = torch.load(
                        f, map_location="cpu", weights_only=False, mmap=False, pickle_module=_safe_unpickle
                    )
                state = None if isinstance(obj, torch.Tensor) else tensors_only(obj)
    except OSError:
        raise
    except Exception as exc:  # any failure to parse an untrusted file means: not a checkpoint we can read
        detail = " ".join(str(exc).split())[:300]
        refused = f"reading it failed ({type(exc).__name__}: {detail})"
        raise ValueError(f"{what}: cannot read {path!r}: {expected}, but {refused}") from exc
    if refused is not None:
        raise ValueError(f"{what}: cannot read {path!r}: {expected}, but {refused}")
    dropped = sorted({n for n in placeholders if n.startswith("torch.") and "._rebuild_" in n})
    if dropped:
        warnings.warn(
            f"{what}: {path!r} holds tensors of kinds pyvq does not read (made by {', '.join(dropped)}: "
            "quantized, sparse, nested, meta or subclass tensors); they were dropped",
            stacklevel=_outside_convert(),
        )
    if state is None:
        top = getattr(obj, "pickled_name", type(obj).__name__)
        raise ValueError(f"{what}: cannot use {path!r}: {expected}, but it holds no tensor in a dict with str keys "
                         f"(its top-level object is a {top})")
    return state


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
