"""pyvq.convert.from_diffusers on diffusers' AsymmetricAutoencoderKL:
the converted AsymmetricVQGAN must reproduce diffusers' encode (posterior
mean / logvar), plain decode and mask-conditioned decode in float64, from an
instance and from a save_pretrained directory; unsupported configs are
rejected by name before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch

from pyvq.convert import from_diffusers
from pyvq.models import AsymmetricVQGAN, AutoencoderKL

PLAIN_DOWN, ATTN_DOWN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
PLAIN_UP, ATTN_UP = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip(
        "diffusers",
        reason="diffusers is not installed (pip install diffusers==0.42.1) for the AsymmetricAutoencoderKL tests",
    )


# Small AsymmetricAutoencoderKL layouts (sample_size 32, 3 channels).
CASES = {
    # two levels, same widths on both sides, one layer each
    "two_levels": dict(
        down_block_types=(PLAIN_DOWN,) * 2,
        down_block_out_channels=(32, 64),
        layers_per_down_block=1,
        up_block_types=(PLAIN_UP,) * 2,
        up_block_out_channels=(32, 64),
        layers_per_up_block=1,
        latent_channels=4,
    ),
    # three levels, a wider and deeper decoder, attention at different levels
    # on each side (encoder: level 2; decoder: up_blocks[1] = level 1)
    "three_levels_attention": dict(
        down_block_types=(PLAIN_DOWN, PLAIN_DOWN, ATTN_DOWN),
        down_block_out_channels=(32, 64, 64),
        layers_per_down_block=1,
        up_block_types=(PLAIN_UP, ATTN_UP, PLAIN_UP),
        up_block_out_channels=(64, 128, 128),
        layers_per_up_block=2,
        latent_channels=3,
    ),
    # four levels (Stable Diffusion's shape: channels double, capped at the last)
    "four_levels": dict(
        down_block_types=(PLAIN_DOWN,) * 4,
        down_block_out_channels=(32, 32, 64, 64),
        layers_per_down_block=2,
        up_block_types=(PLAIN_UP,) * 4,
        up_block_out_channels=(32, 64, 128, 128),
        layers_per_up_block=1,
        latent_channels=4,
        scaling_factor=0.5,
    ),
}


def _model(diffusers, case: str):
    torch.manual_seed(11)
    model = diffusers.AsymmetricAutoencoderKL(sample_size=32, norm_num_groups=32, **CASES[case])
    # Perturb every tensor (norm affines included, so a swapped norm is caught).
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model.eval()


def _check(dmodel, model: AsymmetricVQGAN) -> None:
    dmodel, model = dmodel.double(), model.double()
    g = torch.Generator().manual_seed(13)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    hard = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).double()
    soft = torch.rand(1, 1, 32, 32, generator=g, dtype=torch.float64)  # batch 1: broadcast
    tol = dict(rtol=0, atol=1e-9)
    with torch.no_grad():
        want = dmodel.encode(x).latent_dist
        got = model.encode(x)
        torch.testing.assert_close(got.mean, want.mean, **tol)
        torch.testing.assert_close(got.logvar, want.logvar, **tol)
        z = want.mean + 0.5 * torch.randn(want.mean.shape, generator=g, dtype=torch.float64)
        plain = dmodel.decode(z).sample
        torch.testing.assert_close(model.decode(z), plain, **tol)
        for mask in (hard, soft):
            # Same convention on both sides: mask = 1 is the hole; diffusers
            # multiplies the image by (1 - mask) itself, pyvq takes the masked image.
            want_masked = dmodel.decode(z, image=x, mask=mask).sample
            assert (want_masked - plain).abs().max() > 1e-3  # the condition matters
            torch.testing.assert_close(model.decode(z, (1 - mask) * x, mask), want_masked, **tol)
        # forward(x, mask) = decode(posterior mode, (1 - mask) * x, mask) = diffusers' forward
        got_rec, _ = model(x, hard)
        torch.testing.assert_close(got_rec, dmodel(x, mask=hard).sample, **tol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_asymmetric_from_instance_and_directory(diffusers, case, tmp_path):
    dmodel = _model(diffusers, case)
    model = from_diffusers(dmodel)
    assert isinstance(model, AsymmetricVQGAN) and isinstance(model.base, AutoencoderKL)
    assert not model.training and next(model.parameters()).dtype == torch.float32

    spec = CASES[case]
    c, base = model.config, model.config.base()
    down, up = spec["down_block_out_channels"], spec["up_block_out_channels"]
    assert (c.base_kind, c.blend) == ("kl", "add")
    assert (base.ch, base.ch_mult, base.num_res_blocks) == (
        down[0],
        tuple(b // down[0] for b in down),
        spec["layers_per_down_block"],
    )
    assert (c.ch, c.ch_mult, c.num_res_blocks) == (up[0], tuple(b // up[0] for b in up), spec["layers_per_up_block"])
    assert base.z_channels == base.embed_dim == spec["latent_channels"]
    assert base.scaling_factor == pytest.approx(spec.get("scaling_factor", 0.18215))
    if case == "three_levels_attention":
        assert base.attn_resolutions == (8,) and c.attn_resolutions == (16,)
    else:
        assert base.attn_resolutions == () and c.attn_resolutions == ()
    # only the new decoder trains
    assert not any(p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())

    dmodel.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AsymmetricAutoencoderKL"
    from_dir = from_diffusers(tmp_path)
    mine = model.state_dict()
    assert set(from_dir.state_dict()) == set(mine)
    for key, value in from_dir.state_dict().items():
        assert torch.equal(mine[key], value), key
    _check(dmodel, model)
    _check(dmodel, from_dir)


# ------------------------------------------------------------------ errors
BASE_CONFIG = dict(
    _class_name="AsymmetricAutoencoderKL",
    in_channels=3,
    out_channels=3,
    down_block_types=[PLAIN_DOWN] * 2,
    down_block_out_channels=[32, 64],
    layers_per_down_block=1,
    up_block_types=[PLAIN_UP] * 2,
    up_block_out_channels=[32, 64],
    layers_per_up_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)


def test_asymmetric_unsupported_configs(tmp_path):
    # Config-only directories: the config is rejected before weights are looked for.
    def convert(**changes):
        config = {**BASE_CONFIG, **changes}
        if "up_block_out_channels" in changes:
            config["block_out_channels"] = changes["up_block_out_channels"]
        (tmp_path / "config.json").write_text(json.dumps(config))
        return from_diffusers(tmp_path)

    cases = [
        # all levels equally wide: diffusers' shape-keyed lookup takes the final
        # blend's feature from condition layer 1, pyvq from layer 0
        (dict(up_block_out_channels=[32, 32]), r"up_block_out_channels \(32, 32\) is not supported.*layer 1"),
        # channels not doubling from the first: diffusers has no such feature
        (
            dict(up_block_out_channels=[32, 128]),
            r"up_block_out_channels \(32, 128\) is not supported.*no layer",
        ),
        # five levels: diffusers' condition encoder has five layers, pyvq needs six
        (
            dict(
                down_block_types=[PLAIN_DOWN] * 5,
                down_block_out_channels=[32] * 5,
                up_block_types=[PLAIN_UP] * 5,
                up_block_out_channels=[32, 64, 128, 256, 256],
            ),
            r"not supported.*no layer",
        ),
        (dict(up_block_types=[PLAIN_UP] * 3, up_block_out_channels=[32, 64, 64]), r"same, nonzero length"),
        (dict(out_channels=1), r"in_channels \(3\) must equal out_channels \(1\)"),
        (dict(norm_num_groups=24), r"field 'norm_num_groups' must divide every GroupNorm's channel count"),
        (dict(act_fn="gelu"), r"act_fn"),
        (dict(up_block_types=["UpBlock2D", PLAIN_UP]), r"up_block_types\[0\] = 'UpBlock2D'"),
        (dict(up_block_out_channels=[32, 48]), r"up_block_out_channels \(32, 48\) must be multiples"),
        (dict(layers_per_block=2), r"unknown config field\(s\) \['layers_per_block'\]"),
        (dict(block_out_channels=[32, 32]), r"block_out_channels .* must equal up_block_out_channels"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(**changes)
    # a supported config gets as far as the missing weights
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        convert()


def test_asymmetric_weights_must_fit(diffusers, tmp_path):
    dmodel = _model(diffusers, "two_levels")
    dmodel.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layers_per_up_block"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing key\(s\) .*decoder\.up_blocks\.0\.resnets\.2"):
        from_diffusers(tmp_path)
