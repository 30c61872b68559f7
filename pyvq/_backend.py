"""Loading the compiled extension and choosing a backend per call.

``PYVQ_BACKEND=reference`` sends every op to its plain-PyTorch twin in
``pyvq.reference``; the default (``kernel``) uses the compiled or Triton
kernel registered for the input's device and falls back to the reference
only where no kernel exists, which ``pyvq.info()`` reports.
"""

from __future__ import annotations

import importlib.util
import os

import torch

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
    if _C is None:
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

    build = _C.build_info() if _C is not None else {}
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
        "extension": "loaded" if _C is not None else f"missing ({_C_ERROR})",
        "built_with_cuda": bool(build.get("cuda", False)),
        "cuda_archs": build.get("cuda_archs", ""),
        "cpu_isa": build.get("cpu_isa", "none"),
        "backend": backend(),
        "triton": _triton_status(),
        "ops": ops,
    }
