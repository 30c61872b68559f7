"""Backend choice for every op module (argument checks: ``pyvq._checks``)."""

from __future__ import annotations

import torch

from pyvq import _backend


@torch.compiler.assume_constant_result
def _kernel_enabled(op: str, device_type: str) -> bool:
    return _backend.use_kernel(op, device_type)


def use_kernel(op: str, t: torch.Tensor) -> bool:
    """Whether the call of ``op`` with first tensor ``t`` runs the kernel."""
    return _kernel_enabled(op, t.device.type)
