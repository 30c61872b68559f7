"""Priors over a tokenizer's codes: multinomial diffusion over code indices
(VQ-DDM) and Gaussian diffusion over BRICS key codes, on one UNet and one
schedule toolkit."""

from pyvq.models.priors.gaussian import GaussianDiffusion, GaussianDiffusionConfig
from pyvq.models.priors.multinomial import MultinomialDiffusion, MultinomialDiffusionConfig
from pyvq.models.priors.schedules import Schedule, make_schedule, min_snr_weight

# prior config class name -> the kind of codes it models ("indices" from a VQ
# tokenizer, "keys" from BRICS), as written in a codes folder's codes.json
PRIOR_KINDS = {"MultinomialDiffusionConfig": "indices", "GaussianDiffusionConfig": "keys"}

__all__ = [
    "GaussianDiffusion",
    "GaussianDiffusionConfig",
    "MultinomialDiffusion",
    "MultinomialDiffusionConfig",
    "PRIOR_KINDS",
    "Schedule",
    "make_schedule",
    "min_snr_weight",
]
