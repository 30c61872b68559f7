"""Blocking torch.distributed collectives that hand the tensor back whole.

gloo runs a collective on one of its worker threads, and that thread keeps
its own reference to the tensor for a moment after the collective completed
and ``dist.all_reduce`` returned (measured, torch 2.14, gloo, 2 ranks: in
about 1 call of 4 the tensor's use count is still above the caller's right
after the call). If the caller drops the tensor in that moment, the worker
thread frees it, and freeing a tensor that Python has seen takes the GIL.
When the main thread has reached interpreter finalization by then, taking
the GIL ends the worker thread inside C++ frames and the process aborts
with "terminate called without an active exception" (SIGABRT). That is what
rank 1 did in 1 of about 15 two-process runs on a loaded 2-core machine:
its last collective was the step's logged metrics, and it exited while rank
0 still wrote the final model (gdb on the core: the gloo thread in
``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` -> ``take_gil``
-> ``pthread_exit``).

``all_reduce_`` and ``broadcast_`` wait, after the collective, until the
worker thread has let go of a CPU tensor (its use count back to what it was
before the call), so the caller's reference is the last one and the tensor
is freed by the caller's thread. The wait sleeps, so the GIL is free
meanwhile; it is normally not needed at all or lasts well under a
millisecond, and it gives up after ``RELEASE_WAIT_S`` (the old behaviour).
CUDA tensors are not waited for: NCCL's watchdog thread holds its work until
the GPU is done, and waiting would turn every collective into a host sync.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

RELEASE_WAIT_S = 5.0
_POLL_S = 1e-4


def _blocking(collective, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """``collective(t, **kwargs)``, then sleep until ``t``'s use count is
    back to what it was before (CPU tensors; at most ``RELEASE_WAIT_S``)."""
    before = t._use_count()
    collective(t, **kwargs)
    if t.device.type == "cpu":
        deadline = time.monotonic() + RELEASE_WAIT_S
        while t._use_count() > before and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    return t


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """``dist.all_reduce(t)`` (a sum) in place; returns ``t`` once the
    backend's worker thread holds no reference to it."""
    return _blocking(dist.all_reduce, t)


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """``dist.broadcast(t, src)`` in place; returns ``t`` once the backend's
    worker thread holds no reference to it."""
    return _blocking(dist.broadcast, t, src=src)
