"""Priors over a tokenizer's codes: multinomial diffusion over code indices
(VQ-DDM) and Gaussian diffusion over BRICS key codes, on one UNet and one
schedule toolkit; and Efficient-VQGAN's multi-grained transformer over code
indices (``MultiGrainedTransformer``: masked visual token modelling,
block-by-block parallel decoding, editing).

The prior contract (``base.Prior``; ``PriorTrainer``, ``pyvq sample`` and
``pyvq inpaint`` rely on nothing else):

- ``code_kind``: the kind of codes modelled, ``"indices"`` (from a VQ
  tokenizer) or ``"keys"`` (from BRICS), as written in a codes folder's
  codes.json;
- ``training_loss(codes, generator=None, ...) -> (loss, logs)``, also
  reached as ``prior(codes)``;
- ``sample(n, *, steps=None, generator=None, progress=False, ...)``;
- ``inpaint(codes, keep, *, steps=None, generator=None, progress=False,
  ...)``: the codes where ``keep`` is True never change;
- optionally ``nll(codes, ...)`` (``MultinomialDiffusion`` has it).

``base.DiffusionPrior`` adds what the two diffusion priors share (the
timestep check, the reverse-step plan, the replacement-inpainting loop);
``sampling`` holds the seeded draws, the loss-second-moment timestep
distribution and the progress bar.
"""

from pyvq.models.priors.base import DiffusionPrior, Prior
from pyvq.models.priors.gaussian import GaussianDiffusion, GaussianDiffusionConfig
from pyvq.models.priors.multigrained import (
    MultiGrainedTransformer,
    MultiGrainedTransformerConfig,
    box_keep,
    mask_schedule,
    outpaint_keep,
)
from pyvq.models.priors.multinomial import MultinomialDiffusion, MultinomialDiffusionConfig
from pyvq.models.priors.schedules import Schedule, make_schedule, min_snr_weight

__all__ = [
    "DiffusionPrior",
    "GaussianDiffusion",
    "GaussianDiffusionConfig",
    "MultiGrainedTransformer",
    "MultiGrainedTransformerConfig",
    "MultinomialDiffusion",
    "MultinomialDiffusionConfig",
    "Prior",
    "Schedule",
    "box_keep",
    "make_schedule",
    "mask_schedule",
    "min_snr_weight",
    "outpaint_keep",
]
