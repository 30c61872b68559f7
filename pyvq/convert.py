"""Load third-party tokenizer weights into pyvq models.

Two sources:

- ``from_taming(state_dict_or_path, preset_or_config) -> VQGAN``: a
  taming-transformers VQGAN checkpoint (a Lightning ``.ckpt``, or its
  ``state_dict``). pyvq's module names are taming's, so keys map one to one
  except the codebook (taming ``quantize.embedding.weight``, pyvq
  ``quantize.codebook``); the training loss's modules (``loss.*``: the
  discriminator and LPIPS) are dropped. A checkpoint does not say its
  architecture, so the caller names it (a preset or a ``VQGANConfig``);
  nothing is inferred from the tensors.
- ``from_diffusers(model_or_dir) -> VQGAN | AutoencoderKL | AsymmetricVQGAN``:
  a diffusers ``VQModel``, ``AutoencoderKL`` or ``AsymmetricAutoencoderKL``,
  either the instance or a directory its ``save_pretrained`` wrote. The pyvq
  config is built from diffusers' config, and diffusers' module names are
  mapped onto taming's (table below). diffusers itself is never imported: a
  directory is read with ``json`` and ``safetensors``.

Both are strict: every tensor of the source is used (``loss.*`` aside), every
weight of the model is filled, shapes must agree; otherwise a ``ValueError``
lists the missing or unexpected keys, or names the key whose shape differs.
pyvq's codebook statistics (``quantize.cluster_size``, ``code_usage``,
``embed_sum``), which neither source has, are reset as by
``VectorQuantizer.load_codebook``. Models come back on the CPU, float32, in
eval mode (a half-precision source is widened exactly).

diffusers -> pyvq names (``n`` = number of resolution levels):

=============================================  ====================================
diffusers                                      pyvq (taming)
=============================================  ====================================
encoder.down_blocks.{i}.resnets.{j}.*          encoder.down.{i}.block.{j}.*
encoder.down_blocks.{i}.attentions.{j}.*       encoder.down.{i}.attn.{j}.*
encoder.down_blocks.{i}.downsamplers.0.conv    encoder.down.{i}.downsample.conv
decoder.up_blocks.{k}.resnets.{j}.*            decoder.up.{n-1-k}.block.{j}.*
decoder.up_blocks.{k}.attentions.{j}.*         decoder.up.{n-1-k}.attn.{j}.*
decoder.up_blocks.{k}.upsamplers.0.conv        decoder.up.{n-1-k}.upsample.conv
{en,de}coder.mid_block.resnets.{0,1}           {en,de}coder.mid.block_{1,2}
{en,de}coder.mid_block.attentions.0            {en,de}coder.mid.attn_1
{en,de}coder.conv_norm_out                     {en,de}coder.norm_out
resnet conv_shortcut (1x1)                     resnet nin_shortcut
attention group_norm, to_q, to_k, to_v,        attention norm, q, k, v, proj_out
to_out.0 (Linear, (C, C))                      (1x1 Conv2d, (C, C, 1, 1))
quantize.embedding.weight                      quantize.codebook
=============================================  ====================================

diffusers runs its ``up_blocks`` in storage order from the lowest resolution
up, so ``up_blocks[k]`` is pyvq's (and taming's) ``decoder.up[n-1-k]``;
pyvq, like taming, indexes ``decoder.up[i]`` by resolution level, the same
``i`` as ``encoder.down[i]``. Attention: the mid blocks always have one
(``mid_block_add_attention=True`` is required); the resolution levels have
none with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` (diffusers' default,
and every Stable Diffusion VAE), and one after every resnet with
``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``, exactly taming's
placement; those levels become ``attn_resolutions``, which pyvq shares
between encoder and decoder, so the two must put attention at the same
levels. Pre-0.14 diffusers attention names (``query``, ``key``, ``value``,
``proj_attn``) are accepted as diffusers itself accepts them.

``AsymmetricAutoencoderKL`` (diffusers' port of the asymmetric VQGAN)
becomes an ``AsymmetricVQGAN`` with ``base_kind="kl"``: ``encoder.*``,
``quant_conv``, ``post_quant_conv`` map as above onto ``base.*`` (base config
from ``down_block_out_channels`` / ``layers_per_down_block`` /
``down_block_types``), the ``MaskConditionDecoder`` as the table's
``decoder.*`` (config from ``up_block_out_channels`` /
``layers_per_up_block`` / ``up_block_types``; its attention levels are its
own), and ``decoder.condition_encoder.layers.{k}`` keeps its name. Mask
convention: both libraries take mask = 1 on the HOLE, so no conversion:
diffusers' ``decode(z, image=x, mask=m).sample`` is pyvq's
``decode(z, masked_image=(1 - m) * x, mask=m)`` (diffusers forms
``(1 - m) * x`` itself), and ``decode(z)`` without image and mask is the
plain decoder in both. diffusers' condition encoder always has five layers
and looks each blend point's feature up by its tensor shape; pyvq's has
``L + 1`` (L levels) and feeds blend point ``j`` from layer ``j``. The two
agree exactly when the decoder has at most four levels whose channels double
from the first, capped at the last (Stable Diffusion's layout); other
layouts are refused, and the layers past ``L`` (unused) are dropped.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import Any, Mapping

import torch

from pyvq.models._pretrained import config_from_dict, get_preset
from pyvq.models.tokenizers.asymmetric import AsymmetricVQGAN, AsymmetricVQGANConfig
from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from pyvq.models.tokenizers.vqgan import VQGAN, VQGANConfig

__all__ = ["from_diffusers", "from_taming"]

# pyvq-only quantiser statistics: reset on load, never read from a source.
_STAT_BUFFERS = ("quantize.cluster_size", "quantize.code_usage", "quantize.embed_sum")
_CODEBOOK = "quantize.codebook"


# ------------------------------------------------------------------ shared
def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_into(
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
    targets = {k: v for k, v in model.state_dict().items() if k not in _STAT_BUFFERS}
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
    leftover = [k for k in result.missing_keys if k not in _STAT_BUFFERS]
    if leftover or result.unexpected_keys:  # the checks above make this unreachable
        raise RuntimeError(f"{what}: internal key mapping error: {leftover} {result.unexpected_keys}")
    quantize = getattr(model, "quantize", None)
    if quantize is not None:
        # Resets cluster_size / code_usage / embed_sum to describe the loaded codes.
        quantize.load_codebook(state[_CODEBOOK])


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(device="cpu", dtype=torch.float32).eval()


# ------------------------------------------------------------------ taming
def _vqgan_config(preset_or_config) -> VQGANConfig:
    if isinstance(preset_or_config, VQGANConfig):
        return preset_or_config
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, Mapping):
        config = config_from_dict(VQGANConfig, dict(preset_or_config))
    else:
        raise TypeError(
            "from_taming: argument 'preset_or_config' must be a preset name, a VQGANConfig or a dict of its "
            f"fields, got {type(preset_or_config).__name__}"
        )
    if not isinstance(config, VQGANConfig):
        raise TypeError(f"from_taming: preset {preset_or_config!r} is a {type(config).__name__}, not a VQGANConfig")
    return config


def _unpickler_detail(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", text, flags=re.S)
    return " ".join((match.group(1) if match else text.splitlines()[0] if text else "").split())


def _torch_load(path: str, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "Unsupported global" in detail:
            reason = (
                "the file contains non-tensor Python objects (pickled classes or functions, typically the "
                "Lightning hyper-parameters), and pyvq never unpickles code"
            )
        else:
            reason = "it is not a checkpoint that torch.load(weights_only=True) can read"
        raise ValueError(
            f"{what}: cannot load {path!r} safely: {reason} ({detail}). If you trust the file, re-save only its "
            "weights once, in a separate Python session:\n"
            f"    ckpt = torch.load({path!r}, map_location='cpu', weights_only=False)\n"
            "    torch.save({'state_dict': ckpt['state_dict']}, 'weights.ckpt')\n"
            "and pass 'weights.ckpt' (or pass the state dict itself)."
        ) from exc


def _read_taming(state_dict_or_path) -> dict:
    what = "from_taming"
    obj = state_dict_or_path
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such checkpoint file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = _torch_load(path, what)
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{what}: expected a state dict, a dict with 'state_dict', or a checkpoint path, got {type(obj).__name__}"
        )
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{what}: state dict keys must be str, got {bad[:5]!r}")
    return {k: v for k, v in obj.items() if not k.startswith("loss.")}


def from_taming(state_dict_or_path, preset_or_config) -> VQGAN:
    """A ``VQGAN`` holding the weights of a taming-transformers VQGAN.

    Args:
        state_dict_or_path: a path to a taming ``.ckpt`` (a Lightning
            checkpoint whose ``"state_dict"`` holds the weights; read with
            ``torch.load(weights_only=True)``, so no pickled code runs) or a
            ``.safetensors`` file; or the state dict itself, or a dict with a
            ``"state_dict"`` entry.
        preset_or_config: the architecture, as a preset name
            (``"vqgan_f16_1024"``, ``"vqgan_f16_16384"``, ...), a
            ``VQGANConfig`` or a dict of its fields. Taming's
            ``configs/*.yaml`` ``ddconfig`` has the same field names.

    Keys map one to one, except ``quantize.embedding.weight`` ->
    ``quantize.codebook``; ``loss.*`` keys (discriminator, LPIPS) are
    dropped. Taming's Gumbel and EMA quantisers (``quantize.embed.*``,
    ``quantize.embedding.embed_avg``, ...) and the ``remap`` buffer
    ``quantize.used`` are not supported: they show up as unexpected keys.

    Returns:
        The VQGAN on the CPU, float32, eval mode.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file holds pickled non-tensor objects (the message
            says how to re-save it); keys missing or unexpected (listed);
            a shape differs from the config's (the key is named).
        KeyError / TypeError: unknown preset, or an argument of the wrong type.
    """
    config = _vqgan_config(preset_or_config)
    source = _read_taming(state_dict_or_path)
    model = VQGAN(config)
    _load_into(model, source, lambda k: "quantize.embedding.weight" if k == _CODEBOOK else k, "from_taming")
    return _finish(model)


# ------------------------------------------------------------------ diffusers
_CONFIG_NAME = "config.json"
_WEIGHTS_STEM = "diffusion_pytorch_model"

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
_ASYM = "AsymmetricAutoencoderKL"
_KNOWN_KEYS = {
    "AutoencoderKL": _COMMON_KEYS
    | {"shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv"},
    "VQModel": _COMMON_KEYS | {"num_vq_embeddings", "vq_embed_dim", "norm_type", "lookup_from_codebook"},
    _ASYM: {
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


def _check_common(what: str, c: Mapping[str, Any]) -> None:
    """Settings pyvq's blocks fix: GroupNorm of 32 groups, SiLU."""
    if c["norm_num_groups"] != 32:
        raise ValueError(f"{what}: norm_num_groups must be 32 (pyvq's GroupNorm), got {c['norm_num_groups']!r}")
    if c["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"{what}: act_fn must be 'silu' (pyvq's blocks use SiLU), got {c['act_fn']!r}")


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


def _diffusers_config(class_name: str, cfg: Mapping[str, Any]):
    """The pyvq config of a diffusers ``VQModel`` / ``AutoencoderKL`` /
    ``AsymmetricAutoencoderKL`` config dict."""
    what = f"from_diffusers ({class_name})"
    if class_name not in _KNOWN_KEYS:
        raise ValueError(
            f"from_diffusers: unsupported diffusers model class {class_name!r}; supported: "
            + ", ".join(sorted(_KNOWN_KEYS))
        )
    fields = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - _KNOWN_KEYS[class_name])
    if unknown:
        raise ValueError(
            f"{what}: unknown config field(s) {unknown}; pyvq cannot tell whether they change the "
            "architecture (this converter knows diffusers 0.42's fields)"
        )
    if class_name == _ASYM:
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

    _check_common(what, c)
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
_ASYM_COND_LAYERS = 5


def _asym_condition_layers(boc: tuple[int, ...]) -> list[tuple[int, int]]:
    """(channels, resolution level) of each output of diffusers'
    ``MaskConditionEncoder(out_ch=boc[0], res_ch=boc[-1])`` (level i: H / 2**i)."""
    c0, cap = boc[0], boc[-1]
    chans = [min(c0 * 2**k, cap) for k in range(_ASYM_COND_LAYERS - 1)] + [cap]
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
    _check_common(what, c)
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
                + f" and pyvq's from layer {j} (supported: fewer than {_ASYM_COND_LAYERS} resolution levels "
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
    )
    return AsymmetricVQGANConfig(
        base_kind="kl",
        base_config=base,
        ch=dec_ch,
        ch_mult=dec_mult,
        num_res_blocks=int(c["layers_per_up_block"]),
        attn_resolutions=_attn_resolutions(what, resolution, dec_attn, n),
        blend="add",
    )


_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename_old_attention(state: dict) -> dict:
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


def _diffusers_key(key: str, n_levels: int) -> str:
    """diffusers name of a pyvq (taming-named) weight of an Encoder/Decoder model."""
    if key == _CODEBOOK:
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


def _asym_diffusers_key(key: str, n_levels: int) -> str:
    """diffusers ``AsymmetricAutoencoderKL`` name of an ``AsymmetricVQGAN`` weight."""
    if key.startswith("base."):
        return _diffusers_key(key[len("base."):], n_levels)
    if key.startswith("decoder.condition_encoder."):
        return key
    return _diffusers_key(key, n_levels)


def _linear_to_conv(pyvq_key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Attention projections: diffusers' Linear (C_out, C_in) is pyvq's 1x1 conv (C_out, C_in, 1, 1).
    module = pyvq_key.rsplit(".", 2)[-2]
    if module in ("q", "k", "v", "proj_out") and value.dim() == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return value[:, :, None, None]
    return value


def _read_diffusers_config(directory: str) -> dict:
    what = "from_diffusers"
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what}: no such directory {directory!r}")
    config_path = os.path.join(directory, _CONFIG_NAME)
    if not os.path.isfile(config_path):
        hint = ""
        if os.path.isfile(os.path.join(directory, "vae", _CONFIG_NAME)):
            hint = f" (it looks like a pipeline; pass {os.path.join(directory, 'vae')!r})"
        raise FileNotFoundError(f"{what}: {directory!r} has no {_CONFIG_NAME}{hint}")
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise ValueError(f"{what}: {config_path!r} is not a diffusers model config (no '_class_name')")
    return cfg


def _read_diffusers_weights(directory: str, variant: str | None) -> dict:
    what = "from_diffusers"
    stem = _WEIGHTS_STEM + (f".{variant}" if variant else "")
    single = os.path.join(directory, stem + ".safetensors")
    index = single + ".index.json"
    binary = os.path.join(directory, stem + ".bin")
    if os.path.isfile(single):
        from safetensors.torch import load_file

        state = load_file(single, device="cpu")
    elif os.path.isfile(index):
        from safetensors.torch import load_file

        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(os.path.join(directory, shard), device="cpu"))
    elif os.path.isfile(binary):
        state = _torch_load(binary, what)
    else:
        raise FileNotFoundError(
            f"{what}: {directory!r} has none of {os.path.basename(single)}, {os.path.basename(index)}, "
            f"{os.path.basename(binary)}"
            + ("" if variant else " (pass variant='fp16' for a half-precision variant)")
        )
    return dict(state)


def from_diffusers(model_or_dir, *, variant: str | None = None) -> VQGAN | AutoencoderKL | AsymmetricVQGAN:
    """A pyvq tokenizer holding the weights of a diffusers autoencoder.

    Args:
        model_or_dir: a diffusers ``AutoencoderKL``, ``VQModel`` or
            ``AsymmetricAutoencoderKL`` instance,
            or a directory written by its ``save_pretrained`` (``config.json``
            and ``diffusion_pytorch_model.safetensors``, or a sharded
            ``.safetensors.index.json``; a ``.bin`` is read with
            ``torch.load(weights_only=True)``). diffusers need not be
            installed for a directory.
        variant: the weights file variant of a directory
            (``diffusion_pytorch_model.<variant>.safetensors``, e.g. ``"fp16"``).

    Config mapping: ``block_out_channels`` -> ``ch`` (its first entry) and
    ``ch_mult`` (the entries divided by it); ``layers_per_block`` ->
    ``num_res_blocks``; ``latent_channels`` -> ``z_channels`` (and
    ``embed_dim`` for AutoencoderKL); ``vq_embed_dim`` (default
    ``latent_channels``) -> ``embed_dim`` and ``num_vq_embeddings`` ->
    ``n_embed`` for VQModel; ``sample_size`` -> ``resolution``;
    ``in_channels``, ``out_channels`` -> ``in_channels``, ``out_ch``;
    ``scaling_factor`` -> ``AutoencoderKLConfig.scaling_factor`` (a
    VQModel's is not kept: VQGANConfig has no such field); attention block
    types -> ``attn_resolutions`` (module docstring). ``norm_num_groups``
    must be 32, ``act_fn`` SiLU, ``norm_type`` ``"group"``. An
    AutoencoderKL with ``use_quant_conv=False`` / ``use_post_quant_conv=False``
    (e.g. FLUX's VAE) gets identity 1x1 convs (weight I, bias 0: exact in
    float32 arithmetic; where convolutions run in TF32, as cuDNN's do by
    default on GPUs, they round like every other conv of the model); its
    ``shift_factor`` / ``latents_mean`` / ``latents_std`` are not kept (a
    warning says so).

    ``AsymmetricAutoencoderKL``: an ``AsymmetricVQGAN`` (``base_kind="kl"``,
    ``blend="add"``); the base from the ``down_*`` fields as above, the new
    decoder's ``ch`` / ``ch_mult`` / ``num_res_blocks`` / ``attn_resolutions``
    from ``up_block_out_channels`` / ``layers_per_up_block`` /
    ``up_block_types``. Mask = 1 is the hole in both libraries:
    ``model.decode(z, (1 - mask) * x, mask)`` is diffusers'
    ``decode(z, image=x, mask=mask).sample``. ``in_channels`` must equal
    ``out_channels``; the decoder layouts supported are in the module
    docstring.

    Returns:
        ``VQGAN`` for a VQModel, ``AutoencoderKL`` for an AutoencoderKL,
        ``AsymmetricVQGAN`` for an AsymmetricAutoencoderKL; on
        the CPU, float32, eval mode. ``model.decode(z)`` gives the image.
        For a VQModel, diffusers' ``encode(x).latents`` is pyvq's
        ``model.quant_conv(model.encoder(x))`` (before quantisation).

    Raises:
        ValueError: unsupported class, block type or config value (named);
            keys missing or unexpected (listed); a shape mismatch (the key
            is named).
        FileNotFoundError: a directory without the expected files.
    """
    directory = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = os.fspath(model_or_dir)
        cfg = _read_diffusers_config(directory)
        class_name = cfg["_class_name"]
    else:
        if variant is not None:
            raise ValueError("from_diffusers: argument 'variant' applies to a directory only")
        class_name = type(model_or_dir).__name__
        cfg = getattr(model_or_dir, "config", None)
        if class_name not in _KNOWN_KEYS or cfg is None or not hasattr(model_or_dir, "state_dict"):
            raise TypeError(
                "from_diffusers: argument 'model_or_dir' must be a diffusers AutoencoderKL or VQModel (or "
                f"AsymmetricAutoencoderKL), or a directory, got {class_name}"
            )
        cfg = dict(cfg)

    config = _diffusers_config(class_name, cfg)  # validate before reading any weights
    if directory is not None:
        state = _read_diffusers_weights(directory, variant)
    else:
        state = {k: v.detach() for k, v in model_or_dir.state_dict().items()}
    state = _rename_old_attention(state)
    what = f"from_diffusers ({class_name})"
    if class_name == _ASYM:
        model = AsymmetricVQGAN(config)
        n_levels = len(config.ch_mult)
        # diffusers' condition-encoder layers past pyvq's L + 1 feed no blend point
        # (the config check above proved it): dropped.
        for k in range(n_levels + 1, _ASYM_COND_LAYERS):
            for p in ("weight", "bias"):
                state.pop(f"decoder.condition_encoder.layers.{k}.{p}", None)
        _load_into(model, state, lambda k: _asym_diffusers_key(k, n_levels), what, transform=_linear_to_conv)
        return _finish(model)
    if class_name == "AutoencoderKL":
        model = AutoencoderKL(config)
        # use_quant_conv / use_post_quant_conv = False: no such modules in diffusers;
        # an identity 1x1 conv (weight I, bias 0) returns its input.
        for name, flag in (("quant_conv", "use_quant_conv"), ("post_quant_conv", "use_post_quant_conv")):
            if cfg.get(flag, True):
                continue
            if f"{name}.weight" in state or f"{name}.bias" in state:
                raise ValueError(f"{what}: {flag}=False but the weights contain {name}.*")
            conv = getattr(model, name)
            state[f"{name}.weight"] = torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(conv.out_channels)
    else:
        model = VQGAN(config)
    n_levels = len(config.ch_mult)
    _load_into(model, state, lambda k: _diffusers_key(k, n_levels), what, transform=_linear_to_conv)
    return _finish(model)
