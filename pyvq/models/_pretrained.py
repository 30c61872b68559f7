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
class, using ``_class_name``. Both also take a Hugging Face Hub repository id
instead of a folder (``revision=``, ``subfolder=``, ``cache_dir=``,
``local_files_only=``, ``token=``, ``force_download=``): an existing local
folder wins, then the local Hub cache, then a download when allowed
(``pyvq._hub``). ``model.push_to_hub(repo_id)`` and
``model.save_pretrained(dir, push_to_hub=True)`` upload the two files.

Presets are named configs (``register_preset`` / ``get_preset`` /
``list_presets``); ``Model.from_preset(name)`` builds one with random
weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, ClassVar

import torch

from pyvq._hub import check_repo_id, resolve_folder, upload_folder

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
    def save_pretrained(
        self, directory: str | os.PathLike, push_to_hub: bool = False, repo_id: str | None = None, **kwargs
    ):
        """Write ``model.safetensors`` and ``config.json`` into ``directory``
        (created if needed; existing files are replaced).

        With ``push_to_hub=True`` the two files are then uploaded to the Hub
        repository ``repo_id`` (default: the folder's name, in your
        namespace), as ``push_to_hub`` does; ``kwargs`` are its
        ``commit_message``, ``private``, ``token``, ``revision``,
        ``create_pr``. The local files are written first and stay whatever
        the upload does. Returns ``None``, or the upload's ``CommitInfo``.
        """
        if not isinstance(push_to_hub, bool):
            raise TypeError(
                f"{type(self).__name__}.save_pretrained: argument 'push_to_hub' must be a bool, "
                f"got {type(push_to_hub).__name__} (pass the repository as repo_id=)"
            )
        if not push_to_hub and (repo_id is not None or kwargs):
            given = (["repo_id"] if repo_id is not None else []) + sorted(kwargs)
            raise TypeError(f"{type(self).__name__}.save_pretrained: {given} apply only with push_to_hub=True")
        unknown = sorted(set(kwargs) - _PUSH_OPTIONS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.save_pretrained: unexpected argument(s) {unknown}; "
                f"push_to_hub takes {sorted(_PUSH_OPTIONS)}"
            )
        what = f"{type(self).__name__}.save_pretrained"
        if push_to_hub:
            if repo_id is None:  # diffusers' default: the folder's name, in the user's namespace
                repo_id = os.path.basename(os.path.normpath(os.path.abspath(directory)))
            check_repo_id(repo_id, what)
        files = self._write_pretrained(directory)
        if not push_to_hub:
            return None
        kwargs["commit_message"] = kwargs.get("commit_message") or f"Upload {type(self).__name__}"
        return upload_folder(directory, repo_id, files, what=what, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Upload the model (``config.json`` + ``model.safetensors``) to the
        Hugging Face Hub repository ``repo_id``.

        The repository is created if missing (``private`` applies then);
        ``revision`` is a branch, created if missing; ``create_pr`` opens a
        pull request instead of committing. The files are first written to a
        temporary folder by ``save_pretrained``; if the upload fails that
        folder is kept and its path is added to the error (nothing is lost).
        Load it back with ``Model.from_pretrained(repo_id)``.

        Returns:
            huggingface_hub's ``CommitInfo`` of the upload.
        """
        what = f"{type(self).__name__}.push_to_hub"
        check_repo_id(repo_id, what)
        folder = tempfile.mkdtemp(prefix="pyvq-push-")
        try:
            files = self._write_pretrained(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        result = upload_folder(
            folder, repo_id, files, what=what, commit_message=commit_message or f"Upload {type(self).__name__}",
            private=private, token=token, revision=revision, create_pr=create_pr,
        )
        shutil.rmtree(folder, ignore_errors=True)
        return result

    def _write_pretrained(self, directory: str | os.PathLike) -> list[str]:
        # The files of save_pretrained; returns their names (what an upload sends).
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
        return [CONFIG_NAME, WEIGHTS_NAME]

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
    ):
        """Rebuild a model saved by ``save_pretrained`` (or ``push_to_hub``).

        Args:
            directory: the folder holding ``config.json`` and
                ``model.safetensors``, or a Hugging Face Hub repository id
                (``"owner/name"``). An existing folder wins; a repository
                is read from the local Hub cache, and downloaded into it
                only when the cache lacks it and downloads are allowed.
            map_location: device of the returned model's tensors.
            revision: branch, tag or commit of a repository (default
                ``main``).
            subfolder: a folder inside the repository (or local folder).
            cache_dir: the Hub cache (default ``$HF_HOME/hub``).
            local_files_only: never download (also when ``HF_HUB_OFFLINE=1``).
            token: a Hub token, for private or gated repositories.
            force_download: download again even when cached.

        Returns:
            The model in eval mode (call ``.train()`` to fine-tune it).

        Raises:
            FileNotFoundError: the folder or one of its two files is missing;
                the repository is not cached and cannot be downloaded (the
                message names it and says how to get it).
            ValueError: the folder holds another model class, or the weights
                do not match the config (missing or unexpected keys, shapes).
        """
        hub = {name: value for name, value in locals().items() if name in _HUB_OPTIONS}
        if cls is PretrainedModel:
            return load_pretrained(directory, map_location=map_location, **hub)
        folder = _resolve(directory, f"{cls.__name__}.from_pretrained", hub)
        data = _read_config(folder)
        name = data.get("_class_name")
        if name is not None and name != cls.__name__:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {os.fspath(directory)!r} holds a {name}, not a {cls.__name__}"
            )
        return _load(cls, folder, data, map_location)


# push_to_hub's keyword arguments, which save_pretrained(push_to_hub=True) passes on
_PUSH_OPTIONS = frozenset({"commit_message", "private", "token", "revision", "create_pr"})
# from_pretrained / load_pretrained's keyword arguments for a Hub repository (resolve_folder's)
_HUB_OPTIONS = frozenset({"revision", "subfolder", "cache_dir", "local_files_only", "token", "force_download"})


def _resolve(directory, what: str, hub: dict) -> str:
    # The folder holding config.json + model.safetensors: a local one, or a Hub repository's.
    return resolve_folder(directory, what=what, required=(CONFIG_NAME, WEIGHTS_NAME), **hub)


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
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    try:
        state = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types (SafetensorError: incomplete metadata, ...)
        raise ValueError(
            f"{cls.__name__}.from_pretrained: {path} is not a readable safetensors file "
            f"({type(exc).__name__}: {str(exc)[:200]}); it is truncated or damaged (an interrupted copy or "
            f"download, a full disk): copy or download it again, or write it again with save_pretrained (a "
            f"training run's model/: `pyvq train --resume` with the run's --out writes it again from the last "
            f"checkpoint once that is at the final step)"
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{cls.__name__}.from_pretrained: weights in {os.fspath(directory)!r} do not fit: {exc}") from exc
    return model.to(torch.device(map_location)).eval()


def load_run(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """``load_pretrained`` of a training run's final model (``path/model``)
    or of a saved model folder (or Hub repository id)."""
    folder = os.path.join(path, "model")
    return load_pretrained(folder if os.path.isdir(folder) else path, map_location)


def load_pretrained(
    directory: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
):
    """Load whatever pyvq model ``directory`` (a folder or a Hub repository
    id) holds, by its ``_class_name``; the other arguments as for
    ``PretrainedModel.from_pretrained``."""
    hub = {name: value for name, value in locals().items() if name in _HUB_OPTIONS}
    folder = _resolve(directory, "load_pretrained", hub)
    data = _read_config(folder)
    name = data.get("_class_name")
    if name not in _MODEL_CLASSES:
        raise ValueError(
            f"load_pretrained: {CONFIG_NAME} in {folder!r} names model class {name!r}, "
            f"known: {sorted(_MODEL_CLASSES)} (import the module that defines it first)"
        )
    return _load(_MODEL_CLASSES[name], folder, data, map_location)
