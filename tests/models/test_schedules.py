"""pyvq.models.priors.schedules: cosine and linear betas against diffusers'
DDPMScheduler (an independent implementation), the Chen 2023 cosine
variant, Schedule bookkeeping, strided sampling steps, Min-SNR weights and
argument errors."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from pyvq._checks import ArgumentTypeError
from pyvq.models.priors.schedules import (
    SCHEDULES,
    Schedule,
    betas_from_alpha_bar,
    cosine_alpha_bar,
    cosine_variant_alpha_bar,
    linear_betas,
    make_schedule,
    min_snr_weight,
)


@pytest.fixture(scope="module")
def DDPMScheduler():  # noqa: N802 (the class)
    return pytest.importorskip("diffusers").DDPMScheduler


@pytest.mark.parametrize("T", [1000, 250, 7])
def test_cosine_betas_match_diffusers(DDPMScheduler, T):
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas  # float32, (T,)
    sched = make_schedule("cosine", T)
    torch.testing.assert_close(sched.betas[1:].float(), theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sched.alpha_bar[1:].float(), torch.cumprod(1 - theirs.double(), 0).float(),
                               rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(betas_from_alpha_bar(cosine_alpha_bar, T), sched.betas[1:], rtol=0, atol=0)


def test_linear_betas_match_ddpm(DDPMScheduler):
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas
    ours = linear_betas(1000)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    assert ours[0].item() == pytest.approx(1e-4) and ours[-1].item() == pytest.approx(0.02)
    # improved DDPM's 1000 / T scaling
    torch.testing.assert_close(linear_betas(100), torch.linspace(1e-3, 0.2, 100, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [1000, 50])
def test_schedule_tensors(name, T):
    sched = make_schedule(name, T)
    assert isinstance(sched, Schedule) and sched.name == name and sched.T == T
    for tensor in (sched.betas, sched.alphas, sched.alpha_bar):
        assert tensor.dtype == torch.float64 and tensor.shape == (T + 1,) and tensor.device.type == "cpu"
    assert sched.betas[0] == 0 and sched.alpha_bar[0] == 1
    torch.testing.assert_close(sched.alphas, 1 - sched.betas, rtol=0, atol=0)
    torch.testing.assert_close(sched.alpha_bar, torch.cumprod(sched.alphas, 0), rtol=0, atol=0)
    ab = sched.alpha_bar[1:]
    assert bool((ab > 0).all()) and bool((ab <= 1).all())
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must be strictly decreasing"
    assert ab[-1] < 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.T = 3


def test_cosine_alpha_bar_formula():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cosine_alpha_bar(t), f / f[0])
    assert cosine_alpha_bar(0.0).item() == 1.0
    assert cosine_alpha_bar(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert cosine_alpha_bar(0.5).dtype == torch.float64


def test_cosine_variant_endpoints_and_monotonicity():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for kwargs in [{}, dict(start=0.0, end=1.0, tau=1.0), dict(start=0.0, end=0.9, tau=2.0)]:
        v = cosine_variant_alpha_bar(t, **kwargs)
        assert v[0].item() == pytest.approx(1.0, abs=1e-12)
        assert bool((v[1:] <= v[:-1]).all()) and bool((v > 0).all()) and bool((v <= 1).all())
    # end = 1: exactly 0 before clipping, so clip_min at t = 1.
    assert cosine_variant_alpha_bar(1.0).item() == 1e-9
    assert cosine_variant_alpha_bar(1.0, clip_min=1e-5).item() == 1e-5
    # The defaults follow Chen 2023's cosine_schedule(t, start=0.2, end=1, tau=1.5), evaluated by hand at t = 0.5.
    v_start = math.cos(0.2 * math.pi / 2) ** 3
    v_end = math.cos(math.pi / 2) ** 3
    expected = (v_end - math.cos((0.5 * 0.8 + 0.2) * math.pi / 2) ** 3) / (v_end - v_start)
    assert cosine_variant_alpha_bar(0.5).item() == pytest.approx(expected, rel=1e-12)
    # start = 0, end = 1, tau = 1 is sin^2, i.e. 1 - (cosine schedule with s = 0).
    torch.testing.assert_close(cosine_variant_alpha_bar(t[:-1], start=0.0, end=1.0, tau=1.0),
                               cosine_alpha_bar(t[:-1], s=0.0))


def test_cosine_variant_schedule_uses_its_kwargs():
    T = 100
    sched = make_schedule("cosine_variant", T, tau=1.0, start=0.0)
    fn = functools.partial(cosine_variant_alpha_bar, tau=1.0, start=0.0)
    torch.testing.assert_close(sched.betas[1:], betas_from_alpha_bar(fn, T))
    assert sched.betas.max() <= 0.999
    assert not torch.equal(sched.betas, make_schedule("cosine_variant", T).betas)


def test_betas_from_alpha_bar_caps_and_custom_fn():
    betas = betas_from_alpha_bar(lambda t: torch.exp(-12 * t), 10)
    torch.testing.assert_close(betas, torch.full((10,), 1 - math.exp(-1.2), dtype=torch.float64))
    assert betas_from_alpha_bar(lambda t: 1 - t, 4, max_beta=0.5).tolist() == pytest.approx([0.25, 1 / 3, 0.5, 0.5])


@pytest.mark.parametrize("T, steps", [(1000, 50), (1000, 1000), (10, 3), (7, 2), (5, 4), (999, 998), (1, 1)])
def test_strided(T, steps):
    s = make_schedule("cosine", T).strided(steps)
    assert s.dtype == torch.int64 and s.shape == (steps,)
    assert s[-1] == T and (steps == 1 or s[0] == 1)
    assert bool((s[1:] > s[:-1]).all())
    gaps = s[1:] - s[:-1]
    if steps > 1:
        assert gaps.max() - gaps.min() <= 1  # evenly spaced up to rounding
    assert make_schedule("cosine", 10).strided(1).tolist() == [10]
    assert make_schedule("cosine", 10).strided(10).tolist() == list(range(1, 11))


def test_snr():
    sched = make_schedule("linear", 100)
    t = torch.tensor([[1, 50], [99, 100]])
    snr = sched.snr(t)
    assert snr.shape == (2, 2) and snr.dtype == torch.float64
    ab = sched.alpha_bar[t]
    torch.testing.assert_close(snr, ab / (1 - ab))
    assert bool((snr.flatten()[1:] < snr.flatten()[:-1]).all())
    assert sched.snr(0).item() == math.inf
    assert sched.snr(7).item() == pytest.approx(sched.alpha_bar[7].item() / (1 - sched.alpha_bar[7].item()))


def test_min_snr_weight():
    snr = torch.tensor([0.0, 0.5, 5.0, 10.0, 100.0, math.inf], dtype=torch.float64)
    assert min_snr_weight(snr).tolist() == [1.0, 1.0, 1.0, 0.5, 0.05, 0.0]
    assert min_snr_weight(snr, gamma=1.0).tolist() == [1.0, 1.0, 0.2, 0.1, 0.01, 0.0]
    w = min_snr_weight(torch.tensor([2.0, 8.0]))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.minimum(torch.tensor([2.0, 8.0]), torch.tensor(5.0)) / torch.tensor([2.0, 8.0]))
    assert min_snr_weight(20.0).item() == 0.25


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_schedule("sigmoid", 10), r"unknown schedule name 'sigmoid'.*cosine.*cosine_variant.*linear"),
        (lambda: make_schedule("cosine", 0), "'T'"),
        (lambda: make_schedule("cosine", 10.0), "'T'"),
        (lambda: make_schedule("cosine", True), "'T'"),
        (lambda: make_schedule("cosine", 10, tau=2.0), r"unknown keyword.*tau"),
        (lambda: make_schedule("linear", 10), "'beta_end'"),
        (lambda: linear_betas(100, beta_start=0.1, beta_end=0.01), "'beta_start'"),
        (lambda: betas_from_alpha_bar(cosine_alpha_bar, -1), "'T'"),
        (lambda: betas_from_alpha_bar(cosine_alpha_bar, 10, max_beta=0.0), "'max_beta'"),
        (lambda: betas_from_alpha_bar(lambda t: t.sum(), 10), "'alpha_bar_fn'"),
        (lambda: cosine_alpha_bar(0.5, s=-0.1), "'s'"),
        (lambda: cosine_variant_alpha_bar(0.5, start=0.5, end=0.5), "'start' and 'end'"),
        (lambda: cosine_variant_alpha_bar(0.5, tau=0.0), "'tau'"),
        (lambda: cosine_variant_alpha_bar(0.5, clip_min=0.0), "'clip_min'"),
        (lambda: make_schedule("cosine_variant", 10, end=1.5), "'start' and 'end'"),
        (lambda: make_schedule("cosine", 10).strided(0), "'steps'"),
        (lambda: make_schedule("cosine", 10).strided(11), "'steps'"),
        (lambda: make_schedule("cosine", 10).snr(11), "'t'"),
        (lambda: make_schedule("cosine", 10).snr(torch.tensor([0.5])), "'t'"),
        (lambda: min_snr_weight(torch.ones(2), gamma=0.0), "'gamma'"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_schedule("cosine", 10.0), r"make_schedule: argument 'T' must be an int >= 1, got 10.0"),
        (lambda: linear_betas("10"), r"linear_betas: argument 'T' must be an int >= 1"),
        (lambda: make_schedule("cosine", 10).strided(2.0), r"Schedule.strided: argument 'steps' must be an int in"),
        (lambda: make_schedule("cosine", 10).snr(torch.tensor([True])), r"Schedule.snr: argument 't'"),
        (lambda: cosine_alpha_bar(0.5, s="0"), r"cosine_alpha_bar: argument 's' must be a number"),
        (lambda: betas_from_alpha_bar(cosine_alpha_bar, 10, max_beta=None), r"argument 'max_beta'"),
        (lambda: min_snr_weight(torch.ones(2), gamma="5"), r"min_snr_weight: argument 'gamma'"),
    ],
)
def test_wrong_types_are_type_and_value_errors(call, match):
    with pytest.raises(ArgumentTypeError, match=match) as info:
        call()
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_range_errors_name_expected_and_got():
    with pytest.raises(ValueError, match=r"Schedule.strided: argument 'steps' must be an int in \[1, 10\], got 11"):
        make_schedule("cosine", 10).strided(11)
    with pytest.raises(ValueError, match=r"Schedule.snr: argument 't' must be in \[0, 10\], got values in \[0, 11\]"):
        make_schedule("cosine", 10).snr(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"argument 'max_beta' must be a number in \(0.0, 1.0\], got 1.5"):
        betas_from_alpha_bar(cosine_alpha_bar, 10, max_beta=1.5)
