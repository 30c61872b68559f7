"""``from_taming``: a taming-transformers VQGAN checkpoint into a pyvq
``VQGAN``, with the reading of the checkpoint (a Lightning ``.ckpt``, a
``.safetensors`` file or a state dict) and of the architecture the caller
names (a preset, a ``VQGANConfig`` or a dict of its fields).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from pyvq.convert.files import torch_load
from pyvq.convert.loading import CODEBOOK, finish, load_into
from pyvq.models._pretrained import config_from_dict, get_preset
from pyvq.models.tokenizers.vqgan import VQGAN, VQGANConfig
from pyvq.nn.vector_quantizer import check_beta_term

__all__ = ["from_taming"]

def _vqgan_config(preset_or_config) -> VQGANConfig:
    if isinstance(preset_or_config, VQGANConfig):
        return preset_or_config
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, Mapping):
        config = config_from_dict(VQGANConfig, dict(preset_or_config))
    else:
        raise TypeError(
            "from_taming: argument 'preset_or_config' must be a preset name, a VQGANConfig or a dict of its "
            f"fields, got {type(preset_or_config).__name__}"
        )
    if not isinstance(config, VQGANConfig):
        raise TypeError(f"from_taming: preset {preset_or_config!r} is a {type(config).__name__}, not a VQGANConfig")
    return config


def _read_taming(state_dict_or_path) -> dict:
    what = "from_taming"
    obj = state_dict_or_path
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such checkpoint file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch_load(path, what)
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{what}: expected a state dict, a dict with 'state_dict', or a checkpoint path, got {type(obj).__name__}"
        )
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{what}: state dict keys must be str, got {bad[:5]!r}")
    return {k: v for k, v in obj.items() if not k.startswith("loss.")}


def from_taming(state_dict_or_path, preset_or_config, *, beta_term: str | None = "codebook") -> VQGAN:
    """A ``VQGAN`` holding the weights of a taming-transformers VQGAN.

    Args:
        state_dict_or_path: a path to a taming ``.ckpt`` (a Lightning
            checkpoint whose ``"state_dict"`` holds the weights; read with a
            restricted unpickler that imports and calls nothing the file
            names: its callbacks, hyper-parameters and other pickled objects
            become inert placeholders and are dropped, only the tensors are
            kept) or a ``.safetensors`` file; or the state dict itself, or a
            dict with a ``"state_dict"`` entry.
        preset_or_config: the architecture, as a preset name
            (``"vqgan_f16_1024"``, ``"vqgan_f16_16384"``, ...), a
            ``VQGANConfig`` or a dict of its fields. Taming's
            ``configs/*.yaml`` ``ddconfig`` has the same field names.
        beta_term: the returned config's ``beta_term``, the loss term the
            quantiser's ``beta`` weighs. The default ``"codebook"`` is
            taming's: its VQGAN uses ``VectorQuantizer2(legacy=True)``,
            ``loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``,
            i.e. beta on the codebook term, so fine-tuning the converted model
            gives the encoder and the codebook the gradients taming gave
            them. ``"commitment"``: pyvq's default (VQ-VAE's). ``None``: keep
            the value of ``preset_or_config``. An EMA config (``ema=True``)
            needs ``"commitment"`` or ``None`` (the codebook term has no
            gradient there; taming's EMA quantiser weighs the commitment term
            too).

    Keys map one to one, except ``quantize.embedding.weight`` ->
    ``quantize.codebook``; ``loss.*`` keys (discriminator, LPIPS) are
    dropped. Taming's Gumbel and EMA quantisers (``quantize.embed.*``,
    ``quantize.embedding.embed_avg``, ...) and the ``remap`` buffer
    ``quantize.used`` are not supported: they show up as unexpected keys.

    Returns:
        The VQGAN on the CPU, float32, eval mode.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a checkpoint (not a torch.save file, a
            truncated one, a TorchScript archive, or one holding no tensor:
            the message names the file); keys missing or unexpected
            (listed); a shape differs from the config's (the key is named).
        KeyError / TypeError: unknown preset, or an argument of the wrong type.
    """
    config = _vqgan_config(preset_or_config)
    if beta_term is not None:
        config = dataclasses.replace(config, beta_term=check_beta_term(beta_term, config.ema, where="from_taming"))
    source = _read_taming(state_dict_or_path)
    model = VQGAN(config)
    load_into(model, source, lambda k: "quantize.embedding.weight" if k == CODEBOOK else k, "from_taming")
    return finish(model)
