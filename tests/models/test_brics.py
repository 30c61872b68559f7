"""BRICS tokenizer: shapes, tiling, relaxed-precision noise, the KL variant,
gradients, save/load, presets (big ones on the meta device only), config
checks, learning on real images, the known codes of an inpainting mask."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from pyvq.models import BRICS, BRICSAux, BRICSConfig, TokenizerOutput, get_preset, list_presets, load_pretrained
from pyvq.models.tokenizers.brics import TILINGS, tile_codes, tile_sources
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


# ------------------------------------------------------------ inpainting: known codes
def _sensitive(tiling: str) -> BRICS:
    """brics_tiny in eval mode with grid tables in [-1, 1]: at their initial
    scale (1e-4) a key moves the image by ~1e-5; trained tables make keys
    matter, and so does this."""
    model = tiny(tiling=tiling).eval()
    torch.nn.init.uniform_(model.grid.tables, -1.0, 1.0)
    return model


def _perturbed(keys: torch.Tensor, which) -> torch.Tensor:
    """A batch: ``keys`` (1, C, h, w) first, then one copy per (a, b) in
    ``which`` with that key moved by 0.5 (mod 1) in every channel."""
    batch = keys.repeat(1 + len(which), 1, 1, 1)
    for n, (a, b) in enumerate(which, start=1):
        batch[n, :, a, b] = (batch[n, :, a, b] + 0.5) % 1.0
    return batch


def _reach(cells: torch.Tensor, blocks: int) -> torch.Tensor:
    """Pixels the synthesis network's output at feature cells ``cells``
    (Hd, Wd) can reach, with the style held fixed: the 3x3 input conv (one
    cell), then per x2 block the bilinear upsampling (input pixel p reaches
    outputs 2p - 1 .. 2p + 2) and two 3x3 convs, i.e. [lo, hi] -> [2 lo - 3,
    2 hi + 4]; the skip images' bilinear upsampling stays inside that."""
    r = F.max_pool2d(cells[None, None].float(), 3, stride=1, padding=1)
    for _ in range(blocks):
        r = F.max_pool2d(r.repeat_interleave(2, 2).repeat_interleave(2, 3), 7, stride=1, padding=3)
    return r[0, 0] > 0


