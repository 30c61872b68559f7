"""Gaussian diffusion prior over BRICS key codes (pyvq.models.priors.gaussian)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pyvq.models import get_preset, load_pretrained
from pyvq.models.priors.gaussian import GaussianDiffusion, GaussianDiffusionConfig
from pyvq.models.priors.schedules import min_snr_weight

# A team of 2 OpenMP threads stalls under load on the shared 2-core machine (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")

C, S, T = 3, 8, 20


def small_config(**kw) -> GaussianDiffusionConfig:
    base = dict(channels=C, code_size=S, timesteps=T, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                num_groups=8, num_heads=2, attention_resolutions=(4,))
    base.update(kw)
    return GaussianDiffusionConfig(**base)


def randomize_output(model: GaussianDiffusion, seed: int = 0) -> GaussianDiffusion:
    """The UNet's last conv starts at zero (eps_hat = 0); give it small
    random weights so that sampling exercises a non-trivial network."""
    g = torch.Generator().manual_seed(seed)
    conv = model.net.conv_out
    with torch.no_grad():
        conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(0.05 * torch.randn(conv.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model() -> GaussianDiffusion:
    torch.manual_seed(0)
    return randomize_output(GaussianDiffusion(small_config())).eval()


def smooth_keys(n: int, c: int = C, s: int = S, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic key codes in [0.1, 0.9]: sums of low-frequency waves."""
    g = torch.Generator().manual_seed(seed)
    ii, jj = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    fx = torch.randint(1, 3, (n, c, 1, 1), generator=g).float()
    fy = torch.randint(1, 3, (n, c, 1, 1), generator=g).float()
    phase = 2 * math.pi * torch.rand(n, c, 1, 1, generator=g)
    return 0.5 + 0.4 * torch.sin(math.pi * (fx * ii + fy * jj) + phase)


