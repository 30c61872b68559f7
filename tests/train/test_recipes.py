"""Training recipes: lookup by model type (MRO), registration, the trainers'
checks of a model's recipe, the shared trainer base, and that models carry
no training setup."""

from __future__ import annotations

import pytest
import torch

from pyvq.models import (
    BRICS,
    VQGAN,
    AsymmetricVQGAN,
    AutoencoderKL,
    GaussianDiffusion,
    MultinomialDiffusion,
    TokenizerOutput,
    VQAux,
)
from pyvq.train import recipes
from pyvq.train.base import BaseTrainer
from pyvq.train.config import TrainConfig
from pyvq.train.prior_trainer import PriorTrainer
from pyvq.train.recipes import (
    AsymmetricRecipe,
    BRICSRecipe,
    GaussianRecipe,
    KLRecipe,
    MultinomialRecipe,
    PriorRecipe,
    TokenizerRecipe,
    VQRecipe,
    recipe_for,
    register_recipe,
)
from pyvq.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


_RUN = {"model": "vqgan_tiny", "image_size": 32, "batch_size": 4, "steps": 2, "perceptual_weight": 0.0}


def _config(**kw):
    return TrainConfig(**{**_RUN, **kw})


@pytest.fixture
def registry(monkeypatch):
    """A copy of the recipe registry, restored after the test."""
    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))


class _Toy(torch.nn.Module):
    pass


class _ToyChild(_Toy):
    pass


def test_builtin_recipes_by_type():
    expected = {VQGAN: VQRecipe, AutoencoderKL: KLRecipe, AsymmetricVQGAN: AsymmetricRecipe, BRICS: BRICSRecipe,
                MultinomialDiffusion: MultinomialRecipe, GaussianDiffusion: GaussianRecipe}
    for cls, kind in expected.items():
        assert type(recipe_for(cls)) is kind, cls
    assert recipe_for(VQGAN.from_preset("vqgan_tiny")) is recipe_for(VQGAN)  # an instance or its class
    for cls in (VQGAN, AutoencoderKL, AsymmetricVQGAN, BRICS):
        assert isinstance(recipe_for(cls), TokenizerRecipe) and recipe_for(cls).trainer == "Trainer"
    for cls in (MultinomialDiffusion, GaussianDiffusion):
        assert isinstance(recipe_for(cls), PriorRecipe) and recipe_for(cls).trainer == "PriorTrainer"


def test_lookup_walks_the_mro_and_unknown_types_fail_clearly(registry):
    with pytest.raises(TypeError, match=r"register_recipe\(_ToyChild, recipe\)") as err:
        recipe_for(_ToyChild())
    assert "VQGAN" in str(err.value) and "_ToyChild" in str(err.value)
    toy = TokenizerRecipe()
    register_recipe(_Toy, toy)
    assert recipe_for(_ToyChild) is toy and recipe_for(_Toy()) is toy  # the nearest base class's recipe
    own = VQRecipe()
    register_recipe(_ToyChild, own)
    assert recipe_for(_ToyChild()) is own and recipe_for(_Toy) is toy
    with pytest.raises(TypeError, match="'model_type' must be a class"):
        register_recipe(_Toy(), toy)
    with pytest.raises(TypeError, match="'recipe' must be a pyvq.train.recipes.Recipe, got dict"):
        register_recipe(_Toy, {})