def _box(size: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[y0:y1, x0:x1] = 1
    return mask


def _block_rule(mask: torch.Tensor, f: int) -> torch.Tensor:
    """What ``pyvq inpaint`` kept before: codes whose f x f block is unmasked."""
    return F.max_pool2d(mask[None, None], f)[0, 0] == 0


_MASKS = {  # 64 x 64 pixels, 1 = region to generate
    "centre box": _box(64, 40, 40, 56, 56),
    "edge box": _box(64, 0, 44, 20, 64),
    "large box": _box(64, 36, 36, 60, 60),
    "scattered": _box(64, 6, 6, 9, 11) + _box(64, 50, 20, 53, 22) + _box(64, 30, 58, 31, 59),
}


def test_tile_sources_follow_tile_codes():
    for tiling in TILINGS:
        src = tile_sources(3, 5, 2, tiling)
        z = torch.rand(1, 2, 3, 5)
        tiled = tile_codes(z, 2, tiling)
        assert src.shape == (6, 10) and src.dtype == torch.int64
        torch.testing.assert_close(tiled, z.flatten(2)[:, :, src], rtol=0, atol=0)
    with pytest.raises(ValueError, match="'factor'"):
        tile_sources(3, 5, 0)


@pytest.mark.parametrize("tiling", TILINGS)
def test_known_codes_are_the_keys_whose_features_avoid_the_mask(tiling):
    """Exact, at the feature grid (one key per feature position): perturb
    each key in turn; the feature cells that change are the cells it feeds.
    A key is known exactly when none of them decodes into a masked pixel
    block: a known key never writes features over the mask, an unknown key
    always does (so nothing is generated needlessly)."""
    model = _sensitive(tiling)
    c = model.config
    s = model.downsample_factor // c.tile_factor  # pixels per feature cell
    torch.manual_seed(1)
    keys = torch.rand(1, c.code_channels, 8, 8)  # 32 x 32 images (fast): 64 keys, 16 x 16 cells
    every = [(a, b) for a in range(8) for b in range(8)]
    with torch.no_grad():
        feats = model.features(_perturbed(keys, every))
    fed = ((feats[1:] - feats[:1]).abs().amax(1) > 0)  # (64, 16, 16): the cells each key writes
    assert torch.equal(fed.sum((1, 2)), torch.full((64,), c.tile_factor ** 2))
    differs = False
    for name, mask in _MASKS.items():
        mask = mask[::2, ::2]  # 32 x 32
        known = model.known_codes(mask)
        masked_cells = F.max_pool2d(mask[None, None], s)[0, 0] > 0
        writes_into_mask = (fed & masked_cells).flatten(1).any(1).view(8, 8)
        assert torch.equal(known, ~writes_into_mask), name
        differs |= not torch.equal(known, _block_rule(mask, model.downsample_factor))
    # interleave tiling: the old block rule keeps keys that write into the mask
    assert differs == (tiling == "interleave")


@pytest.mark.parametrize("tiling", TILINGS)
def test_perturbing_keys_in_decoded_pixels(tiling):
    """Decoded pixels, centre-box mask. With the style held fixed (the
    synthesis network run on the perturbed features with the unperturbed
    style), a key reaches only ``_reach`` of its cells (up to float
    rounding, 1e-4 of its largest change), so exactly:
    - a known key does not change the mask's interior (the masked pixels no
      unmasked cell reaches);
    - an unknown key does not change the kept pixels (those no cell fed by
      an unknown key reaches).
    Through ``decode`` itself the style is the MLP of the mean feature, so
    every key moves every pixel a little: measured at most 3% of the key's
    largest change (random tables, both tilings); asserted below 10%, while
    a key that writes into the region (what the old block rule kept with
    interleave tiling, e.g. (7, 7) and (8, 8) here) changes it by 100%."""
    model = _sensitive(tiling)
    c = model.config
    s = model.downsample_factor // c.tile_factor
    mask = _MASKS["centre box"]
    known = model.known_codes(mask)
    which = [(7, 7), (8, 8), (0, 0), (3, 12), (15, 15), (10, 5), (9, 10)]
    torch.manual_seed(2)
    keys = torch.rand(1, c.code_channels, 16, 16)
    with torch.no_grad():
        batch = _perturbed(keys, which)
        feats = model.features(batch)
        style = model.mapping(feats[:1].mean((2, 3))).expand(len(batch), -1)
        fixed = model.synthesis(feats, style)
        full = model.decode(batch)
    blocks = len(c.decoder_channels) - 1
    fed = (feats[1:] - feats[:1]).abs().amax(1) > 0
    masked_cells = F.max_pool2d(mask[None, None], s)[0, 0] > 0
    interior = (mask > 0) & ~_reach(~masked_cells, blocks)
    unknown_cells = (~known).flatten()[tile_sources(16, 16, c.tile_factor, tiling)]  # cells unknown keys feed
    assert not (masked_cells & ~unknown_cells).any()
    kept = ~_reach(unknown_cells, blocks)
    assert interior.sum() >= 16 and kept.sum() >= 16
    if tiling == "interleave":  # the keys the old block rule would have kept here
        assert _block_rule(mask, model.downsample_factor)[7, 7] and not known[7, 7]
    for n, (a, b) in enumerate(which, start=1):
        d = (fixed[n] - fixed[0]).abs().amax(0)
        dfull = (full[n] - full[0]).abs().amax(0)
        assert d.max() > 1e-2, (a, b)  # the perturbation shows
        assert d[~_reach(fed[n - 1], blocks)].max() <= 1e-4 * d.max(), (a, b)  # locality, style fixed
        region = interior if known[a, b] else kept
        assert d[region].max() <= 1e-4 * d.max(), (a, b, bool(known[a, b]))
        assert dfull[region].max() <= 0.1 * dfull.max(), (a, b, bool(known[a, b]))


def test_known_codes_shapes_and_errors():
    model = tiny()
    mask = _MASKS["centre box"]
    known = model.known_codes(mask)
    assert known.shape == (16, 16) and known.dtype == torch.bool
    assert torch.equal(model.known_codes(mask[None].bool()), known)
    batch = torch.stack([mask, torch.zeros(64, 64)])[:, None]
    assert torch.equal(model.known_codes(batch), torch.stack([known, torch.ones(16, 16, dtype=torch.bool)]))
    assert model.known_codes(torch.ones(32, 48)).shape == (8, 12)  # other sizes than the resolution
    assert not model.known_codes(torch.ones(32, 32)).any()
    with pytest.raises(ValueError, match=r"BRICS.known_codes: argument 'mask' .*multiples of 4.*30 x 32"):
        model.known_codes(torch.zeros(30, 32))
    with pytest.raises(ValueError, match=r"argument 'mask' must have shape .*got \(2, 64, 64\)"):
        model.known_codes(torch.zeros(2, 64, 64))
    with pytest.raises(TypeError, match="argument 'mask' must be a tensor"):
        model.known_codes([[0, 1]])
