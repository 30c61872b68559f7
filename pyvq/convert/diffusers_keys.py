"""diffusers state-dict key names of pyvq's (taming-named) weights, per the
table in ``pyvq.convert``'s docstring; the renaming of pre-0.14 diffusers
attention names; diffusers' Linear attention weights as 1x1 conv weights.
"""

from __future__ import annotations

import re

import torch

from pyvq.convert.loading import CODEBOOK

__all__ = ["asym_diffusers_key", "diffusers_key", "linear_to_conv", "rename_old_attention"]

_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def rename_old_attention(state: dict) -> dict:
    """``state`` with pre-0.14 attention names (``query``, ``key``, ``value``, ``proj_attn``) renamed."""
    out = {}
    for key, value in state.items():
        m = _OLD_ATTN_RE.match(key)
        if m:
            new = f"{m.group(1)}.{_OLD_ATTN[m.group(2)]}.{m.group(3)}"
            if new in state:
                raise ValueError(f"from_diffusers: both {key!r} and {new!r} are present")
            key = new
        out[key] = value
    return out


def diffusers_key(key: str, n_levels: int) -> str:
    """diffusers name of a pyvq (taming-named) weight of an Encoder/Decoder model."""
    if key == CODEBOOK:
        return "quantize.embedding.weight"
    top, *rest = key.split(".")
    if top not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    head = rest[0]
    if head in ("conv_in", "conv_out"):
        return key
    if head == "norm_out":
        return ".".join([top, "conv_norm_out", *rest[1:]])

    def resnet(tail: list[str]) -> str:
        return ".".join(["conv_shortcut" if tail[0] == "nin_shortcut" else tail[0], *tail[1:]])

    def attention(tail: list[str]) -> str:
        return ".".join([_ATTN_NAMES[tail[0]], *tail[1:]])

    if head == "mid":
        sub, tail = rest[1], rest[2:]
        if sub == "attn_1":
            return f"{top}.mid_block.attentions.0.{attention(tail)}"
        return f"{top}.mid_block.resnets.{0 if sub == 'block_1' else 1}.{resnet(tail)}"
    # down.{i}... / up.{i}...
    level, kind = int(rest[1]), rest[2]
    if top == "encoder":
        prefix = f"encoder.down_blocks.{level}"
    else:
        prefix = f"decoder.up_blocks.{n_levels - 1 - level}"
    if kind == "block":
        return f"{prefix}.resnets.{rest[3]}.{resnet(rest[4:])}"
    if kind == "attn":
        return f"{prefix}.attentions.{rest[3]}.{attention(rest[4:])}"
    # downsample.conv.* / upsample.conv.*
    return ".".join([prefix, f"{kind}rs", "0", *rest[3:]])


def asym_diffusers_key(key: str, n_levels: int) -> str:
    """diffusers ``AsymmetricAutoencoderKL`` name of an ``AsymmetricVQGAN`` weight."""
    if key.startswith("base."):
        return diffusers_key(key[len("base."):], n_levels)
    if key.startswith("decoder.condition_encoder."):
        return key
    return diffusers_key(key, n_levels)


def linear_to_conv(pyvq_key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Attention projections: diffusers' Linear (C_out, C_in) is pyvq's 1x1 conv (C_out, C_in, 1, 1).
    module = pyvq_key.rsplit(".", 2)[-2]
    if module in ("q", "k", "v", "proj_out") and value.dim() == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return value[:, :, None, None]
    return value
