"""The prior contract (pyvq.models.priors.base): both priors implement it,
an incomplete prior cannot be built, what the diffusion priors share
(timestep check, reverse plan, replacement inpainting), weights saved under
the old ``unet.`` prefix, and the sampling helpers."""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pyvq._checks import ArgumentTypeError
from pyvq.models import load_pretrained
from pyvq.models.priors import (
    DiffusionPrior,
    GaussianDiffusion,
    GaussianDiffusionConfig,
    MultinomialDiffusion,
    MultinomialDiffusionConfig,
    Prior,
)
from pyvq.models.priors import multinomial
from pyvq.models.priors.base import CODE_KINDS
from pyvq.models.priors.sampling import (
    gumbel_argmax,
    progress_bar,
    push_loss_history,
    rand,
    randint,
    second_moment_probs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

S, T = 8, 10
UNET = dict(code_size=S, timesteps=T, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), num_groups=8, num_heads=2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prior(cls, config, seed: int):
    """A seeded prior in eval mode whose zero-initialised output layer is
    perturbed, so that its predictions depend on the input."""
    torch.manual_seed(seed)
    m = cls(config)
    with torch.no_grad():
        m.net.conv_out.weight.normal_(0, 0.05)
    return m.eval()


def multinomial_prior(seed: int = 0) -> MultinomialDiffusion:
    return _prior(MultinomialDiffusion, MultinomialDiffusionConfig(num_classes=8, **UNET), seed)


def gaussian_prior(seed: int = 0) -> GaussianDiffusion:
    return _prior(GaussianDiffusion, GaussianDiffusionConfig(channels=2, **UNET), seed)


def codes_for(prior, B: int = 2) -> torch.Tensor:
    if prior.code_kind == "indices":
        return torch.randint(0, prior.num_classes, (B, S, S), generator=gen(1))
    return torch.rand(B, *prior.config.code_shape, generator=gen(1))


PRIORS = [pytest.param(multinomial_prior, id="multinomial"), pytest.param(gaussian_prior, id="gaussian")]


# ---------------------------------------------------------------- the contract
@pytest.mark.parametrize("cls, kind", [(MultinomialDiffusion, "indices"), (GaussianDiffusion, "keys")])
def test_both_priors_satisfy_the_contract(cls, kind):
    assert issubclass(cls, Prior) and issubclass(cls, DiffusionPrior)
    assert cls.code_kind == kind and kind in CODE_KINDS
    assert not inspect.isabstract(cls)
    for name in ("training_loss", "sample", "inpaint", "forward"):
        method = getattr(cls, name)
        assert callable(method) and not getattr(method, "__isabstractmethod__", False), name
    params = inspect.signature(cls.sample).parameters
    assert {"n", "steps", "generator", "progress"} <= set(params)
    params = inspect.signature(cls.inpaint).parameters
    assert list(params)[1:3] in (["codes", "keep"], ["keys", "keep"])
    assert {"steps", "generator", "progress"} <= set(params)
    assert hasattr(MultinomialDiffusion, "nll") and not hasattr(GaussianDiffusion, "nll")


@pytest.mark.parametrize("make", PRIORS)
def test_contract_in_use(make):
    prior = make()
    assert isinstance(prior, Prior) and isinstance(prior, DiffusionPrior)
    codes = codes_for(prior)
    loss, logs = prior(codes, gen(2))
    assert loss.dim() == 0 and loss.requires_grad and all(isinstance(v, float) for v in logs.values())
    assert all(k.startswith("train/") for k in logs)
    out = prior.sample(2, steps=2, generator=gen(3))
    assert out.shape == codes.shape and torch.equal(out, prior.sample(2, steps=2, generator=gen(3)))
    keep = torch.zeros(S, S, dtype=torch.bool)
    keep[: S // 2] = True
    done = prior.inpaint(codes, keep, steps=2, generator=gen(4))
    assert done.shape == codes.shape
    assert torch.equal(done[..., : S // 2, :], codes[..., : S // 2, :])  # known codes never change
    assert prior.num_timesteps == T == prior.config.timesteps
    assert prior._device == torch.device("cpu") and prior._dtype == torch.float32


def test_a_prior_missing_a_method_cannot_be_built():
    class NoInpaint(Prior):
        code_kind = "indices"

        def training_loss(self, codes, generator=None):
            return codes.sum(), {}

        def sample(self, n, *, steps=None, generator=None, progress=False):
            return torch.zeros(n)

    with pytest.raises(TypeError, match="inpaint"):
        NoInpaint()

    class Complete(NoInpaint):
        def inpaint(self, codes, keep, *, steps=None, generator=None, progress=False):
            return codes

    assert isinstance(Complete(), Prior)


def test_code_kind_is_checked():
    class Unnamed(Prior):
        def training_loss(self, codes, generator=None):
            return codes.sum(), {}

        def sample(self, n, **kw):
            return torch.zeros(n)

        def inpaint(self, codes, keep, **kw):
            return codes

    with pytest.raises(TypeError, match="'code_kind'"):
        Unnamed()
    Unnamed.code_kind = "pixels"
    with pytest.raises(TypeError, match="'code_kind'.*pixels"):
        Unnamed()


@pytest.mark.parametrize("cls", [MultinomialDiffusion, GaussianDiffusion])
def test_config_type_checked_in_one_place(cls):
    with pytest.raises(TypeError, match=f"'config' must be a {cls.config_class.__name__}, got dict"):
        cls({})


@pytest.mark.parametrize("make", PRIORS)
def test_sample_and_inpaint_restore_training_mode(make):
    prior = make().train()
    codes = codes_for(prior)
    prior.sample(1, steps=1, generator=gen(0))
    assert prior.training
    prior.inpaint(codes, torch.ones(S, S, dtype=torch.bool), steps=1, generator=gen(0))
    assert prior.training
    prior.eval()
    prior.sample(1, steps=1, generator=gen(0))
    assert not prior.training


# ---------------------------------------------------------------- shared diffusion pieces
@pytest.mark.parametrize("make", PRIORS)
def test_reverse_plan(make):
    prior = make()
    full = prior._reverse_plan(None, "x")
    assert full == [(t, t - 1) for t in range(T, 0, -1)]
    assert prior._reverse_plan(T, "x") == full
    assert prior._reverse_plan(1, "x") == [(T, 0)]
    times = prior.schedule.strided(4).tolist()
    plan = prior._reverse_plan(4, "x")
    assert plan == list(zip(times[::-1], times[:-1][::-1] + [0]))
    assert plan[-1][1] == 0 and all(s < t for t, s in plan)


@pytest.mark.parametrize("make", PRIORS)
@pytest.mark.parametrize("steps, error", [(0, ValueError), (T + 1, ValueError), (2.0, ArgumentTypeError),
                                          (True, ArgumentTypeError)])
def test_steps_checked_alike(make, steps, error):
    with pytest.raises(error, match=r"\.sample: argument 'steps' must be None or an int in \[1, 10\]"):
        make().sample(1, steps=steps)


@pytest.mark.parametrize("make", PRIORS)
def test_timestep_errors_alike(make):
    prior = make()
    codes = codes_for(prior)
    if prior.code_kind == "keys":
        codes = prior.to_model(codes)
    name = type(prior).__name__
    # A float timestep is an ArgumentTypeError: a TypeError and a ValueError, as the two priors once raised.
    with pytest.raises(ArgumentTypeError, match=rf"{name}\.q_sample: argument 't' must be an int or an integer"):
        prior.q_sample(codes, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=rf"{name}\.q_sample: argument 't' must be in \[0, {T}\], got {T + 1}"):
        prior.q_sample(codes, T + 1)
    with pytest.raises(ValueError, match=r"argument 't' must be in \[0, 10\], got values in \[-1, 3\]"):
        prior.q_sample(codes, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"argument 't' must be an int or have shape \(2,\), got \(3,\)"):
        prior.q_sample(codes, torch.tensor([1, 2, 3]))
    t = prior._check_timesteps(torch.tensor(4), 3, "x")
    assert t.tolist() == [4, 4, 4] and t.dtype == torch.int64


@pytest.mark.parametrize("make", PRIORS)
def test_keep_errors_alike(make):
    prior = make()
    codes = codes_for(prior)
    with pytest.raises(ArgumentTypeError, match="argument 'keep' must be a bool tensor, got dtype torch.float32"):
        prior.inpaint(codes, torch.ones(S, S))
    with pytest.raises(ArgumentTypeError, match="argument 'keep' must be a bool tensor, got list"):
        prior.inpaint(codes, [[True]])
    with pytest.raises(ValueError, match="argument 'keep' must broadcast to the shape of"):
        prior.inpaint(codes, torch.ones(3, S, S, dtype=torch.bool))


def test_multinomial_keep_broadcasts_like_gaussian():
    prior = multinomial_prior()
    codes = codes_for(prior, B=3)
    keep = torch.rand(S, S, generator=gen(5)) < 0.5
    a = prior.inpaint(codes, keep, steps=2, generator=gen(6))
    b = prior.inpaint(codes, keep[None], steps=2, generator=gen(6))
    c = prior.inpaint(codes, keep.expand(3, S, S), steps=2, generator=gen(6))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[keep.expand(3, S, S)], codes[keep.expand(3, S, S)])


def test_reverse_chain_replaces_after_each_step():
    prior = multinomial_prior()
    plan = [(3, 1), (1, 0)]
    calls = []

    def step(x, t, s):
        calls.append(("step", t, s))
        return x + 10

    def known(s):
        calls.append(("known", s))
        return torch.full((4,), -s)

    keep = torch.tensor([True, False, True, False])
    out = prior._reverse_chain(torch.zeros(4, dtype=torch.int64), plan, step, progress=False, desc="",
                               keep=keep, known=known)
    assert calls == [("known", 3), ("step", 3, 1), ("known", 1), ("step", 1, 0), ("known", 0)]
    assert out.tolist() == [0, 20, 0, 20]


# ---------------------------------------------------------------- the network's old name
def _with_old_prefix(state: dict) -> dict:
    return {("unet." + k[len("net."):] if k.startswith("net.") else k): v for k, v in state.items()}


def test_old_unet_prefix_loads_strictly():
    src = multinomial_prior(seed=0)
    src.train()
    src.training_loss(codes_for(src, 4), generator=gen(7))  # some loss history
    src.eval()
    old = _with_old_prefix(src.state_dict())
    assert any(k.startswith("unet.") for k in old) and not any(k.startswith("net.") for k in old)
    dst = multinomial_prior(seed=1)
    result = dst.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(k.startswith("unet.") or not k.startswith("net.") for k in old)  # the caller's dict is untouched
    for (ka, a), (kb, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    codes = codes_for(src)
    with torch.no_grad():
        assert torch.equal(dst.p_logits(codes, 3), src.p_logits(codes, 3))
    assert torch.equal(dst.sample(2, steps=3, generator=gen(8)), src.sample(2, steps=3, generator=gen(8)))


def test_old_unet_prefix_both_names_is_an_error():
    m = multinomial_prior()
    state = dict(m.state_dict())
    state["unet.conv_in.weight"] = state["net.conv_in.weight"]
    with pytest.raises(RuntimeError, match="unet.conv_in.weight"):
        m.load_state_dict(state)


def test_old_save_pretrained_folder_loads(tmp_path):
    src = multinomial_prior(seed=0)
    src.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    save_file(_with_old_prefix(load_file(path)), path, metadata={"format": "pt"})  # as written before the rename
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["_class_name"] == "MultinomialDiffusion"
    for loaded in (MultinomialDiffusion.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert torch.equal(loaded.sample(2, steps=2, generator=gen(9)), src.sample(2, steps=2, generator=gen(9)))


def test_old_prefix_under_a_parent_prefix_loads():
    """An EMA copy (``AveragedModel``: ``module.unet....``) of an old checkpoint."""
    src = multinomial_prior(seed=0)
    ema = AveragedModel(src, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    old = {(k.replace("module.net.", "module.unet.", 1)): v for k, v in ema.state_dict().items()}
    assert any(k.startswith("module.unet.") for k in old)
    dst = AveragedModel(multinomial_prior(seed=1), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    dst.load_state_dict(old, strict=True)
    for a, b in zip(ema.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- sampling helpers
def test_sampling_helpers_are_seeded():
    assert torch.equal(rand((3, 4), gen(0), torch.device("cpu")), torch.rand((3, 4), generator=gen(0)))
    assert torch.equal(randint(7, (5,), gen(1), torch.device("cpu")), torch.randint(7, (5,), generator=gen(1)))
    logp = torch.log_softmax(torch.randn(2, 5, 3, generator=gen(2)), dim=1)
    a = gumbel_argmax(logp, gen(3))
    assert a.shape == (2, 3) and a.dtype == torch.int64 and torch.equal(a, gumbel_argmax(logp, gen(3)))
    assert multinomial.second_moment_probs is second_moment_probs  # still importable from its old home


def test_gumbel_argmax_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logp = probs.log().view(1, 3, 1).expand(1, 3, 20000)
    draws = gumbel_argmax(logp, gen(4))
    freq = torch.bincount(draws.flatten(), minlength=3).double() / draws.numel()
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.015)
    # A class with -inf log-probability is never drawn.
    assert not bool((gumbel_argmax(torch.tensor([[[0.0], [-float("inf")]]]).expand(1, 2, 1000), gen(5)) == 1).any())


def test_progress_bar_off_is_the_iterable():
    items = [(3, 1), (1, 0)]
    assert progress_bar(items, False, "x") is items
    assert list(progress_bar(items, True, "x")) == items


# ---------------------------------------------------------------- config checks
@pytest.mark.parametrize("cls, field, value, match", [
    (MultinomialDiffusionConfig, "importance_sampling", 1,
     r"field 'importance_sampling' must be a bool, got 1 \(int\)"),
    (MultinomialDiffusionConfig, "scale_shift", "yes", r"field 'scale_shift' must be a bool"),
    (MultinomialDiffusionConfig, "uniform_prob", "0.1", r"field 'uniform_prob' must be a number in \[0.0, 1.0\)"),
    (MultinomialDiffusionConfig, "num_classes", 2.5, r"field 'num_classes' must be an int >= 2"),
    (GaussianDiffusionConfig, "clip_denoised", "yes", r"field 'clip_denoised' must be a bool"),
    (GaussianDiffusionConfig, "min_snr_gamma", "5", r"field 'min_snr_gamma' must be a number in \[0.0, inf\)"),
    (GaussianDiffusionConfig, "dropout", None, r"field 'dropout' must be a number in \[0.0, 1.0\)"),
])
def test_config_type_errors_are_type_and_value_errors(cls, field, value, match):
    extra = {"num_classes": 8} if cls is MultinomialDiffusionConfig else {"channels": 2}
    with pytest.raises(ArgumentTypeError, match=f"{cls.__name__}: {match}"):
        cls(**{**UNET, **extra, field: value})


@pytest.mark.parametrize("field, value", [("uniform_prob", 1.0), ("dropout", float("nan")),
                                          ("min_snr_gamma", math.inf)])
def test_config_range_errors(field, value):
    cls = GaussianDiffusionConfig if field == "min_snr_gamma" else MultinomialDiffusionConfig
    extra = {"num_classes": 8} if cls is MultinomialDiffusionConfig else {"channels": 2}
    with pytest.raises(ValueError, match=rf"field '{field}' must be a number in \[0.0, .*\), got"):
        cls(**{**UNET, **extra, field: value})


def test_push_loss_history_is_a_ring():
    hist, counts = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    push_loss_history(hist, counts, torch.tensor([1, 1, 3, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert counts.tolist() == [0, 2, 0, 1]
    assert hist.tolist() == [[0, 0], [2, 4], [0, 0], [3, 0]]
