"""Asymmetric VQGAN (Zhu et al., "Designing a Better Asymmetric VQGAN for
StableDiffusion", 2023): a trained tokenizer's encoder side kept frozen, and
a new, heavier decoder that also sees the known part of the image.

    x -> base.encoder -> base.quant_conv -> quantize / Gaussian posterior -> z   (frozen)
    z -> base.post_quant_conv (frozen) -> decoder(h, masked_image, mask) -> x_rec (trained)

Mask convention: **mask = 1 marks the HOLE** (the region to generate), 0 the
known pixels, (B, 1, H, W); the masked image is ``Y = (1 - mask) * x``. This
is the convention of the paper and of diffusers' ``AsymmetricAutoencoderKL``.
(``pyvq.nn.PartialConv2d`` uses the opposite one; the model passes it
``1 - mask``.)

The decoder (``MaskConditionDecoder``) is ``pyvq.nn.Decoder`` (conv_in, mid,
up[i], norm_out, conv_out, taming names) plus a condition encoder
``condition_encoder.layers[k]`` that maps Y to one feature map per blend
point, and mask-guided blending (MGB) at ``L + 1`` points, L =
``len(ch_mult)``, the placement diffusers' ``MaskConditionDecoder`` uses:

- before the blocks of every level ``up[i]`` (i = L-1 first, right after the
  mid block; the input of ``up[i]`` has ``ch * ch_mult[i + 1]`` channels,
  ``ch * ch_mult[-1]`` for the lowest level, at resolution ``H / 2**i``);
- after ``up[0]``, before ``norm_out`` (``ch * ch_mult[0]`` channels, H).

Condition encoder layers (features taken before the ReLU that follows each):
``layers[0]`` 3x3 conv, 3 -> C_final at full resolution; ``layers[1]`` 3x3
conv, C_final -> C_in[0]; ``layers[k + 1]`` (k = 1..L-1) 4x4 stride-2 conv,
C_in[k-1] -> C_in[k]. Feature ``layers[0]`` feeds the final blend,
``layers[k + 1]`` the blend before ``up[k]``.

Blend modes (``blend``):

- ``"add"`` (the paper's MGB, diffusers' model): ``f = f_dec * m + f_E * (1 - m)``
  with ``m`` the mask resized (nearest) to the level: known pixels take the
  condition features, holes the decoder's.
- ``"concat"``: the condition encoder is built from ``PartialConv2d`` (valid
  mask ``1 - mask``, propagated layer to layer) and
  ``f = fuse[k](cat(f_dec, f_E, m))``, a 1x1 conv initialised to pass
  ``f_dec`` through unchanged (so an untrained fuse is the plain decoder).

Without a condition (``masked_image=None``) the decoder is exactly the plain
``pyvq.nn.Decoder`` path.

Correspondence with diffusers' ``AsymmetricAutoencoderKL`` (for a converter):
``encoder.*`` <-> ``base.encoder.*`` (diffusers' block names),
``quant_conv`` <-> ``base.quant_conv``, ``post_quant_conv`` <->
``base.post_quant_conv``, ``decoder.conv_in`` <-> ``decoder.conv_in``,
``decoder.mid_block.resnets.0/1`` <-> ``decoder.mid.block_1/block_2``,
``decoder.mid_block.attentions.0`` <-> ``decoder.mid.attn_1`` (to_q/k/v/out
linear -> q/k/v/proj_out 1x1 conv), ``decoder.up_blocks.k`` <->
``decoder.up[L-1-k]`` (``resnets.j`` -> ``block[j]``, ``upsamplers.0.conv``
-> ``upsample.conv``, ``conv_shortcut`` -> ``nin_shortcut``),
``decoder.conv_norm_out`` <-> ``decoder.norm_out``, ``decoder.conv_out`` <->
``decoder.conv_out``, ``decoder.condition_encoder.layers.k`` <->
``decoder.condition_encoder.layers.k`` (same shapes for the SD layouts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_image, int_tuple
from pyvq.models._pretrained import PretrainedModel, config_from_dict, get_preset, register_preset
from pyvq.models.outputs import TokenizerOutput
from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from pyvq.models.tokenizers.vqgan import VQGAN, VQGANConfig
from pyvq.nn.blocks import Decoder
from pyvq.nn.partial_conv import PartialConv2d

__all__ = [
    "AsymmetricVQGAN",
    "AsymmetricVQGANConfig",
    "MaskConditionDecoder",
    "decoder_gflops",
    "decoder_parameter_count",
    "mask_guided_blend",
]

_BASES = {"vq": (VQGAN, VQGANConfig), "kl": (AutoencoderKL, AutoencoderKLConfig)}
_BLENDS = ("add", "concat")


def mask_guided_blend(f_dec: torch.Tensor, f_cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MGB, add mode: ``f_dec * m + f_cond * (1 - m)``, with ``mask`` (1 = hole)
    resized by nearest neighbour to ``f_dec``'s spatial size."""
    m = mask if mask.shape[-2:] == f_dec.shape[-2:] else F.interpolate(mask, size=f_dec.shape[-2:], mode="nearest")
    return f_dec * m + f_cond * (1.0 - m)


