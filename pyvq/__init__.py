"""pyvq: fast kernels and thin layers for image tokenizers and their priors.

Import the submodules you need: ``pyvq.ops`` (kernels with a PyTorch API),
``pyvq.reference`` (their plain-PyTorch twins), ``pyvq.nn`` (layers).
``pyvq.info()`` reports what was compiled and which backend each op uses.
"""

__version__ = "0.1.0"

from pyvq._backend import backend, info  # noqa: E402,F401
from pyvq import ops, reference  # noqa: E402,F401

__all__ = ["__version__", "backend", "info", "ops", "reference"]
