"""GroupNorm group count (``norm_num_groups``) as a config field, and
diffusers models of any group count through ``from_diffusers``.

diffusers (0.42.1) is the oracle: tiny AutoencoderKL, VQModel and
AsymmetricAutoencoderKL models with several group counts (16, 8, 4, 1), 1 to
3 layers per block and 1 to 4 resolution levels get random weights; their
pyvq conversions must give the same encode (posterior / pre-quantisation
latents), the same code indices and the same decode in float64. The pyvq-only
tests (config checks, old saved configs) run without diffusers.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyvq.convert import from_diffusers
from pyvq.models import (
    AsymmetricVQGAN,
    AsymmetricVQGANConfig,
    AutoencoderKL,
    AutoencoderKLConfig,
    VQGAN,
    VQGANConfig,
    get_preset,
    load_pretrained,
    model_class_for,
)
from pyvq.nn import Decoder, Encoder, ResnetBlock

from tests.test_convert import _check_kl, _check_vq, _randomize
from tests.test_convert import diffusers  # noqa: F401 (the fixture)
from tests.test_convert_asymmetric import _check as _check_asymmetric

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN_DOWN, ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
PLAIN_UP, ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


def _assert_groups(model: torch.nn.Module, groups: int) -> None:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {groups}


# Encoder/decoder layouts the older tests do not use: group counts other than
# 32, one to four levels, one to three layers per block, attention levels.
KL_CASES = {
    "g8_three_levels_two_layers": dict(
        norm_num_groups=8, block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=3
    ),
    "g4_two_levels_three_layers_attention": dict(
        norm_num_groups=4, block_out_channels=(8, 16), layers_per_block=3, latent_channels=4, attention=(1,)
    ),
    "g1_one_level": dict(norm_num_groups=1, block_out_channels=(4,), layers_per_block=1, latent_channels=2),
    "g16_four_levels": dict(
        norm_num_groups=16, block_out_channels=(16, 32, 32, 48), layers_per_block=1, latent_channels=4
    ),
}
VQ_CASES = {
    "g16_two_levels_three_layers": dict(
        norm_num_groups=16, block_out_channels=(16, 32), layers_per_block=3, latent_channels=4, vq_embed_dim=3
    ),
    "g8_three_levels_attention": dict(
        norm_num_groups=8, block_out_channels=(8, 16, 24), layers_per_block=2, latent_channels=3, attention=(2,)
    ),
    "g4_one_level": dict(norm_num_groups=4, block_out_channels=(8,), layers_per_block=2, latent_channels=4),
    "g1_four_levels": dict(
        norm_num_groups=1, block_out_channels=(4, 8, 8, 8), layers_per_block=1, latent_channels=2, vq_embed_dim=2
    ),
}


def _block_types(n: int, attention: tuple[int, ...]) -> dict:
    """down/up block types with attention at the levels ``attention``
    (up_block_types run from the lowest resolution up)."""
    down = tuple(ATTN_DOWN if i in attention else PLAIN_DOWN for i in range(n))
    up = tuple(ATTN_UP if (n - 1 - k) in attention else PLAIN_UP for k in range(n))
    return dict(down_block_types=down, up_block_types=up)


def _diffusers_kwargs(spec: dict) -> dict:
    spec = dict(spec)
    attention = spec.pop("attention", ())
    return dict(**spec, **_block_types(len(spec["block_out_channels"]), attention), sample_size=32)


@pytest.mark.parametrize("case", sorted(KL_CASES))
def test_autoencoder_kl_groups(diffusers, case):
    spec = KL_CASES[case]
    torch.manual_seed(21)
    dmodel = _randomize(diffusers.AutoencoderKL(**_diffusers_kwargs(spec)), seed=22)
    model = from_diffusers(dmodel)
    assert isinstance(model, AutoencoderKL)
    c = model.config
    boc = spec["block_out_channels"]
    assert (c.norm_num_groups, c.ch, c.num_res_blocks) == (spec["norm_num_groups"], boc[0], spec["layers_per_block"])
    assert c.ch_mult == tuple(b // boc[0] for b in boc)
    _assert_groups(model, spec["norm_num_groups"])
    _check_kl(dmodel, model)  # posterior mean / logvar and decode, float64


@pytest.mark.parametrize("case", sorted(VQ_CASES))
def test_vq_model_groups(diffusers, case):
    spec = VQ_CASES[case]
    torch.manual_seed(31)
    dmodel = diffusers.VQModel(num_vq_embeddings=16, **_diffusers_kwargs(spec))
    with torch.no_grad():
        dmodel.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(32))
    dmodel = _randomize(dmodel, seed=33)
    model = from_diffusers(dmodel)
    assert isinstance(model, VQGAN)
    assert (model.config.norm_num_groups, model.config.num_res_blocks) == (
        spec["norm_num_groups"],
        spec["layers_per_block"],
    )
    _assert_groups(model, spec["norm_num_groups"])
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(34)) * 2 - 1
        assert model.encode(x).indices.unique().numel() > 1  # not all one code
    _check_vq(dmodel, model)  # pre-quantisation latents, indices, z_q and decode, float64


# AsymmetricAutoencoderKL layouts pyvq supports (up_block_out_channels double
# from the first, capped at the last; two to four levels): norm_num_groups,
# down_block_out_channels, layers_per_down_block, up_block_out_channels,
# layers_per_up_block, levels with attention.
ASYM_CASES = {
    "g8_deep_encoder": (8, (8, 16), 3, (8, 16), 2, ()),
    "g4_three_levels_attention": (4, (8, 16, 16), 2, (8, 16, 16), 3, (2,)),
    "g1": (1, (4, 8), 1, (4, 8), 1, ()),
    "g16_four_levels": (16, (16, 16, 32, 32), 1, (16, 32, 64, 64), 2, ()),
}


@pytest.mark.parametrize("case", sorted(ASYM_CASES))
def test_asymmetric_groups(diffusers, case, tmp_path):
    groups, down, layers_down, up, layers_up, attention = ASYM_CASES[case]
    spec = dict(
        norm_num_groups=groups,
        down_block_out_channels=down,
        layers_per_down_block=layers_down,
        up_block_out_channels=up,
        layers_per_up_block=layers_up,
        **_block_types(len(down), attention),
    )
    torch.manual_seed(41)
    dmodel = diffusers.AsymmetricAutoencoderKL(sample_size=32, latent_channels=3, **spec)
    dmodel = _randomize(dmodel, seed=42)
    model = from_diffusers(dmodel)
    assert isinstance(model, AsymmetricVQGAN)
    assert model.config.norm_num_groups == model.config.base().norm_num_groups == groups
    assert model.config.num_res_blocks == layers_up
    _assert_groups(model, groups)

    # The saved pyvq config keeps the group count (base and new decoder).
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["norm_num_groups"] == saved["base_config"]["norm_num_groups"] == groups
    _check_asymmetric(dmodel, load_pretrained(tmp_path))  # encode, plain and masked decode, float64


# ----------------------------------------------------------------- pyvq only
def test_default_is_32_and_presets_unchanged():
    for name in ("vqgan_f16_1024", "kl_tiny", "sd_kl_f8"):
        assert get_preset(name).norm_num_groups == 32
    # vqgan_tiny (ch=32) has 8 groups of 4 channels: 32 would be instance norms (issue 15)
    assert get_preset("vqgan_tiny").norm_num_groups == 8
    assert get_preset("asym_vqgan_tiny").norm_num_groups == 8  # its base's
    assert get_preset("asym_kl_f8_large").norm_num_groups == 32
    _assert_groups(Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16), 32)
    _assert_groups(ResnetBlock(32, 64), 32)


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_blocks_take_the_group_count(groups):
    arch = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4, resolution=16)
    enc, dec = Encoder(norm_num_groups=groups, **arch), Decoder(norm_num_groups=groups, **arch)
    _assert_groups(enc, groups)
    _assert_groups(dec, groups)
    assert enc.norm_num_groups == dec.norm_num_groups == groups
    x = torch.randn(1, 3, 16, 16)
    assert dec(enc(x)[:, :4]).shape == (1, 3, 16, 16)


def test_indivisible_channels_name_the_field():
    arch = dict(ch=24, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=16)
    message = r"'norm_num_groups' must divide every GroupNorm's channel count \[24, 48\] .*got 16: \[24\] are not"
    with pytest.raises(ValueError, match="VQGANConfig: field " + message):
        VQGANConfig(embed_dim=4, n_embed=8, norm_num_groups=16, **arch)
    with pytest.raises(ValueError, match="AutoencoderKLConfig: field " + message):
        AutoencoderKLConfig(norm_num_groups=16, **arch)
    with pytest.raises(ValueError, match="Encoder: argument " + message):
        Encoder(norm_num_groups=16, **arch)
    # a decoder normalises ch * ch_mult only (48 here: 16 divides it)
    assert Decoder(norm_num_groups=16, ch=24, ch_mult=(2,), resolution=16, num_res_blocks=1).norm_num_groups == 16
    with pytest.raises(ValueError, match=r"Decoder: argument 'norm_num_groups' .*\[24, 48\].*got 32: \[24, 48\]"):
        Decoder(norm_num_groups=32, **arch)
    with pytest.raises(ValueError, match=r"Normalize: channel count 24 is not divisible by num_groups=16"):
        ResnetBlock(24, 32, norm_num_groups=16)
    for bad in (0, -4, 2.5, True, "8"):
        with pytest.raises((ValueError, TypeError), match="norm_num_groups"):
            AutoencoderKLConfig(norm_num_groups=bad)
    # the asymmetric decoder: its own group count, or the base's by default
    base = AutoencoderKLConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_num_groups=8)
    assert AsymmetricVQGANConfig(base_kind="kl", base_config=base, ch=24).norm_num_groups == 8
    with pytest.raises(ValueError, match=r"AsymmetricVQGANConfig: field 'norm_num_groups' .*\[24, 48\].*got 16"):
        AsymmetricVQGANConfig(base_kind="kl", base_config=base, ch=24, norm_num_groups=16)


def _drop_field(directory, name: str) -> None:
    """Rewrite a saved config.json as a pyvq version without field ``name`` wrote it."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.pop(name)
    if "base_config" in data:
        data["base_config"].pop(name)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("preset", ["vqgan_tiny", "kl_tiny", "asym_kl_tiny"])
