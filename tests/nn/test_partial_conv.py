"""PartialConv2d against a hand-written loop, gradcheck, and its edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyvq.nn import PartialConv2d


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(layer: PartialConv2d, x: torch.Tensor, mask: torch.Tensor):
    """Liu et al.'s formula, one output position at a time (mask: 1 = valid)."""
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    ph, pw = layer.padding
    b, _, h, w = x.shape
    mask = mask.expand(b, -1, -1, -1)
    xp = F.pad(x, (pw, pw, ph, ph))
    mp = F.pad(mask, (pw, pw, ph, ph))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = torch.zeros(b, layer.out_channels, ho, wo, dtype=x.dtype)
    new = torch.zeros(b, 1, ho, wo, dtype=x.dtype)
    window = kh * kw * (layer.in_channels if layer.multi_channel else 1)
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                xs = xp[n, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
                ms = mp[n, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
                s = ms.sum()
                if s > 0:
                    raw = (layer.weight * (xs * ms)[None]).sum(dim=(1, 2, 3))
                    bias = layer.bias if layer.bias is not None else 0.0
                    out[n, :, i, j] = raw * (window / s) + bias
                    new[n, 0, i, j] = 1.0
    return out, new


@pytest.mark.parametrize(
    "k, stride, padding, bias, multi",
    [(3, 1, 1, True, False), (4, 2, 1, True, False), (3, 2, 0, False, False), (3, 1, 1, True, True), (2, 1, 1, True, True)],
)
def test_matches_loop_reference(k, stride, padding, bias, multi):
    torch.manual_seed(0)
    layer = PartialConv2d(3, 4, k, stride=stride, padding=padding, bias=bias, multi_channel=multi).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    mask = (torch.rand(2, 3 if multi else 1, 7, 6) > 0.6).double()
    mask[0, :, :4, :4] = 0  # a hole larger than a window: some outputs see no valid pixel
    out, new = layer(x, mask)
    ref_out, ref_new = reference(layer, x, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    if multi:
        assert new.shape[1] == 4 and torch.equal(new, ref_new.expand(-1, 4, -1, -1))
    else:
        assert torch.equal(new, ref_new)
    assert (new == 0).any() and (new == 1).any()


@pytest.mark.parametrize("multi", [False, True])
def test_gradcheck(multi):
    torch.manual_seed(0)
    layer = PartialConv2d(2, 3, 3, stride=2, padding=1, multi_channel=multi).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 2 if multi else 1, 5, 5) > 0.5).double()
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x, mask))[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_all_valid_is_plain_conv():
    torch.manual_seed(0)
    layer = PartialConv2d(3, 5, 3, stride=2, padding=0)
    x = torch.randn(2, 3, 9, 9)
    out, new = layer(x, torch.ones(2, 1, 9, 9))
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, stride=2))
    assert torch.equal(new, torch.ones(2, 1, 4, 4))
    # mask=None is the all-valid mask; with padding the interior is the plain conv.
    layer = PartialConv2d(3, 5, 3, padding=1)
    out, new = layer(x)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], F.conv2d(x, layer.weight, layer.bias, padding=1)[..., 1:-1, 1:-1])
    assert torch.equal(new, torch.ones(1, 1, 9, 9).expand(2, -1, -1, -1))


def test_all_hole_gives_zeros():
    layer = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out, new = layer(x, torch.zeros(1, 1, 6, 6))
    assert torch.equal(out, torch.zeros(2, 4, 6, 6)) and torch.equal(new, torch.zeros(2, 1, 6, 6))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_bad_mask_shape():
    layer = PartialConv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 6, 6), torch.ones(2, 3, 6, 6))
    with pytest.raises(ValueError, match="'x'"):
        layer(torch.randn(2, 2, 6, 6))
