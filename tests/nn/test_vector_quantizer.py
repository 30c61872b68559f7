"""pyvq.nn.VectorQuantizer: shapes, straight-through, losses, EMA, usage,
dead-code restart, backends, torch.compile, state_dict, distributed, and a
few training steps on real images."""

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyvq
from pyvq.nn import QuantizerOutput, VectorQuantizer, code_usage_stats


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _vq(num_codes=16, dim=4, seed=0, **kw):
    vq = VectorQuantizer(num_codes, dim, **kw)
    vq.load_codebook(torch.randn(num_codes, dim, generator=_gen(seed)))
    return vq


def _ref_assign(flat, codebook):
    """Nearest codes by the plain-PyTorch reference op."""
    return pyvq.reference.nearest_code(flat, codebook)[0]


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "shape, index_shape",
    [
        ((2, 4, 5, 6), (2, 5, 6)),  # channels-first image latents
        ((3, 7, 4), (3, 7)),  # channels-last sequence
        ((10, 4), (10,)),
        ((2, 3, 2, 1, 4), (2, 3, 2, 1)),
    ],
)
def test_shapes(shape, index_shape):
    vq = _vq()
    z = torch.randn(shape, generator=_gen(1))
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape and out.z_q.dtype == z.dtype
    assert out.indices.shape == index_shape and out.indices.dtype == torch.long
    assert out.loss.dim() == 0 and out.perplexity.dim() == 0 and out.usage.dim() == 0
    # every position's z_q is the code its index names
    ch = 1 if z.dim() == 4 else -1
    zq_last = out.z_q.movedim(ch, -1)
    torch.testing.assert_close(zq_last, vq.codebook.detach()[out.indices])


def test_channels_first_matches_channels_last():
    vq = _vq()
    z = torch.randn(2, 4, 3, 5, generator=_gen(2))
    a = vq(z)
    b = vq(z.permute(0, 2, 3, 1).reshape(2, 15, 4))
    assert torch.equal(a.indices.reshape(2, 15), b.indices)
    torch.testing.assert_close(a.z_q.permute(0, 2, 3, 1).reshape(2, 15, 4), b.z_q)
    torch.testing.assert_close(a.loss, b.loss)


# ----------------------------------------------------------- gradients/loss
def test_straight_through_gradient():
    vq = _vq()
    z = torch.randn(2, 4, 3, 3, generator=_gen(3), requires_grad=True)
    g = torch.randn(2, 4, 3, 3, generator=_gen(4))
    out = vq(z)
    out.z_q.backward(g)
    assert torch.equal(z.grad, g)
    assert vq.codebook.grad is None  # z_q's value is detached from the codebook


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_loss_matches_formula(beta):
    vq = _vq(beta=beta)
    z = torch.randn(3, 6, 4, generator=_gen(5), requires_grad=True)
    out = vq(z)
    cb = vq.codebook.detach()
    idx = _ref_assign(z.detach().reshape(-1, 4), cb).reshape(3, 6)
    assert torch.equal(out.indices, idx)
    q = cb[idx]
    diff2 = (z.detach() - q).pow(2)
    expected = diff2.mean() + beta * diff2.mean()
    torch.testing.assert_close(out.loss, expected)

    out.loss.backward()
    # d/dz of beta * mean((z - sg q)^2); d/dc of mean((c - sg z)^2), summed per code
    n = z.numel()
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - q) / n)
    expected_cb = torch.zeros_like(cb).index_add_(0, idx.reshape(-1), (2 * (q - z.detach()) / n).reshape(-1, 4))
    torch.testing.assert_close(vq.codebook.grad, expected_cb)


def test_ema_loss_is_commitment_only_and_codebook_has_no_grad():
    vq = _vq(ema=True, beta=0.5)
    assert "codebook" not in dict(vq.named_parameters())
    assert "codebook" in dict(vq.named_buffers())
    vq.eval()
    z = torch.randn(20, 4, generator=_gen(6), requires_grad=True)
    out = vq(z)
    q = vq.codebook[_ref_assign(z.detach(), vq.codebook)]
    torch.testing.assert_close(out.loss, 0.5 * (z.detach() - q).pow(2).mean())


