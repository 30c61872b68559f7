"""Atomic, pickle-free, verified training checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding

- ``weights.safetensors``: every module's state dict, keys prefixed by the
  module's name (``model.encoder.conv_in.weight``, ``disc....``, ``ema....``);
- ``state.pt``: optimizer and scheduler state dicts, the step, RNG states
  and whatever ``extra`` the trainer adds (plain tensors, numbers, strings,
  lists and dicts only), read back with ``torch.load(weights_only=True)`` so
  loading never runs pickled code;
- ``meta.json``, written last: step, wall time, module names and the byte
  size and SHA-256 of the two files above.

Write order (each file fsynced): the three files into a temporary directory
``.tmp-step_<N>-<pid>``, that directory renamed to ``step_<N>``, then
``<run>/checkpoints/latest`` (a one-line file, itself replaced atomically)
rewritten to name it, then older checkpoints pruned (renamed to
``.del-...`` first, so a half-deleted one is never a ``step_`` directory).
A ``step_`` directory exists only once complete (the rename of a finished,
fsynced directory): a writer killed at any point leaves every ``step_``
directory whole, and ``latest`` naming the newest one or the one before. A
failed write (``ENOSPC``, say) removes what it wrote and raises
``CheckpointWriteError``; leftovers of a killed writer are removed by the
next save. Before writing step N, the ``step_`` directories of later steps
(a future the run left: it resumed from N or earlier, because they are
corrupt) are moved to ``checkpoints/superseded/`` with a warning, never
deleted; so ``latest`` always names the newest ``step_`` directory and
pruning only ever removes older ones.

Reading (``latest_checkpoint``, ``load_checkpoint``) goes by the folder's
contents: the newest ``step_`` directory that verifies (``meta.json``
parses, sizes and SHA-256 match, the safetensors header parses and
``state.pt`` loads: ``verify_checkpoint``), whatever ``latest`` says (a
warning names the bad files skipped, and a ``latest`` that is missing or
names another one); when none is valid they raise
``CorruptCheckpointError`` naming the folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from typing import Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pyvq._checks import check_int

__all__ = [
    "CheckpointWarning",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "capture_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

_WEIGHTS = "weights.safetensors"
_STATE = "state.pt"
_META = "meta.json"
_LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"(\.tmp-.*|\.del-.*|latest\.tmp)-(\d+)")  # a writer's temporary names end in its pid


class CheckpointWarning(UserWarning):
    """A checkpoint could not be written, or one found on disk is corrupt and
    was skipped (the message names the file)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; nothing half-written was left behind and
    the previous checkpoint is intact. ``errno`` is the cause's, if any."""


class CorruptCheckpointError(ValueError):
    """A checkpoint directory (or every checkpoint of a run) is incomplete
    or corrupt; the message names the bad file."""


class _UnloadableStateError(CorruptCheckpointError, pickle.UnpicklingError):
    """state.pt does not unpickle under ``weights_only`` (damaged, or a pickle
    that would run code: never loaded either way)."""


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


# ------------------------------------------------------------------ writing
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass


