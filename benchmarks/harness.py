"""Shared benchmark harness: timing, peak memory, tables and JSON.

Benchmarks measure; they never assert. Every script compares methods side by
side in one process, reports medians over repeats, and writes its results as
JSON next to the printed table.

Peak extra memory is read from the kernel (VmHWM of /proc/self/status after
resetting it through /proc/self/clear_refs), so it counts every allocation:
torch's, a library's own malloc, thread scratch. glibc is told to serve
blocks of 64 KiB and more with mmap (MALLOC_MMAP_THRESHOLD_), so freed
memory goes back to the OS and one measurement does not hide the next.

Every script takes ``--device`` (``add_device_argument``; default cpu, the
behaviour above). ``select_device("cuda")`` makes the same helpers measure
the GPU: each timed run is bracketed by ``torch.cuda.synchronize()`` (so a
time is the kernels' completion, launch overhead included), and peak extra
memory is ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` over what was allocated before (torch's caching
allocator only: a library's own cudaMalloc, e.g. a cuBLAS workspace, is not
counted). Without a CUDA device it refuses with one line naming what is
missing.
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

# The device the timing and memory helpers measure (select_device).
_device = torch.device("cpu")


def add_device_argument(parser) -> None:
    """The ``--device`` option every benchmark script takes."""
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:N]: where the tensors live and what is timed")


def select_device(name: str) -> torch.device:
    """Parse ``--device`` and make the helpers below measure it.

    Raises SystemExit with one line (the argument, what was expected, what
    was found) for a malformed name or a CUDA device this machine lacks.
    """
    global _device
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmark"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SystemExit(f"{prog}: --device must be cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"{prog}: --device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("torch is not a CUDA build" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
            raise SystemExit(f"{prog}: --device {name}: no CUDA device here ({why})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SystemExit(f"{prog}: --device {name}: this machine has {count} CUDA device(s), "
                             f"indices 0..{count - 1}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    _device = device
    return device


def current_device() -> torch.device:
    """The device selected by ``select_device`` (cpu until then)."""
    return _device


def synchronize() -> None:
    """Wait for the selected device's queued work (a no-op on the CPU)."""
    if _device.type == "cuda":
        torch.cuda.synchronize(_device)


def set_recompile_limit(n: int) -> None:
    """Let torch.compile keep ``n`` graphs per function (one per shape and
    mode in a benchmark). torch renamed the knob from ``cache_size_limit`` to
    ``recompile_limit``; either is set, whichever this torch has."""
    import torch._dynamo

    config = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, knob):
            setattr(config, knob, n)
            return


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
    """Peak memory (MiB) that ``fn()`` adds: resident memory of the process
    on the CPU, or None where the kernel cannot report it; on a CUDA device
    (``select_device``), torch's allocated device memory."""
    if _device.type == "cuda":
        return _cuda_peak_extra_memory(fn)
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


def _cuda_peak_extra_memory(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize(_device)
    torch.cuda.reset_peak_memory_stats(_device)
    before = torch.cuda.memory_allocated(_device)
    out = fn()
    torch.cuda.synchronize(_device)
    peak = torch.cuda.max_memory_allocated(_device)
    del out
    return max(0, peak - before) / 2**20


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
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
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
    synchronize()
    t0 = time.perf_counter()
    mem = peak_extra_memory(fn)
    t_mem = time.perf_counter() - t0
    if budget_s is not None and not warm:
        if t_mem >= budget_s:
            return t_mem, mem
        budget_s -= t_mem
    return median_time(fn, repeats=repeats, warmup=0, budget_s=budget_s), mem


def measure_column(row: dict, name: str, fn: Callable[[], object], **kwargs) -> None:
    """``time_and_memory(fn, **kwargs)`` into ``row[name_ms]`` and
    ``row[name_MiB]``. A column that raises (a compiler or a peer that does
    not support this case or device) gets None there and its error, in one
    line, in ``row[name_error]`` and on stdout; the other columns go on."""
    try:
        t, mem = time_and_memory(fn, **kwargs)
    except Exception as exc:  # noqa: BLE001  one column's failure must not cost the table
        text = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
        print(f"{name} failed: {message}", flush=True)
        row[f"{name}_ms"] = row[f"{name}_MiB"] = None
        row[f"{name}_error"] = message
        return
    row[f"{name}_ms"] = 1e3 * t
    row[f"{name}_MiB"] = mem


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
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(_device),
    }
    if _device.type == "cuda":
        props = torch.cuda.get_device_properties(_device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def attention_side(op: str, device) -> tuple[str, str]:
    """(what pyvq's column of attention op ``op`` runs on ``device``, where)
    for table titles: the CPU kernel and its ISA, or the Triton kernels on
    CUDA, or the reference where neither exists."""
    import pyvq
    from pyvq._backend import has_triton_kernel, use_kernel

    if device.type == "cuda":
        triton = has_triton_kernel(op) and pyvq.backend() == "kernel"
        return ("Triton kernels" if triton else f"reference (no {op} Triton kernels here)"), str(device)
    isa = pyvq.info()["ops"][op]["cpu_isa"]
    side = f"kernel ({isa})" if use_kernel(op, "cpu") else f"reference (no {op} kernel in this build)"
    return side, f"{torch.get_num_threads()} threads"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
