"""VQGAN and AutoencoderKL: shapes, taming key names, save/load, presets,
training on real images, kernel vs reference backend, the Gaussian posterior."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import pyvq
from pyvq.models import (
    VQGAN,
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussianDistribution,
    PretrainedModel,
    VQGANConfig,
    get_preset,
    list_presets,
    load_pretrained,
    register_preset,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vqgan(**overrides) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN.from_preset("vqgan_tiny", **overrides)


def tiny_kl(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL.from_preset("kl_tiny", **overrides)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ VQGAN
@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, (32, 32)),
        ({}, (16, 48)),
        ({"ch_mult": (1, 2), "attn_resolutions": (), "embed_dim": 8, "n_embed": 64}, (24, 16)),
        ({"ch_mult": (1, 1, 2, 2), "in_channels": 1, "out_ch": 1, "ema": True, "l2_normalize": True}, (32, 32)),
    ],
)
def test_vqgan_shapes(overrides, size):
    model = tiny_vqgan(**overrides)
    cfg = model.config
    f = cfg.downsample_factor
    x = torch.randn(2, cfg.in_channels, *size)
    z_q, indices, aux = model.encode(x)
    assert z_q.shape == (2, cfg.embed_dim, size[0] // f, size[1] // f)
    assert indices.shape == (2, size[0] // f, size[1] // f) and indices.dtype == torch.int64
    assert set(aux) == {"loss", "perplexity", "usage", "indices"}
    assert aux["loss"].dim() == 0 and torch.isfinite(aux["loss"])
    x_rec, aux = model(x)
    assert x_rec.shape == (2, cfg.out_ch, *size)
    assert aux["loss"].requires_grad
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_vqgan_rejects_bad_images():
    model = tiny_vqgan()
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="VQGANConfig"):
        VQGAN(AutoencoderKLConfig())
    with pytest.raises(ValueError, match="ch_mult"):
        VQGANConfig(ch_mult=())


def test_vqgan_state_dict_follows_taming_names():
    model = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32))
    keys = set(model.state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.attn.0.q.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.block_2.norm2.bias",
        "decoder.up.0.block.1.conv2.weight",
        "decoder.up.1.attn.0.k.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.norm_out.weight",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "quantize.codebook",
    ]:
        assert key in keys, key
    assert model.quant_conv.weight.shape == (model.config.embed_dim, model.config.z_channels, 1, 1)
    assert model.post_quant_conv.weight.shape == (model.config.z_channels, model.config.embed_dim, 1, 1)


@pytest.mark.parametrize("overrides", [{}, {"l2_normalize": True}])
def test_decode_indices_matches_decode(overrides):
    model = tiny_vqgan(**overrides).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, indices, _ = model.encode(x)
        # z_q = z + (q - z).detach() (straight-through) equals the codes up to
        # float rounding, hence a tolerance rather than bit equality.
        torch.testing.assert_close(model.quantize.codes_from_indices(indices), z_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.decode_indices(indices), model.decode(z_q), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode_indices(indices.flatten())


def test_vqgan_training_lowers_reconstruction_loss(skimage_patches):
    x = skimage_patches * 2 - 1
    model = tiny_vqgan()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def recon() -> float:
        model.eval()
        with torch.no_grad():
            out = F.mse_loss(model(x)[0], x).item()
        model.train()
        return out

    before = recon()
    for _ in range(10):
        x_rec, aux = model(x)
        loss = F.l1_loss(x_rec, x) + aux["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recon()
    assert after < 0.8 * before, (before, after)


def test_vqgan_kernel_and_reference_backends_agree(monkeypatch):
    model = tiny_vqgan().eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    monkeypatch.setenv("PYVQ_BACKEND", "kernel")
    with torch.no_grad():
        rec_k, aux_k = model(x)
    monkeypatch.setenv("PYVQ_BACKEND", "reference")
    assert pyvq.backend() == "reference"
    with torch.no_grad():
        rec_r, aux_r = model(x)
    assert torch.equal(aux_k["indices"], aux_r["indices"])
    torch.testing.assert_close(rec_k, rec_r)
    torch.testing.assert_close(aux_k["loss"], aux_r["loss"])


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize(
    "make, overrides",
    [(tiny_vqgan, {}), (tiny_vqgan, {"ema": True, "l2_normalize": True}), (tiny_kl, {})],
)
def test_save_load_round_trip(tmp_path, make, overrides):
    model = make(**overrides)
    if isinstance(model, VQGAN):  # move the EMA / usage buffers off their initial values
        model.train()
        model(torch.rand(2, 3, 32, 32))
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["_class_name"] == type(model).__name__
    assert meta["ch_mult"] == list(model.config.ch_mult)

    loaded = type(model).from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        if isinstance(model, VQGAN):
            torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
        else:
            torch.testing.assert_close(
                loaded(x, sample_posterior=False)[0], model(x, sample_posterior=False)[0], rtol=0, atol=0
            )
    generic = load_pretrained(tmp_path / "m")
    assert type(generic) is type(model)
    assert type(PretrainedModel.from_pretrained(tmp_path / "m")) is type(model)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        VQGAN.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQGAN.from_pretrained(tmp_path / "empty")
    tiny_kl().save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="holds a AutoencoderKL"):
        VQGAN.from_pretrained(tmp_path / "kl")
    # A config that does not match the weights.
    path = tmp_path / "kl" / "config.json"
    meta = json.loads(path.read_text())
    meta["ch"] = 64
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit"):
        AutoencoderKL.from_pretrained(tmp_path / "kl")
    meta["not_a_field"] = 1
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not_a_field"):
        AutoencoderKL.from_pretrained(tmp_path / "kl")


# ------------------------------------------------------------------ presets
def test_preset_registry():
    assert {"vqgan_f16_1024", "vqgan_f16_16384", "vqgan_tiny", "sd_kl_f8", "kl_tiny"} <= set(list_presets())
    cfg = get_preset("vqgan_f16_1024")
    assert isinstance(cfg, VQGANConfig)
    assert (cfg.embed_dim, cfg.n_embed, cfg.z_channels, cfg.resolution, cfg.ch) == (256, 1024, 256, 256, 128)
    assert (cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.dropout) == ((1, 1, 2, 2, 4), 2, (16,), 0.0)
    assert get_preset("vqgan_f16_16384") == dataclasses.replace(cfg, n_embed=16384)
    sd = get_preset("sd_kl_f8")
    assert (sd.embed_dim, sd.z_channels, sd.ch, sd.ch_mult, sd.attn_resolutions) == (4, 4, 128, (1, 2, 4, 4), ())
    with pytest.raises(KeyError, match="vqgan_tiny"):
        get_preset("no_such_preset")
    with pytest.raises(ValueError, match="already exists"):
        register_preset("vqgan_tiny", cfg)
    with pytest.raises(TypeError, match="VQGANConfig"):
        VQGAN.from_preset("kl_tiny")


def test_big_presets_build_with_expected_sizes():
    # Built on the meta device: shapes only, no memory, no init cost.
    with torch.device("meta"):
        f16_1024 = VQGAN.from_preset("vqgan_f16_1024")
        f16_16384 = VQGAN.from_preset("vqgan_f16_16384")
        sd = AutoencoderKL.from_preset("sd_kl_f8")
    # taming's f16 VQGAN: encoder 29.3M + decoder 42.4M + 1x1 convs 0.13M
    # + codebook 1024 x 256 = 72.1M ("~72M" in the taming/VQGAN releases).
    assert 70e6 < n_params(f16_1024) < 75e6
    assert n_params(f16_16384) - n_params(f16_1024) == (16384 - 1024) * 256
    # Stable Diffusion's VAE: 83.65M parameters (encoder 34.2M, decoder 49.5M).
    assert 83e6 < n_params(sd) < 84.5e6
    assert f16_1024.downsample_factor == 16 and sd.downsample_factor == 8


# ------------------------------------------------------------------ AutoencoderKL
def test_autoencoder_kl_shapes():
    model = tiny_kl()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussianDistribution)
    for t in (posterior.mean, posterior.logvar, posterior.std, posterior.var, posterior.sample(), posterior.mode()):
        assert t.shape == (2, 4, 8, 12)
    assert posterior.kl().shape == (2,)
    assert posterior.nll(posterior.sample()).shape == (2,)
    x_rec, post = model(x)
    assert x_rec.shape == x.shape and post.kl().requires_grad
    g = torch.Generator().manual_seed(0)
    a = model(x, generator=g)[0]
    g.manual_seed(0)
    torch.testing.assert_close(model(x, generator=g)[0], a, rtol=0, atol=0)
    assert model.get_last_layer() is model.decoder.conv_out.weight
    assert "quant_conv.weight" in model.state_dict()
    assert model.quant_conv.weight.shape == (8, 8, 1, 1)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKLConfig(double_z=False)


def test_gaussian_kl_nll_closed_forms():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    other_params = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    p, q = DiagonalGaussianDistribution(params), DiagonalGaussianDistribution(other_params)
    torch.testing.assert_close(p.kl(DiagonalGaussianDistribution(params.clone())), torch.zeros(3, dtype=torch.float64))

    normal = torch.distributions.Normal
    dims = (1, 2, 3)
    std_normal = normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))
    torch.testing.assert_close(p.kl(), torch.distributions.kl_divergence(normal(p.mean, p.std), std_normal).sum(dims))
    torch.testing.assert_close(
        p.kl(q), torch.distributions.kl_divergence(normal(p.mean, p.std), normal(q.mean, q.std)).sum(dims)
    )
    s = p.sample()
    torch.testing.assert_close(p.nll(s), -normal(p.mean, p.std).log_prob(s).sum(dims))
    torch.testing.assert_close(p.mode(), p.mean)
    torch.testing.assert_close(p.std**2, p.var)


def test_gaussian_clamp_sampling_and_deterministic():
    params = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], 1)
    p = DiagonalGaussianDistribution(params)
    assert p.logvar.flatten().tolist() == [-30.0, 20.0]

    # Sample moments of N(mean, var) with a seeded generator.
    mean = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 100, 100)
    logvar = torch.log(torch.tensor([0.25, 4.0])).view(1, 2, 1, 1).expand(1, 2, 100, 100)
    p = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    s = p.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean((0, 2, 3)), torch.tensor([1.0, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(s.std((0, 2, 3)), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)

    d = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=True)
    assert torch.equal(d.sample(), d.mean)
    assert torch.equal(d.kl(), torch.zeros(1)) and torch.equal(d.nll(d.mean), torch.zeros(1))
    with pytest.raises(ValueError, match="2C"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


# ------------------------------------------------------------------ typed outputs
def test_typed_outputs_read_by_attribute_and_key():
    from pyvq.models import TokenizerOutput, VQAux, VQEncoding

    model = tiny_vqgan()
    x = torch.randn(2, 3, 32, 32)
    enc = model.encode(x)
    assert isinstance(enc, VQEncoding) and isinstance(enc.aux, VQAux)
    assert enc.z_q is enc[0] and enc.indices is enc[1] and enc.aux is enc[2]
    assert torch.equal(enc.aux.indices, enc.indices)
    out = model(x)
    assert isinstance(out, TokenizerOutput) and out.x_rec is out[0] and out.aux is out[1]
    aux = out.aux
    assert list(aux) == ["loss", "perplexity", "usage", "indices"] and len(aux) == 4
    for name in aux:
        assert name in aux and aux[name] is getattr(aux, name) and aux.get(name) is getattr(aux, name)
    assert aux["loss"].requires_grad and aux.loss.dim() == 0
    assert "kl" not in aux and aux.get("kl", 7) == 7 and 0 not in aux
    with pytest.raises(KeyError, match="'kl'"):
        aux["kl"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        aux.loss = torch.zeros(())
    kl_out = tiny_kl()(torch.rand(2, 3, 32, 32))
    assert isinstance(kl_out, TokenizerOutput) and isinstance(kl_out.aux, DiagonalGaussianDistribution)