def _file_record(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _write_weights(folder: str, tensors: dict) -> None:
    path = os.path.join(folder, _WEIGHTS)
    save_file(tensors, path)
    _fsync_file(path)


def _write_state(folder: str, state: dict) -> None:
    path = os.path.join(folder, _STATE)
    torch.save(state, path)
    _fsync_file(path)


def _write_meta(folder: str, meta: dict) -> None:
    path = os.path.join(folder, _META)
    with open(path, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_file(tmp)
        raise


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _remove_tree(path: str) -> None:
    """Remove a checkpoint directory: first renamed out of the ``step_``
    namespace, so a removal cut short never leaves a half checkpoint."""
    head, name = os.path.split(path)
    trash = os.path.join(head, f".del-{name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _publish(tmp: str, final: str) -> None:
    """Rename the finished temporary directory into place (replacing an
    older checkpoint of the same step)."""
    if os.path.exists(final):
        _remove_tree(final)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _dead_leftovers(root: str) -> list[str]:
    """The temporary files and directories of checkpoint writers that died
    (their pid is in the name and no longer alive)."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in names if (m := _LEFTOVER.fullmatch(n)) is not None and not _pid_alive(int(m.group(2)))]


def _clean_leftovers(root: str) -> None:
    """Remove ``_dead_leftovers``."""
    for name in _dead_leftovers(root):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_file(path)


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, name) of every ``step_<N>`` directory, newest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _STEP_DIR.fullmatch(name)
        if m is not None and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found, reverse=True)


def _set_aside_newer(root: str, step: int) -> None:
    """Move the ``step_`` directories of steps after ``step`` (about to be
    written) into ``root/superseded/``, with a warning naming them."""
    newer = [name for s, name in _step_dirs(root) if s > step]
    if not newer:
        return
    aside = os.path.join(root, "superseded")
    os.makedirs(aside, exist_ok=True)
    moved = []
    for name in newer:
        target = os.path.join(aside, name)
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(aside, f"{name}-{n}")
        os.replace(os.path.join(root, name), target)
        moved.append(target)
    _fsync_dir(root)
    warnings.warn(f"save_checkpoint: writing step {step}, so the later checkpoints of this run (a future it left, "
                  f"having resumed from step {step} or earlier) were moved aside, not deleted: "
                  f"{', '.join(moved)}", CheckpointWarning, stacklevel=4)


def _prune(root: str, keep: int, newest: int, protect: str) -> None:
    """Remove all but the ``keep`` newest checkpoints, counting ``newest``
    (the one just written, which ``latest`` names: ``protect``); only
    checkpoints of steps before ``newest`` are ever removed."""
    older = [name for step, name in _step_dirs(root) if step < newest and name != protect]
    for name in older[max(0, max(1, keep) - 1):]:
        try:
            _remove_tree(os.path.join(root, name))
        except OSError as exc:
            warnings.warn(f"save_checkpoint: could not remove the old checkpoint {os.path.join(root, name)} "
                          f"({exc}); it is kept", CheckpointWarning, stacklevel=3)


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

    Raises:
        CheckpointWriteError: a file could not be written (its ``errno`` is
            the cause's: ``errno.ENOSPC`` for a full disk); the temporary
            directory is removed and ``latest`` still names the previous
            checkpoint.
    """
    check_int("step", step, where="save_checkpoint", minimum=0)
    root = _ckpt_root(run_dir)
    name = f"step_{step:09d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    published = False
    try:
        os.makedirs(root, exist_ok=True)
        _clean_leftovers(root)
        _set_aside_newer(root, step)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {}
        for prefix, module in modules.items():
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous().clone()
        _write_weights(tmp, tensors)
        del tensors
        state = {
            "step": step,
            "optimizers": {k: v.state_dict() for k, v in (optimizers or {}).items()},
            "schedulers": {k: v.state_dict() for k, v in (schedulers or {}).items()},
            "rng": capture_rng_state(),
            "extra": dict(extra or {}),
        }
        _write_state(tmp, state)
        files = {f: _file_record(os.path.join(tmp, f)) for f in (_WEIGHTS, _STATE)}
        _write_meta(tmp, {"step": step, "time": time.time(), "modules": sorted(modules), "files": files})
        _publish(tmp, final)
        published = True
        _atomic_write_text(os.path.join(root, _LATEST), name + "\n")
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if published and _committed_name(root) != name:  # complete, never committed: take it back
            try:
                _remove_tree(final)
            except OSError:
                pass
        previous = _committed_name(root)
        kept = (f"'latest' still names {os.path.join(root, previous)}" if previous
                else "the run has no earlier checkpoint")
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointWriteError(
            getattr(exc, "errno", None) or errno.EIO,
            f"save_checkpoint: could not write checkpoint {name} into {root}: {type(exc).__name__}: {cause}"
            f"{f' ({exc.filename})' if getattr(exc, 'filename', None) else ''}; its temporary directory was "
            f"removed and {kept}") from exc
    _prune(root, keep, step, name)
    return final


# ------------------------------------------------------------------ reading
def _committed_name(root: str) -> str | None:
    """The step directory ``latest`` names, if it reads as one."""
    try:
        with open(os.path.join(root, _LATEST)) as f:
            name = f.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.fullmatch(name) else None


def _verified_state(path: str, map_location="cpu") -> dict:
    """Check a checkpoint directory and return its ``state.pt`` contents;
    CorruptCheckpointError naming the bad file otherwise."""
    meta_path = os.path.join(path, _META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("no integer 'step'")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {meta_path} is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {meta_path} does not read as its "
                                     f"meta.json ({exc})") from None
    for fname in (_WEIGHTS, _STATE):
        if not os.path.isfile(os.path.join(path, fname)):
            raise CorruptCheckpointError(f"checkpoint {path} is incomplete: {os.path.join(path, fname)} is missing")
    wpath = os.path.join(path, _WEIGHTS)
    try:
        with safe_open(wpath, framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {wpath} is not a readable safetensors "
                                     f"file ({exc})") from None
    spath = os.path.join(path, _STATE)
    try:
        state = torch.load(spath, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _UnloadableStateError(f"checkpoint {path} is corrupt: {spath} does not load under "
                                    f"weights_only ({str(exc)[:300]})") from None
    except Exception as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {spath} does not load "
                                     f"({type(exc).__name__}: {str(exc)[:200]})") from None
    # Sizes and hashes last: the loads above already caught most damage and
    # name it better. Checkpoints written before they were recorded have none.
    for fname, rec in (meta.get("files") or {}).items():
        fpath = os.path.join(path, fname)
        size = os.path.getsize(fpath) if os.path.isfile(fpath) else None
        if size != rec.get("bytes"):
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {fpath} has {size} bytes, "
                                         f"{rec.get('bytes')} were written (truncated?)")
        if _file_record(fpath)["sha256"] != rec.get("sha256"):
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {fpath} does not match the SHA-256 "
                                         f"recorded when it was written")
    if not isinstance(state, dict) or state.get("step") != meta["step"]:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {spath} is not the state of step "
                                     f"{meta['step']} that {meta_path} names")
    return state


