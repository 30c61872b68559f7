"""The oldest torch and Triton pyvq works with, and the one-line check.

Imports nothing (setup.py loads this file by path, before torch is known
to be usable, and ``import pyvq`` runs the check before loading pyvq._C,
whose symbols would otherwise fail with an unreadable linker error).

The newest APIs pyvq relies on, by the torch release that added them:

- 2.6: ``torch.library.triton_op`` and ``wrap_triton`` (the Triton attention
  kernels' registration, pyvq/ops/_*_triton.py)
- 2.4: ``torch.library.register_fake``, ``register_autograd``,
  ``register_kernel`` and ``opcheck`` (every op)
- 2.3: ``torch.compiler.is_compiling`` (the posterior ops' checks)

The Triton kernels use ``tl.dot(..., input_precision="ieee")``, Triton 3.0's
spelling; torch 2.6 ships with Triton 3.2.
"""

from __future__ import annotations

import re

TORCH_FLOOR = (2, 6)
TORCH_FLOOR_FEATURE = "torch.library.triton_op and wrap_triton, which register its Triton attention kernels"
TRITON_FLOOR = (3, 0)
TRITON_FLOOR_FEATURE = 'tl.dot(..., input_precision="ieee") in its Triton kernels'


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 11, 0) from "2.11.0+cu130", "2.6.0a0+git1234" or "3.6.0"; () when
    ``version`` does not start with a number."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def floor_problem(name: str, found: str, floor: tuple[int, ...], feature: str) -> str | None:
    """None when ``found`` is at least ``floor``, else the one-line message
    naming the version found, the version needed and the feature."""
    have = version_tuple(found)
    if have and have[: len(floor)] >= floor:
        return None
    need = ".".join(map(str, floor))
    return f"pyvq needs {name} >= {need} ({feature}); found {name} {found}"


def torch_problem(found: str) -> str | None:
    """``floor_problem`` for torch."""
    return floor_problem("torch", found, TORCH_FLOOR, TORCH_FLOOR_FEATURE)


def triton_problem(found: str) -> str | None:
    """``floor_problem`` for Triton."""
    return floor_problem("triton", found, TRITON_FLOOR, TRITON_FLOOR_FEATURE)