class OracleEps(nn.Module):
    """Knows x0 and returns the exact noise of x_t: (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""

    def __init__(self, x0: torch.Tensor, alpha_bar: torch.Tensor):
        super().__init__()
        self.x0, self.alpha_bar = x0, alpha_bar
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device and dtype
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        ab = self.alpha_bar[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value", [
    ("channels", 0), ("code_size", 7), ("timesteps", 0), ("timesteps", 2.5), ("model_channels", -1),
    ("channel_mult", ()), ("channel_mult", "12"), ("num_res_blocks", 0), ("num_groups", 5), ("num_heads", 3),
    ("dropout", 1.0), ("min_snr_gamma", -1.0), ("schedule", "quadratic"), ("scale_shift", 1),
    ("clip_denoised", "yes"), ("attention_resolutions", 4),
])
def test_bad_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_bad_schedule_kwargs_named():
    with pytest.raises(ValueError, match="schedule_kwargs"):
        small_config(schedule_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="schedule_kwargs"):
        small_config(schedule_kwargs={"tau": -1.0})
    # The kwargs reach the schedule.
    a = GaussianDiffusion(small_config(schedule_kwargs={"tau": 1.0})).schedule.alpha_bar
    b = GaussianDiffusion(small_config()).schedule.alpha_bar
    assert not torch.allclose(a, b)


def test_attention_only_at_existing_levels():
    cfg = GaussianDiffusionConfig(channels=2, code_size=8, timesteps=10, model_channels=16, channel_mult=(1, 2),
                                  num_res_blocks=1, num_groups=8)
    assert cfg.attention_resolutions == (32, 16, 8)
    assert cfg.unet_attention_resolutions == (8,)
    m = GaussianDiffusion(cfg)
    assert [lvl.has_attention for lvl in m.net.down] == [True, False]


def test_gamma_none_or_zero_is_plain_mse():
    keys = smooth_keys(3)
    for gamma in (None, 0.0):
        torch.manual_seed(0)
        m = randomize_output(GaussianDiffusion(small_config(min_snr_gamma=gamma)))
        loss, logs = m.training_loss(keys, torch.Generator().manual_seed(1), t=torch.tensor([1, 2, 3]))
        assert loss.item() == pytest.approx(logs["train/mse"], rel=1e-6)


# ------------------------------------------------------------------ forward process
def test_to_from_model_round_trip():
    keys = torch.rand(2, C, S, S)
    x = GaussianDiffusion.to_model(keys)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(GaussianDiffusion.from_model(x), keys)
    assert GaussianDiffusion.from_model(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("t", [1, T // 2, T])
def test_q_sample_statistics(model, t):
    x0 = torch.full((4000, 1, S, S), 0.0).expand(-1, C, -1, -1).contiguous()
    x0[:, 1] = 0.8
    x0[:, 2] = -0.6
    xt = model.q_sample(x0, t, generator=torch.Generator().manual_seed(t))
    ab = float(model.schedule.alpha_bar[t])
    for ch, v in enumerate((0.0, 0.8, -0.6)):
        sample = xt[:, ch].double()
        assert sample.mean().item() == pytest.approx(math.sqrt(ab) * v, abs=0.01)
        assert sample.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-3)


def test_q_sample_t0_is_identity_and_t_validation(model):
    x0 = torch.rand(2, C, S, S) * 2 - 1
    assert torch.equal(model.q_sample(x0, 0), x0)
    assert torch.equal(model.q_sample(x0, torch.zeros(2, dtype=torch.long)), x0)
    with pytest.raises(ValueError, match="'t'"):
        model.q_sample(x0, T + 1)
    with pytest.raises(ValueError, match="'t'"):
        model.q_sample(x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="'t'"):
        model.q_sample(x0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="'noise'"):
        model.q_sample(x0, 1, torch.randn(1, C, S, S))


def test_predict_x0_inverts_q_sample():
    m = GaussianDiffusion(small_config(clip_denoised=False))
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(T, C, S, S, generator=g, dtype=torch.float64) * 2 - 1) * 1.5  # beyond [-1, 1]: no clip
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.arange(1, T + 1)
    xt = m.q_sample(x0, t, noise)
    torch.testing.assert_close(m.predict_x0(xt, t, noise), x0, rtol=0, atol=1e-9)
    # clip_denoised clips the estimate to [-1, 1].
    mc = GaussianDiffusion(small_config())
    torch.testing.assert_close(mc.predict_x0(xt, t, noise), x0.clamp(-1, 1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method,steps", [("ddim", 1), ("ddim", 3), ("ddim", T), ("ddpm", 4), ("ddpm", None)])
def test_oracle_eps_recovers_x0(method, steps):
    """With the exact noise, every reverse step predicts x0 and the final
    jump to t = 0 (alpha_bar = 1) lands on it."""
    m = GaussianDiffusion(small_config())
    keys = smooth_keys(3)
    m.net = OracleEps(m.to_model(keys), m.schedule.alpha_bar)
    out = m.sample(3, steps=steps, method=method, generator=torch.Generator().manual_seed(0))
    # One jump from t = T divides float32 rounding by sqrt(alpha_bar_T) ~ 5e-5.
    torch.testing.assert_close(out, keys, rtol=0, atol=5e-4 if steps == 1 else 1e-5)
    assert m.net.calls == (T if steps is None else steps)


def test_oracle_ddim_deterministic_path_from_x_t():
    """DDIM (eta = 0) keeps eps fixed, so its x_s are q_sample(x0, s, eps)."""
    m = GaussianDiffusion(small_config())
    keys = smooth_keys(2)
    x0 = m.to_model(keys)
    m.net = OracleEps(x0, m.schedule.alpha_bar)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    x = m.q_sample(x0, 12, noise)
    for t, s in ((12, 7), (7, 2)):
        x = m._step(x, t, s, "ddim", 0.0, None)
        torch.testing.assert_close(x, m.q_sample(x0, s, noise), rtol=0, atol=1e-5)
    torch.testing.assert_close(m._step(x, 2, 0, "ddim", 0.0, None), x0, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ training
def test_training_loss_matches_hand_computation(model):
    keys = smooth_keys(4)
    t = torch.tensor([1, 2, T // 2, T])
    noise = torch.randn(keys.shape, generator=torch.Generator().manual_seed(5))
    loss, logs = model.training_loss(keys, t=t, noise=noise)
    assert torch.isfinite(loss) and loss.dim() == 0
    assert set(logs) == {"train/loss", "train/mse"} and all(isinstance(v, float) for v in logs.values())

    x0 = 2 * keys - 1
    ab = model.schedule.alpha_bar[t].float().reshape(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        mse = (model.net(xt, t) - noise).pow(2).mean(dim=(1, 2, 3))
    snr = model.schedule.alpha_bar[t] / (1 - model.schedule.alpha_bar[t])
    w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert w[0] < 1 and w[-1] == 1  # the weighting does something at t = 1
    torch.testing.assert_close(w, min_snr_weight(snr, 5.0))
    assert loss.item() == pytest.approx((w.float() * mse).mean().item(), rel=1e-5)
    assert logs["train/mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert logs["train/loss"] == pytest.approx(loss.item())


def test_training_loss_seeded_and_clamps_values(model):
    keys = smooth_keys(3)
    a, _ = model.training_loss(keys, torch.Generator().manual_seed(7))
    b, _ = model.training_loss(keys, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # Values outside [0, 1] are clamped (documented), not rejected.
    wild = keys.clone()
    wild[:, 0, 0, 0] = 1.7
    wild[:, 1, 0, 0] = -0.3
    clamped = wild.clamp(0, 1)
    c, _ = model.training_loss(wild, torch.Generator().manual_seed(7))
    d, _ = model.training_loss(clamped, torch.Generator().manual_seed(7))
    assert torch.equal(c, d)
    # t must be in 1..T for training.
    with pytest.raises(ValueError, match="'t'"):
        model.training_loss(keys, t=0)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    m = GaussianDiffusion(small_config(channels=2))
    data = smooth_keys(16, c=2, seed=1)
    t_eval = torch.arange(1, T + 1).repeat(2)[:16]
    noise_eval = torch.randn(data.shape, generator=torch.Generator().manual_seed(2))

    def eval_loss():
        with torch.no_grad():
            return m.training_loss(data, t=t_eval, noise=noise_eval)[0].item()

    before = eval_loss()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        loss, _ = m.training_loss(data, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_train_defaults_are_train_config_fields(model):
    from pyvq.train.config import TrainConfig
    from pyvq.train.recipes import recipe_for

    d = recipe_for(model).train_defaults(model)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(d) <= names and set(d) <= {"lr", "betas", "weight_decay", "warmup_steps", "grad_clip", "ema_decay"}
    assert 1e-4 <= d["lr"] <= 2e-4 and d["betas"] == (0.9, 0.999) and d["grad_clip"] == 1.0
    TrainConfig().with_model_defaults(d)


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("method,steps,eta", [("ddim", 1, 0.0), ("ddim", 3, 0.0), ("ddim", 3, 0.7),
                                              ("ddim", T, 0.0), ("ddpm", 3, 0.0), ("ddpm", None, 0.0)])
def test_sample_shape_range_determinism(model, method, steps, eta):
    def draw(seed):
        return model.sample(2, steps=steps, method=method, eta=eta, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (2, C, S, S) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_eta1_equals_ddpm(model):
    a = model.sample(2, steps=5, method="ddpm", generator=torch.Generator().manual_seed(4))
    b = model.sample(2, steps=5, method="ddim", eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sample_restores_mode_and_handles_n0(model):
    model.train()
    try:
        model.sample(1, steps=1)
        assert model.training
    finally:
        model.eval()
    assert model.sample(0, steps=2).shape == (0, C, S, S)


@pytest.mark.parametrize("kwargs,name", [
    (dict(n=-1), "'n'"), (dict(n=2.0), "'n'"), (dict(n=1, steps=0), "'steps'"), (dict(n=1, steps=T + 1), "'steps'"),
    (dict(n=1, method="euler"), "'method'"), (dict(n=1, eta=-0.1), "'eta'"),
])
def test_sample_bad_arguments(model, kwargs, name):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=name):
        model.sample(n, **kwargs)


# ------------------------------------------------------------------ inpainting
@pytest.mark.parametrize("method,steps", [("ddim", 4), ("ddpm", 3)])
def test_inpaint_keeps_region(model, method, steps):
    keys = smooth_keys(2)
    keep = torch.rand(keys.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    out = model.inpaint(keys, keep, steps=steps, method=method, generator=torch.Generator().manual_seed(1))
    assert out.shape == keys.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[keep], keys[keep])
    assert not torch.equal(out[~keep], keys[~keep])
    again = model.inpaint(keys, keep, steps=steps, method=method, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_inpaint_broadcast_mask_and_oracle():
    m = GaussianDiffusion(small_config())
    keys = smooth_keys(2)
    m.net = OracleEps(m.to_model(keys), m.schedule.alpha_bar)
    keep = torch.zeros(1, 1, S, S, dtype=torch.bool)
    keep[..., : S // 2, :] = True
    out = m.inpaint(keys, keep, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., : S // 2, :], keys[..., : S // 2, :])
    torch.testing.assert_close(out, keys, rtol=0, atol=1e-5)  # the oracle knows the rest


def test_inpaint_bad_arguments(model):
    keys = smooth_keys(2)
    with pytest.raises(ValueError, match="'keep'"):
        model.inpaint(keys, torch.ones(2, C, S, S))
    with pytest.raises(ValueError, match="'keep'"):
        model.inpaint(keys, torch.ones(3, C, S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="'keys'"):
        model.inpaint(keys[:, :2], torch.ones(1, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(2, C + 1, S, S), (2, C, S, S // 2), (C, S, S), (2, C, 2 * S, 2 * S)])
def test_training_loss_bad_shapes(model, shape):
    with pytest.raises(ValueError, match="'keys'"):
        model.training_loss(torch.rand(shape))


def test_training_loss_bad_dtype(model):
    with pytest.raises(ValueError, match="'keys'"):
        model.training_loss(torch.ones(2, C, S, S, dtype=torch.long))


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = randomize_output(GaussianDiffusion(small_config(min_snr_gamma=None, schedule="cosine",
                                                        schedule_kwargs={"s": 0.01})))
    m.save_pretrained(tmp_path)
    loaded = GaussianDiffusion.from_pretrained(tmp_path)
    assert loaded.config == m.config
    sd_a, sd_b = m.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    torch.testing.assert_close(loaded.schedule.alpha_bar, m.schedule.alpha_bar, rtol=0, atol=0)
    a = m.eval().sample(1, steps=2, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(1, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert isinstance(load_pretrained(tmp_path), GaussianDiffusion)


# ------------------------------------------------------------------ presets
@pytest.mark.parametrize("name,brics", [
    ("keycode_diffusion_16x16x8", "brics_16x16x8"), ("keycode_diffusion_16x16x16", "brics_16x16x16"),
    ("keycode_diffusion_32x32x4", "brics_32x32x4"), ("keycode_diffusion_64x64x4", "brics_64x64x4"),
    ("keycode_diffusion_tiny", "brics_tiny"),
])
def test_presets_match_brics_code_shapes(name, brics):
    cfg, bcfg = get_preset(name), get_preset(brics)
    assert isinstance(cfg, GaussianDiffusionConfig)
    assert cfg.code_shape == (bcfg.code_channels, bcfg.code_size, bcfg.code_size)
    if name != "keycode_diffusion_tiny":
        assert cfg.channel_mult == (1, 2, 3, 4) and cfg.num_res_blocks == 2 and cfg.timesteps == 1000
        assert cfg.schedule == "cosine_variant" and cfg.min_snr_gamma == 5.0
        expect = tuple(r for r in (32, 16, 8) if r in cfg.level_sizes)
        assert cfg.unet_attention_resolutions == expect
        with torch.device("meta"):
            m = GaussianDiffusion(cfg)
        assert next(m.parameters()).is_meta
        assert m.schedule.alpha_bar.device.type == "cpu"
    else:
        assert cfg.timesteps == 100 and cfg.model_channels == 32
        m = GaussianDiffusion.from_preset(name)
        keys = torch.rand(2, *cfg.code_shape)
        loss, _ = m.training_loss(keys, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)
