"""Asymmetric VQGAN (Zhu et al., "Designing a Better Asymmetric VQGAN for
StableDiffusion", 2023): a trained tokenizer's encoder side kept frozen, and
a new, heavier decoder that also sees the known part of the image.

    x -> base.encoder -> base.quant_conv -> quantize / Gaussian posterior -> z   (frozen)
    z -> base.post_quant_conv (frozen) -> decoder(h, masked_image, mask) -> x_rec (trained)

Mask convention: **mask = 1 marks the HOLE** (the region to generate), 0 the
known pixels, (B, 1, H, W); the masked image is ``Y = (1 - mask) * x``. This
is the convention of the paper and of diffusers' ``AsymmetricAutoencoderKL``.

The decoder is ``pyvq.nn.MaskConditionDecoder`` (``pyvq/nn/mask_decoder.py``:
``pyvq.nn.Decoder`` plus a ``ConditionEncoder`` and mask-guided blending; its
docstring gives the blend points and modes). Its parameter count and GFLOPs
are in ``pyvq.models.cost``.

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
from torch import nn

from pyvq._checks import check_image, check_positive_fields, int_tuple
from pyvq.models._pretrained import PretrainedModel, config_from_dict, get_preset, register_preset
from pyvq.models.outputs import TokenizerOutput
from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from pyvq.models.tokenizers.vqgan import VQGAN, VQGANConfig
from pyvq.nn.blocks import check_norm_groups, norm_channels
from pyvq.nn.mask_decoder import BLEND_MODES, MaskConditionDecoder

__all__ = ["AsymmetricVQGAN", "AsymmetricVQGANConfig"]

_BASES = {"vq": (VQGAN, VQGANConfig), "kl": (AutoencoderKL, AutoencoderKLConfig)}


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
        norm_num_groups: GroupNorm groups of the new decoder (``None``: the
            base's ``norm_num_groups``); must divide every ``ch * ch_mult[i]``.

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
    norm_num_groups: int | None = None

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
        for key in ("ch", "num_res_blocks", "norm_num_groups"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, getattr(bc, key))
        for key in ("ch_mult", "attn_resolutions"):
            value = getattr(bc, key) if getattr(self, key) is None else getattr(self, key)
            object.__setattr__(self, key, int_tuple(key, value, where=name))
        if self.cond_ch is None:
            object.__setattr__(self, "cond_ch", self.ch)
        check_positive_fields(self, ("ch", "num_res_blocks", "cond_ch"), where=name)
        if len(self.ch_mult) != len(bc.ch_mult) or min(self.ch_mult) < 1:
            raise ValueError(
                f"{name}: field 'ch_mult' must have {len(bc.ch_mult)} entries >= 1 (the base's downsampling), "
                f"got {self.ch_mult}"
            )
        if self.blend not in BLEND_MODES:
            raise ValueError(f"{name}: field 'blend' must be one of {BLEND_MODES}, got {self.blend!r}")
        if self.blend == "add" and self.cond_ch != self.ch:
            raise ValueError(f"{name}: blend='add' needs cond_ch == ch ({self.ch}), got {self.cond_ch}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: field 'dropout' must be in [0, 1), got {self.dropout!r}")
        groups = check_norm_groups(
            self.norm_num_groups, norm_channels(self.ch, self.ch_mult, encoder=False), where=name, what="field"
        )
        object.__setattr__(self, "norm_num_groups", groups)

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
            norm_num_groups=self.norm_num_groups,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def scaled_to(self, base_config) -> dict:
        """Decoder fields (``from_base`` overrides) that give a base tokenizer
        with config ``base_config`` this config's decoder scaling: width
        ``ch`` and depth ``num_res_blocks`` multiplied by this config's ratio
        to its own base (width rounded to a multiple of ``base_config``'s
        ``norm_num_groups``, the GroupNorm group count the new decoder
        takes), the same ``blend`` and ``dropout``; the levels
        (``ch_mult``, ``attn_resolutions``) stay the base's."""
        own = self.base()
        width, depth = self.ch / own.ch, self.num_res_blocks / own.num_res_blocks
        g = base_config.norm_num_groups
        return dict(
            ch=max(g, int(round(base_config.ch * width / g)) * g) if width != 1 else base_config.ch,
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