# ---------------------------------------------------------------------- EMA
def test_ema_step_matches_hand_computation():
    decay, eps = 0.9, 1e-3
    vq = _vq(num_codes=5, dim=3, seed=7, ema=True, decay=decay, eps=eps)
    c0 = vq.codebook.clone()
    z = torch.randn(40, 3, generator=_gen(8)) * 1.5
    vq.train()
    out = vq(z)

    idx = _ref_assign(z, c0)
    assert torch.equal(out.indices, idx)
    counts = torch.zeros(5)
    sums = torch.zeros(5, 3)
    for i, j in enumerate(idx.tolist()):
        counts[j] += 1
        sums[j] += z[i]
    size = decay * torch.ones(5) + (1 - decay) * counts
    embed = decay * c0 + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + 5 * eps) * n
    torch.testing.assert_close(vq.cluster_size, size)
    torch.testing.assert_close(vq.embed_sum, embed)
    torch.testing.assert_close(vq.codebook, embed / smoothed[:, None])
    assert torch.equal(vq.code_usage, counts.long())


def test_ema_moves_codes_toward_assigned_means():
    vq = _vq(num_codes=8, dim=2, seed=9, ema=True, decay=0.8)
    z = torch.randn(500, 2, generator=_gen(10)) * 3
    c0 = vq.codebook.clone()
    idx = _ref_assign(z, c0)
    used = torch.unique(idx)
    means = torch.stack([z[idx == j].mean(0) for j in used.tolist()])
    before = (c0[used] - means).norm(dim=1)
    vq.train()
    vq(z)
    after = (vq.codebook[used] - means).norm(dim=1)
    assert (after < before).all()
    # repeated steps on the same batch: codes converge to the means
    for _ in range(60):
        vq(z)
    idx2 = _ref_assign(z, vq.codebook)
    for j in torch.unique(idx2).tolist():
        torch.testing.assert_close(vq.codebook[j], z[idx2 == j].mean(0), atol=5e-2, rtol=0)


def test_eval_mode_changes_nothing():
    vq = _vq(ema=True, restart_dead_codes=True)
    vq.cluster_size.zero_()  # every code "dead"
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(30, 4, generator=_gen(11)))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


# ----------------------------------------------------------- usage / dead
def test_perplexity_and_usage_hand_built():
    vq = VectorQuantizer(4, 4)
    vq.load_codebook(torch.eye(4) * 10)
    # two vectors near code 0, one near code 1, one near code 2, none near 3
    z = torch.eye(4)[[0, 0, 1, 2]] * 9 + 0.1
    out = vq.eval()(z)
    assert out.indices.tolist() == [0, 0, 1, 2]
    # p = (1/2, 1/4, 1/4, 0): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert math.isclose(float(out.perplexity), 2**1.5, rel_tol=1e-6)
    assert math.isclose(float(out.usage), 0.75, rel_tol=1e-6)
    p, u = code_usage_stats(torch.tensor([3, 3, 3]), 4)
    assert math.isclose(float(p), 1.0, rel_tol=1e-6) and math.isclose(float(u), 0.25)
    p, u = code_usage_stats(torch.arange(8) % 4, 4)
    assert math.isclose(float(p), 4.0, rel_tol=1e-6) and float(u) == 1.0


def test_code_usage_accumulates_over_steps():
    vq = VectorQuantizer(4, 4)
    vq.load_codebook(torch.eye(4) * 10)
    z = torch.eye(4)[[0, 0, 1, 2]] * 9
    vq.train()
    vq(z)
    vq(z[:1])
    assert vq.code_usage.tolist() == [3, 1, 1, 0]
    assert vq.usage_fraction() == 0.75
    vq.reset_usage()
    assert vq.code_usage.sum() == 0


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_restart_replaces_unused_code(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, ema=ema, restart_dead_codes=True, dead_code_threshold=1.0)
    live = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    far = torch.tensor([100.0, 100.0])
    vq.load_codebook(torch.cat([live, far[None]]))
    z = torch.randn(64, 2, generator=_gen(12))
    vq.train()
    first = vq(z)
    assert not (first.indices == 3).any()
    # code 3 was unused: its cluster size decayed below the threshold, but it
    # is only replaced at the next training step
    assert vq.cluster_size[3] < 1.0 and vq.cluster_size[:3].min() >= 1.0
    torch.testing.assert_close(vq.codebook[3].detach(), far, atol=1e-3, rtol=0)  # (EMA smoothing)
    out = vq(z)  # restarted from this batch, before the lookup
    new = vq.codebook[3].detach()
    gap = (z - new).norm(dim=1).min()
    if ema:
        # restarted at a batch vector, then moved by one EMA step toward the
        # mean of the vectors it attracted: still next to that vector
        assert gap < 0.1
    else:
        assert gap == 0
        torch.testing.assert_close(vq.codebook[:3].detach(), live)  # live codes untouched
    assert (out.indices == 3).any()  # the new code is used at once