def test_configs_saved_without_the_field_load(preset, tmp_path):
    torch.manual_seed(51)
    config = get_preset(preset)
    if config.norm_num_groups not in (None, 32):  # vqgan_tiny: 8; a config saved before the field had 32
        config = dataclasses.replace(config, norm_num_groups=32)
    model = model_class_for(config)(config).eval()
    model.save_pretrained(tmp_path)
    _drop_field(tmp_path, "norm_num_groups")
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.config == model.config and loaded.config.norm_num_groups == 32
    x = torch.rand(1, 3, 16, 16)
    mode = {"sample_posterior": False} if isinstance(model, AutoencoderKL) else {}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **mode).x_rec, model(x, **mode).x_rec, rtol=0, atol=0)


def test_save_load_keeps_the_group_count(tmp_path):
    config = dataclasses.replace(get_preset("vqgan_tiny"), norm_num_groups=8)
    model = VQGAN(config)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["norm_num_groups"] == 8
    loaded = VQGAN.from_pretrained(tmp_path)
    assert loaded.config.norm_num_groups == 8
    _assert_groups(loaded, 8)


def test_asymmetric_from_base_keeps_the_group_count():
    base = AutoencoderKL(AutoencoderKLConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_num_groups=8))
    model = AsymmetricVQGAN.from_base(base, ch=24)
    assert model.config.norm_num_groups == 8
    _assert_groups(model.decoder, 8)
    # scaled_to rounds the decoder width to a multiple of the base's group count
    assert get_preset("asym_kl_tiny").scaled_to(base.config)["ch"] == 32  # width x2
    own = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_num_groups=16)
    wider = AsymmetricVQGANConfig(base_kind="kl", base_config=own, ch=48)  # width x1.5: 16 * 1.5 = 24
    assert wider.scaled_to(base.config)["ch"] == 24
    assert AsymmetricVQGAN.from_base(base, **wider.scaled_to(base.config)).config.ch == 24
