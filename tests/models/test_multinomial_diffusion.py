"""VQ-DDM multinomial diffusion prior: the forward process, the bound's terms
against a float64 hand computation, the importance sampler, learning on
structured codes, sampling / inpainting, the likelihood, kernel vs
reference backends, save/load, presets (big ones on the meta device) and
argument errors. Tiny models: K = 8, 8x8 codes, T = 10."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pyvq.models import get_preset, list_presets, load_pretrained
from pyvq.models.priors.multinomial import (
    MultinomialDiffusion,
    MultinomialDiffusionConfig,
    second_moment_probs,
    uniform_prior_kl,
)
from pyvq.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

K, S, T = 8, 8, 10


def small_config(**overrides) -> MultinomialDiffusionConfig:
    base = dict(num_classes=K, code_size=S, timesteps=T, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_groups=8, num_heads=2)
    base.update(overrides)
    return MultinomialDiffusionConfig(**base)


def small(seed: int = 0, randomize_out: bool = True, **overrides) -> MultinomialDiffusion:
    """A small model; the UNet's zero-initialised output conv is given
    random weights so the model is not the trivial "z_0 = z_t" predictor."""
    torch.manual_seed(seed)
    model = MultinomialDiffusion(small_config(**overrides))
    if randomize_out:
        with torch.no_grad():
            model.net.conv_out.weight.normal_(0, 0.05)
            model.net.conv_out.bias.normal_(0, 0.1)
    return model


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def codes_batch(B: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K, (B, S, S), generator=gen(seed))


def patterns() -> torch.Tensor:
    """(8, S, S) structured code maps: stripes and diagonals in two phases,
    a checkerboard and a constant map."""
    i = torch.arange(S).view(S, 1).expand(S, S)
    j = torch.arange(S).view(1, S).expand(S, S)
    maps = []
    for shift in (0, 3):
        maps += [(i + shift) % K, (j + shift) % K, (i + j + shift) % K]
    maps += [((i + j) % 2) * 5, torch.full((S, S), 6)]
    return torch.stack(maps).long()


def hand_kl(z_t, z0, logits, alpha_t: float, abar_prev: float) -> torch.Tensor:
    """Mean over positions of KL(q(z_{t-1}|z_t,z_0) || p(z_{t-1}|z_t)) from
    the definition, float64, (B,)."""
    oh_t = F.one_hot(z_t, K).permute(0, 3, 1, 2).double()
    oh_0 = F.one_hot(z0, K).permute(0, 3, 1, 2).double()
    f = alpha_t * oh_t + (1 - alpha_t) / K
    q = f * (abar_prev * oh_0 + (1 - abar_prev) / K)
    q = q / q.sum(1, keepdim=True)
    p = f * (abar_prev * torch.softmax(logits.double(), 1) + (1 - abar_prev) / K)
    p = p / p.sum(1, keepdim=True)
    kl = torch.where(q > 0, q * (q.log() - p.log()), torch.zeros_like(q)).sum(1)
    return kl.mean((1, 2))


# ---------------------------------------------------------------- forward process
@pytest.mark.parametrize("t", [1, 4, T])
def test_q_sample_marginal(t):
    model = small()
    z0 = codes_batch(512, seed=2)  # 32768 positions
    z_t = model.q_sample(z0, t, generator=gen(3))
    assert z_t.shape == z0.shape and z_t.dtype == torch.int64
    ab = float(model.schedule.alpha_bar[t])
    same = (z_t == z0).double().mean().item()
    assert abs(same - (ab + (1 - ab) / K)) < 0.015
    shifted = (z_t == (z0 + 3) % K).double().mean().item()  # one particular other class
    assert abs(shifted - (1 - ab) / K) < 0.01
    # t = 0 is the data itself
    assert torch.equal(model.q_sample(z0, 0, generator=gen(3)), z0)


# ---------------------------------------------------------------- the bound's terms
def test_training_loss_shape_and_estimator():
    model = small().eval()
    codes = codes_batch(6)
    loss, logs = model.training_loss(codes, generator=gen(5))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert set(logs) == {"train/vlb", "train/kl"} and all(isinstance(v, float) for v in logs.values())
    loss.backward()
    assert model.net.conv_out.weight.grad is not None and torch.isfinite(model.net.conv_out.weight.grad).all()
    # The documented draw order, replayed: t, then z_t; loss = mean L / p(t).
    g = gen(5)
    t, p = model.sample_timesteps(6, generator=g)
    assert torch.allclose(p, torch.full_like(p, 1 / T))  # empty history: uniform
    z_t = model.q_sample(codes, t, generator=g)
    with torch.no_grad():
        L = model.vlb_term(codes, z_t, t)
        ab = model.schedule.alpha_bar
        for b in range(6):
            tb = int(t[b])
            logits = model.p_logits(z_t[b:b + 1], tb)
            ref = hand_kl(z_t[b:b + 1], codes[b:b + 1], logits, float(ab[tb] / ab[tb - 1]), float(ab[tb - 1]))
            torch.testing.assert_close(L[b].double(), ref[0], rtol=1e-4, atol=1e-6)
    assert loss.item() == pytest.approx((L.double() / p).mean().item(), rel=1e-5)
    assert logs["train/vlb"] == pytest.approx(loss.item())
    assert logs["train/kl"] == pytest.approx(L.mean().item(), rel=1e-5)


def test_t1_term_is_decoder_nll():
    model = small().eval()
    codes = codes_batch(3)
    z1 = model.q_sample(codes, 1, generator=gen(6))
    z1[:, 0, 0] = (codes[:, 0, 0] + 1) % K  # make sure some positions moved
    with torch.no_grad():
        logits = model.p_logits(z1, 1)
        term = model.vlb_term(codes, z1, 1, logits=logits)
    # -log p(z_0 | z_1) from the posterior, by hand: p ∝ Q_1[k, z_1] softmax_k
    a1 = float(model.schedule.alphas[1])
    log_f = torch.log(a1 * F.one_hot(z1, K).permute(0, 3, 1, 2).double() + (1 - a1) / K)
    log_p = torch.log_softmax(log_f + torch.log_softmax(logits.double(), 1), dim=1)
    nll = -log_p.gather(1, codes[:, None]).squeeze(1).mean((1, 2))
    torch.testing.assert_close(term.double(), nll, rtol=1e-5, atol=1e-6)
    # the same through the posterior helper (a jump 1 -> 0)
    with torch.no_grad():
        post = model.p_posterior_logprobs(z1, 1, 0)
    torch.testing.assert_close(post.double(), log_p, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- importance sampling
def test_second_moment_probs_synthetic():
    N, u = 4, 0.01
    hist = torch.rand(T + 1, N, generator=gen(7)) + 0.1
    counts = torch.full((T + 1,), N)
    counts[3] = N - 1
    probs = second_moment_probs(hist, counts, u)
    assert probs.shape == (T + 1,) and probs.dtype == torch.float64 and probs[0] == 0
    torch.testing.assert_close(probs[1:], torch.full((T,), 1 / T, dtype=torch.float64))  # not full yet
    counts[3] = N
    probs = second_moment_probs(hist, counts, u)
    w = hist[1:].double().pow(2).mean(1).sqrt()
    torch.testing.assert_close(probs[1:], (1 - u) * w / w.sum() + u / T)
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[1:].max() > 1.2 / T  # non-uniform
    # all-zero history: uniform again
    torch.testing.assert_close(second_moment_probs(torch.zeros(T + 1, N), counts, u)[1:],
                               torch.full((T,), 1 / T, dtype=torch.float64))


def test_model_sampler_follows_history():
    model = small()
    N = model.config.history
    with torch.no_grad():
        model.loss_history.copy_(torch.arange(T + 1, dtype=torch.float32).view(-1, 1).expand(T + 1, N))
        model.loss_counts.fill_(N)
    probs = model.timestep_probs()
    u = model.config.uniform_prob
    expected = (1 - u) * torch.arange(1, T + 1).double() / (T * (T + 1) / 2) + u / T
    torch.testing.assert_close(probs[1:], expected)
    t, p = model.sample_timesteps(20000, generator=gen(8))
    assert int(t.min()) >= 1 and int(t.max()) <= T
    torch.testing.assert_close(p, probs[t])
    freq = torch.bincount(t, minlength=T + 1)[1:].double() / 20000
    assert (freq - expected).abs().max() < 0.02
    # importance_sampling=False: uniform whatever the history
    plain = small(importance_sampling=False)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.timestep_probs()[1:], torch.full((T,), 1 / T, dtype=torch.float64))


def test_training_loss_weights_by_importance():
    model = small().eval()
    N = model.config.history
    with torch.no_grad():  # L_t^2 growing with t: late timesteps drawn more often
        model.loss_history.copy_(torch.arange(T + 1, dtype=torch.float32).view(-1, 1).expand(T + 1, N) ** 2)
        model.loss_counts.fill_(N)
    codes = codes_batch(6)
    loss, _ = model.training_loss(codes, generator=gen(23))
    g = gen(23)
    t, p = model.sample_timesteps(6, generator=g)
    assert not torch.allclose(p, torch.full_like(p, 1 / T))
    with torch.no_grad():
        L = model.vlb_term(codes, model.q_sample(codes, t, generator=g), t)
    assert loss.item() == pytest.approx((L.double() / p).mean().item(), rel=1e-5)


def test_loss_history_ring_and_training_mode_only():
    model = small(history=3)
    model.update_loss_history(torch.tensor([2, 2, 5, 2, 2]), torch.tensor([1.0, 2.0, 7.0, 3.0, 4.0]))
    assert model.loss_counts.tolist()[2] == 3 and model.loss_counts.tolist()[5] == 1
    assert model.loss_history[2].tolist() == [2.0, 3.0, 4.0]  # oldest dropped, in order
    assert model.loss_history[5, 0].item() == 7.0
    before = model.loss_counts.clone()
    model.eval()
    model.training_loss(codes_batch(4), generator=gen(9))
    assert torch.equal(model.loss_counts, before)
    model.train()
    _, logs = model.training_loss(codes_batch(4), generator=gen(9))
    assert int(before.sum()) < int(model.loss_counts.sum()) <= int(before.sum()) + 4
    assert int(model.loss_counts.max()) <= 3


def test_importance_sampling_switches_on_when_history_full():
    model = small(history=2)
    model.train()
    codes = codes_batch(16)
    g = gen(10)
    while not bool((model.loss_counts[1:] >= 2).all()):
        torch.testing.assert_close(model.timestep_probs()[1:], torch.full((T,), 1 / T, dtype=torch.float64))
        with torch.no_grad():
            model.training_loss(codes, generator=g)
    probs = model.timestep_probs()[1:]
    assert probs.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(probs, torch.full((T,), 1 / T, dtype=torch.float64))
    w = model.loss_history[1:].double().pow(2).mean(1).sqrt()
    u = model.config.uniform_prob
    torch.testing.assert_close(probs, (1 - u) * w / w.sum() + u / T)


# ---------------------------------------------------------------- learning
def test_training_lowers_the_bound():
    model = small(randomize_out=False)
    data = patterns()
    assert data.min() >= 0 and data.max() < K
    before = model.nll(data, generator=gen(11)).mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = gen(12)
    model.train()
    for _ in range(40):
        loss, _ = model.training_loss(data, generator=g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = model.nll(data, generator=gen(11)).mean().item()
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("steps", [None, 1, 3, T])
def test_sample_shape_range_determinism(steps):
    model = small()
    model.train()
    out = model.sample(3, steps=steps, generator=gen(13))
    assert model.training  # mode restored
    assert out.shape == (3, S, S) and out.dtype == torch.int64
    assert int(out.min()) >= 0 and int(out.max()) < K
    assert torch.equal(model.sample(3, steps=steps, generator=gen(13)), out)
    assert not torch.equal(model.sample(3, steps=steps, generator=gen(14)), out)


def test_sample_full_chain_equals_strided_T():
    model = small()
    torch.testing.assert_close(model.sample(2, generator=gen(15)), model.sample(2, steps=T, generator=gen(15)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("mask_2d", [False, True])
def test_inpaint_keeps_known_codes(mask_2d):
    model = small()
    codes = codes_batch(3)
    keep = torch.zeros(S, S, dtype=torch.bool)
    keep[:, : S // 2] = True
    if not mask_2d:
        keep = keep.expand(3, S, S).clone()
        keep[1, 0, -1] = True
    out = model.inpaint(codes, keep, steps=4, generator=gen(16))
    assert out.shape == codes.shape and out.dtype == torch.int64
    full_keep = keep.expand_as(codes)
    assert torch.equal(out[full_keep], codes[full_keep])
    assert int(out.min()) >= 0 and int(out.max()) < K
    assert not torch.equal(out[~full_keep], codes[~full_keep])  # the rest is generated
    assert torch.equal(model.inpaint(codes, keep, steps=4, generator=gen(16)), out)
    # keep everything: the input back; keep nothing: codes in range
    assert torch.equal(model.inpaint(codes, torch.ones(S, S, dtype=torch.bool), steps=2, generator=gen(0)), codes)
    free = model.inpaint(codes, torch.zeros(S, S, dtype=torch.bool), generator=gen(0))
    assert int(free.min()) >= 0 and int(free.max()) < K


# ---------------------------------------------------------------- likelihood
def test_uniform_prior_kl_closed_form():
    for a in (0.0, 1e-6, 0.3, 0.9):
        q = torch.full((K,), (1 - a) / K, dtype=torch.float64)
        q[2] += a
        explicit = torch.where(q > 0, q * torch.log(q * K), torch.zeros_like(q)).sum().item()
        assert uniform_prior_kl(a, K) == pytest.approx(explicit, abs=1e-12)


def test_nll_is_the_sum_of_its_terms():
    model = small()
    codes = codes_batch(3)
    nll = model.nll(codes, generator=gen(17))
    assert nll.shape == (3,) and torch.isfinite(nll).all() and (nll > 0).all()
    # independent: one q_sample per t in increasing t, hand KLs, explicit prior
    g = gen(17)
    ab = model.schedule.alpha_bar
    total = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for t in range(1, T + 1):
            z_t = model.q_sample(codes, t, generator=g)
            total += hand_kl(z_t, codes, model.p_logits(z_t, t), float(ab[t] / ab[t - 1]), float(ab[t - 1]))
    aT = float(ab[T])
    q = torch.full((K,), (1 - aT) / K, dtype=torch.float64)
    q[0] += aT
    total += (q * torch.log(q * K)).sum()
    torch.testing.assert_close(nll.double(), total, rtol=1e-5, atol=1e-5)
    # grouping timesteps per UNet call changes nothing but rounding
    torch.testing.assert_close(model.nll(codes, batch_t=4, generator=gen(17)), nll, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- backends
def _run_all(model, codes):
    model.zero_grad()
    loss, _ = model.training_loss(codes, generator=gen(18))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    nll = model.nll(codes, generator=gen(19))
    z = model.q_sample(codes, 5, generator=gen(20))
    post = model.p_posterior_logprobs(z, 5, 2)
    return loss.detach(), grads, nll, post


def test_kernel_and_reference_backends_agree(monkeypatch):
    from pyvq import _backend

    model = small().eval()
    codes = codes_batch(4)
    monkeypatch.setenv("PYVQ_BACKEND", "kernel")
    assert _backend.use_kernel("multinomial_kl", "cpu")
    kernel = _run_all(model, codes)
    monkeypatch.setenv("PYVQ_BACKEND", "reference")
    assert not _backend.use_kernel("multinomial_kl", "cpu")
    ref = _run_all(model, codes)
    torch.testing.assert_close(kernel[0], ref[0], rtol=1e-5, atol=1e-6)
    assert len(kernel[1]) == len(ref[1]) > 0
    for a, b in zip(kernel[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kernel[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel[3], ref[3], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = small()
    model.train()
    for i in range(3):
        with torch.no_grad():
            model.training_loss(codes_batch(8, seed=i), generator=gen(i))
    assert int(model.loss_counts.sum()) == 24
    model.save_pretrained(tmp_path)
    loaded = MultinomialDiffusion.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.loss_history, model.loss_history)
    assert torch.equal(loaded.loss_counts, model.loss_counts)
    torch.testing.assert_close(loaded.timestep_probs(), model.timestep_probs())
    codes = codes_batch(2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.p_logits(codes, 4), model.p_logits(codes, 4), rtol=0, atol=0)
    assert torch.equal(loaded.sample(2, steps=3, generator=gen(21)), model.sample(2, steps=3, generator=gen(21)))
    again = load_pretrained(tmp_path)
    assert isinstance(again, MultinomialDiffusion)


# ---------------------------------------------------------------- presets and defaults
def test_presets_and_parameter_counts():
    assert {"vqddm_celebahq_512", "vqddm_celebahq_1024", "vqddm_tiny"} <= set(list_presets())
    counts = {}
    for name in ("vqddm_celebahq_512", "vqddm_celebahq_1024", "vqddm_tiny"):
        config = get_preset(name)
        with torch.device("meta"):
            model = MultinomialDiffusion(config)
        counts[name] = sum(p.numel() for p in model.parameters())
    c = get_preset("vqddm_celebahq_1024")
    assert (c.num_classes, c.code_size, c.timesteps, c.schedule, c.attention_resolutions, c.channel_mult) == (
        1024, 16, 4000, "cosine", (16, 8, 4), (1, 2, 2, 2))
    assert get_preset("vqddm_celebahq_512").num_classes == 512
    assert counts == {"vqddm_celebahq_512": 124_318_496, "vqddm_celebahq_1024": 126_383_392, "vqddm_tiny": 791_360}
    doc = MultinomialDiffusion.__doc__
    for n in counts.values():
        assert f"{n:,}" in doc
    tiny = get_preset("vqddm_tiny")
    assert tiny.timesteps == 100 and tiny.model_channels == 32 and tiny.num_res_blocks == 1
    # the tiny preset builds with another codebook size
    m = MultinomialDiffusion.from_preset("vqddm_tiny", num_classes=16)
    assert m.net.conv_in.in_channels == 16 and m.net.conv_out.out_channels == 16


def test_train_defaults_fit_trainconfig():
    from pyvq.train.recipes import recipe_for

    model = small()
    defaults = recipe_for(model).train_defaults(model)
    assert set(defaults) <= {"lr", "betas", "weight_decay", "warmup_steps", "grad_clip", "ema_decay"}
    resolved = TrainConfig().with_model_defaults(defaults)
    assert resolved.lr == 2e-4 and tuple(resolved.betas) == (0.9, 0.999) and resolved.ema_decay == 0.0


def test_linear_schedule():
    model = small(schedule="linear", timesteps=40)
    assert model.schedule.name == "linear" and model.schedule.T == 40
    loss, _ = model.training_loss(codes_batch(2), generator=gen(22))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [
    ("num_classes", 1), ("num_classes", 2.5), ("code_size", 0), ("code_size", 7), ("timesteps", 0),
    ("schedule", "quadratic"), ("model_channels", 0), ("channel_mult", ()), ("channel_mult", (1, 0)),
    ("num_res_blocks", 0), ("attention_resolutions", (3,)), ("dropout", 1.0), ("num_heads", 3),
    ("num_groups", 5), ("history", 0), ("uniform_prob", 1.0), ("uniform_prob", -0.1),
    ("scale_shift", "yes"), ("importance_sampling", 1),
])
def test_bad_config_fields(field, value):
    with pytest.raises((ValueError, TypeError), match=repr(field)):
        small_config(**{field: value})


def test_linear_schedule_too_short_names_fields():
    with pytest.raises(ValueError, match="'timesteps'"):
        small_config(schedule="linear", timesteps=10)


def test_bad_inputs():
    model = small()
    good = codes_batch(2)
    with pytest.raises(ValueError, match="'codes'.*\\[0, 8\\)"):
        model.training_loss(good + K)
    with pytest.raises(ValueError, match="'codes'.*\\[0, 8\\)"):
        model.nll(good - 1)
    with pytest.raises(ValueError, match="'codes'.*shape"):
        model.training_loss(good[:, :4])
    with pytest.raises(ValueError, match="'codes'.*shape"):
        model.training_loss(good[0])
    with pytest.raises(TypeError, match="'codes'"):
        model.training_loss(good.float())
    with pytest.raises(ValueError, match="'t'"):
        model.p_logits(good, 0)
    with pytest.raises(ValueError, match="'t'"):
        model.q_sample(good, T + 1)
    with pytest.raises(ValueError, match="'t'"):
        model.p_logits(good, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="'s'"):
        model.p_posterior_logprobs(good, 3, 3)
    with pytest.raises(ValueError, match="'steps'"):
        model.sample(1, steps=T + 1)
    with pytest.raises(ValueError, match="'steps'"):
        model.sample(1, steps=0)
    with pytest.raises(ValueError, match="'n'"):
        model.sample(0)
    with pytest.raises(TypeError, match="'keep'"):
        model.inpaint(good, torch.ones(S, S))
    with pytest.raises(ValueError, match="'keep'"):
        model.inpaint(good, torch.ones(3, S, S, dtype=torch.bool))
    with pytest.raises(TypeError, match="'t'"):
        model.p_logits(good, 1.5)
    with pytest.raises(ValueError, match="'batch_t'"):
        model.nll(good, batch_t=0)
    with pytest.raises(TypeError, match="'config'"):
        MultinomialDiffusion(dataclasses.asdict(small_config()))
