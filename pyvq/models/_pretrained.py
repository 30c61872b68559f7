"""Saving, loading and naming models built from a config dataclass.

A model class mixes in ``PretrainedModel`` and names its config dataclass in
``config_class``::

    class VQGAN(PretrainedModel, nn.Module):
        config_class = VQGANConfig
        def __init__(self, config: VQGANConfig): ...

``model.save_pretrained(dir)`` writes two files:

- ``model.safetensors``: the ``state_dict`` (parameters and persistent
  buffers), loaded back without pickle;
- ``config.json``: the config dataclass's fields (tuples become JSON lists),
  plus ``"_class_name"`` (the model class) and ``"_pyvq_version"``.

``Model.from_pretrained(dir)`` rebuilds ``Model(config)`` and loads the
weights strictly. ``load_pretrained(dir)`` does the same without naming the
class, using ``_class_name``.

Presets are named configs (``register_preset`` / ``get_preset`` /
``list_presets``); ``Model.from_preset(name)`` builds one with random
weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, ClassVar

import torch

__all__ = [
    "PretrainedModel",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "list_presets",
    "load_pretrained",
    "load_run",
    "model_class_for",
    "register_preset",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# model class name -> class, filled by PretrainedModel.__init_subclass__
_MODEL_CLASSES: dict[str, type] = {}
# preset name -> config dataclass instance
_PRESETS: dict[str, Any] = {}


# ---------------------------------------------------------------- configs
def _to_json(value):
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _from_json(value):
    # JSON has no tuples; configs hold sequences as tuples (hashable, immutable).
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def config_to_dict(config) -> dict:
    """The fields of a config dataclass as a JSON-ready dict."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict: expected a dataclass instance, got {type(config).__name__}")
    return {f.name: _to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_dict(config_class: type, data: dict):
    """Build ``config_class`` from a dict (e.g. read from config.json).

    Keys starting with ``_`` (metadata) are ignored; an unknown key raises
    ``ValueError`` naming it, so a config written by another model or a
    newer version is not silently misread. Missing keys take the
    dataclass's defaults.
    """
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    fields = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{config_class.__name__}: unknown config field(s) {unknown}; known: {sorted(names)}")
    return config_class(**{k: _from_json(v) for k, v in fields.items()})


# ---------------------------------------------------------------- presets
def register_preset(name: str, config, *, overwrite: bool = False) -> None:
    """Register ``config`` (a config dataclass instance) under ``name``.

    A copy is stored. Registering an existing name raises ``ValueError``
    unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_preset: argument 'name' must be a non-empty str, got {name!r}")
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"register_preset: argument 'config' must be a dataclass instance, got {type(config).__name__}")
    if name in _PRESETS and not overwrite:
        raise ValueError(f"register_preset: preset {name!r} already exists (pass overwrite=True to replace it)")
    _PRESETS[name] = copy.deepcopy(config)


def get_preset(name: str):
    """A copy of the config registered as ``name``; ``KeyError`` listing the
    known names if there is none."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {list_presets()}")
    return copy.deepcopy(_PRESETS[name])


def list_presets() -> list[str]:
    """Sorted names of the registered presets."""
    return sorted(_PRESETS)


def model_class_for(config) -> type:
    """The registered model class whose ``config_class`` is ``config``'s type."""
    for cls in _MODEL_CLASSES.values():
        if cls.config_class is type(config):
            return cls
    raise KeyError(f"no model class takes a {type(config).__name__} (import the module that defines it first)")


# ---------------------------------------------------------------- models
class PretrainedModel:
    """Mixin for ``nn.Module`` models built as ``Model(config)``.

    Subclasses set ``config_class`` and store the config as ``self.config``.
    """

    config_class: ClassVar[type] = None  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _MODEL_CLASSES[cls.__name__] = cls

    # -- building
    @classmethod
    def from_config(cls, config):
        """``cls(config)``; ``config`` may also be a dict of its fields."""
        if isinstance(config, dict):
            config = config_from_dict(cls.config_class, config)
        return cls(config)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """Build the preset ``name`` (random weights), with fields replaced
        by ``overrides``. The preset must be a ``cls.config_class``."""
        config = get_preset(name)
        if cls.config_class is not None and not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__}.from_preset: preset {name!r} is a {type(config).__name__}, "
                f"not a {cls.config_class.__name__}"
            )
        if overrides:
            config = dataclasses.replace(config, **overrides)
        return cls(config)

    # -- saving / loading
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``
        (created if needed; existing files are replaced)."""
        from safetensors.torch import save_file

        import pyvq

        config = getattr(self, "config", None)
        if config is None:
            raise AttributeError(f"{type(self).__name__}.save_pretrained: the model has no 'config' attribute")
        os.makedirs(directory, exist_ok=True)
        # Cloned: safetensors refuses tensors that share storage, and a
        # contiguous CPU copy is what it writes anyway.
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"_class_name": type(self).__name__, "_pyvq_version": pyvq.__version__}
        meta.update(config_to_dict(config))
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=False)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Rebuild a model saved by ``save_pretrained``.

        Args:
            directory: the folder holding ``config.json`` and
                ``model.safetensors``.
            map_location: device of the returned model's tensors.

        Returns:
            The model in eval mode (call ``.train()`` to fine-tune it).

        Raises:
            FileNotFoundError: the folder or one of its two files is missing.
            ValueError: the folder holds another model class, or the weights
                do not match the config (missing or unexpected keys, shapes).
        """
        if cls is PretrainedModel:
            return load_pretrained(directory, map_location=map_location)
        data = _read_config(directory)
        name = data.get("_class_name")
        if name is not None and name != cls.__name__:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {os.fspath(directory)!r} holds a {name}, not a {cls.__name__}"
            )
        return _load(cls, directory, data, map_location)


def _read_config(directory) -> dict:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"from_pretrained: no such directory {directory!r}")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, fname)):
            raise FileNotFoundError(
                f"from_pretrained: {directory!r} has no {fname} (expected the output of save_pretrained)"
            )
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"from_pretrained: {CONFIG_NAME} in {directory!r} is not a JSON object")
    return data


def _load(cls, directory, data: dict, map_location):
    from safetensors.torch import load_file

    config = config_from_dict(cls.config_class, data)
    model = cls(config)
    state = load_file(os.path.join(os.fspath(directory), WEIGHTS_NAME), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{cls.__name__}.from_pretrained: weights in {os.fspath(directory)!r} do not fit: {exc}") from exc
    return model.to(torch.device(map_location)).eval()


def load_run(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """``load_pretrained`` of a training run's final model (``path/model``)
    or of a saved model folder."""
    folder = os.path.join(path, "model")
    return load_pretrained(folder if os.path.isdir(folder) else path, map_location)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load whatever pyvq model ``directory`` holds (by its ``_class_name``)."""
    data = _read_config(directory)
    name = data.get("_class_name")
    if name not in _MODEL_CLASSES:
        raise ValueError(
            f"load_pretrained: {CONFIG_NAME} in {os.fspath(directory)!r} names model class {name!r}, "
            f"known: {sorted(_MODEL_CLASSES)} (import the module that defines it first)"
        )
    return _load(_MODEL_CLASSES[name], directory, data, map_location)
