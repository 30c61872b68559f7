"""torch.distributed set-up for ``torchrun`` launches (gloo on CPU, nccl on GPU).

Failures. The process group is created with a timeout (``dist_timeout_s``:
``TrainConfig.dist_timeout_s``, else ``$PYVQ_DIST_TIMEOUT``, else 300 s), so
no collective waits longer than that for a rank that is stuck or gone.
Measured with gloo (torch 2.14, 2 processes on one machine, with and
without torchrun): when a rank is killed (SIGKILL) the others' pending
collective fails at once ("Connection reset by peer"); when a rank raises,
the others fail ("Connection closed by peer") once its process has exited
(its sockets close then; destroying its process group does not close them
earlier, DDP still holds the group), or at the timeout, whichever comes
first; a rank that stays alive but never reaches the collective (a loop, a
sleep, a receive nobody sends) holds the others until the timeout, and
without a timeout gloo waits 30 minutes. torchrun's agent tears the rest of
the job down (SIGTERM) as soon as one rank has exited, so it never waits on
a stuck rank for longer than the timeout either. ``collective_guard`` turns
such an error into a ``DistributedFailure`` whose one-line message names
this rank, the peer (with two processes: the other rank; with more, gloo's
error does not say which) and the timeout; the process then exits normally
(measured: ``destroy_process_group`` and interpreter exit return at once
after either error).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pyvq._collectives import all_reduce_

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "PYVQ_DIST_TIMEOUT"

# Substrings of the errors gloo, nccl and c10d raise when a peer is gone or a
# collective timed out (gloo raises plain RuntimeErrors).
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket closed", "remote process exited")
_TIMED_OUT = ("timed out", "timeout")
_DIST_MARKERS = ("gloo", "nccl", "c10d", "processgroup") + _PEER_GONE


class DistributedFailure(RuntimeError):
    """A collective failed because another rank died, exited or is stuck (or
    the collective timed out). ``rank``/``world_size``: this process;
    ``peer``: the rank that failed when it is known (two processes), else
    None; ``timed_out``: the collective hit ``dist_timeout_s``."""

    def __init__(self, message: str, *, rank: int, world_size: int, peer: int | None, timed_out: bool):
        super().__init__(message)
        self.rank, self.world_size, self.peer, self.timed_out = rank, world_size, peer, timed_out


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank, device, and
    the process group's timeout in seconds."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_timeout_s(value: float | None = None) -> float:
    """The collective timeout in seconds: ``value``, else ``$PYVQ_DIST_TIMEOUT``,
    else 300. Raises ValueError naming the source unless it is a finite
    number > 0."""
    source = "argument 'timeout_s'"
    if value is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or not raw.strip():
            return DEFAULT_TIMEOUT_S
        source = f"${TIMEOUT_ENV}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"init_distributed: {source} must be a number of seconds > 0, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"init_distributed: {source} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    ``device``: "cpu", "cuda" or None (cuda when available). The backend is
    nccl for CUDA and gloo for CPU. A single process needs no process group.
    ``timeout_s``: how long a collective (and the start-up rendezvous) waits
    for the other ranks (``dist_timeout_s``; None: ``$PYVQ_DIST_TIMEOUT``
    or 300 s). A group that already exists is kept as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"init_distributed: argument 'device' must be 'cpu' or 'cuda', got {device!r}")
    timeout = dist_timeout_s(timeout_s)
    dev = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        except RuntimeError as exc:  # DistStoreError / DistNetworkError are RuntimeErrors
            raise DistributedFailure(
                f"rank {rank} of {world}: joining the process group failed within dist_timeout_s={timeout:g} s "
                f"(are all {world} ranks running?): {_first_line(exc)}",
                rank=rank, world_size=world, peer=None, timed_out=_matches(exc, _TIMED_OUT)) from exc
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, timeout_s=timeout)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _matches(exc: BaseException, needles) -> bool:
    text = str(exc).lower()
    return any(n in text for n in needles)


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of torch.distributed itself (a failed or
    timed-out collective), as opposed to an error of the code around it."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and _matches(exc, _DIST_MARKERS))


def collective_failure(exc: BaseException, info: DistInfo, what: str) -> DistributedFailure:
    """The ``DistributedFailure`` for collective error ``exc`` raised during
    ``what`` (e.g. "step 4") on this rank."""
    peer = 1 - info.rank if info.world_size == 2 else None
    who = f"rank {peer}" if peer is not None else "another rank"
    head = f"rank {info.rank} of {info.world_size}: {what}"
    if _matches(exc, _PEER_GONE):
        timed_out = False
        text = (f"{head} failed: {who} closed its connection (it crashed, was killed or exited; its own log has "
                f"its error)")
    elif _matches(exc, _TIMED_OUT):
        timed_out = True
        text = (f"{head} timed out after dist_timeout_s={info.timeout_s:g} s: {who} did not join the collective "
                f"(stuck or dead; raise TrainConfig.dist_timeout_s / ${TIMEOUT_ENV} if a rank may legitimately "
                f"pause longer, e.g. rank 0 writing a large checkpoint)")
    else:
        timed_out = False
        text = f"{head} failed in a collective ({who} may have failed): {_first_line(exc)}"
    return DistributedFailure(text, rank=info.rank, world_size=info.world_size, peer=peer, timed_out=timed_out)


@contextmanager
def collective_guard(info: DistInfo, what: str):
    """Re-raise a torch.distributed error inside the block as a
    ``DistributedFailure`` (one-line message: this rank, ``what``, the peer,
    the timeout), chained to the original, after destroying the process
    group (the group is broken by then; measured on gloo, destroying it
    returns at once after a peer's death or a timeout). Other errors pass
    unchanged; a single process is not guarded."""
    if not info.distributed:
        yield
        return
    try:
        yield
    except DistributedFailure:
        raise
    except RuntimeError as exc:
        if not is_collective_error(exc):
            raise
        failure = collective_failure(exc, info, what)
        cleanup_distributed()
        raise failure from exc


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (identity for one process)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    all_reduce_(t)  # returns once gloo's worker thread let go of t (see pyvq._collectives)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
