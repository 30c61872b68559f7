"""A toy prior and its PriorTrainer, for the fault tests: a real trainer
(checkpoints, resume, skipped steps) that runs a step in milliseconds.

``ToyPrior`` maps a code map to one number with a linear layer; its
``seen`` buffer changes in every forward (as an EMA codebook or a prior's
loss history do), and ``bad`` (call numbers, from 0) makes chosen calls
return a NaN loss, an infinite one with finite gradients
(``bad_kind="inf"``) or a finite one with a non-finite gradient
(``bad_kind="grad"``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pyvq.train import recipes
from pyvq.train.config import TrainConfig
from pyvq.train.prior_trainer import PriorTrainer


class ToyPrior(torch.nn.Module):
    code_kind = "indices"

    def __init__(self, bad=(), bad_kind: str = "nan"):
        super().__init__()
        self.lin = torch.nn.Linear(16, 1)
        self.register_buffer("seen", torch.zeros(()))
        self.bad, self.bad_kind, self.calls = set(bad), bad_kind, 0

    def forward(self, codes):
        x = codes.float().reshape(len(codes), -1) / 8
        self.seen += 1
        loss = (self.lin(x).squeeze(1) - x.mean(1)).pow(2).mean()
        if self.calls in self.bad:
            if self.bad_kind == "nan":
                loss = loss * float("nan")
            elif self.bad_kind == "inf":  # an infinite value, finite gradients
                loss = loss + float("inf")
            else:  # finite value, NaN gradient: d sqrt(u)/du is inf at 0
                loss = loss + torch.sqrt(self.lin.weight.sum() * 0.0)
        self.calls += 1
        return loss, {"train/loss": loss.detach()}

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"toy": True}, f)


@pytest.fixture
def toy_recipe(monkeypatch):
    """ToyPrior trains with the prior recipe (the registry is restored afterwards)."""
    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))
    recipes.register_recipe(ToyPrior, recipes.PriorRecipe())


def toy_codes(n: int = 16):
    g = torch.Generator().manual_seed(0)
    codes = torch.utils.data.TensorDataset(torch.randint(0, 8, (n, 4, 4), generator=g))
    codes.meta = {"kind": "indices", "shape": [4, 4], "num_classes": 8}
    return codes


def toy_trainer(out_dir, *, resume: bool = False, overwrite: bool = False, bad=(), bad_kind: str = "nan",
                dataset=None, **config) -> PriorTrainer:
    """A PriorTrainer of a ToyPrior (log and checkpoint every step by default;
    ``dataset`` instead of ``toy_codes()``)."""
    base = dict(model="vqddm_tiny", steps=6, batch_size=4, lr=1e-2, warmup_steps=2, log_every=1,
                image_every=100, ckpt_every=1, seed=0)
    base.update(config)
    torch.manual_seed(0)  # the same initial weights in every run
    return PriorTrainer(TrainConfig(**base), str(out_dir), resume=resume, overwrite=overwrite,
                        dataset=toy_codes() if dataset is None else dataset,
                        model=ToyPrior(bad, bad_kind))


def state_of(trainer) -> dict:
    """Everything a skipped step must leave alone: weights, buffers, the
    optimizers' state, the schedulers' position, the EMA."""
    out = {f"module.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for name, opt in trainer._optimizers().items():
        for i, st in enumerate(opt.state_dict()["state"].values()):
            out.update({f"opt.{name}.{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    for name, sched in trainer._schedulers().items():
        out[f"sched.{name}"] = torch.tensor(sched.last_epoch)
    if trainer.ema is not None:
        out.update({f"ema.{k}": v.detach().clone() for k, v in trainer.ema.state_dict().items()})
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
