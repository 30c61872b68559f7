"""Shared benchmark harness: timing, peak memory, tables and JSON.

Benchmarks measure; they never assert. Every script compares methods side by
side in one process, reports medians over repeats, and writes its results as
JSON next to the printed table.

Peak extra memory is read from the kernel (VmHWM of /proc/self/status after
resetting it through /proc/self/clear_refs), so it counts every allocation:
torch's, a library's own malloc, thread scratch. glibc is told to serve
blocks of 64 KiB and more with mmap (MALLOC_MMAP_THRESHOLD_), so freed
memory goes back to the OS and one measurement does not hide the next.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reexec_with_mmap_threshold() -> None:
    """Restart this script once with glibc's mmap threshold fixed at 64 KiB."""
    if os.environ.get(_MMAP_ENV) is None:
        env = dict(os.environ, **{_MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def peak_extra_memory(fn: Callable[[], object]) -> float | None:
    """Peak resident memory (MiB) that ``fn()`` adds to the process, or None
    where the kernel cannot report it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024.0


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
                budget_s: float | None = None) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after ``warmup``.

    With ``budget_s``, stops early (keeping at least one timed run) once the
    timed runs have used that budget: slow baselines stay measurable.
    """
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if budget_s is not None and spent >= budget_s:
            break
    return statistics.median(times)


def import_faiss():
    """The faiss module, or None (saying so) where faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError:
        print("faiss-cpu not installed (pip install -r requirements-bench.txt): no faiss column")
        return None
    return faiss


def time_and_memory(fn: Callable[[], object], *, repeats: int, budget_s: float | None = None,
                    warm: bool = True) -> tuple[float, float | None]:
    """(median seconds, peak extra MiB) of ``fn``. ``warm`` runs it once
    first (compilation, first touch of the allocator's pages); a slow
    baseline is better measured with ``warm=False``: its memory run is then
    the warm-up, counts against ``budget_s``, and is the one timed run when
    it alone used the budget."""
    if warm:
        fn()
    t0 = time.perf_counter()
    mem = peak_extra_memory(fn)
    t_mem = time.perf_counter() - t0
    if budget_s is not None and not warm:
        if t_mem >= budget_s:
            return t_mem, mem
        budget_s -= t_mem
    return median_time(fn, repeats=repeats, warmup=0, budget_s=budget_s), mem


@dataclass
class Table:
    """Rows of results printed as an aligned table and saved as JSON."""

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)
        print(self._format_row(row), flush=True)

    def header(self) -> None:
        print(f"\n{self.title}")
        print(self._format_row({c: c for c in self.columns}), flush=True)

    def _format_row(self, row: dict) -> str:
        cells = []
        for c in self.columns:
            v = row.get(c, "")
            if isinstance(v, float):
                v = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            elif v is None:
                v = "-"
            cells.append(f"{str(v):>12}")
        return " ".join(cells)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        payload = {
            "title": self.title,
            "machine": machine_info(),
            "rows": self.rows,
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"\nwrote {path}")


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
