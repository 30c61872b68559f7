"""Models built from ``pyvq.nn`` (tokenizers and the priors over their codes): ``Model(config)``, ``save_pretrained`` /
``from_pretrained``, and named presets (``list_presets()``). Tokenizers return the typed outputs of
``pyvq.models.outputs`` (``TokenizerOutput``, ``VQEncoding``, ``VQAux``, ``BRICSAux``)."""

from pyvq.models import _pretrained, cost, outputs, priors, tokenizers
from pyvq.models._pretrained import *  # noqa: F401,F403
from pyvq.models.cost import *  # noqa: F401,F403
from pyvq.models.outputs import *  # noqa: F401,F403
from pyvq.models.priors import *  # noqa: F401,F403
from pyvq.models.tokenizers import *  # noqa: F401,F403

# Each name once (the tokenizers package also re-exports the cost helpers and decoder layers).
__all__ = list(dict.fromkeys([*_pretrained.__all__, *cost.__all__, *outputs.__all__, *priors.__all__, *tokenizers.__all__]))
