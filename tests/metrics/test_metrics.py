"""pyvq.metrics: PSNR and SSIM against independent oracles, torch-fidelity wiring."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from pyvq._weights import MissingWeightsError
from pyvq.metrics import fidelity_metrics, psnr, ssim
from pyvq.metrics.fidelity import INCEPTION_FILE


def test_psnr_matches_formula(skimage_patches):
    x = skimage_patches[:4] * 2 - 1
    g = torch.Generator().manual_seed(0)
    y = x + 0.05 * torch.randn(x.shape, generator=g)
    got = psnr(x, y)
    for i in range(4):
        mse = ((x[i].double() - y[i].double()) ** 2).mean().item()
        assert got[i].item() == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-12)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_matches_skimage(skimage_patches):
    metrics = pytest.importorskip("skimage.metrics")
    x = skimage_patches[:3] * 2 - 1
    g = torch.Generator().manual_seed(1)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got = ssim(x, y)
    for i in range(3):
        ref = metrics.structural_similarity(
            x[i].double().numpy(), y[i].double().numpy(), data_range=2.0, channel_axis=0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        assert got[i].item() == pytest.approx(ref, abs=1e-9)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


def test_missing_inception_weights_message(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(MissingWeightsError) as info:
            fidelity_metrics(torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 16, 16))
    finally:
        torch.hub.set_dir(old)
    msg = str(info.value)
    assert INCEPTION_FILE in msg
    assert os.path.join(str(tmp_path), "checkpoints", INCEPTION_FILE) in msg


class _TinyExtractor(torch.nn.Module):
    """A fixed random conv net standing in for Inception-v3."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 3, 3, 3, generator=g) * 0.2, requires_grad=False)
        self.head = torch.nn.Parameter(torch.randn(10, 16, generator=g), requires_grad=False)

    def features(self, x_uint8):
        x = x_uint8.float() / 127.5 - 1
        f = F.relu(F.conv2d(x, self.w, stride=2)).mean((2, 3))
        return f, f @ self.head.t()


@pytest.fixture
def registered_extractor():
    import torch_fidelity
    from torch_fidelity import registry

    class Extractor(torch_fidelity.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = _TinyExtractor()

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits_unbiased" if metric == "isc" else "feat"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            feat, logits = self.net.features(x)
            out = {"feat": feat, "logits_unbiased": logits}
            return tuple(out[a] for a in self.features_list)

    name = "pyvq-test-extractor"
    if name not in registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, Extractor)
    return name


def test_fidelity_metrics_with_registered_extractor(registered_extractor, skimage_patches):
    real = skimage_patches * 2 - 1
    same = fidelity_metrics(real, real.clone(), feature_extractor=registered_extractor)
    g = torch.Generator().manual_seed(2)
    noisy = (real + 0.8 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    worse = fidelity_metrics(real, noisy, feature_extractor=registered_extractor)
    assert same["frechet_inception_distance"] == pytest.approx(0.0, abs=1e-3)
    assert worse["frechet_inception_distance"] > 1e-2
    assert worse["kernel_inception_distance_mean"] > same["kernel_inception_distance_mean"]
    assert same["inception_score_mean"] >= 1.0