def test_no_restart_when_disabled():
    vq = VectorQuantizer(4, 2, restart_dead_codes=False)
    far = torch.tensor([100.0, 100.0])
    vq.load_codebook(torch.cat([torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), far[None]]))
    z = torch.randn(64, 2, generator=_gen(12))
    vq.train()
    for _ in range(3):
        vq(z)
    assert torch.equal(vq.codebook[3].detach(), far)


def test_restart_with_fewer_vectors_than_dead_codes():
    vq = _vq(num_codes=16, dim=4, restart_dead_codes=True)
    vq.cluster_size.zero_()
    z = torch.randn(3, 4, generator=_gen(13))
    vq.train()
    vq(z)
    # every code is now one of the 3 batch vectors
    d = (vq.codebook.detach()[:, None] - z[None]).abs().sum(-1).min(1).values
    assert (d == 0).all()


# -------------------------------------------------------------- l2 normalize
def test_l2_normalize_uses_cosine_lookup():
    vq = _vq(num_codes=32, dim=8, seed=14, l2_normalize=True)
    z = torch.randn(4, 8, 3, 3, generator=_gen(15)) * 5
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    idx = pyvq.reference.nearest_code(flat, vq.codebook.detach(), metric="cosine")[0]
    assert torch.equal(out.indices.reshape(-1), idx)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(4, 3, 3))
    torch.testing.assert_close(vq.codes_from_indices(out.indices), out.z_q)
    zn = F.normalize(flat, dim=1)
    qn = F.normalize(vq.codebook.detach(), dim=1)[idx]
    torch.testing.assert_close(out.loss, 1.25 * (zn - qn).pow(2).mean())


# ------------------------------------------------------------------ errors
def test_non_finite_input_raises():
    vq = _vq()
    z = torch.randn(2, 4, 3, 3)
    z[0, 1, 2, 2] = float("nan")
    z[1, 0, 0, 0] = float("inf")
    z[1, 3, 1, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"'z' contains 3 non-finite"):
        vq(z)
    VectorQuantizer(16, 4, check_finite=False).eval()(z)  # opt-out: no raise


def test_wrong_channel_size_raises():
    vq = _vq()
    with pytest.raises(ValueError, match=r"'z' must have 4 channels.*channel size 5"):
        vq(torch.randn(2, 5, 3, 3))
    # a 4-D input is read channels-first, even when its last size is dim
    with pytest.raises(ValueError, match=r"'z' must have 4 channels in layout \(B, dim, H, W\)"):
        vq(torch.randn(2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"'z' must have 4 channels"):
        vq(torch.randn(7, 5))
    with pytest.raises(TypeError, match="'z'"):
        vq(torch.ones(7, 4, dtype=torch.long))


def test_bad_constructor_and_load_codebook():
    with pytest.raises(ValueError, match="'num_codes'"):
        VectorQuantizer(0, 4)
    with pytest.raises(ValueError, match="'dim'"):
        VectorQuantizer(4, 0)
    with pytest.raises(ValueError, match="'decay'"):
        VectorQuantizer(4, 4, decay=1.5)
    vq = VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match=r"'codebook'.*\(4, 3\)"):
        vq.load_codebook(torch.randn(5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        vq.load_codebook(torch.full((4, 3), float("nan")))


# ------------------------------------------------------ round trips/backends
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (6, 4), (2, 3, 4)])
def test_codes_from_indices_round_trip(shape):
    vq = _vq()
    z = torch.randn(shape, generator=_gen(16))
    out = vq(z)
    codes = vq.codes_from_indices(out.indices)
    assert codes.shape == z.shape
    torch.testing.assert_close(codes, out.z_q.detach())
    # quantising the codes again gives the same indices
    assert torch.equal(vq(codes.detach()).indices, out.indices)


@pytest.mark.parametrize("kw", [{}, {"l2_normalize": True}, {"ema": True}])
def test_kernel_and_reference_backends_agree(monkeypatch, kw):
    z0 = torch.randn(2, 4, 6, 6, generator=_gen(17))
    results = []
    for backend in ("kernel", "reference"):
        monkeypatch.setenv("PYVQ_BACKEND", backend)
        vq = _vq(num_codes=32, **kw).train()
        z = z0.clone().requires_grad_(True)
        out = vq(z)
        (out.loss + out.z_q.square().mean()).backward()
        results.append((out, z.grad, vq.codebook.grad, vq.codebook.detach().clone()))
    (a, ga, gca, ca), (b, gb, gcb, cb) = results
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.z_q, b.z_q)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)
    if gca is not None:
        torch.testing.assert_close(gca, gcb)
    torch.testing.assert_close(ca, cb)


