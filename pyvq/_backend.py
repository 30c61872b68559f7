"""Loading the compiled extension and choosing a backend per call.

``PYVQ_BACKEND=reference`` sends every op to its plain-PyTorch twin in
``pyvq.reference``; the default (``kernel``) uses the compiled or Triton
kernel registered for the input's device and falls back to the reference
only where no kernel exists, which ``pyvq.info()`` reports.

The ops come from ``pyvq._C`` unless ``PYVQ_OPS_LIBRARY`` names the
``libpyvq_ops.so`` of a CMake build (CMakeLists.txt; the sanitizer build of
``make sanitize``): then that library is loaded with
``torch.ops.load_library`` and ``pyvq._C`` is never imported (both register
the same ops). A sanitizer build needs the ASan runtime preloaded
(``tools/sanitize/run`` does it); without it, loading fails with a message
that says so, instead of ASan aborting the process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import mmap
import os

import torch

OPS_LIBRARY_VAR = "PYVQ_OPS_LIBRARY"


class _OpsLibrary:
    """The CMake library named by PYVQ_OPS_LIBRARY, loaded into torch.ops.pyvq."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"{OPS_LIBRARY_VAR} must name the libpyvq_ops.so of a CMake build "
                f"(e.g. build-sanitize/libpyvq_ops.so from `make sanitize`), got {path!r}: "
                f"no such file{'' if path == self.path else f' ({self.path})'}"
            )
        self.sanitized = _needs_asan(self.path)
        if self.sanitized and not _asan_loaded():
            raise ImportError(
                f"{OPS_LIBRARY_VAR}={path!r} is a sanitizer build (it needs libasan), but the ASan "
                "runtime is not loaded in this process: start Python with "
                "LD_PRELOAD=$(gcc -print-file-name=libasan.so) (tools/sanitize/run does this)"
            )
        try:
            lib = ctypes.CDLL(self.path)
        except OSError as exc:
            raise ImportError(f"{OPS_LIBRARY_VAR}={path!r} cannot be loaded as a shared library: {exc}") from exc
        if not hasattr(lib, "pyvq_build_info_json"):
            raise ImportError(
                f"{OPS_LIBRARY_VAR} must name a libpyvq_ops.so built by this pyvq's CMakeLists.txt "
                f"(it exports pyvq_build_info_json), got {path!r}, which does not export it"
            )
        self._build_info_json = lib.pyvq_build_info_json
        self._build_info_json.restype = ctypes.c_char_p
        torch.ops.load_library(self.path)  # already registered by the dlopen; torch records it

    def description(self) -> str:
        return f"{self.path} ({'sanitizer build' if self.sanitized else 'CMake build'})"

    def build_info(self) -> dict:
        """The facts pyvq._C.build_info() gives (tools/sanitize/build_info.cpp)."""
        facts = json.loads(self._build_info_json().decode())
        if "error" in facts:
            raise RuntimeError(facts["error"])
        return facts


def _needs_asan(path: str) -> bool:
    """Whether the shared library at ``path`` links the ASan runtime (its
    dynamic section names libasan)."""
    if os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(b"libasan.so") >= 0


def _asan_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("libasan" in line for line in maps)
    except OSError:  # not Linux: let the dynamic loader decide
        return True


_OPS_LIBRARY = None
if os.environ.get(OPS_LIBRARY_VAR, "").strip():
    _OPS_LIBRARY = _OpsLibrary(os.environ[OPS_LIBRARY_VAR].strip())
    _C = None
    _C_ERROR = None
else:
    try:
        from pyvq import _C  # noqa: F401  (registers torch.ops.pyvq.*)

        _C_ERROR = None
    except ImportError as exc:  # a source checkout without a build
        _C = None
        _C_ERROR = exc

# The C++ ops pyvq registers, in the order info() lists them.
CPP_OPS = ("nearest_code", "grid_encode", "multinomial_posterior", "multinomial_kl", "window_attention",
           "multigrained_attention")
_BACKENDS = ("kernel", "reference")


def backend() -> str:
    """The backend chosen by ``PYVQ_BACKEND`` ('kernel' or 'reference')."""
    value = os.environ.get("PYVQ_BACKEND", "kernel").strip().lower() or "kernel"
    if value not in _BACKENDS:
        raise ValueError(
            f"PYVQ_BACKEND must be one of {_BACKENDS}, got {value!r}"
        )
    return value


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether ``torch.ops.pyvq.<op>`` has a kernel for ``device``'s type."""
    if _C is None and _OPS_LIBRARY is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyvq::{op}", key)
    except RuntimeError:  # an extension built before the op existed
        return False


def has_triton_kernel(op: str) -> bool:
    """Whether ``op`` has Triton kernels (``pyvq.triton_kernels.<op>``) and
    Triton is importable (they run on CUDA tensors, or interpreted)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        return importlib.util.find_spec(f"pyvq.triton_kernels.{op}") is not None
    except ImportError:
        return False


def use_kernel(op: str, device: torch.device | str) -> bool:
    """True when a call of ``op`` on ``device`` should run the kernel."""
    return backend() == "kernel" and has_kernel(op, device)


def _triton_status() -> dict:
    status = {"importable": importlib.util.find_spec("triton") is not None}
    status["interpreted"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if status["importable"]:
        try:
            import triton

            status["version"] = triton.__version__
        except Exception as exc:  # importable but broken: say so
            status["importable"] = False
            status["error"] = repr(exc)
    return status


def info() -> dict:
    """What was compiled and which backend each op takes.

    Returns a dict with the pyvq and torch versions, the build's CUDA
    architectures and the CPU instruction-set level in use (``PYVQ_CPU_ISA``
    applied), Triton's status, and for every op whether the dispatcher has a
    CPU and a CUDA kernel, whether it has Triton kernels (``triton``: the CUDA
    path of the attention ops), that a reference exists, and the
    instruction-set level its CPU kernel runs at (``cpu_isa``; "none"
    without one).
    """
    import pyvq
    from pyvq import reference

    if _OPS_LIBRARY is not None:
        build, extension = _OPS_LIBRARY.build_info(), _OPS_LIBRARY.description()
    elif _C is not None:
        build, extension = _C.build_info(), "loaded"
    else:
        build, extension = {}, f"missing ({_C_ERROR})"
    cpu_isa_by_op = build.get("cpu_isa_by_op", {})
    ops = {}
    for op in CPP_OPS:
        ops[op] = {
            "cpu": has_kernel(op, "cpu"),
            "cuda": has_kernel(op, "cuda"),
            "reference": hasattr(reference, op),
            "cpu_isa": cpu_isa_by_op.get(op, "none") if has_kernel(op, "cpu") else "none",
            "triton": has_triton_kernel(op),
        }
    return {
        "pyvq": pyvq.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": extension,
        "built_with_cuda": bool(build.get("cuda", False)),
        "cuda_archs": build.get("cuda_archs", ""),
        "cpu_isa": build.get("cpu_isa", "none"),
        "backend": backend(),
        "triton": _triton_status(),
        "ops": ops,
    }
