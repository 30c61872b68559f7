"""Translation of a diffusers model config (``VQModel``, ``AutoencoderKL``,
``AsymmetricAutoencoderKL``) into a pyvq ``VQGANConfig``,
``AutoencoderKLConfig`` or ``AsymmetricVQGANConfig``: diffusers' defaults
for absent fields, refusal of unknown fields and of settings pyvq's blocks
do not have, attention block types to ``attn_resolutions``, and the check
that an asymmetric decoder's condition-encoder layout matches pyvq's
(``pyvq.convert``'s docstring explains the rules).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from pyvq.models.tokenizers.asymmetric import AsymmetricVQGANConfig
from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKLConfig
from pyvq.models.tokenizers.vqgan import VQGANConfig

__all__ = ["ASYMMETRIC_CLASS", "CONDITION_ENCODER_LAYERS", "KNOWN_KEYS", "diffusers_config"]

_PLAIN_DOWN, _ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
_PLAIN_UP, _ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"

_COMMON_KEYS = {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "mid_block_add_attention",
    "force_upcast",  # dtype policy of diffusers pipelines; no effect on the weights
}
ASYMMETRIC_CLASS = "AsymmetricAutoencoderKL"
KNOWN_KEYS = {
    "AutoencoderKL": _COMMON_KEYS
    | {"shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv"},
    "VQModel": _COMMON_KEYS | {"num_vq_embeddings", "vq_embed_dim", "norm_type", "lookup_from_codebook"},
    ASYMMETRIC_CLASS: {
        "in_channels",
        "out_channels",
        "down_block_types",
        "down_block_out_channels",
        "layers_per_down_block",
        "up_block_types",
        "up_block_out_channels",
        "layers_per_up_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
        "scaling_factor",
        "block_out_channels",  # registered by diffusers as a copy of up_block_out_channels
        "force_upcast",
    },
}


def _resolution(sample_size) -> int:
    if isinstance(sample_size, (list, tuple)):
        sizes = {int(s) for s in sample_size}
        if len(sizes) != 1:
            raise ValueError(
                f"from_diffusers: non-square sample_size {list(sample_size)} is not supported "
                "(pyvq configs have one 'resolution')"
            )
        return sizes.pop()
    return int(sample_size)


def _check_common(what: str, c: Mapping[str, Any]) -> int:
    """The setting pyvq's blocks fix (SiLU) checked; returns
    ``norm_num_groups`` (an int >= 1; the pyvq config checks that it divides
    the channel counts)."""
    if c["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"{what}: act_fn must be 'silu' (pyvq's blocks use SiLU), got {c['act_fn']!r}")
    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{what}: config field norm_num_groups must be an int >= 1, got {groups!r}")
    return groups


def _ch_mult(what: str, boc, field: str = "block_out_channels") -> tuple[int, tuple[int, ...]]:
    """``(ch, ch_mult)`` of a diffusers ``block_out_channels``."""
    boc = tuple(int(b) for b in boc)
    ch = boc[0]
    if any(b % ch for b in boc):
        raise ValueError(f"{what}: {field} {boc} must be multiples of the first entry (pyvq: ch * ch_mult)")
    return ch, tuple(b // ch for b in boc)


def _attn_levels(what: str, field: str, types, plain: str, attn: str, reverse: bool) -> list[int]:
    """Resolution levels (pyvq's ``i``) with attention, from diffusers block
    types; ``reverse``: up blocks, stored from the lowest resolution up."""
    n = len(types)
    for k, t in enumerate(types):
        if t not in (plain, attn):
            raise ValueError(f"{what}: {field}[{k}] = {t!r} is not supported; supported: {plain}, {attn}")
    return sorted((n - 1 - k) if reverse else k for k in range(n) if types[k] == attn)


def _attn_resolutions(what: str, resolution: int, levels: list[int], n: int) -> tuple[int, ...]:
    factor = 2 ** (n - 1)
    if levels and (resolution < factor or resolution % factor):
        raise ValueError(
            f"{what}: with attention blocks, sample_size ({resolution}) must be a multiple of the "
            f"downsampling factor {factor} (it places pyvq's attention by resolution)"
        )
    return tuple(sorted((resolution // 2**i for i in levels), reverse=True))


def diffusers_config(class_name: str, cfg: Mapping[str, Any]):
    """The pyvq config of a diffusers ``VQModel`` / ``AutoencoderKL`` /
    ``AsymmetricAutoencoderKL`` config dict."""
    what = f"from_diffusers ({class_name})"
    if class_name not in KNOWN_KEYS:
        raise ValueError(
            f"from_diffusers: unsupported diffusers model class {class_name!r}; supported: "
            + ", ".join(sorted(KNOWN_KEYS))
        )
    fields = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - KNOWN_KEYS[class_name])
    if unknown:
        raise ValueError(
            f"{what}: unknown config field(s) {unknown}; pyvq cannot tell whether they change the "
            "architecture (this converter knows diffusers 0.42's fields)"
        )
    if class_name == ASYMMETRIC_CLASS:
        return _asymmetric_config(what, fields)
    defaults = {
        # diffusers' own defaults, for configs written before a field existed
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": (_PLAIN_DOWN,),
        "up_block_types": (_PLAIN_UP,),
        "block_out_channels": (64,),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4 if class_name == "AutoencoderKL" else 3,
        "norm_num_groups": 32,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "num_vq_embeddings": 256,
        "vq_embed_dim": None,
        "norm_type": "group",
    }
    c = {**defaults, **fields}

    groups = _check_common(what, c)
    if not c["mid_block_add_attention"]:
        raise ValueError(f"{what}: mid_block_add_attention=False is not supported (pyvq's mid block has attention)")
    if class_name == "VQModel" and c["norm_type"] != "group":
        raise ValueError(
            f"{what}: norm_type must be 'group', got {c['norm_type']!r} (spatial norm, MoVQ, is not supported)"
        )

    boc = tuple(int(b) for b in c["block_out_channels"])
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    n = len(boc)
    if n == 0 or len(down) != n or len(up) != n:
        raise ValueError(
            f"{what}: block_out_channels {boc}, down_block_types {down} and up_block_types {up} "
            "must have the same, nonzero length"
        )
    ch, ch_mult = _ch_mult(what, boc)
    enc_attn = _attn_levels(what, "down_block_types", down, _PLAIN_DOWN, _ATTN_DOWN, reverse=False)
    dec_attn = _attn_levels(what, "up_block_types", up, _PLAIN_UP, _ATTN_UP, reverse=True)
    if enc_attn != dec_attn:
        raise ValueError(
            f"{what}: the encoder has attention at levels {enc_attn} and the decoder at levels "
            f"{dec_attn} (up_block_types run from the lowest resolution up); pyvq's attn_resolutions "
            "is shared by encoder and decoder, so they must agree"
        )
    resolution = _resolution(c["sample_size"])
    attn_resolutions = _attn_resolutions(what, resolution, enc_attn, n)

    arch = dict(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=attn_resolutions,
        z_channels=int(c["latent_channels"]),
        resolution=resolution,
        in_channels=int(c["in_channels"]),
        out_ch=int(c["out_channels"]),
        norm_num_groups=groups,
    )
    if class_name == "VQModel":
        embed_dim = c["vq_embed_dim"] if c["vq_embed_dim"] is not None else c["latent_channels"]
        # VQModel's scaling_factor has no VQGANConfig field: codes are indices, and a
        # latent prior over the continuous latents must apply it itself.
        return VQGANConfig(embed_dim=int(embed_dim), n_embed=int(c["num_vq_embeddings"]), **arch)

    for name in ("shift_factor", "latents_mean", "latents_std"):
        if c.get(name) is not None:
            warnings.warn(
                f"{what}: config field {name}={c[name]!r} has no AutoencoderKLConfig field and is not kept; "
                "apply it to the latents yourself",
                stacklevel=3,
            )
    return AutoencoderKLConfig(
        embed_dim=int(c["latent_channels"]), scaling_factor=float(c["scaling_factor"]), **arch
    )


# diffusers' MaskConditionEncoder is built with its default stride=16: always
# five conv layers, the last three halving the resolution.
CONDITION_ENCODER_LAYERS = 5


def _asym_condition_layers(boc: tuple[int, ...]) -> list[tuple[int, int]]:
    """(channels, resolution level) of each output of diffusers'
    ``MaskConditionEncoder(out_ch=boc[0], res_ch=boc[-1])`` (level i: H / 2**i)."""
    c0, cap = boc[0], boc[-1]
    chans = [min(c0 * 2**k, cap) for k in range(CONDITION_ENCODER_LAYERS - 1)] + [cap]
    return [(c, max(0, k - 1)) for k, c in enumerate(chans)]


def _asymmetric_config(what: str, fields: Mapping[str, Any]) -> AsymmetricVQGANConfig:
    defaults = {  # AsymmetricAutoencoderKL's defaults
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": (_PLAIN_DOWN,),
        "down_block_out_channels": (64,),
        "layers_per_down_block": 1,
        "up_block_types": (_PLAIN_UP,),
        "up_block_out_channels": (64,),
        "layers_per_up_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 32,
        "scaling_factor": 0.18215,
    }
    c = {**defaults, **fields}
    groups = _check_common(what, c)
    down_boc = tuple(int(b) for b in c["down_block_out_channels"])
    up_boc = tuple(int(b) for b in c["up_block_out_channels"])
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    n = len(down_boc)
    if n == 0 or len(down) != n or len(up) != n or len(up_boc) != n:
        raise ValueError(
            f"{what}: down_block_out_channels {down_boc}, up_block_out_channels {up_boc}, down_block_types "
            f"{down} and up_block_types {up} must have the same, nonzero length (pyvq's decoder upsamples "
            "as much as the encoder downsamples)"
        )
    if "block_out_channels" in c and tuple(int(b) for b in c["block_out_channels"]) != up_boc:
        raise ValueError(
            f"{what}: block_out_channels {tuple(c['block_out_channels'])} must equal up_block_out_channels "
            f"{up_boc} (diffusers registers it as a copy)"
        )
    if int(c["in_channels"]) != int(c["out_channels"]):
        raise ValueError(
            f"{what}: in_channels ({c['in_channels']}) must equal out_channels ({c['out_channels']}): diffusers' "
            "condition encoder reads out_channels, pyvq's in_channels"
        )
    ch, ch_mult = _ch_mult(what, down_boc, "down_block_out_channels")
    dec_ch, dec_mult = _ch_mult(what, up_boc, "up_block_out_channels")
    resolution = _resolution(c["sample_size"])
    enc_attn = _attn_levels(what, "down_block_types", down, _PLAIN_DOWN, _ATTN_DOWN, reverse=False)
    dec_attn = _attn_levels(what, "up_block_types", up, _PLAIN_UP, _ATTN_UP, reverse=True)

    # diffusers looks each blend point's condition feature up by its shape
    # (a later layer of the same shape replaces an earlier one); pyvq feeds
    # blend point j (0: the final blend, i + 1: before up[i]) with layer j.
    # Convertible iff that lookup picks layer j at every blend point.
    layers = _asym_condition_layers(up_boc)
    by_shape = {shape: k for k, shape in enumerate(layers)}
    points = [(up_boc[0], 0)] + [(up_boc[min(i + 1, n - 1)], i) for i in range(n)]
    for j, shape in enumerate(points):
        if by_shape.get(shape) != j:
            used = by_shape.get(shape)
            raise ValueError(
                f"{what}: up_block_out_channels {up_boc} is not supported: blend point {j} needs a "
                f"{shape[0]}-channel condition feature at 1/{2 ** shape[1]} resolution, which diffusers' "
                f"MaskConditionEncoder takes from "
                + ("no layer (diffusers itself cannot run it)" if used is None else f"layer {used}")
                + f" and pyvq's from layer {j} (supported: fewer than {CONDITION_ENCODER_LAYERS} resolution levels "
                "whose channels double from the first, capped at the last, e.g. Stable Diffusion's)"
            )

    base = AutoencoderKLConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=int(c["layers_per_down_block"]),
        attn_resolutions=_attn_resolutions(what, resolution, enc_attn, n),
        z_channels=int(c["latent_channels"]),
        embed_dim=int(c["latent_channels"]),
        resolution=resolution,
        in_channels=int(c["in_channels"]),
        out_ch=int(c["out_channels"]),
        scaling_factor=float(c["scaling_factor"]),
        norm_num_groups=groups,
    )
    return AsymmetricVQGANConfig(
        base_kind="kl",
        base_config=base,
        ch=dec_ch,
        ch_mult=dec_mult,
        num_res_blocks=int(c["layers_per_up_block"]),
        attn_resolutions=_attn_resolutions(what, resolution, dec_attn, n),
        blend="add",
        norm_num_groups=groups,
    )
