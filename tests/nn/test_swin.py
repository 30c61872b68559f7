"""pyvq.nn.swin against timm 1.0.31 (the independent oracle): SwinBlock,
WindowAttention, PatchMerging and PatchEmbed load timm's state dicts
strictly and compute the same function; the padded grid, PatchExpanding's
layout, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyvq.nn.swin as swin
from pyvq.nn import (
    DropPath,
    NearestUpsample,
    PatchEmbed,
    PatchExpanding,
    PatchMerging,
    SwinBlock,
    SwinStage,
    WindowAttention,
)
from tests.conftest import half_precision_bound

ts = pytest.importorskip("timm.models.swin_transformer", reason="timm (a test dependency) is not installed")
timm_layers = pytest.importorskip("timm.layers", reason="timm (a test dependency) is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HEADS, WIN = 32, 4, 4


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _randomise(module, seed=0):
    """Random values in every parameter (LayerNorm affines and the bias
    table included), so that a wrongly mapped one shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        is_norm_weight = p.dim() == 1 and name.endswith("weight")
        p.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.3 * noise)
    return module


def _timm_block(H, W, shift, dtype, dim=DIM, heads=HEADS, win=WIN):
    torch.manual_seed(0)
    t = ts.SwinTransformerBlock(dim, (H, W), num_heads=heads, window_size=win, shift_size=shift)
    return _randomise(t).to(dtype).eval()


def _ours_from(timm_module, make):
    ours = make().to(next(timm_module.parameters()).dtype)
    ours.load_state_dict(timm_module.state_dict(), strict=True)
    return ours.eval()


def _forward_and_grad(module, x, g):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx


# ------------------------------------------------------------------ SwinBlock vs timm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid", [(8, 8), (8, 12)])
@pytest.mark.parametrize("shift", [0, WIN // 2])
def test_swin_block_equals_timm(dtype, grid, shift):
    H, W = grid
    t = _timm_block(H, W, shift, dtype)
    assert t.shift_size == (shift, shift)  # the grid is larger than the window: timm keeps the shift
    ours = _ours_from(t, lambda: SwinBlock(DIM, HEADS, WIN, shift_size=shift))
    assert set(ours.state_dict()) == set(t.state_dict())
    x = torch.randn(2, H, W, DIM, dtype=dtype)
    g = torch.randn(2, H, W, DIM, dtype=dtype)
    y_t, gx_t = _forward_and_grad(t, x, g)
    y_o, gx_o = _forward_and_grad(ours, x, g)
    if dtype == torch.float64:
        torch.testing.assert_close(y_o, y_t, **_tol(dtype))
        torch.testing.assert_close(gx_o, gx_t, **_tol(dtype))
    else:
        # float32 kernels round differently from timm's: both are held to a
        # float64 timm (flash-attention's rule, tests/conftest.py).
        y64, gx64 = _forward_and_grad(_timm_block(H, W, shift, torch.float64), x.double(), g.double())
        half_precision_bound(y_o, y_t, y64)
        half_precision_bound(gx_o, gx_t, gx64)


def test_swin_block_parameter_gradients_equal_timm():
    t = _timm_block(8, 12, WIN // 2, torch.float64)
    ours = _ours_from(t, lambda: SwinBlock(DIM, HEADS, WIN, shift_size=WIN // 2))
    x = torch.randn(2, 8, 12, DIM, dtype=torch.float64)
    for m in (t, ours):
        m.zero_grad()
        m(x).square().sum().backward()
    grads_t = {n: p.grad for n, p in t.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_t[name], rtol=1e-10, atol=1e-10, msg=name)


def test_grid_in_one_window_is_not_shifted_like_timm():
    # H = W = w: timm turns the shift off (resolution not larger than the window); so does SwinBlock.
    t = _timm_block(WIN, WIN, WIN // 2, torch.float64)
    assert t.shift_size == (0, 0)
    ours = _ours_from(t, lambda: SwinBlock(DIM, HEADS, WIN, shift_size=WIN // 2))
    x = torch.randn(2, WIN, WIN, DIM, dtype=torch.float64)
    torch.testing.assert_close(ours(x), t(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ WindowAttention vs timm
def _partition(x, w):
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def _merge(windows, w, B, H, W):
    C = windows.shape[-1]
    return windows.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [0, WIN // 2])
def test_window_attention_equals_timm_on_partitioned_windows(dtype, shift):
    B, H, W = 2, 8, 12
    torch.manual_seed(0)
    t_attn = _randomise(ts.WindowAttention(DIM, num_heads=HEADS, window_size=WIN)).to(dtype).eval()
    ours = _ours_from(t_attn, lambda: WindowAttention(DIM, HEADS, WIN, shift=shift))
    x = torch.randn(B, H, W, DIM, dtype=dtype)
    # timm's W-MSA / SW-MSA written out: roll, partition, attention with the
    # block's -100 region mask, merge, roll back.
    mask = ts.SwinTransformerBlock(DIM, (H, W), num_heads=HEADS, window_size=WIN, shift_size=shift).attn_mask
    rolled = torch.roll(x, (-shift, -shift), (1, 2)) if shift else x
    out = t_attn(_partition(rolled, WIN), mask=None if mask is None else mask.to(dtype))
    expected = _merge(out, WIN, B, H, W)
    if shift:
        expected = torch.roll(expected, (shift, shift), (1, 2))
    torch.testing.assert_close(ours(x), expected, **_tol(dtype))


def test_window_attention_passes_strided_views_to_the_op(monkeypatch):
    seen = {}
    real = swin.window_attention

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v, kwargs=kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(swin, "window_attention", spy)
    layer = WindowAttention(DIM, HEADS, WIN, shift=2)
    layer(torch.randn(2, 8, 8, DIM))
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.shape == (2, HEADS, 8, 8, DIM // HEADS)
    assert not q.is_contiguous() and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert seen["kwargs"]["window_size"] == WIN and seen["kwargs"]["shift"] == 2
    assert seen["kwargs"]["bias_table"] is layer.relative_position_bias_table


# ------------------------------------------------------------------ padding
@pytest.mark.parametrize("shift", [0, WIN // 2])
def test_padded_grid_is_pad_then_block(shift):
    """7 x 9 with w 4: SwinBlock pads the normalised tokens to 8 x 12, runs
    (shifted) window attention there and crops; the oracle is timm's
    attention on the padded 8 x 12 grid."""
    H, W, Hp, Wp = 7, 9, 8, 12
    t = _timm_block(Hp, Wp, shift, torch.float64)
    ours = _ours_from(t, lambda: SwinBlock(DIM, HEADS, WIN, shift_size=shift))
    x = torch.randn(2, H, W, DIM, dtype=torch.float64)
    h = F.pad(t.norm1(x), (0, 0, 0, Wp - W, 0, Hp - H))
    y = x + t._attn(h)[:, :H, :W]
    expected = y + t.mlp(t.norm2(y))
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
    t_small = _timm_block(H, W, shift, torch.float64)  # timm on 7 x 9: rolls, then pads
    if shift == 0:  # without a shift the two orders are the same computation
        torch.testing.assert_close(ours(x), t_small(x), rtol=1e-12, atol=1e-12)
    else:  # padded and shifted: the original Swin's order, not timm's
        assert (ours(x) - t_small(x)).abs().max() > 1e-3


def test_padded_grid_smaller_than_window_runs_unshifted():
    block = SwinBlock(DIM, HEADS, WIN, shift_size=2).double().eval()
    x = torch.randn(1, 3, 2, DIM, dtype=torch.float64)
    h = F.pad(block.norm1(x), (0, 0, 0, WIN - 2, 0, WIN - 3))
    y = x + block.attn(h, shift=0)[:, :3, :2]
    torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ merging, expanding, embedding
@pytest.mark.parametrize("out_dim", [None, 24])
def test_patch_merging_equals_timm(out_dim):
    torch.manual_seed(0)
    t = _randomise(ts.PatchMerging(16, out_dim=out_dim)).double()
    ours = _ours_from(t, lambda: PatchMerging(16, out_dim=out_dim))
    x = torch.randn(2, 8, 6, 16, dtype=torch.float64)
    g = torch.randn(2, 4, 3, out_dim or 32, dtype=torch.float64)
    y_t, gx_t = _forward_and_grad(t, x, g)
    y_o, gx_o = _forward_and_grad(ours, x, g)
    assert y_o.shape == (2, 4, 3, out_dim or 32)
    torch.testing.assert_close(y_o, y_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_o, gx_t, rtol=1e-12, atol=1e-12)


def test_patch_expanding_shapes_and_layout():
    assert PatchExpanding(32)(torch.randn(2, 3, 5, 32)).shape == (2, 6, 10, 16)
    assert PatchExpanding(32, out_dim=8)(torch.randn(2, 3, 5, 32)).shape == (2, 6, 10, 8)
    # With expand = identity (dim = 4 * out_dim) the layer is a depth-to-space
    # move: channel block (dr, dc) of token (i, j) lands at (2i + dr, 2j + dc).
    layer = PatchExpanding(12, out_dim=3).double()
    with torch.no_grad():
        layer.expand.weight.copy_(torch.eye(12, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 12, dtype=torch.float64)
    moved = torch.empty(2, 6, 8, 3, dtype=torch.float64)
    for dr in range(2):
        for dc in range(2):
            block = 2 * dr + dc
            moved[:, dr::2, dc::2] = x[..., 3 * block: 3 * block + 3]
    torch.testing.assert_close(layer(x), F.layer_norm(moved, (3,)), rtol=1e-12, atol=1e-12)


def test_patch_embed_equals_timm():
    torch.manual_seed(0)
    t = timm_layers.PatchEmbed(img_size=None, patch_size=4, in_chans=3, embed_dim=DIM,
                               norm_layer=torch.nn.LayerNorm, flatten=False, output_fmt="NHWC")
    _randomise(t)
    ours = _ours_from(t, lambda: PatchEmbed(4, 3, DIM))
    x = torch.randn(2, 3, 16, 24)
    assert ours(x).shape == (2, 4, 6, DIM)
    torch.testing.assert_close(ours(x), t(x))


def test_nearest_upsample():
    x = torch.randn(2, 3, 5, 7)
    expected = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
    assert torch.equal(NearestUpsample()(x), expected)
    assert NearestUpsample(3)(x).shape == (2, 9, 15, 7)


def test_stage_alternates_shift_and_drop_path():
    stage = SwinStage(DIM, 3, HEADS, WIN, drop_path=[0.0, 0.1, 0.2])
    assert [b.shift_size for b in stage.blocks] == [0, WIN // 2, 0]
    assert [b.drop_path1.p for b in stage.blocks] == [0.0, 0.1, 0.2]
    assert stage(torch.randn(1, 8, 8, DIM)).shape == (1, 8, 8, DIM)
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


# ------------------------------------------------------------------ torch.compile
def test_compiled_block_equals_eager():
    torch.manual_seed(0)
    block = _randomise(SwinBlock(DIM, HEADS, WIN, shift_size=WIN // 2)).eval()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 8, 12, DIM)
    g = torch.randn(2, 8, 12, DIM)
    results = []
    for module in (block, compiled):
        block.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = module(xr)
        y.backward(g)
        results.append((y.detach(), xr.grad, [p.grad.clone() for p in block.parameters()]))
    (y_e, gx_e, gp_e), (y_c, gx_c, gp_c) = results
    # float32 with fused kernels: rounding relative to each tensor's scale
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

    close(y_c, y_e)
    close(gx_c, gx_e)
    for a, b in zip(gp_c, gp_e):
        close(a, b)


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    with pytest.raises(ValueError, match="'dim' must be divisible by num_heads=3"):
        SwinBlock(32, 3, 4)
    with pytest.raises(ValueError, match=r"'shift_size' must be in \[0, window_size\) = \[0, 4\), got 4"):
        SwinBlock(32, 4, 4, shift_size=4)
    with pytest.raises(ValueError, match=r"'shift' must be in \[0, window_size\)"):
        WindowAttention(32, 4, 4, shift=5)
    with pytest.raises(ValueError, match="'window_size' must be an int in"):
        WindowAttention(32, 4, 0)
    with pytest.raises(ValueError, match=r"'x' must have shape \(B, H, W, 32\).*got \(2, 8, 8, 16\)"):
        SwinBlock(32, 4, 4)(torch.randn(2, 8, 8, 16))
    with pytest.raises(ValueError, match=r"\(B, H, W, 32\)"):
        WindowAttention(32, 4, 4)(torch.randn(2, 32, 8, 8))
    with pytest.raises(ValueError, match="multiple of window_size 4 in both axes, got 6 x 8"):
        WindowAttention(32, 4, 4)(torch.randn(2, 6, 8, 32))
    with pytest.raises(TypeError, match="floating-point"):
        SwinBlock(32, 4, 4)(torch.zeros(2, 8, 8, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="even sides, got 5 x 4"):
        PatchMerging(8)(torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="divisible by patch_size 4"):
        PatchEmbed(4, 3, 8)(torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        PatchEmbed(4, 3, 8)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="'drop_path' must be a number or 2 rates"):
        SwinStage(32, 2, 4, 4, drop_path=[0.1])
    with pytest.raises(ValueError, match="'p' must be a number in"):
        DropPath(1.0)
