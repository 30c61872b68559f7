"""MultiGrainedTransformer (Efficient-VQGAN's prior): config checks, the
network, MVTM training (seeded, and it learns real codes), block-by-block
sampling (the Ws = 1 and Ws = latent limits with their exact numbers of
forward passes), inpainting / outpainting / box edits (known codes never
change), labels, backends and save / load."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pyvq.models import (
    MultiGrainedTransformer,
    MultiGrainedTransformerConfig,
    Prior,
    box_keep,
    load_pretrained,
    mask_schedule,
    outpaint_keep,
)

pytestmark = pytest.mark.usefixtures("one_thread")

K = 32


def _model(**overrides) -> MultiGrainedTransformer:
    torch.manual_seed(0)
    base = dict(num_codes=K, latent_size=4, block_size=2, halo=1, width=32, depth=2, heads=2, mlp_ratio=2.0,
                dropout=0.0, steps_per_block=8)
    return MultiGrainedTransformer(MultiGrainedTransformerConfig(**{**base, **overrides}))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Passes:
    """Records the token map every forward pass reads (a pre-hook on the
    token embedding) and counts the passes (a hook on the output head)."""

    def __init__(self, model):
        self.inputs, self.count = [], 0
        self.handles = [model.token_embed.register_forward_pre_hook(lambda m, a: self.inputs.append(a[0].clone())),
                        model.head.register_forward_hook(lambda *a: self._count())]

    def _count(self):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("fields, match", [
    ({"latent_size": 12, "block_size": 8}, r"field 'latent_size' \(12 x 12\) must be a multiple of field "
                                           r"'block_size' \(8\)"),
    ({"latent_size": (8, 6), "block_size": 4}, r"'latent_size' \(8 x 6\) must be a multiple"),
    ({"width": 30, "heads": 4}, r"field 'width' \(30\) must be divisible by field 'heads' \(4\)"),
    ({"width": 1024, "heads": 2}, r"head dim\) must be at most 256, got 1024 / 2 = 512"),
    ({"num_codes": 1}, r"field 'num_codes' must be an int >= 2, got 1"),
    ({"halo": -1}, r"field 'halo' must be an int >= 0, got -1"),
    ({"block_size": 0}, r"field 'block_size' must be an int >= 1, got 0"),
    ({"dropout": 1.0}, r"field 'dropout' must be a number in \[0.0, 1.0\), got 1.0"),
    ({"label_dropout": 1.5}, r"field 'label_dropout' must be a number in \[0.0, 1.0\]"),
    ({"num_classes": -2}, r"field 'num_classes' must be an int >= 0"),
    ({"latent_size": "16"}, r"field 'latent_size' must be an int or an \(H, W\) pair of ints, got '16'"),
    ({"latent_size": (4, 0)}, r"field 'latent_size' must have sides >= 1"),
    ({"block_masking": 1}, r"field 'block_masking' must be a bool"),
    ({"temperature": -1.0}, r"field 'temperature' must be a number"),
])
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        MultiGrainedTransformerConfig(**fields)


def test_presets_and_prior_contract():
    c = MultiGrainedTransformer.from_preset("mgt_tiny").config
    assert (c.num_codes, c.latent_size, c.block_size, c.halo) == (256, 8, 2, 1)
    f16 = dataclasses.replace(MultiGrainedTransformerConfig())  # the f16 preset's defaults
    from pyvq.models import get_preset

    assert get_preset("mgt_f16_16x16") == f16 and (f16.num_codes, f16.latent_size, f16.block_size, f16.halo,
                                                   f16.width, f16.depth, f16.heads) == (1024, 16, 8, 2, 512, 12, 8)
    assert get_preset("mgt_32x32").latent_size == 32 and get_preset("mgt_64x64").latent_size == 64
    assert get_preset("mgt_64x64").num_blocks == 64
    with torch.device("meta"):
        big = MultiGrainedTransformer.from_preset("mgt_f16_16x16")
    assert sum(p.numel() for p in big.parameters()) == 81_011_712
    m = _model()
    assert isinstance(m, Prior) and m.code_kind == "indices" and m.code_shape == (4, 4) and m.mask_id == K
    with pytest.raises(ValueError, match=r"argument 'codes' must hold codes in \[0, 32\), got values in \[32, 32\]"):
        m.training_loss(torch.full((1, 4, 4), K))
    with pytest.raises(ValueError, match=r"argument 'codes' must have shape \(B, 4, 4\)"):
        m.training_loss(torch.zeros(1, 4, 5, dtype=torch.long))


# ---------------------------------------------------------------- network
def test_logits_shapes_labels_and_errors():
    m = _model()
    tokens = torch.randint(0, K + 1, (3, 4, 4), generator=_gen())
    assert m.logits(tokens).shape == (3, 4, 4, K)
    with pytest.raises(ValueError, match=r"'labels' was given but the model is unconditional"):
        m.logits(tokens, labels=1)
    with pytest.raises(ValueError, match=r"argument 'tokens' must hold codes in \[0, 32\) or the mask index 32"):
        m.logits(tokens + 1)
    c = _model(num_classes=3)
    assert len(c.layers) == 2 and c.class_embed.num_embeddings == 4
    a, b = c.logits(tokens, labels=0), c.logits(tokens, labels=torch.tensor([1, 1, 1]))
    assert a.shape == (3, 4, 4, K) and not torch.allclose(a, b)  # the class token reaches every position
    assert torch.equal(c.logits(tokens), c.logits(tokens, labels=3))  # None = the null class 3
    with pytest.raises(ValueError, match=r"'labels' must hold classes in \[0, 3\] \(3 = the null class\)"):
        c.logits(tokens, labels=4)
    with pytest.raises(ValueError, match=r"'labels' must be an int or have shape \(3,\), got \(2,\)"):
        c.logits(tokens, labels=torch.tensor([0, 1]))
    # non-square grids
    r = _model(latent_size=(4, 6))
    assert r.logits(torch.zeros(2, 4, 6, dtype=torch.long)).shape == (2, 4, 6, K)
    assert r.sample(1, steps_per_block=1, generator=_gen()).shape == (1, 4, 6)


def test_global_attention_baseline_is_the_op_with_a_covering_halo():
    """``global_attention=True`` (plain SDPA over every token and the globals)
    computes what the op computes when the halo covers the whole grid."""
    op = _model(halo=4)
    dense = _model(halo=4, global_attention=True)
    dense.load_state_dict(op.state_dict())
    tokens = torch.randint(0, K + 1, (2, 4, 4), generator=_gen(1))
    torch.testing.assert_close(dense.logits(tokens), op.logits(tokens), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_model(halo=0).logits(tokens), op.logits(tokens), atol=1e-4)


def test_kernel_and_reference_backends_give_the_same_logits(monkeypatch):
    m = _model(latent_size=8, halo=2)
    tokens = torch.randint(0, K + 1, (2, 8, 8), generator=_gen(2))
    kernel = m.logits(tokens)
    monkeypatch.setenv("PYVQ_BACKEND", "reference")
    torch.testing.assert_close(kernel, m.logits(tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training
def test_training_mask_follows_the_cosine_schedule_and_masks_whole_blocks():
    B, N = 64, 16
    plain = _model(block_masking=False)
    base = plain.training_mask(B, _gen(3))
    r = torch.rand(B, generator=_gen(3)).double()  # the first draw
    assert torch.equal(base.flatten(1).sum(1), torch.ceil(torch.cos(math.pi / 2 * r) * N).clamp(1, N).long())
    mask = _model().training_mask(B, _gen(3))
    assert bool((mask | ~base).all())  # block masking only adds masked tokens (same token draws)
    blocks = mask.view(B, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, 4, 4)  # (B, block, token)
    extra = (mask & ~base).view(B, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, 4, 4).any(-1)
    assert bool(blocks.all(-1)[extra].all())  # an added token belongs to a wholly masked block
    assert bool(extra.any())  # ... and some were added
    # MaskGIT alone for a single block (G = 1: m ~ U{0} masks no block)
    one = _model(block_size=4)
    assert torch.equal(one.training_mask(B, _gen(3)), base)


def test_training_loss_is_seeded_and_differentiable():
    m = _model()
    codes = torch.randint(0, K, (4, 4, 4), generator=_gen(4))
    a, logs = m.training_loss(codes, _gen(5))
    b, _ = m.training_loss(codes, _gen(5))
    c, _ = m.training_loss(codes, _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(logs) == {"train/ce", "train/accuracy", "train/mask_ratio"} and 0 < logs["train/mask_ratio"] <= 1
    assert abs(a.item() - math.log(K)) < 0.5  # near-uniform predictions at initialisation
    a.backward()
    assert m.token_embed.weight.grad is not None and m.global_conv.weight.grad.abs().sum() > 0
    assert torch.equal(m(codes, _gen(5))[0], b)  # forward is training_loss


def test_label_dropout_replaces_labels_by_the_null_class_in_training():
    codes = torch.randint(0, K, (4, 4, 4), generator=_gen(7))
    labels = torch.tensor([0, 1, 2, 0])
    always = _model(num_classes=3, label_dropout=1.0)
    null = always.training_loss(codes, _gen(8))[0]
    assert torch.equal(always.training_loss(codes, _gen(8), labels=labels)[0], null)
    always.eval()  # no label dropout outside training
    assert not torch.equal(always.training_loss(codes, _gen(8), labels=labels)[0], null)
    never = _model(num_classes=3, label_dropout=0.0)
    assert not torch.equal(never.training_loss(codes, _gen(8), labels=labels)[0], null)


@pytest.fixture(scope="module")
def real_codes(skimage_patches):
    """8 x 8 codes of the 16 skimage tiles and their flips / transposes
    (K = 256) from a vqgan_tiny trained for a few steps on them."""
    from pyvq.models import VQGAN

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tok = VQGAN.from_preset("vqgan_tiny")
        x = skimage_patches * 2 - 1
        opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
        for _ in range(15):
            out = tok(x)
            loss = (out.x_rec - x).abs().mean() + out.aux.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        views = [x, x.flip(-1), x.transpose(-1, -2), x.flip(-2)]
        with torch.no_grad():
            codes = torch.cat([tok.encode(v)[1] for v in views])  # (64, 8, 8)
    finally:
        torch.set_num_threads(n)
    return codes


def test_training_lowers_masked_token_ce_on_real_codes(real_codes):
    held = torch.arange(len(real_codes)) % 16 >= 12  # the rocket tiles (and their views) are held out
    train, test = real_codes[~held], real_codes[held]
    m = MultiGrainedTransformer.from_preset("mgt_tiny", num_codes=256)

    def held_out_ce():
        with torch.no_grad():
            return sum(m.training_loss(test, _gen(100 + i))[0].item() for i in range(4)) / 4

    before = held_out_ce()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = _gen(9)
    for step in range(60):
        batch = train[torch.randint(0, len(train), (16,), generator=g)]
        loss, _ = m.training_loss(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_ce()
    assert after < before - 0.5, (before, after)


# ---------------------------------------------------------------- sampling
def test_mask_schedule():
    for num, steps in ((64, 8), (4, 4), (16, 5), (64, 64), (1, 1), (9, 3)):
        s = mask_schedule(num, steps)
        assert len(s) == steps and s[-1] == 0
        assert all(a > b for a, b in zip([num] + s, s))  # every step decodes at least one token
    # where the plain formula decreases it is the formula
    assert mask_schedule(64, 8) == [math.floor(64 * math.cos(math.pi / 2 * (t + 1) / 8)) for t in range(8)]
    assert mask_schedule(64, 64)[:2] == [63, 62]  # floor(64 cos(pi/128)) = 63, then 63 again -> 62


def test_autoregressive_limit_one_token_per_pass_in_raster_order():
    m = _model(block_size=1, halo=1)
    rec = _Passes(m)
    out = m.sample(2, steps_per_block=8, generator=_gen(10))
    rec.close()
    assert rec.count == 16 and out.shape == (2, 4, 4) and out.dtype == torch.int64
    assert int(out.min()) >= 0 and int(out.max()) < K
    for i, tokens in enumerate(rec.inputs):  # pass i sees tokens 0..i-1 decoded, i.. masked
        masked = (tokens == m.mask_id).flatten(1)
        assert bool(masked[:, i:].all()) and not bool(masked[:, :i].any())


def test_maskgit_limit_whole_grid_in_t_passes():
    m = _model(block_size=4, halo=0)
    rec = _Passes(m)
    m.sample(3, steps_per_block=5, generator=_gen(11))
    rec.close()
    assert rec.count == 5
    still = [int((t == m.mask_id)[0].sum()) for t in rec.inputs]
    assert still == [16] + mask_schedule(16, 5)[:-1]


@pytest.mark.parametrize("ws, steps, passes", [(2, 8, 16), (2, 2, 8), (2, 3, 12), (1, 3, 16), (4, 20, 16)])
def test_number_of_passes_is_blocks_times_min_steps_and_block_size(ws, steps, passes):
    m = _model(block_size=ws)
    rec = _Passes(m)
    out = m.sample(1, steps_per_block=steps, generator=_gen(12))
    rec.close()
    assert rec.count == passes == (16 // ws**2) * min(steps, ws * ws)
    assert not bool((out == m.mask_id).any())


def test_blocks_are_decoded_one_after_another_in_the_order():
    m = _model(latent_size=(4, 6))  # 2 x 3 blocks
    for order, expect in (("raster", [0, 1, 2, 3, 4, 5]), ("center_out", [1, 4, 0, 2, 3, 5]), ("random", None)):
        rec = _Passes(m)
        out = m.sample(1, steps_per_block=4, order=order, generator=_gen(13))
        rec.close()
        maps = rec.inputs + [out]
        assert len(rec.inputs) == 24
        per_pass = []
        for before, after in zip(maps, maps[1:]):  # the block each pass wrote into: exactly one
            changed = (before != after)[0].view(2, 2, 3, 2).permute(0, 2, 1, 3).reshape(6, 4).any(-1)
            assert int(changed.sum()) == 1
            per_pass.append(int(changed.nonzero()))
        runs = [per_pass[i] for i in range(0, 24, 4)]
        assert per_pass == [b for b in runs for _ in range(4)] and sorted(runs) == list(range(6))
        if expect is not None:
            assert runs == expect, order


def test_sampling_is_seeded_and_temperature_zero_is_greedy():
    m = _model()
    a = m.sample(2, generator=_gen(14))
    assert torch.equal(a, m.sample(2, generator=_gen(14)))
    assert not torch.equal(a, m.sample(2, generator=_gen(15)))
    g0 = m.sample(2, temperature=0.0, generator=_gen(1))
    assert torch.equal(g0, m.sample(2, temperature=0.0, generator=_gen(2)))  # no draw decides anything
    noisy = m.sample(2, temperature=0.0, choice_temperature=4.5, generator=_gen(1))
    assert noisy.shape == (2, 4, 4)
    assert torch.equal(m.sample(2, steps=3, generator=_gen(3)), m.sample(2, steps_per_block=3, generator=_gen(3)))
    with pytest.raises(ValueError, match=r"'steps' \(2\) and 'steps_per_block' \(3\) disagree"):
        m.sample(1, steps=2, steps_per_block=3)
    with pytest.raises(ValueError, match=r"argument 'order' must be one of"):
        m.sample(1, order="spiral")
    with pytest.raises(ValueError, match=r"'guidance_scale' must be 1.0 for an unconditional model"):
        m.sample(1, guidance_scale=2.0)
    assert m.training  # sampling restored the mode


def test_guidance_batches_both_inputs_into_one_pass():
    m = _model(num_classes=3)
    rec = _Passes(m)
    out = m.sample(2, labels=1, guidance_scale=3.0, steps_per_block=2, generator=_gen(16))
    rec.close()
    assert rec.count == 8 and rec.inputs[0].shape[0] == 4 and out.shape == (2, 4, 4)


# ---------------------------------------------------------------- editing
def test_inpaint_keeps_known_codes_exactly_and_skips_known_blocks():
    m = _model(latent_size=8)
    codes = torch.randint(0, K, (3, 8, 8), generator=_gen(17))
    keep = torch.rand(3, 8, 8, generator=_gen(18)) < 0.6
    rec = _Passes(m)
    out = m.inpaint(codes, keep, generator=_gen(19))
    rec.close()
    assert torch.equal(out[keep], codes[keep]) and not bool((out == m.mask_id).any())
    assert all(torch.equal(t[keep], codes[keep]) for t in rec.inputs)  # known codes are input from the start
    # one unknown block of 3 codes: min(8, 3) passes; nothing unknown: no pass
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2, 4], keep[3, 4], keep[3, 5] = False, False, False
    rec = _Passes(m)
    out = m.inpaint(codes, keep, generator=_gen(20))
    assert rec.count == 3 and torch.equal(out[:, keep], codes[:, keep])
    assert torch.equal(m.inpaint(codes, torch.ones(8, 8, dtype=torch.bool)), codes) and rec.count == 3
    rec.close()
    with pytest.raises(ValueError, match=r"argument 'keep' must broadcast"):
        m.inpaint(codes, torch.ones(4, 4, dtype=torch.bool))


def test_inpaint_is_conditioned_on_the_known_codes():
    """The prediction at an unknown position depends on its known neighbours."""
    m = _model(latent_size=8)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[3:5, 3:5] = False
    a = torch.randint(0, K, (1, 8, 8), generator=_gen(21))
    b = a.clone()
    b[0, 2] = (b[0, 2] + 1) % K  # a known row next to the hole
    ta, tb = (torch.where(keep, x, m.mask_id) for x in (a, b))
    assert not torch.allclose(m.logits(ta)[0, 3:5, 3:5], m.logits(tb)[0, 3:5, 3:5])


def test_outpaint_and_edit_box():
    m = _model(latent_size=8, num_classes=3)
    codes = torch.randint(0, K, (2, 8, 8), generator=_gen(22))
    keep = outpaint_keep(8, 2)
    assert keep.sum() == 16 and bool(keep[2:6, 2:6].all())
    out = m.outpaint(codes, 2, order="center_out", generator=_gen(23))
    assert torch.equal(out[:, keep], codes[:, keep]) and not torch.equal(out, codes)
    assert torch.equal(outpaint_keep((8, 6), (1, 0, 2, 3))[1:6, :3], torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'border' \(4, 4, 4, 4\) leaves no known centre"):
        outpaint_keep(8, 4)

    box = (1, 2, 5, 7)  # rows 1..4, columns 2..6
    inside = ~box_keep(8, box)
    assert inside.sum() == 4 * 5 and bool(inside[1:5, 2:7].all())
    edited = m.edit_box(codes, box, label=2, generator=_gen(24))
    assert torch.equal(edited[:, ~inside], codes[:, ~inside])  # only the box changes
    assert not torch.equal(edited[:, inside], codes[:, inside])
    same_seed = m.inpaint(codes, box_keep(8, box), labels=2, generator=_gen(24))
    assert torch.equal(edited, same_seed)
    with pytest.raises(ValueError, match=r"'box' \(y0, x0, y1, x1\) must satisfy 0 <= y0 < y1 <= 8"):
        m.edit_box(codes, (3, 0, 3, 2), label=1)
    with pytest.raises(ValueError, match=r"'labels' was given but the model is unconditional"):
        _model(latent_size=8).edit_box(codes, box, label=1)


# ---------------------------------------------------------------- save / load
def test_save_pretrained_round_trip(tmp_path):
    m = _model(latent_size=(4, 6), num_classes=2)
    m.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    assert type(back) is MultiGrainedTransformer and back.config == m.config and back.config.latent_size == (4, 6)
    tokens = torch.randint(0, K + 1, (2, 4, 6), generator=_gen(25))
    assert torch.equal(back.logits(tokens, labels=1), m.eval().logits(tokens, labels=1))
    assert torch.equal(MultiGrainedTransformer.from_pretrained(tmp_path).sample(1, generator=_gen(26)),
                       m.sample(1, generator=_gen(26)))
