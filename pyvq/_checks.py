"""Argument checks and dtype rules, in one place for every layer.

Every message has one shape: ``"<where>: <what> '<name>' must be <expected>,
got <given>"``, where ``where`` is the op, layer or config class that was
called and ``what`` is "argument" (a function or constructor argument) or
"field" (a config dataclass field).

A value of the wrong type raises ``ArgumentTypeError``, a ``TypeError`` that
is also a ``ValueError`` (several of the checks gathered here once raised
``ValueError`` for a wrong type, and callers may catch that); a value of the
right type but outside its range raises ``ValueError``.

This module imports only torch, so every layer, ``pyvq.reference``
included, may use it.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "ArgumentTypeError",
    "HOST_CHECKED_DEVICES",
    "accumulation_dtype",
    "assert_values",
    "check_bool",
    "check_choice",
    "check_float",
    "check_floating",
    "check_image",
    "check_int",
    "check_positive_fields",
    "check_positive_ints",
    "check_seed",
    "check_tensor",
    "int_tuple",
    "is_int",
    "value_check",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument or field of the wrong type (a ``TypeError`` and a ``ValueError``)."""


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype pyvq computes in: float64 when any input is float64, else
    float32 (float16 and bfloat16 storage is accumulated in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _prefix(where: str | None, what: str, name: str) -> str:
    head = f"{where}: " if where else ""
    return f"{head}{what} '{name}'"


def is_int(value) -> bool:
    """An integer that is not a bool (``numbers.Integral``: int, numpy ints)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_int(name: str, value, *, where: str | None = None, minimum: int | None = None,
              maximum: int | None = None, what: str = "argument") -> int:
    """``value`` as an int, checked against ``[minimum, maximum]``."""
    if not is_int(value):
        raise ArgumentTypeError(
            f"{_prefix(where, what, name)} must be an int{_bounds(minimum, maximum)}, got {value!r} "
            f"({type(value).__name__})"
        )
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{_prefix(where, what, name)} must be an int{_bounds(minimum, maximum)}, got {value}")
    return value


def check_positive_ints(values, *, where: str, what: str = "argument") -> None:
    """Every value of the mapping ``values`` (name -> value) is an int >= 1."""
    for name, value in values.items():
        check_int(name, value, where=where, minimum=1, what=what)


def check_positive_fields(config, names, *, where: str) -> None:
    """Every field of ``config`` named in ``names`` is an int >= 1."""
    check_positive_ints({name: getattr(config, name) for name in names}, where=where, what="field")


def check_float(name: str, value, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                high_open: bool = False, where: str | None = None, what: str = "argument") -> float:
    """``value`` as a float in ``[low, high]``; ``low_open`` / ``high_open``
    exclude an end (``high=math.inf, high_open=True``: finite). NaN is rejected."""
    span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{_prefix(where, what, name)} must be a number in {span}, got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    if not ((value > low if low_open else value >= low) and (value < high if high_open else value <= high)):
        raise ValueError(f"{_prefix(where, what, name)} must be a number in {span}, got {value}")
    return value


def check_bool(name: str, value, *, where: str | None = None, what: str = "argument") -> bool:
    """``value``, which must be a bool."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{_prefix(where, what, name)} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value, options, *, where: str | None = None, what: str = "argument"):
    """``value``, which must be one of ``options``."""
    if value not in options:
        raise ValueError(f"{_prefix(where, what, name)} must be one of {tuple(options)}, got {value!r}")
    return value


def check_seed(name: str, seed, *, where: str | None = None) -> int | None:
    """``None`` or an int >= 0."""
    if seed is None:
        return None
    return check_int(name, seed, where=where, minimum=0)


def int_tuple(name: str, value, *, where: str | None = None, what: str = "field") -> tuple[int, ...]:
    """``value``, a sequence of ints, as a tuple of ints."""
    items = None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        items = tuple(value)
    if items is None or not all(is_int(v) for v in items):
        raise ArgumentTypeError(f"{_prefix(where, what, name)} must be a sequence of ints, got {value!r}")
    return tuple(int(v) for v in items)


def check_tensor(t, name: str, where: str) -> None:
    """``t`` is a ``torch.Tensor``."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{where}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")


def check_floating(t, name: str, where: str, *, holds: str = "") -> None:
    """``t`` is a floating-point tensor; ``holds`` says what it holds ("of logits")."""
    check_tensor(t, name, where)
    if not t.is_floating_point():
        raise ArgumentTypeError(
            f"{where}: argument '{name}' must be a floating-point tensor{' ' + holds if holds else ''} "
            f"(float16, bfloat16, float32 or float64), got dtype {t.dtype}"
        )


def check_image(x, *, where: str, channels: int, factor: int, name: str = "x") -> None:
    """``x`` is a floating (B, channels, H, W) batch with H and W divisible by ``factor``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ArgumentTypeError(f"{where}: argument '{name}' must be a floating-point tensor, got {got}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{where}: argument '{name}' must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"{where}: image height and width must be divisible by the downsampling factor {factor}, "
            f"got {tuple(x.shape[2:])}"
        )


# --- value checks (the data of a tensor, not its shape) ----------------------
#
# Reading a tensor's values on the host costs a device-to-host copy and a
# synchronisation on CUDA, which stalls a GPU pipeline. So value checks have
# two forms: on the devices listed here (the CPU) they read the data and raise
# a ValueError at once; on any other device they run on the device with
# ``torch._assert_async``: no host read, and a bad value surfaces as a
# device-side assertion at the next synchronisation (CUDA:
# ``RuntimeError: CUDA error: device-side assert triggered``, the message
# printed by the device; the CUDA context is unusable afterwards, as after
# any device-side assert in PyTorch).
HOST_CHECKED_DEVICES = ("cpu",)


def value_check(t: torch.Tensor) -> str:
    """How to check the values of ``t``: ``"skip"`` (empty, meta or fake,
    or while torch.compile traces: the kernels guard themselves), ``"host"``
    (read now and raise ``ValueError``) or ``"device"`` (``assert_values``:
    no host synchronisation)."""
    if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
        return "skip"
    if isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        return "skip"
    return "host" if t.device.type in HOST_CHECKED_DEVICES else "device"


def assert_values(ok: torch.Tensor, message: str) -> None:
    """Assert on the device, without a host synchronisation, that the 0-d
    bool tensor ``ok`` is True; ``message`` says which argument was bad."""
    torch._assert_async(ok, message)
