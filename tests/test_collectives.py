"""pyvq._collectives: a collective returns only once the backend's worker
thread has let go of the tensor, so the caller's reference is the last one
(gloo's worker otherwise may free it at interpreter exit and abort the
process: see the module docstring)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from pyvq import _collectives
from pyvq._collectives import all_reduce_, broadcast_
from pyvq.train.distributed import DistInfo, all_reduce_mean


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group (its worker threads are gloo's, as with more ranks)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _late_holder(monkeypatch, name: str, hold_s: float):
    """Replace ``dist.<name>`` by one that does the work at once and keeps a
    C++ reference to the tensor (a view) for ``hold_s`` seconds from another
    thread, as gloo's worker thread does for a moment."""
    calls = []

    def fake(t, *args, **kwargs):
        view = [t.view(-1)]  # a view holds a reference to t's TensorImpl
        threading.Timer(hold_s, view.clear).start()
        calls.append(time.monotonic())

    monkeypatch.setattr(dist, name, fake)
    return calls


@pytest.mark.parametrize("name, call", [("all_reduce", all_reduce_), ("broadcast", lambda t: broadcast_(t, src=0))])
def test_returns_after_the_worker_let_go(monkeypatch, name, call):
    calls = _late_holder(monkeypatch, name, hold_s=0.05)
    t = torch.ones(3)
    assert call(t) is t
    waited = time.monotonic() - calls[0]
    assert t._use_count() == 1  # the caller's reference alone
    assert waited >= 0.04


def test_counts_only_the_references_taken_by_the_collective(monkeypatch):
    _late_holder(monkeypatch, "all_reduce", hold_s=0.05)
    t = torch.ones(4)
    view = t[1:]  # the caller's own view stays
    all_reduce_(t)
    assert t._use_count() == 2 and view._use_count() >= 1


def test_gives_up_after_the_limit(monkeypatch):
    monkeypatch.setattr(_collectives, "RELEASE_WAIT_S", 0.05)
    _late_holder(monkeypatch, "all_reduce", hold_s=2.0)
    t = torch.ones(2)
    start = time.monotonic()
    all_reduce_(t)
    assert time.monotonic() - start < 1.0  # the old behaviour, not a hang
    assert t._use_count() > 1


def test_gloo_tensors_come_back_unshared_and_right(gloo_group):
    # Measured without the wait: about 1 call in 40 on one process (1 in 4
    # with 2 ranks) left gloo's worker holding the tensor after the call.
    for i in range(500):
        t = torch.full((3,), float(i))
        all_reduce_(t)
        assert t._use_count() == 1 and t.tolist() == [float(i)] * 3
        b = torch.arange(4.0) + i
        broadcast_(b, src=0)
        assert b._use_count() == 1 and b.tolist() == [float(i + k) for k in range(4)]


def test_all_reduce_mean_on_a_gloo_group(gloo_group):
    info = DistInfo(rank=0, world_size=2)  # as if 2 ranks: the mean divides the one rank's sum by 2
    assert all_reduce_mean({"a": 2.0, "b": -4.0}, info) == {"a": 1.0, "b": -2.0}
