"""Strict loading of a source state dict into a pyvq model, and the finish
every converter applies (CPU, float32, eval mode).

The converters name each pyvq weight's source key and, where needed, reshape
the tensor; ``load_into`` checks that the two sets of keys agree, that shapes
and dtype kinds match, and resets the quantiser's statistics.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["CODEBOOK", "STAT_BUFFERS", "finish", "load_into"]

# pyvq-only quantiser statistics: reset on load, never read from a source.
STAT_BUFFERS = ("quantize.cluster_size", "quantize.code_usage", "quantize.embed_sum")
CODEBOOK = "quantize.codebook"


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(
    model: torch.nn.Module,
    source: Mapping[str, Any],
    source_key,
    what: str,
    transform=None,
) -> None:
    """Fill ``model`` from ``source`` strictly.

    ``source_key(pyvq_key) -> str`` names the source tensor of each weight;
    ``transform(pyvq_key, tensor, target_shape) -> tensor`` may reshape it
    (diffusers' Linear attention weights to 1x1 conv weights). Every source
    key must be used; messages use the source's own key names.
    """
    targets = {k: v for k, v in model.state_dict().items() if k not in STAT_BUFFERS}
    names = {k: source_key(k) for k in targets}
    missing = sorted(s for s in names.values() if s not in source)
    unexpected = sorted(set(source) - set(names.values()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_format_keys(unexpected)}")
        raise ValueError(
            f"{what}: the weights do not fit the configured architecture: {'; '.join(parts)}. "
            "Check that the config matches the checkpoint."
        )
    state = {}
    for key, target in targets.items():
        src = names[key]
        value = source[src]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: key {src!r} holds a {type(value).__name__}, not a tensor")
        if transform is not None:
            value = transform(key, value, target.shape)
        if tuple(value.shape) != tuple(target.shape):
            where = src if src == key else f"{src} (pyvq {key})"
            raise ValueError(
                f"{what}: shape mismatch for key {where}: the checkpoint has {tuple(value.shape)}, "
                f"the configured model expects {tuple(target.shape)}. Check that the config matches the checkpoint."
            )
        if target.is_floating_point() != value.is_floating_point():
            raise ValueError(f"{what}: key {src!r} has dtype {value.dtype}, the model expects {target.dtype}")
        state[key] = value
    with torch.no_grad():
        result = model.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if k not in STAT_BUFFERS]
    if leftover or result.unexpected_keys:  # the checks above make this unreachable
        raise RuntimeError(f"{what}: internal key mapping error: {leftover} {result.unexpected_keys}")
    quantize = getattr(model, "quantize", None)
    if quantize is not None:
        # Resets cluster_size / code_usage / embed_sum to describe the loaded codes.
        quantize.load_codebook(state[CODEBOOK])


def finish(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on the CPU, float32 (a half-precision source widened exactly), in eval mode."""
    return model.to(device="cpu", dtype=torch.float32).eval()
