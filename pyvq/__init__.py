"""pyvq: fast kernels and thin layers for image tokenizers and their priors.

``import pyvq`` loads the ops (``pyvq.ops``: kernels with a PyTorch API) and
their plain-PyTorch twins (``pyvq.reference``); the other subpackages are
attributes loaded on first use, as ``torch.nn`` is after ``import torch``:
``pyvq.nn`` (layers), ``pyvq.models`` (tokenizers and priors),
``pyvq.convert`` (taming / diffusers checkpoints), ``pyvq.losses``,
``pyvq.metrics``, ``pyvq.data``, ``pyvq.train`` and ``pyvq.refit``.
``pyvq.info()`` reports what was compiled and which backend each op uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

import torch as _torch  # noqa: E402

from pyvq._requirements import torch_problem as _torch_problem  # noqa: E402

# Before pyvq._C loads: an extension built for another torch fails there with
# an undefined symbol, which names neither torch nor the version needed.
if _torch_problem(_torch.__version__):
    raise ImportError(_torch_problem(_torch.__version__) + f" at {_torch.__file__}")
del _torch, _torch_problem

from pyvq._backend import backend, info  # noqa: E402,F401
from pyvq import ops, reference  # noqa: E402,F401

# Imported on first attribute access (module __getattr__, PEP 562), so that
# ``import pyvq`` does not pay for the models, the training stack or diffusers.
_LAZY_SUBMODULES = ("nn", "models", "convert", "losses", "metrics", "data", "train", "refit")

__all__ = ["__version__", "backend", "info", "ops", "reference", *_LAZY_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"pyvq.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'pyvq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
