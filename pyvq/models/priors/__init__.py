"""Priors over a tokenizer's codes: multinomial diffusion over code indices
(VQ-DDM) and Gaussian diffusion over BRICS key codes, on one UNet and one
schedule toolkit. A prior class names the kind of codes it models in
``code_kind`` (``"indices"`` from a VQ tokenizer, ``"keys"`` from BRICS), as
written in a codes folder's codes.json."""

from pyvq.models.priors.gaussian import GaussianDiffusion, GaussianDiffusionConfig
from pyvq.models.priors.multinomial import MultinomialDiffusion, MultinomialDiffusionConfig
from pyvq.models.priors.schedules import Schedule, make_schedule, min_snr_weight

__all__ = [
    "GaussianDiffusion",
    "GaussianDiffusionConfig",
    "MultinomialDiffusion",
    "MultinomialDiffusionConfig",
    "Schedule",
    "make_schedule",
    "min_snr_weight",
]