def test_torch_compile_fullgraph_eval_matches_eager():
    torch._dynamo.reset()
    vq = _vq(num_codes=32, dim=4, seed=18).eval()
    compiled = torch.compile(vq, fullgraph=True)
    z = torch.randn(2, 4, 5, 5, generator=_gen(19))
    eager, comp = vq(z), compiled(z)
    assert torch.equal(eager.indices, comp.indices)
    for name in ("z_q", "loss", "perplexity", "usage"):
        torch.testing.assert_close(getattr(comp, name), getattr(eager, name))
    # channels-last input, l2-normalised codebook
    vq2 = _vq(num_codes=32, dim=4, seed=20, l2_normalize=True).eval()
    z2 = torch.randn(3, 7, 4, generator=_gen(21))
    e2, c2 = vq2(z2), torch.compile(vq2, fullgraph=True)(z2)
    assert torch.equal(e2.indices, c2.indices)
    torch.testing.assert_close(c2.z_q, e2.z_q)
    torch.testing.assert_close(c2.loss, e2.loss)


@pytest.mark.parametrize("ema", [False, True])
def test_state_dict_round_trip(ema):
    vq = _vq(num_codes=8, dim=4, ema=ema).train()
    for s in range(3):
        vq(torch.randn(50, 4, generator=_gen(30 + s)))
    buf = io.BytesIO()
    torch.save(vq.state_dict(), buf)
    buf.seek(0)
    other = VectorQuantizer(8, 4, ema=ema)
    other.load_state_dict(torch.load(buf))
    for (k, v), (k2, v2) in zip(vq.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    z = torch.randn(2, 4, 3, 3, generator=_gen(40))
    a, b = vq.eval()(z), other.eval()(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q)


def test_half_input():
    vq = _vq(num_codes=16, dim=4)
    z = torch.randn(2, 4, 3, 3, generator=_gen(41)).half()
    out = vq(z)
    assert out.z_q.dtype == torch.float16 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, vq(z.float()).indices)


# --------------------------------------------------------------- distributed
def _dist_worker(rank, world, init_file, out_dir, z_full, codebook):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z = z_full.chunk(world)[rank]
        ema = VectorQuantizer(codebook.shape[0], codebook.shape[1], ema=True, decay=0.9).train()
        ema.load_codebook(codebook)
        ema(z)
        torch.manual_seed(100 + rank)  # different local RNGs: broadcast must win
        rs = VectorQuantizer(codebook.shape[0], codebook.shape[1], restart_dead_codes=True).train()
        rs.load_codebook(codebook)
        rs.cluster_size[-1] = 0.0  # last code dead
        rs(z)
        torch.save(
            {
                "ema_codebook": ema.codebook, "ema_size": ema.cluster_size, "usage": ema.code_usage,
                "restart_codebook": rs.codebook.detach(), "z": z,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_distributed_statistics_are_all_reduced(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    z_full = torch.randn(40, 3, generator=_gen(50))
    codebook = torch.randn(6, 3, generator=_gen(51))
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), z_full, codebook), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    single = VectorQuantizer(6, 3, ema=True, decay=0.9).train()
    single.load_codebook(codebook)
    single(z_full)
    for r in (r0, r1):
        torch.testing.assert_close(r["ema_codebook"], single.codebook)
        torch.testing.assert_close(r["ema_size"], single.cluster_size)
        assert torch.equal(r["usage"], single.code_usage)
    # restarted code: identical on both ranks, and taken from rank 0's batch
    assert torch.equal(r0["restart_codebook"], r1["restart_codebook"])
    assert torch.equal(r0["restart_codebook"][:-1], codebook[:-1])
    assert (r0["z"] - r0["restart_codebook"][-1]).abs().sum(1).min() == 0


# ------------------------------------------------------ training on images
class _TinyVQAE(nn.Module):
    def __init__(self, num_codes=32, dim=8):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, dim, 4, stride=2, padding=1)
        )
        self.quantizer = VectorQuantizer(num_codes, dim, beta=0.25)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(dim, 16, 4, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1)
        )

    def forward(self, x):
        out = self.quantizer(self.encoder(x))
        return self.decoder(out.z_q), out


def test_training_steps_lower_reconstruction_loss(skimage_patches):
    torch.manual_seed(0)
    model = _TinyVQAE()
    x = skimage_patches
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def recon():
        with torch.no_grad():
            model.eval()
            r = F.mse_loss(model(x)[0], x).item()
            model.train()
            return r

    start = recon()
    for _ in range(40):
        rec, out = model(x)
        loss = F.mse_loss(rec, x) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = recon()
    assert end < 0.5 * start, (start, end)
    assert model.quantizer.codebook.grad is not None