def test_tokenizer_recipes_loss_inputs_and_metrics():
    x = torch.zeros(2, 3, 4, 4)
    aux = VQAux(loss=torch.tensor(0.5, dtype=torch.float64), perplexity=torch.tensor(3.0), usage=torch.tensor(0.25),
                indices=torch.zeros(2, 1, 1, dtype=torch.long))
    out = TokenizerOutput(x, aux)
    inputs = VQRecipe().loss_inputs(x, out)
    assert set(inputs) == {"codebook_loss"} and inputs["codebook_loss"].dtype == torch.float32
    assert VQRecipe().metrics(out) == {"train/perplexity": 3.0, "train/usage": 0.25}
    assert set(AsymmetricRecipe().loss_inputs(x, out)) == {"codebook_loss"}
    assert AsymmetricRecipe().metrics(out) == VQRecipe().metrics(out)
    posterior = AutoencoderKL.from_preset("kl_tiny").encode(torch.zeros(1, 3, 16, 16))
    kl_out = TokenizerOutput(x, posterior)
    assert KLRecipe().loss_inputs(x, kl_out) == {"posterior": posterior} and KLRecipe().metrics(kl_out) == {}
    assert AsymmetricRecipe().loss_inputs(x, kl_out) == {} and AsymmetricRecipe().metrics(kl_out) == {}


def test_trainer_uses_the_registered_recipe(tmp_path, registry):
    class Custom(VQRecipe):
        def train_defaults(self, model):
            return {"lr": 5e-4, "betas": (0.8, 0.95)}

    custom = Custom()
    register_recipe(VQGAN, custom)
    t = Trainer(_config(lr=1e-3), str(tmp_path))
    assert t.recipe is custom and isinstance(t, BaseTrainer)
    assert t.config.lr == 1e-3 and t.config.betas == (0.8, 0.95)  # the user's lr is kept
    assert t.opt_g.param_groups[0]["betas"] == (0.8, 0.95)


def test_trainers_check_the_recipe_kind(tmp_path):
    prior = MultinomialDiffusion.from_preset("vqddm_tiny", num_classes=16, timesteps=10)
    with pytest.raises(TypeError, match="MultinomialDiffusion, which trains with PriorTrainer"):
        Trainer(_config(), str(tmp_path / "a"), model=prior)
    codes = torch.utils.data.TensorDataset(torch.randint(0, 16, (16, 8, 8)))
    codes.meta = {"kind": "indices", "shape": [8, 8], "num_classes": 16}
    with pytest.raises(TypeError, match="VQGAN, which trains with Trainer"):
        PriorTrainer(_config(), str(tmp_path / "b"), dataset=codes, model=VQGAN.from_preset("vqgan_tiny"))
    with pytest.raises(TypeError, match="register_recipe"):
        Trainer(_config(), str(tmp_path / "c"), model=_Toy())
    t = PriorTrainer(TrainConfig(model="vqddm_tiny", steps=2, batch_size=4, model_overrides={"timesteps": 10}),
                     str(tmp_path / "d"), dataset=codes)
    assert isinstance(t, BaseTrainer) and isinstance(t.recipe, MultinomialRecipe) and t.loss is None
    assert t.config.betas == (0.9, 0.999) and set(t._modules()) == {"model"}


def test_models_carry_no_training_setup():
    for cls in (VQGAN, AutoencoderKL, AsymmetricVQGAN, BRICS, MultinomialDiffusion, GaussianDiffusion):
        for name in ("build_loss", "train_defaults", "loss_inputs"):
            assert not hasattr(cls, name), (cls.__name__, name)


def test_brics_recipe_defaults():
    model = BRICS.from_preset("brics_tiny", kl_weight=2e-6)
    d = recipe_for(model).train_defaults(model)
    assert d == {"lr": 2e-3, "betas": (0.0, 0.99), "adam_eps": 1e-15, "disc_adam_eps": 1e-8, "warmup_steps": 0,
                 "min_lr_ratio": 1.0, "grad_clip": 0.0, "disc_weight": 1.0, "pixel_loss": "l2",
                 "pixel_weight": 20.0, "perceptual_weight": 5.0, "kl_weight": 2e-6}
    config = TrainConfig(image_size=32).with_model_defaults({**d, "perceptual_weight": 0.0})
    loss = recipe_for(model).build_loss(model, config)
    assert loss.pixel_weight == 20.0 and loss.discriminator.resolution == 32
