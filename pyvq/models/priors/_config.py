"""What the priors' configs share: the UNet fields, their checks, the UNet;
the ``tokenizer`` field (the record of the tokenizer whose codes the prior
models) and its check."""

from __future__ import annotations

from pyvq._checks import ArgumentTypeError, check_bool, check_float, check_positive_fields, int_tuple
from pyvq.nn.unet import UNet


def level_sizes(config) -> tuple[int, ...]:
    """UNet level sides, ``code_size / 2**i``."""
    return tuple(config.code_size // 2**i for i in range(len(config.channel_mult)))


def check_unet_fields(config, cls: str, *, ints: tuple[str, ...] = (), strict_attention: bool = True) -> None:
    """Normalise and check a prior config's UNet fields (``code_size``,
    ``timesteps``, ``model_channels``, ``channel_mult``, ``num_res_blocks``,
    ``attention_resolutions``, ``dropout``, ``num_heads``, ``num_groups``,
    ``scale_shift``) plus the int fields ``ints``; ``strict_attention``: an
    attention size no level has is an error (else it is ignored)."""
    for name in ("channel_mult", "attention_resolutions"):
        object.__setattr__(config, name, int_tuple(name, getattr(config, name), where=cls))
    check_positive_fields(
        config, ("code_size", "timesteps", "model_channels", "num_res_blocks", "num_heads", "num_groups") + ints,
        where=cls)
    if not config.channel_mult or min(config.channel_mult) < 1:
        raise ValueError(f"{cls}: field 'channel_mult' must be non-empty with entries >= 1, got {config.channel_mult}")
    f = 2 ** (len(config.channel_mult) - 1)
    if config.code_size % f:
        raise ValueError(f"{cls}: field 'code_size' ({config.code_size}) must be divisible by "
                         f"2**(len(channel_mult) - 1) = {f}")
    sizes = level_sizes(config)
    missing = sorted(set(config.attention_resolutions) - set(sizes))
    if strict_attention and missing:
        raise ValueError(f"{cls}: field 'attention_resolutions' has sizes {missing} that no UNet level has; "
                         f"the level sizes are {list(sizes)}")
    widths = [config.model_channels * m for m in config.channel_mult]
    bad = [w for w in widths if w % config.num_groups]
    if bad:
        raise ValueError(f"{cls}: field 'num_groups' ({config.num_groups}) must divide every UNet width "
                         f"model_channels * channel_mult = {widths}")
    # Heads are needed at the attention levels and in the middle block (last width).
    att = [w for w, s in zip(widths, sizes) if s in config.attention_resolutions] + [widths[-1]]
    bad = [w for w in att if w % config.num_heads]
    if bad:
        raise ValueError(f"{cls}: field 'num_heads' ({config.num_heads}) must divide the widths of the "
                         f"attention levels, got {sorted(set(bad))}")
    check_float("dropout", config.dropout, where=cls, what="field", low=0.0, high=1.0, high_open=True)
    check_bool("scale_shift", config.scale_shift, where=cls, what="field")


def check_tokenizer_field(config, cls: str) -> None:
    """The ``tokenizer`` field, the record of the tokenizer whose codes the
    prior was trained on (``pyvq.data.codes.tokenizer_record``: ``path``,
    ``class``, ``fingerprint``, ``kind``, ``num_classes``, ``shape``,
    ``image_size``; set by ``PriorTrainer``, checked by ``pyvq sample`` /
    ``pyvq inpaint``), is None (not recorded) or a dict."""
    if config.tokenizer is not None and not isinstance(config.tokenizer, dict):
        raise ArgumentTypeError(f"{cls}: field 'tokenizer' must be None or a dict (a tokenizer record), got "
                                f"{type(config.tokenizer).__name__}")


def build_unet(config, channels: int) -> UNet:
    """The prior's UNet: ``channels`` in and out, at the config's code size,
    attention at the configured sizes that a level has."""
    sizes = level_sizes(config)
    return UNet(channels, channels, image_size=config.code_size, model_channels=config.model_channels,
                channel_mult=config.channel_mult, num_res_blocks=config.num_res_blocks,
                attention_resolutions=tuple(r for r in config.attention_resolutions if r in sizes),
                dropout=config.dropout, num_heads=config.num_heads, scale_shift=config.scale_shift,
                num_groups=config.num_groups)
