"""pyvq.refit: ReFiT codebook re-building and encoder freezing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyvq.nn import VectorQuantizer
from pyvq.ops import nearest_code
from pyvq.refit import RefitResult, freeze_encoder, rebuild_codebook, sample_latents


def _encoder(dim=8, seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, dim, 4, stride=2, padding=1)
    )
    return enc.eval()


class _Tokenizer(nn.Module):
    def __init__(self, dim=8, num_codes=16):
        super().__init__()
        self.encoder = _encoder(dim)
        self.quant_conv = nn.Conv2d(dim, dim, 1)
        self.quantizer = VectorQuantizer(num_codes, dim)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(dim, 3, 4, stride=4), nn.BatchNorm2d(3))


def test_rebuild_codebook_shape_and_finite(skimage_patches):
    res = rebuild_codebook(_encoder(), skimage_patches, 16, num_samples=512, batch_size=5, seed=0)
    assert isinstance(res, RefitResult)
    assert res.codebook.shape == (16, 8) and res.codebook.dtype == torch.float32
    assert torch.isfinite(res.codebook).all()
    assert res.num_images == 16 and res.num_samples == 512
    assert res.usage_before is None and not res.applied
    # the centroids are k-means centroids of real latents: each lies inside
    # the latents' bounding box
    lat = _encoder()(skimage_patches).detach().permute(0, 2, 3, 1).reshape(-1, 8)
    assert (res.codebook >= lat.min(0).values - 1e-6).all()
    assert (res.codebook <= lat.max(0).values + 1e-6).all()


def test_rebuild_is_deterministic_and_accepts_iterables(skimage_patches):
    enc = _encoder()
    a = rebuild_codebook(enc, skimage_patches, 8, num_samples=256, seed=3, kmeans_iters=5)
    b = rebuild_codebook(enc, skimage_patches, 8, num_samples=256, seed=3, kmeans_iters=5)
    assert torch.equal(a.codebook, b.codebook)
    # a DataLoader-style iterable of (images, labels)
    batches = [(skimage_patches[i : i + 4], torch.zeros(4)) for i in range(0, 16, 4)]
    c = rebuild_codebook(enc, iter(batches), 8, num_samples=256, seed=3, kmeans_iters=5)
    assert c.codebook.shape == (8, 8) and c.num_images == 16


def test_sample_latents_is_uniform_over_images_and_positions():
    # The "encoder" writes each image's id into channel 0 and the position
    # id into channel 1, so the samples reveal what was drawn. Uneven
    # batches exercise the streaming reservoir.
    def encoder(batch):
        b = batch.shape[0]
        ids = batch[:, 0, 0, 0]
        lat = torch.empty(b, 2, 3, 4)
        lat[:, 0] = ids.view(b, 1, 1)
        lat[:, 1] = torch.arange(12.0).view(3, 4)
        return lat

    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 8, 8)
    batches = [images[:2], images[2:3], images[3:5]]
    P = 30000
    samples, n = sample_latents(encoder, batches, P, seed=1)
    assert n == 5 and samples.shape == (P, 2)
    img_hist = torch.bincount(samples[:, 0].long(), minlength=5).double()
    pos_hist = torch.bincount(samples[:, 1].long(), minlength=12).double()
    # binomial standard deviations: sqrt(P p (1-p)); allow 5 of them
    assert ((img_hist - P / 5).abs() < 5 * (P * 0.2 * 0.8) ** 0.5).all(), img_hist
    assert ((pos_hist - P / 12).abs() < 5 * (P / 12 * 11 / 12) ** 0.5).all(), pos_hist


def test_collapsed_codebook_usage_improves(skimage_patches):
    enc = _encoder()
    quant = VectorQuantizer(16, 8)
    # collapse: one code at the latents' mean, the other 15 far away
    lat = enc(skimage_patches).detach().permute(0, 2, 3, 1).reshape(-1, 8)
    collapsed = torch.full((16, 8), 50.0)
    collapsed[0] = lat.mean(0)
    quant.load_codebook(collapsed)
    before = quant.codebook.detach().clone()
    res = rebuild_codebook(enc, skimage_patches, 16, num_samples=1024, quantizer=quant, seed=0)
    assert res.usage_before == pytest.approx(1 / 16)
    assert res.perplexity_before == pytest.approx(1.0)
    assert res.usage_after >= res.usage_before
    assert res.usage_after > 0.5 and res.perplexity_after > 4.0
    assert not res.applied
    assert torch.equal(quant.codebook.detach(), before)  # apply=False: untouched

    # recompute "after" independently on fresh latents from all positions
    idx, _ = nearest_code(lat, res.codebook)
    assert torch.unique(idx).numel() / 16 > 0.5


def test_apply_loads_codebook_and_resets_stats(skimage_patches):
    enc = _encoder()
    quant = VectorQuantizer(8, 8, ema=True)
    quant.train()(torch.randn(30, 8))
    res = rebuild_codebook(enc, skimage_patches, 8, num_samples=256, quantizer=quant, apply=True, seed=0)
    assert res.applied
    torch.testing.assert_close(quant.codebook, res.codebook)
    torch.testing.assert_close(quant.embed_sum, res.codebook)
    assert torch.equal(quant.cluster_size, torch.ones(8)) and quant.code_usage.sum() == 0


def test_l2_normalized_quantizer_gets_unit_codes(skimage_patches):
    quant = VectorQuantizer(8, 8, l2_normalize=True)
    res = rebuild_codebook(_encoder(), skimage_patches, 8, num_samples=256, quantizer=quant, seed=0)
    torch.testing.assert_close(res.codebook.norm(dim=1), torch.ones(8))


def test_rebuild_errors(skimage_patches):
    enc = _encoder()
    with pytest.raises(ValueError, match="apply=True needs a 'quantizer'"):
        rebuild_codebook(enc, skimage_patches, 8, num_samples=64, apply=True)
    with pytest.raises(ValueError, match="'num_samples'"):
        rebuild_codebook(enc, skimage_patches, 8, num_samples=4)
    with pytest.raises(ValueError, match="'num_codes'"):
        rebuild_codebook(enc, skimage_patches, 8, num_samples=64, quantizer=VectorQuantizer(4, 8))
    with pytest.raises(ValueError, match=r"latent dim \(8\) must equal the quantizer's dim \(4\)"):
        rebuild_codebook(enc, skimage_patches, 8, num_samples=64, quantizer=VectorQuantizer(8, 4))
    with pytest.raises(ValueError, match="'images'"):
        rebuild_codebook(enc, skimage_patches[0], 8, num_samples=64)
    with pytest.raises(ValueError, match="yielded no images"):
        rebuild_codebook(enc, [], 8, num_samples=64)
    with pytest.raises(ValueError, match="'encoder' must return"):
        rebuild_codebook(lambda x: x.mean((2, 3)), skimage_patches, 8, num_samples=64)


def test_freeze_encoder_freezes_exactly_the_encoder():
    model = _Tokenizer().train()
    names = freeze_encoder(model)
    expected = [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    assert names == expected and len(names) == 4
    for n, p in model.named_parameters():
        assert p.requires_grad == (not n.startswith("encoder.")), n
    assert not model.encoder.training
    assert model.decoder.training and model.quantizer.training

    # gradients reach the decoder but not the encoder
    x = torch.randn(2, 3, 16, 16)
    out = model.decoder(model.quantizer(model.quant_conv(model.encoder(x))).z_q)
    out.square().mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_freeze_encoder_variants():
    model = _Tokenizer()
    names = freeze_encoder(model, also=("quant_conv",))
    assert names == [n for n, _ in model.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    enc = _encoder().train()
    names = freeze_encoder(enc)  # an encoder without an `encoder` attribute: itself
    assert names == [n for n, _ in enc.named_parameters()]
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    with pytest.raises(TypeError, match="'model'"):
        freeze_encoder(lambda x: x)
