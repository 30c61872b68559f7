"""Helpers every op module uses: argument checks and backend choice."""

from __future__ import annotations

import torch

from pyvq import _backend


@torch.compiler.assume_constant_result
def _kernel_enabled(op: str, device_type: str) -> bool:
    return _backend.use_kernel(op, device_type)


def use_kernel(op: str, t: torch.Tensor) -> bool:
    """Whether the call of ``op`` with first tensor ``t`` runs the kernel."""
    return _kernel_enabled(op, t.device.type)


def check_floating(t, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{op}: argument '{name}' must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got dtype {t.dtype}"
        )
