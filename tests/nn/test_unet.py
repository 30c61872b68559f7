"""pyvq.nn.unet: shapes over configurations, zero-initialised outputs,
gradient flow, attention placement and math, time / class conditioning, a
short fit, and argument errors. Every model here is tiny (width 16, 8
groups) so the file runs in seconds on one thread."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyvq.nn.unet import AttentionBlock, TimeResBlock, UNet, timestep_features


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(image_size=16, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(8,), num_groups=8, num_heads=2)


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    kwargs = {**TINY, **overrides}
    in_ch, out_ch = kwargs.pop("in_channels", 4), kwargs.pop("out_channels", 4)
    return UNet(in_ch, out_ch, **kwargs)


def wake_zero_convs(model: nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised layers random weights so every path is live."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.any():
                m.weight.normal_(0, std)
                m.bias.normal_(0, std)


@pytest.mark.parametrize(
    "overrides, batch, size, t",
    [
        ({}, 1, (16, 16), torch.tensor([17])),
        ({}, 3, (16, 16), torch.tensor([0.5, 10.25, 999.0])),
        (dict(scale_shift=False, attention_resolutions=()), 3, (16, 16), torch.tensor([1, 2, 3])),
        (dict(num_classes=5, out_channels=6), 3, (16, 16), 7),
        (dict(head_channels=8, attention_resolutions=(16, 4), resample_with_conv=False), 2, (8, 24), 3.5),
        (dict(channel_mult=(1,), attention_resolutions=(16,), num_res_blocks=2), 2, (4, 4), torch.tensor(5)),
        (dict(dropout=0.1, in_channels=1, out_channels=2, channel_mult=(1, 1, 2, 2)), 1, (16, 16), torch.tensor([3])),
    ],
)
def test_output_shapes(overrides, batch, size, t):
    model = tiny(**overrides)
    wake_zero_convs(model)
    x = torch.randn(batch, model.in_channels, *size)
    y = torch.arange(batch) % model.num_classes if model.num_classes else None
    out = model(x, t, y)
    assert out.shape == (batch, model.out_channels, *size)
    assert torch.isfinite(out).all()


def test_output_is_zero_at_init():
    model = tiny(num_classes=3)
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([5, 900]), torch.tensor([0, 2]))
    assert torch.equal(out, torch.zeros_like(out))
    # Every residual branch starts at 0 too: the last conv of each ResBlock and attention projection.
    for m in model.modules():
        if isinstance(m, TimeResBlock):
            assert not m.conv2.weight.any() and not m.conv2.bias.any()
        if isinstance(m, AttentionBlock):
            assert not m.proj.weight.any() and not m.proj.bias.any()


def test_gradients_reach_every_parameter():
    model = tiny(num_classes=3, scale_shift=True)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5, 900]), torch.tensor([0, 2])
    # Perturbing only the output conv: every parameter takes part in the graph (has a grad),
    # and the zero-initialised layers get a non-zero one, so training can start.
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.05)
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    zero_init = [m for m in model.modules() if isinstance(m, TimeResBlock)]
    assert all(m.conv2.weight.grad.abs().sum() > 0 for m in zero_init)
    # With every zero layer woken up, every parameter gets a non-zero gradient.
    model.zero_grad(set_to_none=True)
    wake_zero_convs(model)
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_placement():
    model = tiny(attention_resolutions=(16, 4), channel_mult=(1, 2, 2), num_res_blocks=2)
    assert [level.resolution for level in model.down] == [16, 8, 4]
    assert [level.resolution for level in model.up] == [16, 8, 4]
    assert [level.has_attention for level in model.down] == [True, False, True]
    assert [level.has_attention for level in model.up] == [True, False, True]
    assert [sum(isinstance(a, AttentionBlock) for a in level.attn) for level in model.down] == [2, 0, 2]
    assert [sum(isinstance(a, AttentionBlock) for a in level.attn) for level in model.up] == [3, 0, 3]
    assert isinstance(model.mid.attn, AttentionBlock)
    # 2 + 2 (encoder) + 1 (middle) + 3 + 3 (decoder)
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) == 11
    # Layout: num_res_blocks per encoder level, one more per decoder level; resampling between levels.
    assert [len(level.res) for level in model.down] == [2, 2, 2]
    assert [len(level.res) for level in model.up] == [3, 3, 3]
    assert [level.resample is None for level in model.down] == [False, False, True]
    assert [level.resample is None for level in model.up] == [True, False, False]
    assert [level.res[-1].out_channels for level in model.up] == [16, 32, 32]
    no_attn = tiny(attention_resolutions=())
    assert sum(isinstance(m, AttentionBlock) for m in no_attn.modules()) == 1  # the middle one only
    assert tiny(num_heads=4).mid.attn.num_heads == 4
    assert tiny(head_channels=8).mid.attn.num_heads == 4  # 32 channels / 8


def test_attention_block_matches_handwritten_multihead():
    torch.manual_seed(0)
    b, c, h, w, heads = 2, 16, 3, 5, 4
    block = AttentionBlock(c, heads, num_groups=4).double()
    nn.init.normal_(block.proj.weight)
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    qkv = block.qkv(block.norm(x)).reshape(b, 3 * c, h * w)
    d = c // heads
    outs = []
    for i in range(heads):
        q = qkv[:, i * d:(i + 1) * d].transpose(1, 2)  # (B, HW, d)
        k = qkv[:, c + i * d:c + (i + 1) * d]  # (B, d, HW)
        v = qkv[:, 2 * c + i * d:2 * c + (i + 1) * d].transpose(1, 2)  # (B, HW, d)
        outs.append(torch.softmax(q @ k / math.sqrt(d), dim=-1) @ v)  # (B, HW, d)
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, c, h, w)
    torch.testing.assert_close(block(x), x + block.proj(out), rtol=1e-10, atol=1e-10)


def test_time_and_class_conditioning_change_the_output():
    for scale_shift in (True, False):
        model = tiny(num_classes=4, scale_shift=scale_shift).eval()
        wake_zero_convs(model)
        x = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1)
        with torch.no_grad():
            out = model(x, torch.tensor([10, 600]), torch.tensor([1, 1]))
            assert (out[0] - out[1]).abs().max() > 1e-4  # different t, same x and y
            out = model(x, torch.tensor([10, 10]), torch.tensor([0, 3]))
            assert (out[0] - out[1]).abs().max() > 1e-4  # different y, same x and t
            # A scalar t broadcasts; int and float timesteps of equal value agree.
            torch.testing.assert_close(model(x, 10, torch.tensor([1, 2])),
                                       model(x, torch.tensor([10.0, 10.0]), torch.tensor([1, 2])))


def test_timestep_features():
    t = torch.tensor([0, 1, 250])
    f = timestep_features(t, 8)
    assert f.shape == (3, 8) and f.dtype == torch.float32
    torch.testing.assert_close(f[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(f[2], torch.cat([torch.cos(250 * freqs), torch.sin(250 * freqs)]))
    assert timestep_features(torch.tensor([0.5]), 7).shape == (1, 7)


def test_double_precision_and_eval_determinism():
    model = tiny(dropout=0.5).double().eval()
    wake_zero_convs(model)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    out = model(x, torch.tensor([3, 4]))
    assert out.dtype == torch.float64
    torch.testing.assert_close(model(x, torch.tensor([3, 4])), out, rtol=0, atol=0)


def test_a_few_steps_reduce_a_regression_loss():
    # Predict the noise that was added to a fixed smooth image at each t.
    model = tiny(channel_mult=(1, 2), attention_resolutions=(8,), image_size=8)
    torch.manual_seed(0)
    base = torch.linspace(-1, 1, 8)
    x0 = (base[None, :] * base[:, None]).expand(4, 4, 8, 8)
    noise = torch.randn(4, 4, 8, 8)
    t = torch.tensor([100, 300, 500, 700])
    a = 1 - t.float()[:, None, None, None] / 1000
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = (model(xt, t) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(noise.square().mean().item())  # zero output at init
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_size=12, channel_mult=(1, 2, 2, 2)), "'image_size'"),
        (dict(image_size=0), "'image_size'"),
        (dict(model_channels=0), "'model_channels'"),
        (dict(num_res_blocks=0), "'num_res_blocks'"),
        (dict(channel_mult=()), "'channel_mult'"),
        (dict(channel_mult=(1, 0)), "'channel_mult'"),
        (dict(attention_resolutions=(32,)), r"'attention_resolutions'.*\[16, 8, 4\]"),
        (dict(model_channels=12), "'num_groups'"),
        (dict(num_heads=3), "'num_heads'"),
        (dict(head_channels=5), "'head_channels'"),
        (dict(num_classes=0), "'num_classes'"),
        (dict(dropout=1.0), "'dropout'"),
        (dict(in_channels=0), "'in_channels'"),
    ],
)
def test_bad_constructor_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_bad_forward_arguments():
    model = tiny()
    x = torch.randn(2, 4, 16, 16)
    with pytest.raises(ValueError, match="'x'"):
        model(torch.randn(2, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="'x'.*divisible by 4"):
        model(torch.randn(2, 4, 16, 10), 1)
    with pytest.raises(ValueError, match="'t'"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="'y'.*unconditional"):
        model(x, 1, torch.tensor([0, 1]))
    conditional = tiny(num_classes=3)
    with pytest.raises(ValueError, match="'y'.*required"):
        conditional(x, 1)
    with pytest.raises(ValueError, match="'y'"):
        conditional(x, 1, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="'y'"):
        conditional(x, 1, torch.tensor([0, 1, 2]))
