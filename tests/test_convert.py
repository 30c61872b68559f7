"""pyvq.convert: taming-transformers and diffusers weights into pyvq models.

The taming tests build taming-named state dicts from a pyvq VQGAN; the
diffusers tests build tiny diffusers models with random (seeded) weights and
compare outputs in float64. A second set writes diffusers-format directories
without diffusers, so the directory path is tested even where diffusers is
not installed.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyvq.convert import from_diffusers, from_taming
from pyvq.models import VQGAN, AutoencoderKL, AutoencoderKLConfig, VQGANConfig, get_preset

STATS = ("quantize.cluster_size", "quantize.code_usage", "quantize.embed_sum")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip(
        "diffusers",
        reason="diffusers is not installed (pip install diffusers==0.42.1) for the diffusers-instance tests",
    )


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every floating tensor (GroupNorm affine included, so swapped
    norms are caught) and return the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model.eval()


# ----------------------------------------------------------------- taming
# Names taming-transformers' VQModel uses for the vqgan_tiny architecture
# (ch_mult (1, 2, 2), one res block, attention at 16 = level 2 of 64).
TAMING_NAMES = [
    "encoder.conv_in.weight",
    "encoder.down.0.block.0.norm1.weight",
    "encoder.down.0.downsample.conv.weight",
    "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.2.attn.0.q.weight",
    "encoder.mid.block_1.conv1.weight",
    "encoder.mid.attn_1.proj_out.bias",
    "encoder.mid.block_2.norm2.bias",
    "encoder.norm_out.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.up.2.attn.1.k.weight",
    "decoder.up.2.upsample.conv.weight",
    "decoder.up.0.block.0.nin_shortcut.weight",
    "decoder.up.0.block.1.conv2.weight",
    "decoder.norm_out.bias",
    "decoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.bias",
    "quantize.embedding.weight",
]


def _taming_state(model: VQGAN) -> dict:
    """A pyvq VQGAN's weights under taming's names, plus loss.* keys."""
    state = {}
    for key, value in model.state_dict().items():
        if key in STATS:
            continue
        state["quantize.embedding.weight" if key == "quantize.codebook" else key] = value.clone()
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    state["loss.perceptual_loss.net.slice1.0.bias"] = torch.randn(64)
    return state


@pytest.fixture(scope="module")
def taming_source():
    torch.manual_seed(1)
    model = _randomize(VQGAN.from_preset("vqgan_tiny"), seed=2)
    with torch.no_grad():
        model.quantize.codebook.normal_()
    return model, _taming_state(model)


def _assert_same_weights(converted: VQGAN, source: VQGAN) -> None:
    got, want = converted.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        if key not in STATS:
            assert torch.equal(got[key], want[key]), key


def test_taming_names_are_taming_s(taming_source):
    _, state = taming_source
    missing = [k for k in TAMING_NAMES if k not in state]
    assert not missing, missing


def test_from_taming_round_trip(taming_source):
    source, state = taming_source
    model = from_taming(state, get_preset("vqgan_tiny"))
    assert isinstance(model, VQGAN) and not model.training
    _assert_same_weights(model, source)
    assert torch.equal(model.quantize.cluster_size, torch.ones(256))
    assert int(model.quantize.code_usage.sum()) == 0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want, _ = source(x)
        got, _ = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A Lightning-style dict, and the config as a preset name or a dict.
    _assert_same_weights(from_taming({"state_dict": state, "global_step": 7}, "vqgan_tiny"), source)
    fields = dataclasses.asdict(get_preset("vqgan_tiny"))
    _assert_same_weights(from_taming(state, fields), source)


def test_from_taming_ckpt_path(taming_source, tmp_path):
    source, state = taming_source
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1, "optimizer_states": []}, path)
    _assert_same_weights(from_taming(path, "vqgan_tiny"), source)
    _assert_same_weights(from_taming(str(path), "vqgan_tiny"), source)


_PWNED = []


def _pwn():
    _PWNED.append(True)
    return {}


class _Hparams:
    """Stands for the OmegaConf / argparse objects Lightning pickles; unpickling it would run _pwn."""

    def __reduce__(self):
        return (_pwn, ())


def test_from_taming_pickled_objects_not_run(taming_source, tmp_path):
    source, state = taming_source
    path = tmp_path / "with_hparams.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": _Hparams()}, path)
    _assert_same_weights(from_taming(path, "vqgan_tiny"), source)
    assert not _PWNED  # nothing was executed

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.ckpt.*expected a torch\.save file"):
        from_taming(junk, "vqgan_tiny")
    with pytest.raises(FileNotFoundError):
        from_taming(tmp_path / "absent.ckpt", "vqgan_tiny")


def test_from_taming_missing_and_unexpected_keys(taming_source):
    _, state = taming_source
    bad = dict(state)
    del bad["encoder.conv_in.bias"]
    del bad["quantize.embedding.weight"]
    with pytest.raises(ValueError, match=r"missing key\(s\) encoder\.conv_in\.bias, quantize\.embedding\.weight"):
        from_taming(bad, "vqgan_tiny")
    bad = dict(state)
    bad["quantize.used"] = torch.arange(256)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) quantize\.used") as info:
        from_taming(bad, "vqgan_tiny")
    assert "missing" not in str(info.value)
    # the architecture comes from the config only: one level more is reported, not guessed
    deeper = dataclasses.replace(get_preset("vqgan_tiny"), ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"missing key\(s\) .*decoder\.up\.3\.block\.0"):
        from_taming(state, deeper)


def test_from_taming_shape_mismatch(taming_source):
    _, state = taming_source
    bad = dict(state)
    bad["quantize.embedding.weight"] = torch.randn(512, 16)
    message = r"shape mismatch for key quantize\.embedding\.weight \(pyvq quantize\.codebook\)"
    with pytest.raises(ValueError, match=message):
        from_taming(bad, "vqgan_tiny")
    wider = dataclasses.replace(get_preset("vqgan_tiny"), z_channels=64)
    with pytest.raises(ValueError, match=r"shape mismatch for key encoder\.conv_out\.weight: .*\(32, 64, 3, 3\)"):
        from_taming(state, wider)


def test_from_taming_bad_arguments(taming_source):
    _, state = taming_source
    with pytest.raises(KeyError, match="no_such_preset"):
        from_taming(state, "no_such_preset")
    with pytest.raises(TypeError, match="not a VQGANConfig"):
        from_taming(state, "kl_tiny")
    with pytest.raises(TypeError, match="state dict"):
        from_taming([1, 2], "vqgan_tiny")


# ----------------------------------------------------------------- diffusers instances
KL_CASES = {
    "default_blocks": dict(block_out_channels=(32, 64)),
    # attention at level 0 only, equal widths at levels 0 and 1: a decoder
    # level order error cannot hide behind a shape check
    "attention_levels": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
    ),
    # FLUX-style: no quant convs
    "no_quant_conv": dict(block_out_channels=(32, 64), use_quant_conv=False, use_post_quant_conv=False),
}


def _tiny_kl(diffusers, **overrides):
    n = len(overrides.get("block_out_channels", (32, 64)))
    kwargs = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    kwargs.update(overrides)
    torch.manual_seed(3)
    return _randomize(diffusers.AutoencoderKL(**kwargs), seed=4)


def _tiny_vq(diffusers):
    torch.manual_seed(5)
    model = diffusers.VQModel(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        vq_embed_dim=3,
        num_vq_embeddings=16,
        norm_num_groups=32,
        sample_size=32,
    )
    _randomize(model, seed=6)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


def _check_kl(dmodel, model: AutoencoderKL) -> None:
    dmodel, model = dmodel.double(), model.double()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        want = dmodel.encode(x).latent_dist
        got = model.encode(x)
        torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.logvar, want.logvar, rtol=0, atol=1e-5)
        z = want.mean + 0.5 * torch.randn(want.mean.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(model.decode(z), dmodel.decode(z).sample, rtol=0, atol=1e-5)


def _check_vq(dmodel, model: VQGAN) -> None:
    dmodel, model = dmodel.double(), model.double()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        h = dmodel.encode(x).latents
        torch.testing.assert_close(model.quant_conv(model.encoder(x)), h, rtol=0, atol=1e-5)
        quant, _, (_, _, indices) = dmodel.quantize(h)
        z_q, got_indices, _ = model.encode(x)
        assert torch.equal(got_indices.flatten(), indices.flatten())
        torch.testing.assert_close(z_q, quant, rtol=0, atol=1e-5)
        want = dmodel.decode(quant, force_not_quantize=True).sample
        torch.testing.assert_close(model.decode(quant), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode_indices(got_indices), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(KL_CASES))
def test_from_diffusers_autoencoder_kl(diffusers, case):
    dmodel = _tiny_kl(diffusers, **KL_CASES[case])
    model = from_diffusers(dmodel)
    assert isinstance(model, AutoencoderKL) and not model.training
    boc = KL_CASES[case]["block_out_channels"]
    assert model.config.ch == 32 and model.config.ch_mult == tuple(b // 32 for b in boc)
    assert model.config.num_res_blocks == 1 and model.config.z_channels == model.config.embed_dim == 4
    assert model.config.scaling_factor == pytest.approx(0.18215)
    assert model.config.attn_resolutions == ((32,) if case == "attention_levels" else ())
    _check_kl(dmodel, model)


def test_from_diffusers_vq_model(diffusers):
    dmodel = _tiny_vq(diffusers)
    model = from_diffusers(dmodel)
    assert isinstance(model, VQGAN)
    c = model.config
    assert (c.ch, c.ch_mult, c.z_channels, c.embed_dim, c.n_embed, c.attn_resolutions) == (32, (1, 2), 4, 3, 16, ())
    _check_vq(dmodel, model)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_from_diffusers_directory(diffusers, kind, tmp_path):
    dmodel = _tiny_kl(diffusers, **KL_CASES["attention_levels"]) if kind == "kl" else _tiny_vq(diffusers)
    dmodel.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    model = from_diffusers(tmp_path)
    from_instance = from_diffusers(dmodel)
    for key, value in from_instance.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    (_check_kl if kind == "kl" else _check_vq)(dmodel, model)


def test_from_diffusers_kl_extra_latent_stats_warn(diffusers):
    dmodel = _tiny_kl(diffusers, shift_factor=0.1159, scaling_factor=0.3611)
    with pytest.warns(UserWarning, match="shift_factor=0.1159"):
        model = from_diffusers(dmodel)
    assert model.config.scaling_factor == pytest.approx(0.3611)


def test_from_diffusers_rejects_unsupported(diffusers):
    with pytest.raises(ValueError, match="mid_block_add_attention"):
        from_diffusers(diffusers.AutoencoderKL(block_out_channels=(32,), mid_block_add_attention=False))
    with pytest.raises(TypeError, match="AutoencoderKL or VQModel"):
        from_diffusers(diffusers.AutoencoderTiny())


# ----------------------------------------------------------------- diffusers directories, without diffusers
def _diffusers_name(key: str, n_levels: int) -> str:
    """The diffusers name of a pyvq weight, written independently of pyvq.convert."""
    subs = [
        (r"^quantize\.codebook$", "quantize.embedding.weight"),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
        (r"(attentions\.\d+)\.(q|k|v)\.", r"\1.to_\2."),
        (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
    ]
    m = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", key)
    if m:
        k = n_levels - 1 - int(m.group(1))
        part = {"block": "resnets.", "attn": "attentions.", "upsample": "upsamplers.0."}[m.group(2)]
        key = f"decoder.up_blocks.{k}.{part}{m.group(3)}"
    for pattern, repl in subs:
        key = re.sub(pattern, repl, key)
    return key


def _write_diffusers_dir(model, class_name: str, config: dict, directory, old_attention_names=False) -> None:
    n = len(model.config.ch_mult)
    state = {}
    for key, value in model.state_dict().items():
        if key in STATS:
            continue
        name = _diffusers_name(key, n)
        if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", name):
            value = value[:, :, 0, 0]  # diffusers stores Linear weights
        if old_attention_names:
            name = re.sub(r"\.to_q\.", ".query.", name)
            name = re.sub(r"\.to_k\.", ".key.", name)
            name = re.sub(r"\.to_v\.", ".value.", name)
            name = re.sub(r"\.to_out\.0\.", ".proj_attn.", name)
        state[name] = value.detach().clone().contiguous()
    directory.mkdir(exist_ok=True)
    save_file(state, str(directory / "diffusion_pytorch_model.safetensors"))
    meta = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    (directory / "config.json").write_text(json.dumps({**meta, **config}))


KL_DIR_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=16,
    scaling_factor=0.25,
)


def _kl_pyvq_source() -> AutoencoderKL:
    config = AutoencoderKLConfig(
        embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4, resolution=16,
        scaling_factor=0.25,
    )
    torch.manual_seed(9)
    return _randomize(AutoencoderKL(config), seed=10)


@pytest.mark.parametrize("old_names", [False, True])
def test_from_diffusers_directory_without_diffusers(tmp_path, old_names):
    source = _kl_pyvq_source()
    _write_diffusers_dir(source, "AutoencoderKL", KL_DIR_CONFIG, tmp_path / "vae", old_attention_names=old_names)
    model = from_diffusers(tmp_path / "vae")
    assert model.config == source.config
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="pass .*vae"):
        from_diffusers(tmp_path)  # a pipeline folder


def test_from_diffusers_vq_directory_without_diffusers(tmp_path):
    config = VQGANConfig(embed_dim=3, n_embed=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=4, resolution=32)
    torch.manual_seed(11)
    source = _randomize(VQGAN(config), seed=12)
    cfg = dict(KL_DIR_CONFIG, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
               sample_size=32, num_vq_embeddings=16, vq_embed_dim=3, norm_type="group")
    del cfg["scaling_factor"]
    _write_diffusers_dir(source, "VQModel", cfg, tmp_path)
    model = from_diffusers(tmp_path)
    assert model.config == config
    for key, value in source.state_dict().items():
        if key not in STATS:
            assert torch.equal(model.state_dict()[key], value), key


def test_from_diffusers_directory_errors(tmp_path):
    source = _kl_pyvq_source()
    _write_diffusers_dir(source, "AutoencoderKL", KL_DIR_CONFIG, tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"

    def with_config(**changes):
        (tmp_path / "config.json").write_text(
            json.dumps({"_class_name": "AutoencoderKL", **KL_DIR_CONFIG, **changes})
        )
        return from_diffusers(tmp_path)

    cases = [
        (dict(norm_num_groups=24), r"field 'norm_num_groups' must divide every GroupNorm's channel count \[32, 64\]"),
        (dict(norm_num_groups=0), r"norm_num_groups must be an int >= 1, got 0"),
        (dict(act_fn="gelu"), r"act_fn"),
        (dict(down_block_types=["DownBlock2D", "AttnDownEncoderBlock2D"]), r"down_block_types\[0\] = 'DownBlock2D'"),
        (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), r"encoder has attention at levels \[1\]"),
        (dict(block_out_channels=[32, 48]), r"multiples of the first entry"),
        (dict(sample_size=15), r"sample_size \(15\) must be a multiple"),
        (dict(use_linear_projection=True), r"unknown config field\(s\) \['use_linear_projection'\]"),
        (dict(_class_name="AutoencoderTiny"), r"unsupported diffusers model class"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            with_config(**changes)

    # weights that do not fit the config: named in diffusers' terms
    with pytest.raises(ValueError, match=r"missing key\(s\) .*decoder\.up_blocks\.0\.attentions\.2"):
        with_config(layers_per_block=2)
    state = load_file(str(weights))
    state["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] = torch.zeros(32, 64, 3, 3)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"shape mismatch for key decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut"
                                         r"\.weight \(pyvq decoder\.up\.0\.block\.0\.nin_shortcut\.weight\)"):
        with_config()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        with_config()


def test_package_surface():
    """pyvq.convert is a package whose public names are the two converters."""
    import pyvq.convert as convert

    assert sorted(convert.__all__) == ["from_diffusers", "from_taming"]
    assert convert.from_taming is from_taming and convert.from_diffusers is from_diffusers


def test_from_diffusers_warning_points_at_the_caller(tmp_path):
    """The dropped-latent-statistics warning is attributed to the caller's line, not to pyvq.convert."""
    source = _kl_pyvq_source()
    _write_diffusers_dir(source, "AutoencoderKL", dict(KL_DIR_CONFIG, shift_factor=0.1159), tmp_path)
    with pytest.warns(UserWarning, match="shift_factor=0.1159") as record:
        from_diffusers(tmp_path)
    assert [w.filename for w in record] == [__file__]