# --------------------------------------------------------------- decoder
class _ConditionEncoder(nn.Module):
    """Masked image -> one feature map per blend point (see the module
    docstring). ``partial``: PartialConv2d layers driven by a valid mask."""

    def __init__(self, in_ch: int, channels: list[int], partial: bool):
        super().__init__()
        self.partial = bool(partial)
        layers, c_in = [], in_ch
        for k, c_out in enumerate(channels):
            if k < 2:
                args = dict(kernel_size=3, stride=1, padding=1)
            else:
                args = dict(kernel_size=4, stride=2, padding=1)
            layers.append(PartialConv2d(c_in, c_out, **args) if partial else nn.Conv2d(c_in, c_out, **args))
            c_in = c_out
        self.layers = nn.ModuleList(layers)

    def forward(self, y: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            if self.partial:
                y, valid = layer(y, valid)
            else:
                y = layer(y)
            feats.append(y)
            y = torch.relu(y)
        return feats


class MaskConditionDecoder(Decoder):
    """``pyvq.nn.Decoder`` with a masked-image condition and mask-guided
    blending; see the module docstring.

    Args: those of ``pyvq.nn.Decoder``, plus
        blend: ``"add"`` or ``"concat"``.
        cond_ch: condition-encoder width: its feature at a blend point with
            ``ch * mult`` decoder channels has ``cond_ch * mult`` channels.
            Must equal ``ch`` for ``"add"`` (the default, ``None``, means ``ch``).
        cond_in_channels: channels of the masked image (default ``out_ch``).

    ``forward(z, masked_image=None, mask=None)``: z (B, z_channels, h, w);
    masked_image (B, cond_in_channels, h*f, w*f); mask (B or 1, 1, h*f, w*f),
    1 = hole. Both or neither. Returns (B, out_ch, h*f, w*f).
    """

    def __init__(self, *, blend: str = "add", cond_ch: int | None = None, cond_in_channels: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if blend not in _BLENDS:
            raise ValueError(f"MaskConditionDecoder: argument 'blend' must be one of {_BLENDS}, got {blend!r}")
        ch_mult = tuple(int(m) for m in kwargs.get("ch_mult", (1, 1, 2, 2, 4)))
        cond_ch = self.ch if cond_ch is None else int(cond_ch)
        if blend == "add" and cond_ch != self.ch:
            raise ValueError(f"MaskConditionDecoder: blend='add' needs cond_ch == ch ({self.ch}), got {cond_ch}")
        if cond_ch < 1:
            raise ValueError(f"MaskConditionDecoder: argument 'cond_ch' must be >= 1, got {cond_ch}")
        self.blend = blend
        self.cond_ch = cond_ch
        # Decoder-feature multipliers at the blend points: final, then the input of up[0], ..., up[L-1].
        mults = [ch_mult[0]] + [ch_mult[min(i + 1, len(ch_mult) - 1)] for i in range(len(ch_mult))]
        self.blend_channels = [self.ch * m for m in mults]
        cond_channels = [cond_ch * m for m in mults]
        cond_in = self.out_ch if cond_in_channels is None else int(cond_in_channels)
        self.cond_in_channels = cond_in
        self.condition_encoder = _ConditionEncoder(cond_in, cond_channels, partial=(blend == "concat"))
        if blend == "concat":
            self.fuse = nn.ModuleList(nn.Conv2d(c + ce + 1, c, kernel_size=1) for c, ce in zip(self.blend_channels, cond_channels))
            with torch.no_grad():
                for conv, c in zip(self.fuse, self.blend_channels):
                    conv.weight.zero_()
                    conv.bias.zero_()
                    conv.weight[:, :c, 0, 0].copy_(torch.eye(c))

    def _blend(self, k: int, f_dec: torch.Tensor, f_cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.blend == "add":
            return mask_guided_blend(f_dec, f_cond, mask)
        m = F.interpolate(mask, size=f_dec.shape[-2:], mode="nearest").expand(f_dec.shape[0], 1, -1, -1)
        return self.fuse[k](torch.cat([f_dec, f_cond, m], dim=1))

    def condition_features(self, masked_image: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The condition encoder's features: [final, input of up[0], ..., input of up[L-1]]."""
        return self.condition_encoder(masked_image, 1.0 - mask)

    def forward(
        self, z: torch.Tensor, masked_image: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if masked_image is None and mask is None:
            return super().forward(z)
        if masked_image is None or mask is None:
            raise ValueError("MaskConditionDecoder: pass both 'masked_image' and 'mask', or neither")
        f = 2 ** (self.num_resolutions - 1)
        size = (z.shape[2] * f, z.shape[3] * f)
        if masked_image.dim() != 4 or masked_image.shape[1] != self.cond_in_channels or tuple(masked_image.shape[2:]) != size:
            raise ValueError(
                f"MaskConditionDecoder: argument 'masked_image' must have shape (B, {self.cond_in_channels}, "
                f"{size[0]}, {size[1]}), got {tuple(masked_image.shape)}"
            )
        if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != size:
            raise ValueError(
                f"MaskConditionDecoder: argument 'mask' must have shape (B, 1, {size[0]}, {size[1]}), "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(dtype=masked_image.dtype)
        feats = self.condition_features(masked_image, mask)

        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            h = self._blend(i + 1, h, feats[i + 1], mask)
            level = self.up[i]
            h = level.run_blocks(h)
            if i != 0:
                h = level.upsample(h)
        h = self._blend(0, h, feats[0], mask)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class AsymmetricVQGANConfig:
    """Architecture of an ``AsymmetricVQGAN``.

    Attributes:
        base_kind: ``"vq"`` (a ``VQGAN`` base) or ``"kl"`` (``AutoencoderKL``).
        base_config: the base tokenizer's config fields, a dict (a
            ``VQGANConfig`` / ``AutoencoderKLConfig`` instance is converted).
            Empty: the base class's defaults.
        ch, ch_mult, num_res_blocks, attn_resolutions: the new decoder's
            width and depth; ``None`` takes the base's value.
        dropout: ResnetBlock dropout of the new decoder.
        blend: ``"add"`` (MGB) or ``"concat"`` (partial-conv condition
            encoder, concat + 1x1 fuse).
        cond_ch: condition-encoder width (``None``: ``ch``; must be ``ch``
            for ``"add"``).

    The new decoder keeps the base's ``z_channels``, ``resolution``,
    ``out_ch``, ``resamp_with_conv`` and ``tanh_out``; ``len(ch_mult)`` must
    equal the base's (same downsampling factor).
    """

    base_kind: str = "vq"
    base_config: dict = field(default_factory=dict)
    ch: int | None = None
    ch_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float = 0.0
    blend: str = "add"
    cond_ch: int | None = None

    def __post_init__(self):
        name = "AsymmetricVQGANConfig"
        if self.base_kind not in _BASES:
            raise ValueError(f"{name}: field 'base_kind' must be one of {sorted(_BASES)}, got {self.base_kind!r}")
        base_cls = _BASES[self.base_kind][1]
        bc = self.base_config
        if dataclasses.is_dataclass(bc) and not isinstance(bc, type):
            if not isinstance(bc, base_cls):
                raise TypeError(f"{name}: base_kind={self.base_kind!r} needs a {base_cls.__name__}, got {type(bc).__name__}")
        elif isinstance(bc, dict):
            bc = config_from_dict(base_cls, bc)
        else:
            raise TypeError(f"{name}: field 'base_config' must be a dict or a {base_cls.__name__}, got {type(bc).__name__}")
        object.__setattr__(self, "base_config", {f.name: getattr(bc, f.name) for f in dataclasses.fields(bc)})
        for key in ("ch", "num_res_blocks"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, getattr(bc, key))
        for key in ("ch_mult", "attn_resolutions"):
            value = getattr(bc, key) if getattr(self, key) is None else getattr(self, key)
            object.__setattr__(self, key, int_tuple(key, value, where=name))
        if self.cond_ch is None:
            object.__setattr__(self, "cond_ch", self.ch)
        for key in ("ch", "num_res_blocks", "cond_ch"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: field {key!r} must be an int >= 1, got {v!r}")
        if len(self.ch_mult) != len(bc.ch_mult) or min(self.ch_mult) < 1:
            raise ValueError(
                f"{name}: field 'ch_mult' must have {len(bc.ch_mult)} entries >= 1 (the base's downsampling), "
                f"got {self.ch_mult}"
            )
        if self.blend not in _BLENDS:
            raise ValueError(f"{name}: field 'blend' must be one of {_BLENDS}, got {self.blend!r}")
        if self.blend == "add" and self.cond_ch != self.ch:
            raise ValueError(f"{name}: blend='add' needs cond_ch == ch ({self.ch}), got {self.cond_ch}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: field 'dropout' must be in [0, 1), got {self.dropout!r}")

    def base(self):
        """The base tokenizer's config dataclass."""
        return config_from_dict(_BASES[self.base_kind][1], self.base_config)

    def decoder_kwargs(self) -> dict:
        """Arguments of the ``MaskConditionDecoder``."""
        b = self.base()
        return dict(
            out_ch=b.out_ch,
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            z_channels=b.z_channels,
            resolution=b.resolution,
            dropout=self.dropout,
            resamp_with_conv=b.resamp_with_conv,
            tanh_out=b.tanh_out,
            blend=self.blend,
            cond_ch=self.cond_ch,
            cond_in_channels=b.in_channels,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def scaled_to(self, base_config) -> dict:
        """Decoder fields (``from_base`` overrides) that give a base tokenizer
        with config ``base_config`` this config's decoder scaling: width
        ``ch`` and depth ``num_res_blocks`` multiplied by this config's ratio
        to its own base (width rounded to a multiple of 32, GroupNorm's
        group count), the same ``blend`` and ``dropout``; the levels
        (``ch_mult``, ``attn_resolutions``) stay the base's."""
        own = self.base()
        width, depth = self.ch / own.ch, self.num_res_blocks / own.num_res_blocks
        return dict(
            ch=max(32, int(round(base_config.ch * width / 32)) * 32) if width != 1 else base_config.ch,
            num_res_blocks=max(1, int(round(base_config.num_res_blocks * depth + 1e-9))),
            blend=self.blend,
            dropout=self.dropout,
        )


# ----------------------------------------------------------------- model
class AsymmetricVQGAN(PretrainedModel, nn.Module):
    """Frozen tokenizer encoder + trainable mask-conditioned decoder.

    Submodules: ``base`` (a ``VQGAN`` or ``AutoencoderKL`` without its
    decoder; parameters frozen, always in eval mode) and ``decoder`` (a
    ``MaskConditionDecoder``). Only ``decoder`` has trainable parameters.
    ``mask`` is 1 on the hole (see the module docstring).
    """

    #: forward(x, mask) takes a mask; the trainer samples one per step.
    conditional = True

    config_class = AsymmetricVQGANConfig

    def __init__(self, config: AsymmetricVQGANConfig):
        super().__init__()
        if not isinstance(config, AsymmetricVQGANConfig):
            raise TypeError(f"AsymmetricVQGAN: argument 'config' must be an AsymmetricVQGANConfig, got {type(config).__name__}")
        self.config = config
        base_cls = _BASES[config.base_kind][0]
        self.base = base_cls(config.base())
        del self.base.decoder  # replaced by self.decoder
        self.base.requires_grad_(False)
        self.base.eval()
        self.decoder = MaskConditionDecoder(**config.decoder_kwargs())

    # -- building
    @classmethod
    def from_base(cls, base_model: nn.Module, *, init_decoder: bool = True, **decoder_overrides) -> "AsymmetricVQGAN":
        """An asymmetric model on a trained ``VQGAN`` / ``AutoencoderKL``.

        The base's encoder-side weights (encoder, quant_conv, quantizer,
        post_quant_conv) are copied and frozen. ``decoder_overrides`` are
        ``AsymmetricVQGANConfig`` fields (``ch``, ``ch_mult``,
        ``num_res_blocks``, ``attn_resolutions``, ``dropout``, ``blend``,
        ``cond_ch``). ``init_decoder``: copy the base decoder's weights into
        every new-decoder tensor of the same name and shape (all of them when
        the width and depth are the base's); the rest keep their random
        initialisation.
        """
        if isinstance(base_model, VQGAN):
            kind = "vq"
        elif isinstance(base_model, AutoencoderKL):
            kind = "kl"
        else:
            raise TypeError(f"AsymmetricVQGAN.from_base: expected a VQGAN or AutoencoderKL, got {type(base_model).__name__}")
        config = AsymmetricVQGANConfig(base_kind=kind, base_config=base_model.config, **decoder_overrides)
        model = cls(config)
        base_state = base_model.state_dict()
        enc_state = {k: v for k, v in base_state.items() if not k.startswith("decoder.")}
        model.base.load_state_dict(enc_state, strict=True)
        if init_decoder and hasattr(base_model, "decoder"):
            own = model.decoder.state_dict()
            dec = {k[len("decoder."):]: v for k, v in base_state.items() if k.startswith("decoder.")}
            fit = {k: v for k, v in dec.items() if k in own and own[k].shape == v.shape}
            model.decoder.load_state_dict(fit, strict=False)
        model.to(next(base_model.parameters()).device)
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the frozen side never updates its statistics / codebook
        return self

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # -- running
    def encode(self, x: torch.Tensor):
        """The frozen base's ``encode``: VQ -> (z_q, indices, aux); KL -> the posterior."""
        return self.base.encode(x)

    def decode(
        self, z: torch.Tensor, masked_image: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, out_ch, h*f, w*f).

        ``masked_image`` (B, C, h*f, w*f) and ``mask`` (B or 1, 1, h*f, w*f),
        1 = hole: the known content to keep; both or neither (neither: the
        plain decoder). ``masked_image`` should be zero on the hole, e.g.
        ``(1 - mask) * x``.
        """
        if mask is not None and mask.dim() == 4 and mask.shape[0] == 1 and z.shape[0] != 1:
            mask = mask.expand(z.shape[0], -1, -1, -1)
        return self.decoder(self.base.post_quant_conv(z), masked_image, mask)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, sample_posterior: bool = False
    ) -> TokenizerOutput:
        """Reconstruct ``x`` (B, C, H, W), conditioned on ``(1 - mask) * x`` when a
        ``mask`` (B or 1, 1, H, W), 1 = hole, is given.

        Returns a ``TokenizerOutput`` (x_rec, aux): aux is the base's
        ``VQAux`` (VQ base) or the posterior (KL base; the decoder gets its
        mode, or a sample with ``sample_posterior``).
        """
        check_image(x, where="AsymmetricVQGAN", channels=self.config.base().in_channels, factor=self.downsample_factor)
        if self.config.base_kind == "vq":
            z, _, aux = self.encode(x)
        else:
            aux = self.encode(x)
            z = aux.sample() if sample_posterior else aux.mode()
        if mask is None:
            return TokenizerOutput(self.decode(z), aux)
        if mask.dim() == 3:
            mask = mask[:, None]
        mask = mask.to(x.dtype)
        if mask.shape[0] == 1 and x.shape[0] != 1:
            mask = mask.expand(x.shape[0], -1, -1, -1)
        return TokenizerOutput(self.decode(z, (1.0 - mask) * x, mask), aux)

    def get_last_layer(self) -> torch.Tensor:
        """The new decoder's last conv weight (adaptive GAN weight)."""
        return self.decoder.conv_out.weight


# ----------------------------------------------------------------- helpers
def decoder_parameter_count(model_or_config) -> int:
    """Parameters of the new decoder (condition encoder and fuse convs
    included) of an ``AsymmetricVQGAN`` or ``AsymmetricVQGANConfig`` (built
    on the meta device, no memory)."""
    if isinstance(model_or_config, AsymmetricVQGANConfig):
        with torch.device("meta"):
            dec = MaskConditionDecoder(**model_or_config.decoder_kwargs())
    elif isinstance(model_or_config, AsymmetricVQGAN):
        dec = model_or_config.decoder
    else:
        raise TypeError(f"decoder_parameter_count: expected an AsymmetricVQGAN or its config, got {type(model_or_config).__name__}")
    return sum(p.numel() for p in dec.parameters())


def decoder_gflops(config: AsymmetricVQGANConfig, height: int, width: int, conditioned: bool = True) -> float:
    """GFLOPs (2 per multiply-add) of one decoder pass (post_quant_conv
    included) for an (height, width) image, batch 1, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (convs,
    matmuls, attention; norms and activations are not counted).
    ``conditioned``: include the condition encoder and blends."""
    from torch.utils.flop_counter import FlopCounterMode

    f = config.downsample_factor
    if height % f or width % f:
        raise ValueError(f"decoder_gflops: height and width must be divisible by {f}, got {(height, width)}")
    base = config.base()
    with torch.device("meta"):
        dec = MaskConditionDecoder(**config.decoder_kwargs())
        pqc = nn.Conv2d(base.embed_dim, base.z_channels, kernel_size=1)
        z = torch.empty(1, base.embed_dim, height // f, width // f)
        args = (torch.empty(1, base.in_channels, height, width), torch.empty(1, 1, height, width)) if conditioned else ()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        dec(pqc(z), *args)
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------- presets
def _round_to(v: float, multiple: int) -> int:
    return max(multiple, int(round(v / multiple)) * multiple)


def _scaled(base_preset: str, kind: str, width: float, depth: float, blend: str = "add") -> AsymmetricVQGANConfig:
    b = get_preset(base_preset)
    return AsymmetricVQGANConfig(
        base_kind=kind,
        base_config=b,
        ch=_round_to(b.ch * width, 32),
        num_res_blocks=max(1, int(round(b.num_res_blocks * depth + 1e-9))),
        blend=blend,
    )


# The tiny decoders have twice their base's width (the paper's heavier-decoder
# direction; it also gives the final GroupNorm 2 channels per group, so the
# blended condition features keep a per-image-independent scale there: at 1
# channel per group the known region's colours are re-normalised by every
# image's own statistics, and the measured Pre_error gain stayed near 2x).
register_preset("asym_vqgan_tiny", AsymmetricVQGANConfig(base_kind="vq", base_config=get_preset("vqgan_tiny"), ch=64))
register_preset("asym_kl_tiny", AsymmetricVQGANConfig(base_kind="kl", base_config=get_preset("kl_tiny"), ch=64))
# The paper's decoders: base (the base tokenizer's width/depth), Large
# (width x1.5, depth x1.5: ch 192, 3 blocks), Large x2 (width x2, depth x2.5:
# ch 256, 5 blocks) -- diffusers' asymmetric-autoencoder-kl-x-1-5 / x-2 layouts.
for _name, _w, _d in (("base", 1.0, 1.0), ("large", 1.5, 1.5), ("large2", 2.0, 2.5)):
    register_preset(f"asym_vq_f16_{_name}", _scaled("vqgan_f16_16384", "vq", _w, _d))
    register_preset(f"asym_kl_f8_{_name}", _scaled("sd_kl_f8", "kl", _w, _d))
del _name, _w, _d
