"""ProjectedDiscriminator: frozen timm features, random projections, trained
per-scale heads; weights from the local Hugging Face cache only."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm (the Projected GAN backbone) is not installed")

from pyvq.losses import MissingWeightsError, ProjectedDiscriminator, VQLPIPSWithDiscriminator  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
REPO = "timm/tf_efficientnet_lite0.in1k"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _cache_backbone(cache, state):
    """Write ``state`` where huggingface_hub keeps REPO's model.safetensors."""
    from safetensors.torch import save_file

    repo = cache / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


def test_missing_weights_name_the_repository(empty_hub_cache):
    with pytest.raises(MissingWeightsError, match=REPO):
        ProjectedDiscriminator(32, backbone=BACKBONE)


def test_pretrained_weights_load_from_the_local_cache(empty_hub_cache):
    torch.manual_seed(3)
    full = timm.create_model(BACKBONE, pretrained=False)
    _cache_backbone(empty_hub_cache, full.state_dict())
    d = ProjectedDiscriminator(32, backbone=BACKBONE)
    torch.testing.assert_close(d.backbone.conv_stem.weight, full.conv_stem.weight, rtol=0, atol=0)
    torch.testing.assert_close(d.backbone.blocks[2][0].conv_pw.weight, full.blocks[2][0].conv_pw.weight,
                               rtol=0, atol=0)


@pytest.mark.parametrize("size,resize", [(32, None), (64, None), (16, 32)])
def test_logits_shape_and_input_gradient(size, resize):
    torch.manual_seed(0)
    d = ProjectedDiscriminator(size, pretrained=False, channels=16, resize=resize).train()
    x = (torch.rand(3, 3, size, size) * 2 - 1).requires_grad_()
    logits = d(x)
    assert logits.dim() == 2 and logits.shape[0] == 3 and logits.shape[1] >= 4
    assert torch.isfinite(logits).all()
    (g,) = torch.autograd.grad(logits.sum(), x)
    assert g.abs().sum() > 0  # the generator is trained through the frozen features
    assert not d.backbone.training  # frozen backbone keeps its batch-norm statistics


def test_only_the_heads_train():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(32, pretrained=False, channels=16)
    frozen = {n: p.clone() for n, p in d.named_parameters() if not n.startswith("heads.")}
    assert all(not p.requires_grad for n, p in d.named_parameters() if not n.startswith("heads."))
    loss = VQLPIPSWithDiscriminator(0, perceptual_weight=0.0, discriminator=d)
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=1e-2)
    heads_before = [p.clone() for p in d.heads.parameters()]
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    rec = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d_loss, log = loss(x, rec, 1, global_step=1)
    assert torch.isfinite(d_loss) and "train/d_loss" in log
    d_loss.backward()
    opt.step()
    for n, p in d.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, d.heads.parameters()))


def test_generator_step_uses_it():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(32, pretrained=False, channels=16)
    loss = VQLPIPSWithDiscriminator(0, perceptual_weight=0.0, discriminator=d)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = x.clone().requires_grad_()
    g_loss, log = loss(x, rec, 0, global_step=1, codebook_loss=torch.tensor(0.0))
    assert log["train/g_loss"] != 0
    g_loss.backward()
    assert rec.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="argument 'image_size'"):
        ProjectedDiscriminator(0, pretrained=False)
    d = ProjectedDiscriminator(32, pretrained=False, channels=8)
    with pytest.raises(ValueError, match="argument 'x'"):
        d(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TypeError, match="argument 'discriminator'"):
        VQLPIPSWithDiscriminator(0, perceptual_weight=0.0, discriminator="projected")


def test_train_config_disc_type(empty_hub_cache):
    from pyvq.models import VQGAN
    from pyvq.train.config import TrainConfig
    from pyvq.train.recipes import recipe_for

    with pytest.raises(ValueError, match="field 'disc_type'"):
        TrainConfig(disc_type="stylegan")
    model = VQGAN.from_preset("vqgan_tiny")
    with pytest.raises(MissingWeightsError, match=REPO):
        recipe_for(model).build_loss(model, TrainConfig(disc_type="projected", perceptual_weight=0.0, image_size=32))
    _cache_backbone(empty_hub_cache, timm.create_model(BACKBONE, pretrained=False).state_dict())
    loss = recipe_for(model).build_loss(model, TrainConfig(disc_type="projected", perceptual_weight=0.0,
                                                           image_size=32))
    assert isinstance(loss.discriminator, ProjectedDiscriminator)
