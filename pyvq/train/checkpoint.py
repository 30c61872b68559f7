"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding

- ``weights.safetensors``: every module's state dict, keys prefixed by the
  module's name (``model.encoder.conv_in.weight``, ``disc....``, ``ema....``);
- ``state.pt``: optimizer and scheduler state dicts, the step, RNG states
  and whatever ``extra`` the trainer adds (plain tensors, numbers, strings,
  lists and dicts only), read back with ``torch.load(weights_only=True)`` so
  loading never runs pickled code;
- ``meta.json``: step and wall time, for people.

It is written into a temporary directory and renamed into place, and
``<run>/checkpoints/latest`` (a one-line file, itself replaced atomically)
names the newest complete one: a run killed mid-write leaves the previous
checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Mapping

import numpy as np
import torch

from pyvq._checks import check_int
from safetensors.torch import load_file, save_file

_WEIGHTS = "weights.safetensors"
_STATE = "state.pt"
_META = "meta.json"
_LATEST = "latest"


def _ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def capture_rng_state() -> dict:
    """The RNG states of torch (CPU and CUDA), numpy and Python's random."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str,
    step: int,
    modules: Mapping[str, torch.nn.Module],
    *,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, object] | None = None,
    extra: Mapping | None = None,
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` of a run atomically; returns its directory.

    Args:
        run_dir: the run directory (created if needed).
        step: the global step (names the checkpoint).
        modules: name -> module whose state dict is saved (e.g. model,
            discriminator, ema).
        optimizers, schedulers: name -> object with ``state_dict()``.
        extra: more state for ``state.pt`` (weights_only-loadable types).
        keep: how many newest checkpoints to keep (older ones are removed).
    """
    check_int("step", step, where="save_checkpoint", minimum=0)
    root = _ckpt_root(run_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:09d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous().clone()
    save_file(tensors, os.path.join(tmp, _WEIGHTS))
    state = {
        "step": step,
        "optimizers": {k: v.state_dict() for k, v in (optimizers or {}).items()},
        "schedulers": {k: v.state_dict() for k, v in (schedulers or {}).items()},
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
    }
    torch.save(state, os.path.join(tmp, _STATE))
    with open(os.path.join(tmp, _META), "w") as f:
        json.dump({"step": step, "time": time.time(), "modules": sorted(modules)}, f)

    if os.path.exists(final):  # re-saving a step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(os.path.join(root, _LATEST), name + "\n")
    _prune(root, keep)
    return final


def _prune(root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for d in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = _ckpt_root(run_dir)
    try:
        with open(os.path.join(root, _LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    return path if os.path.isfile(os.path.join(path, _STATE)) else None


def load_checkpoint(
    path: str,
    modules: Mapping[str, torch.nn.Module],
    *,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, object] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load a checkpoint directory (or a run directory's latest) in place.

    Returns the state dict's ``{"step", "extra"}``. Raises FileNotFoundError
    naming the path when there is no checkpoint, and KeyError naming the
    modules whose weights are missing from it.
    """
    if os.path.isfile(os.path.join(path, _LATEST)) or os.path.isdir(_ckpt_root(path)):
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"load_checkpoint: no complete checkpoint under {path}")
        path = found
    if not os.path.isfile(os.path.join(path, _WEIGHTS)):
        raise FileNotFoundError(f"load_checkpoint: {path} is not a checkpoint (no {_WEIGHTS})")
    tensors = load_file(os.path.join(path, _WEIGHTS), device=str(map_location))
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not sub and module.state_dict():
            raise KeyError(f"load_checkpoint: checkpoint {path} has no weights for module {prefix!r}")
        module.load_state_dict(sub)
    state = torch.load(os.path.join(path, _STATE), map_location=map_location, weights_only=True)
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(state["optimizers"][name])
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(state["schedulers"][name])
    if restore_rng:
        restore_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
