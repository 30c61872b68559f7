"""pyvq.losses.perceptual: where the backbone weights are looked for, the
error when they are missing (and no download), loading a torchvision
checkpoint into lpips' trunk, and the frozen-but-differentiable distance."""

from __future__ import annotations

import os

import pytest
import torch

from pyvq.losses import LPIPS, MissingWeightsError, VQLPIPSWithDiscriminator, backbone_weights, build_lpips

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import torchvision.models._api as tv_api

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)


# ------------------------------------------------------------- weight lookup
def test_backbone_files_are_torchvisions():
    """The cache file names are the ones torchvision's download would create."""
    import torchvision.models as tvm

    for net, weights in (
        ("vgg", tvm.VGG16_Weights.IMAGENET1K_V1),
        ("alex", tvm.AlexNet_Weights.IMAGENET1K_V1),
        ("squeeze", tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1),
    ):
        filename, path, url = backbone_weights(net)
        assert url == weights.url
        assert filename == os.path.basename(weights.url)
        assert path == os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    assert backbone_weights("vgg")[0] == VGG_FILE


def test_missing_backbone_raises_and_never_downloads(empty_hub, no_download):
    with pytest.raises(MissingWeightsError) as info:
        build_lpips()
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert VGG_FILE in msg
    assert os.path.join(str(empty_hub), "checkpoints", VGG_FILE) in msg
    assert VGG_URL in msg
    assert not os.path.exists(os.path.join(str(empty_hub), "checkpoints", VGG_FILE))
    # An explicit path that does not exist is named too.
    missing = str(empty_hub / "elsewhere" / VGG_FILE)
    with pytest.raises(MissingWeightsError, match="elsewhere"):
        build_lpips(backbone_path=missing)


def test_loss_default_perceptual_needs_weights(empty_hub, no_download):
    with pytest.raises(MissingWeightsError, match=VGG_FILE):
        VQLPIPSWithDiscriminator(0, disc_ndf=8)
    loss = VQLPIPSWithDiscriminator(0, perceptual_weight=0.0, disc_ndf=8)  # no LPIPS needed
    assert loss.perceptual is None
    assert not any(k.startswith("perceptual") for k in loss.state_dict())


def _torchvision_vgg_features_file(path):
    """A checkpoint in torchvision's VGG16 format (random values): the keys
    and shapes of ``torchvision.models.vgg16().state_dict()``'s features."""
    from torchvision.models import vgg

    torch.manual_seed(1)
    # the features of torchvision.models.vgg16() (its config "D"), without the
    # 100M-parameter classifier that vgg16() would also initialise
    feats = vgg.make_layers(vgg.cfgs["D"]).state_dict()
    state = {f"features.{k}": v for k, v in feats.items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # present in the real file, unused
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return state


def test_backbone_loaded_from_hub_cache(empty_hub, no_download):
    state = _torchvision_vgg_features_file(os.path.join(str(empty_hub), "checkpoints", VGG_FILE))
    m = build_lpips()
    assert m.pretrained_backbone
    trunk = m.model.net
    # lpips' slices keep torchvision's layer indices: conv 0 in slice1, conv 28 in slice5.
    assert torch.equal(getattr(trunk.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(trunk.slice3, "14").bias, state["features.14.bias"])
    assert torch.equal(getattr(trunk.slice5, "28").weight, state["features.28.weight"])
    n_convs = sum(1 for k in state if k.startswith("features.") and k.endswith(".weight"))
    assert n_convs == 13 == sum(1 for k in trunk.state_dict() if k.endswith(".weight"))
    # The same file at an explicit path gives the same network.
    other = str(empty_hub / "copy.pth")
    os.replace(os.path.join(str(empty_hub), "checkpoints", VGG_FILE), other)
    m2 = build_lpips(backbone_path=other)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_wrong_backbone_file_is_rejected(empty_hub):
    path = os.path.join(str(empty_hub), "checkpoints", VGG_FILE)
    os.makedirs(os.path.dirname(path))
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(RuntimeError, match=r"features\.0\.weight") as info:
        build_lpips()
    assert path in str(info.value)


def test_real_vgg_weights_if_cached(images):
    filename, path, _ = backbone_weights("vgg")
    if not os.path.isfile(path):
        pytest.skip(f"{filename} is not in the torch hub cache (expected at {path}); the real-weights path is untested")
    m = build_lpips()
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(getattr(m.model.net.slice1, "0").weight, ref["features.0.weight"])
    x = images[:4]
    assert torch.all(m(x, x) < 1e-6)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.all(m(x, noisy) > m(x, x))


# ---------------------------------------------------------- the distance
def test_identical_zero_different_positive(random_lpips, images):
    x, y = images[0:16:4], images[1:16:4]  # one tile of each photograph, and its neighbour
    same = random_lpips(x, x.clone())
    assert same.shape == (4,)
    assert same.abs().max().item() < 1e-7
    diff = random_lpips(x, y)
    assert diff.shape == (4,)
    assert torch.all(diff > 1e-4)
    # a slightly perturbed image is closer than a different one
    g = torch.Generator().manual_seed(0)
    near = random_lpips(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    assert torch.all(near < diff)
    assert torch.allclose(random_lpips(x, y, reduction="mean"), diff.mean())
    assert torch.allclose(random_lpips(x[:2], y[:2], reduction="sum"), diff[:2].sum())


def test_frozen_but_differentiable(random_lpips, images):
    m = random_lpips
    assert all(not p.requires_grad for p in m.parameters())
    x = images[:4]
    y = images[4:8].clone().requires_grad_(True)
    m(x, y, reduction="mean").backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    # a parent's .train() does not switch on the heads' dropout
    parent = torch.nn.ModuleDict({"lpips": m}).train()
    assert parent.training and not any(mod.training for mod in m.modules())
    assert torch.equal(m(x, y.detach()), m(x, y.detach()))


def test_bad_arguments(random_lpips):
    a = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        random_lpips(a, torch.zeros(2, 3, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        random_lpips(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="reduction"):
        random_lpips(a, a, reduction="max")
    with pytest.raises(ValueError, match="'net'"):
        LPIPS("resnet", pretrained_backbone=False)
    with pytest.raises(ValueError, match="backbone_path"):
        LPIPS(pretrained_backbone=False, backbone_path="/nonexistent.pth")
