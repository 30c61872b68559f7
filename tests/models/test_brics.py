"""BRICS tokenizer: shapes, tiling, relaxed-precision noise, the KL variant,
gradients, save/load, presets (big ones on the meta device only), config
checks, learning on real images."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyvq.models import BRICS, BRICSAux, BRICSConfig, TokenizerOutput, get_preset, list_presets, load_pretrained
from pyvq.models.tokenizers.brics import tile_codes
from pyvq.train.recipes import recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> BRICS:
    torch.manual_seed(0)
    return BRICS.from_preset("brics_tiny", **overrides)


@pytest.fixture(scope="module")
def images(skimage_patches):
    return skimage_patches[:4] * 2 - 1  # (4, 3, 32, 32) real photo tiles in [-1, 1]


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (32, 48)])
def test_shapes(size):
    model = tiny().eval()
    c = model.config
    x = torch.rand(2, 3, *size) * 2 - 1
    keys = model.encode(x)
    h, w = size[0] // 4, size[1] // 4
    assert keys.shape == (2, c.code_channels, h, w)
    assert keys.min() >= 0 and keys.max() <= 1
    assert model.features(keys).shape == (2, c.feature_channels, 2 * h, 2 * w)
    x_rec, aux = model(x)
    assert x_rec.shape == x.shape and set(aux) == {"keys"}
    torch.testing.assert_close(model.decode(keys), x_rec)
    assert model.get_last_layer() is model.synthesis.blocks[-1].torgb.conv.weight


@pytest.mark.parametrize("tiling", ["interleave", "nearest"])
def test_tiling_mapping_is_recoverable(tiling):
    z = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    out = tile_codes(z, 3, tiling)
    assert out.shape == (2, 3, 12, 15)
    for i in range(12):
        for j in range(15):
            src = (i % 4, j % 5) if tiling == "interleave" else (i // 3, j // 3)
            assert torch.equal(out[:, :, i, j], z[:, :, src[0], src[1]])
    if tiling == "interleave":
        assert torch.equal(out, torch.tile(z, (1, 1, 3, 3)))
    # every code value appears, each exactly 9 times
    assert torch.equal(out.flatten().sort().values, z.flatten().repeat_interleave(9))


@pytest.mark.parametrize("tiling", ["interleave", "nearest"])
def test_query_points_keys_and_coordinates(tiling):
    model = tiny(tiling=tiling).eval()
    keys = torch.rand(2, 4, 4, 6)
    tiled, coords = model.query_points(keys)
    assert tiled.shape == (2, 8, 12, 4, 1) and coords.shape == (8, 12, 2)
    for i, j in [(0, 0), (5, 7), (7, 11), (3, 2)]:
        src = (i % 4, j % 6) if tiling == "interleave" else (i // 2, j // 2)
        torch.testing.assert_close(tiled[:, i, j, :, 0], keys[:, :, src[0], src[1]], rtol=0, atol=0)
        torch.testing.assert_close(coords[i, j], torch.tensor([(i + 0.5) / 8, (j + 0.5) / 12]))


def test_key_noise_only_in_training_mode():
    model = tiny()
    keys = torch.rand(2, 4, 8, 8)
    model.eval()
    eval_pts = model.query_points(keys)[0]
    torch.testing.assert_close(model.query_points(keys)[0], eval_pts, rtol=0, atol=0)
    out = model.decode(keys)
    torch.testing.assert_close(model.decode(keys), out, rtol=0, atol=0)
    model.train()
    noisy = model.query_points(keys)[0]
    noise = noisy - eval_pts
    expected_std = 1 / (4 * model.config.max_res)
    assert model.config.key_noise_std == expected_std
    assert noise.std().item() == pytest.approx(expected_std, rel=0.1)
    assert abs(noise.mean().item()) < 0.1 * expected_std
    assert not torch.equal(model.decode(keys), model.decode(keys))
    # the encoder itself is deterministic in training mode (no KL)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.encode(x), model.encode(x), rtol=0, atol=0)
    quiet = tiny(key_noise=False).train()
    torch.testing.assert_close(quiet.query_points(keys)[0], eval_pts, rtol=0, atol=0)


def test_kl_variant():
    model = tiny(kl=True)
    c = model.config
    assert model.encoder.conv_out.out_channels == 2 * c.code_channels
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.train()
    x_rec, aux = model(x)
    assert x_rec.shape == x.shape and aux["kl"].shape == (2,) and (aux["kl"] > 0).all()
    assert not torch.equal(model.encode(x), model.encode(x))  # sampled
    assert set(recipe_for(model).loss_inputs(x, TokenizerOutput(x_rec, aux))) == {"kl"}
    model.eval()
    keys = model.encode(x)
    torch.testing.assert_close(model.encode(x), keys, rtol=0, atol=0)
    mu, log_sigma = model.encoder(x).chunk(2, dim=1)
    torch.testing.assert_close(keys, torch.sigmoid(mu))
    # KL of N(mu, sigma^2) to N(0, 1), summed over the code
    kl = 0.5 * (mu.square() + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).flatten(1).sum(1)
    torch.testing.assert_close(model(x)[1]["kl"], kl, rtol=1e-4, atol=1e-4)
    assert recipe_for(model).train_defaults(model)["kl_weight"] == 1e-6
    assert recipe_for(BRICS).loss_inputs(x, TokenizerOutput(x_rec, BRICSAux(keys=keys))) == {}


def test_gradients_reach_tables_keys_and_decoder(images):
    model = tiny()
    x_rec, aux = model(images)
    aux["keys"].retain_grad()
    (x_rec - images).square().mean().backward()
    assert aux["keys"].grad.abs().sum() > 0
    for name in ("grid.tables", "grid.weight0", "grid.bias1", "encoder.conv_in.weight", "encoder.conv_out.weight",
                 "mapping.layers.0.weight", "synthesis.input.conv.weight", "synthesis.blocks.0.torgb.conv.weight"):
        p = model.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # only the table rows the queries touch get a gradient
    assert 0 < (model.grid.tables.grad != 0).float().mean() < 1


def test_save_load_round_trip(tmp_path, images):
    model = tiny(tiling="nearest")
    with torch.no_grad():  # not the initial tables
        model.grid.tables.normal_(0, 0.1)
    model.eval()
    expected = model(images)[0]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "BRICS" and config["tiling"] == "nearest"
    for loaded in (BRICS.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert isinstance(loaded, BRICS) and not loaded.training
        assert loaded.config == model.config
        torch.testing.assert_close(loaded(images)[0], expected, rtol=0, atol=0)


def test_presets_on_meta_device():
    paper = {"brics_16x16x8": (16, 8, 32), "brics_16x16x16": (16, 16, 32), "brics_32x32x4": (32, 4, 32),
             "brics_64x64x4": (64, 4, 64)}
    assert set(paper) | {"brics_tiny"} <= set(list_presets())
    for name, (hz, cz, r_max) in paper.items():
        config = get_preset(name)
        assert (config.code_size, config.code_channels, config.max_res) == (hz, cz, r_max)
        assert (config.resolution, config.feature_size, config.feature_channels) == (256, 64, 512)
        assert (config.levels, config.features, config.key_dim, config.log2_table_size) == (16, 4, 1, 18)
        assert config.encoder_attn_resolutions == (hz,)
        with torch.device("meta"):
            model = BRICS(config)
        assert model.grid.tables.is_meta
        assert model.grid.tables.numel() == cz * 16 * 2**18 * 4
        assert model.grid.resolutions[0] == 4 and model.grid.resolutions[-1] == r_max
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in model.named_children()}
        assert config.ch == 32  # the VQGAN encoder with unit channels 32
        assert 1e6 < counts["encoder"] < 3e6, (name, counts)
        assert 4e6 < counts["synthesis"] + counts["mapping"] < 10e6, (name, counts)
        assert counts["grid"] - model.grid.tables.numel() < 1e6
    assert sum(p.numel() for p in tiny().parameters()) < 1e6


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(code_channels=5, key_dim=2), "code_channels"),
        (dict(feature_channels=66), "feature_channels"),
        (dict(feature_size=24), "feature_size"),
        (dict(code_size=8), "code_size"),
        (dict(decoder_channels=(64, 32, 32)), "resolution"),
        (dict(tiling="block"), "tiling"),
        (dict(index="linear"), "index"),
        (dict(key_dim=6, code_channels=6, feature_channels=60), "key_dim"),
        (dict(features=3), "features"),
        (dict(max_res=2), "max_res"),
        (dict(ch=24), "ch"),
        (dict(gan_penalty="l2"), "gan_penalty"),
        (dict(log2_table_size=-1), "log2_table_size"),
    ],
)
def test_bad_config(overrides, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(get_preset("brics_tiny"), **overrides)


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="keys"):
        model.decode(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(TypeError, match="BRICSConfig"):
        BRICS(get_preset("vqgan_tiny"))


def test_learns_real_images_and_uses_the_grid(images):
    """Adam steps with the paper's optimizer settings lower the L2
    reconstruction error of real photographs, below what the best constant
    colour per image achieves (so the key codes carry image content)."""
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.0, 0.99), eps=1e-15)
    losses = []
    for _ in range(40):
        x_rec, _ = model(images)
        loss = (x_rec - images).square().mean()
        opt.zero_grad()
        (20 * loss).backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    mean_colour = (images - images.mean(dim=(2, 3), keepdim=True)).square().mean().item()
    assert last < 0.5 * first and last < 0.85 * mean_colour, (mean_colour, losses)
    usage = model.grid_usage(images)
    assert 0 < usage <= 1 and model.training
    assert model.grid_usage([(images[:2],), (images[2:],)]) == pytest.approx(usage)


def test_config_defaults():
    c = BRICSConfig()
    assert (c.code_size, c.code_channels, c.num_groups, c.tile_factor, c.downsample_factor) == (16, 8, 8, 4, 16)
    assert c.key_noise_std == 1 / 128 and c.tiling == "interleave" and c.index == "dense_mod"


def test_typed_outputs():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tiny()(x)
    assert isinstance(out, TokenizerOutput) and isinstance(out.aux, BRICSAux)
    assert out.aux.kl is None and "kl" not in out.aux and list(out.aux) == ["keys"]
    assert out.aux["keys"] is out.aux.keys and out.aux.keys.shape == (2, 4, 8, 8)
    with pytest.raises(KeyError, match="'kl'"):
        out.aux["kl"]
    kl_out = tiny(kl=True)(x)
    assert "kl" in kl_out.aux and kl_out.aux["kl"] is kl_out.aux.kl and kl_out.aux.kl.shape == (2,)
    # training setup lives in the recipe (pyvq.train.recipes), not on the model
    assert not any(hasattr(BRICS, name) for name in ("build_loss", "train_defaults", "loss_inputs"))