def verify_checkpoint(path: str) -> None:
    """Check that a checkpoint directory is complete and intact: meta.json
    parses, the files have the sizes and SHA-256 recorded at save time, the
    safetensors header parses and state.pt loads (``weights_only``).

    Raises:
        CorruptCheckpointError: naming the bad file.
    """
    _verified_state(path)


def _warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest valid checkpoint directory of a run, or None when it has none.

    Found from the folder's contents: the ``step_`` directory of the highest
    step that verifies (``verify_checkpoint``). A ``CheckpointWarning``
    names each bad one skipped, and ``latest`` when it is missing or names
    another directory (a writer killed between the rename of a complete
    checkpoint and the update of ``latest``, or a ``latest`` edited by hand).

    Raises:
        CorruptCheckpointError: the run has checkpoints but none is valid
            (the message names the folder and why each failed).
    """
    root = _ckpt_root(run_dir)
    dirs = _step_dirs(root)
    latest = os.path.join(root, _LATEST)
    for name in _dead_leftovers(root):
        _warn(f"latest_checkpoint: ignoring {os.path.join(root, name)}, left by a checkpoint writer that died "
              f"(pid {_LEFTOVER.fullmatch(name).group(2)}); the next save removes it")
    committed = _committed_name(root)
    if committed is None and not dirs:
        return None
    problems = []
    if committed is not None and not os.path.isdir(os.path.join(root, committed)):
        problems.append(f"{latest} names {committed}, which does not exist")
    for _, name in dirs:
        path = os.path.join(root, name)
        try:
            _verified_state(path)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            _warn(f"latest_checkpoint: skipping {exc}")
            continue
        if name != committed:
            what = ("is missing" if not os.path.exists(latest) else
                    f"names {committed}" if committed else "does not name a step_<N> checkpoint")
            _warn(f"latest_checkpoint: {latest} {what}; using {path}, the newest valid checkpoint in {root}")
        return path
    raise CorruptCheckpointError(f"latest_checkpoint: no valid checkpoint in {root}: " + "; ".join(problems)
                                 + ". Nothing to resume from: start the run again (into another folder, or with "
                                 "`pyvq train --overwrite`, which moves this one's contents aside)")


def load_checkpoint(
    path: str,
    modules: Mapping[str, torch.nn.Module],
    *,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, object] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load a checkpoint directory (or a run directory's ``latest_checkpoint``)
    in place, after verifying it (``verify_checkpoint``).

    Returns the state dict's ``{"step", "extra"}``. Raises FileNotFoundError
    naming the path when there is no checkpoint, CorruptCheckpointError
    naming the bad file when it is corrupt, and KeyError naming the modules
    whose weights are missing from it.
    """
    if os.path.isfile(os.path.join(path, _LATEST)) or os.path.isdir(_ckpt_root(path)):
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"load_checkpoint: no complete checkpoint under {path}")
        path = found
    if not any(os.path.isfile(os.path.join(path, f)) for f in (_WEIGHTS, _STATE, _META)):
        raise FileNotFoundError(f"load_checkpoint: {path} is not a checkpoint (no {_WEIGHTS})")
    state = _verified_state(path, map_location)
    tensors = load_file(os.path.join(path, _WEIGHTS), device=str(map_location))
    for prefix in modules:
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not sub and modules[prefix].state_dict():
            raise KeyError(f"load_checkpoint: checkpoint {path} has no weights for module {prefix!r}")
    for prefix, module in modules.items():
        try:
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        except RuntimeError as exc:  # missing / unexpected keys, other shapes
            raise ValueError(f"load_checkpoint: the weights of module {prefix!r} in {path} do not fit the "
                             f"{type(module).__name__} given (a checkpoint of another model or configuration? "
                             f"resume a run with the config it was started with): {str(exc)[:400]}") from None
    for name, opt in (optimizers or {}).items():
        try:
            opt.load_state_dict(state["optimizers"][name])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"load_checkpoint: the state of optimizer {name!r} in {path} does not fit this "
                             f"run's optimizer (other parameters: another model or configuration?): "
                             f"{type(exc).__name__}: {exc}") from None
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(state["schedulers"][name])
    if restore_rng:
        restore_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
