"""EfficientVQGAN: shapes and downsampling factors of the presets, module
names, save/load, kernel vs reference backend, ReFiT on its encoder, bad
configs and inputs, and a tiny model trained on real photographs beating
the mean-colour baseline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import pyvq
from pyvq.metrics import psnr
from pyvq.models import (
    EfficientVQGAN,
    EfficientVQGANConfig,
    PretrainedModel,
    VQGANConfig,
    get_preset,
    list_presets,
    load_pretrained,
)
from pyvq.nn import SwinBlock
from pyvq.refit import freeze_encoder, rebuild_codebook

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> EfficientVQGAN:
    torch.manual_seed(0)
    return EfficientVQGAN.from_preset("effvqgan_tiny", **overrides)


def _mean_colour_psnr(x: torch.Tensor) -> float:
    """The trivial baseline: every pixel replaced by its image's mean colour."""
    return float(psnr(x, x.mean((2, 3), keepdim=True).expand_as(x)).mean())


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, (32, 32)),
        ({}, (32, 48)),
        ({}, (40, 24)),  # stage grids 10 x 6 and 5 x 3: padded inside the blocks
        ({}, (16, 16)),  # stage grids 4 x 4 (one window, unshifted) and 2 x 2 (padded)
        ({"depths": (2,), "num_heads": (2,)}, (32, 32)),  # f4, no merge
        ({"patch_size": 2}, (32, 32)),  # f4 with a merge, no final expanding
        ({"patch_size": 8, "depths": (1,), "num_heads": (2,)}, (32, 16)),  # f8, two final expandings
        ({"in_channels": 1, "out_ch": 1, "ema": True, "l2_normalize": False, "depths": (1, 2, 1),
          "num_heads": (2, 2, 4)}, (32, 32)),  # f16
    ],
)
def test_shapes(overrides, size):
    model = tiny(**overrides)
    cfg = model.config
    f = cfg.downsample_factor
    assert f == cfg.patch_size * 2 ** (len(cfg.depths) - 1) == model.downsample_factor
    x = torch.randn(2, cfg.in_channels, *size)
    z_q, indices, aux = model.encode(x)
    assert z_q.shape == (2, cfg.embed_dim, size[0] // f, size[1] // f)
    assert indices.shape == (2, size[0] // f, size[1] // f) and indices.dtype == torch.int64
    assert set(aux) == {"loss", "perplexity", "usage", "indices"} and aux.loss.dim() == 0
    x_rec, aux = model(x)
    assert x_rec.shape == (2, cfg.out_ch, *size)
    assert aux.loss.requires_grad
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_paper_presets_factors_and_shapes():
    assert {"effvqgan_f16", "effvqgan_f8", "effvqgan_tiny"} <= set(list_presets())
    f16, f8 = get_preset("effvqgan_f16"), get_preset("effvqgan_f8")
    assert f16.downsample_factor == 16 and f16.resolution // 16 == 16 and f16.n_embed == 1024
    assert f8.downsample_factor == 8 and f8.resolution // 8 == 32 and f8.n_embed == 1024
    assert len(f8.depths) == len(f16.depths) - 1
    # adding a stage doubles f
    assert dataclasses.replace(f16, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32)).downsample_factor == 32
    torch.manual_seed(0)
    for name, f in (("effvqgan_f16", 16), ("effvqgan_f8", 8)):
        model = EfficientVQGAN.from_preset(name).eval()
        with torch.no_grad():
            x = torch.randn(1, 3, 32, 64)
            z_q, indices, _ = model.encode(x)
            assert indices.shape == (1, 32 // f, 64 // f)
            assert model.decode(z_q).shape == (1, 3, 32, 64)


def test_module_names_and_encoder_output():
    model = tiny()
    keys = set(model.state_dict())
    for key in [
        "encoder.patch_embed.proj.weight",
        "encoder.patch_embed.norm.weight",
        "encoder.stages.0.blocks.0.attn.qkv.weight",
        "encoder.stages.0.blocks.1.attn.relative_position_bias_table",
        "encoder.stages.1.blocks.1.mlp.fc2.weight",
        "encoder.merges.0.reduction.weight",
        "encoder.norm.weight",
        "encoder.proj.weight",
        "quantize.codebook",
        "decoder.proj.weight",
        "decoder.stages.1.blocks.0.norm1.weight",
        "decoder.expands.0.expand.weight",
        "decoder.patch_expand.0.expand.weight",
        "decoder.conv_out.weight",
    ]:
        assert key in keys, key
    blocks = [m for m in model.encoder.stages[0].blocks]
    assert all(isinstance(b, SwinBlock) for b in blocks)
    assert [b.shift_size for b in blocks] == [0, model.config.window_size // 2]
    # the encoder alone gives the pre-quantisation latents the quantizer takes (ReFiT's input)
    x = torch.randn(2, 3, 32, 32)
    lat = model.encoder(x)
    assert lat.shape == (2, model.config.embed_dim, 4, 4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.quantize(lat).indices, model.encode(x).indices)


def test_drop_path_rates_rise_over_the_encoder():
    model = tiny(drop_path=0.3)
    rates = [b.drop_path1.p for s in model.encoder.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    dec = [b.drop_path1.p for i in reversed(range(len(model.decoder.stages))) for b in model.decoder.stages[i].blocks]
    assert dec == rates[::-1]


@pytest.mark.parametrize("overrides", [{}, {"l2_normalize": False}])
def test_decode_indices_matches_decode(overrides):
    model = tiny(**overrides).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, indices, _ = model.encode(x)
        torch.testing.assert_close(model.quantize.codes_from_indices(indices), z_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.decode_indices(indices), model.decode(z_q), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode_indices(indices.flatten())


# ------------------------------------------------------------------ errors
def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="'patch_size' must be a power of two >= 2, got 3"):
        EfficientVQGANConfig(patch_size=3)
    with pytest.raises(ValueError, match="'num_heads' must hold 3 ints"):
        EfficientVQGANConfig(num_heads=(4, 8))
    with pytest.raises(ValueError, match="stage 1 has width 256 and 6 heads"):
        EfficientVQGANConfig(num_heads=(4, 6, 16))
    with pytest.raises(ValueError, match="'depths' must be a non-empty"):
        EfficientVQGANConfig(depths=(), num_heads=())
    with pytest.raises(ValueError, match="'window_size' must be an int in"):
        EfficientVQGANConfig(window_size=33)
    with pytest.raises(ValueError, match="'ch' must be divisible by patch_size / 2 = 4"):
        EfficientVQGANConfig(patch_size=8, ch=18, num_heads=(2, 4, 8))
    with pytest.raises(TypeError, match="'l2_normalize' must be a bool"):
        EfficientVQGANConfig(l2_normalize=1)
    with pytest.raises(TypeError, match="EfficientVQGANConfig"):
        EfficientVQGAN(VQGANConfig())
    with pytest.raises(TypeError, match="is a VQGANConfig"):
        EfficientVQGAN.from_preset("vqgan_tiny")
    model = tiny()
    with pytest.raises(ValueError, match="divisible by the downsampling factor 8"):
        model.encode(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"'z_q' must have shape \(B, 8, h, w\)"):
        model.decode(torch.randn(1, 4, 4, 4))


# ------------------------------------------------------------------ save / load, backends
@pytest.mark.parametrize("overrides", [{}, {"ema": True}])
def test_save_load_round_trip(tmp_path, overrides):
    model = tiny(**overrides).train()
    model(torch.rand(2, 3, 32, 32))  # moves the quantizer's statistics off their initial values
    model.eval()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["_class_name"] == "EfficientVQGAN" and meta["depths"] == list(model.config.depths)
    loaded = EfficientVQGAN.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).x_rec, model(x).x_rec, rtol=0, atol=0)
    assert type(load_pretrained(tmp_path / "m")) is EfficientVQGAN
    assert type(PretrainedModel.from_pretrained(tmp_path / "m")) is EfficientVQGAN


def test_kernel_and_reference_backends_agree(monkeypatch):
    model = tiny().eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    x_g = x.clone().requires_grad_(True)
    monkeypatch.setenv("PYVQ_BACKEND", "kernel")
    rec_k, aux_k = model(x_g)
    (grad_k,) = torch.autograd.grad(rec_k.square().sum(), x_g)
    monkeypatch.setenv("PYVQ_BACKEND", "reference")
    assert pyvq.backend() == "reference"
    rec_r, aux_r = model(x_g)
    (grad_r,) = torch.autograd.grad(rec_r.square().sum(), x_g)
    assert torch.equal(aux_k.indices, aux_r.indices)
    torch.testing.assert_close(rec_k, rec_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_k.loss, aux_r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad_r, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ ReFiT
def test_refit_rebuilds_the_codebook_from_the_encoder(skimage_patches):
    x = skimage_patches * 2 - 1
    model = tiny().eval()
    res = rebuild_codebook(model.encoder, x, model.config.n_embed, num_samples=256, seed=0,
                           quantizer=model.quantize, apply=True)
    assert res.applied and res.usage_after >= res.usage_before
    torch.testing.assert_close(model.quantize.codebook, res.codebook.to(model.quantize.codebook.dtype))
    frozen = freeze_encoder(model)
    assert frozen == [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    model.train()
    x_rec, aux = model(x[:4])
    (F.mse_loss(x_rec, x[:4]) + aux.loss).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder.conv_out.weight.grad is not None


# ------------------------------------------------------------------ training
def test_tiny_training_beats_mean_colour_baseline(skimage_patches):
    """300 Adam steps (L2 + VQ loss) on 16 crops of four photographs: the
    reconstructions must beat the mean-colour baseline by 2 dB."""
    x = skimage_patches * 2 - 1
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        x_rec, aux = model(x)
        loss = F.mse_loss(x_rec, x) + aux.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x_rec, aux = model(x)
    got, baseline = float(psnr(x, x_rec.clamp(-1, 1)).mean()), _mean_colour_psnr(x)
    print(f"tiny EfficientVQGAN PSNR {got:.2f} dB, mean-colour baseline {baseline:.2f} dB, "
          f"codes used {float(aux.usage):.3f}")
    assert got > baseline + 2.0, (got, baseline)
