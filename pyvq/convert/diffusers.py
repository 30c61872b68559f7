"""``from_diffusers``: a diffusers ``VQModel``, ``AutoencoderKL`` or
``AsymmetricAutoencoderKL`` (an instance, or a ``save_pretrained`` folder)
into a pyvq ``VQGAN``, ``AutoencoderKL`` or ``AsymmetricVQGAN``: config
first, then weights, renamed and loaded strictly.
"""

from __future__ import annotations

import os

import torch

from pyvq._hub import resolve_folder
from pyvq.convert.diffusers_config import ASYMMETRIC_CLASS, CONDITION_ENCODER_LAYERS, KNOWN_KEYS, diffusers_config
from pyvq.convert.diffusers_keys import asym_diffusers_key, diffusers_key, linear_to_conv, rename_old_attention
from pyvq.convert.files import read_diffusers_config, read_diffusers_weights
from pyvq.convert.loading import finish, load_into
from pyvq.models.tokenizers.asymmetric import AsymmetricVQGAN
from pyvq.models.tokenizers.autoencoder_kl import AutoencoderKL
from pyvq.models.tokenizers.vqgan import VQGAN

__all__ = ["from_diffusers"]

def from_diffusers(
    model_or_dir,
    *,
    variant: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> VQGAN | AutoencoderKL | AsymmetricVQGAN:
    """A pyvq tokenizer holding the weights of a diffusers autoencoder.

    Args:
        model_or_dir: a diffusers ``AutoencoderKL``, ``VQModel`` or
            ``AsymmetricAutoencoderKL`` instance,
            or a directory written by its ``save_pretrained`` (``config.json``
            and ``diffusion_pytorch_model.safetensors``, or a sharded
            ``.safetensors.index.json``; a ``.bin`` is read with
            ``torch.load(weights_only=True)``). diffusers need not be
            installed for a directory. Or a Hugging Face Hub repository id
            (``"stabilityai/sd-vae-ft-mse"``; a pipeline's with
            ``subfolder="vae"``), read from the local Hub cache first and
            downloaded only when it lacks the files and downloads are allowed
            (safetensors preferred over ``.bin``); an existing local
            directory of that name wins.
        variant: the weights file variant of a directory
            (``diffusion_pytorch_model.<variant>.safetensors``, e.g. ``"fp16"``).
        subfolder: a folder inside the directory or repository (``"vae"``).
        revision, cache_dir, local_files_only, token, force_download: for a
            Hub repository, as in ``PretrainedModel.from_pretrained``
            (``local_files_only`` also when ``HF_HUB_OFFLINE=1``).

    Config mapping: ``block_out_channels`` -> ``ch`` (its first entry) and
    ``ch_mult`` (the entries divided by it); ``layers_per_block`` ->
    ``num_res_blocks``; ``latent_channels`` -> ``z_channels`` (and
    ``embed_dim`` for AutoencoderKL); ``vq_embed_dim`` (default
    ``latent_channels``) -> ``embed_dim`` and ``num_vq_embeddings`` ->
    ``n_embed`` for VQModel; ``sample_size`` -> ``resolution``;
    ``in_channels``, ``out_channels`` -> ``in_channels``, ``out_ch``;
    ``scaling_factor`` -> ``AutoencoderKLConfig.scaling_factor`` (a
    VQModel's is not kept: VQGANConfig has no such field); attention block
    types -> ``attn_resolutions`` (``pyvq.convert``'s docstring);
    ``norm_num_groups`` -> ``norm_num_groups`` (any value that divides every
    block's channel count). ``act_fn`` must be SiLU, ``norm_type``
    ``"group"``. An
    AutoencoderKL with ``use_quant_conv=False`` / ``use_post_quant_conv=False``
    (e.g. FLUX's VAE) gets identity 1x1 convs (weight I, bias 0: exact in
    float32 arithmetic; where convolutions run in TF32, as cuDNN's do by
    default on GPUs, they round like every other conv of the model); its
    ``shift_factor`` / ``latents_mean`` / ``latents_std`` are not kept (a
    warning says so).

    ``AsymmetricAutoencoderKL``: an ``AsymmetricVQGAN`` (``base_kind="kl"``,
    ``blend="add"``); the base from the ``down_*`` fields as above, the new
    decoder's ``ch`` / ``ch_mult`` / ``num_res_blocks`` / ``attn_resolutions``
    from ``up_block_out_channels`` / ``layers_per_up_block`` /
    ``up_block_types``. Mask = 1 is the hole in both libraries:
    ``model.decode(z, (1 - mask) * x, mask)`` is diffusers'
    ``decode(z, image=x, mask=mask).sample``. ``in_channels`` must equal
    ``out_channels``; the decoder layouts supported are in
    ``pyvq.convert``'s docstring.

    Returns:
        ``VQGAN`` for a VQModel, ``AutoencoderKL`` for an AutoencoderKL,
        ``AsymmetricVQGAN`` for an AsymmetricAutoencoderKL; on
        the CPU, float32, eval mode. ``model.decode(z)`` gives the image.
        For a VQModel, diffusers' ``encode(x).latents`` is pyvq's
        ``model.quant_conv(model.encoder(x))`` (before quantisation).

    Raises:
        ValueError: unsupported class, block type or config value (named);
            keys missing or unexpected (listed); a shape mismatch (the key
            is named).
        FileNotFoundError: a directory without the expected files; a Hub
            repository that is not cached and cannot be downloaded (named,
            with how to get it).
    """
    directory = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
        directory = resolve_folder(
            model_or_dir, what="from_diffusers", required=("config.json",),
            choices=((f"{stem}.safetensors",), (f"{stem}.safetensors.index.json", f"{stem}-*.safetensors"),
                     (f"{stem}.bin",)),
            subfolder=subfolder, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token, force_download=force_download,
        )
        cfg = read_diffusers_config(directory)
        class_name = cfg["_class_name"]
    else:
        given = [k for k, v in (("variant", variant), ("subfolder", subfolder), ("revision", revision),
                                ("cache_dir", cache_dir), ("token", token)) if v is not None]
        if given:
            raise ValueError(f"from_diffusers: argument(s) {given} apply to a directory or Hub repository only")
        class_name = type(model_or_dir).__name__
        cfg = getattr(model_or_dir, "config", None)
        if class_name not in KNOWN_KEYS or cfg is None or not hasattr(model_or_dir, "state_dict"):
            raise TypeError(
                "from_diffusers: argument 'model_or_dir' must be a diffusers AutoencoderKL or VQModel (or "
                f"AsymmetricAutoencoderKL), or a directory, got {class_name}"
            )
        cfg = dict(cfg)

    config = diffusers_config(class_name, cfg)  # validate before reading any weights
    if directory is not None:
        state = read_diffusers_weights(directory, variant)
    else:
        state = {k: v.detach() for k, v in model_or_dir.state_dict().items()}
    state = rename_old_attention(state)
    what = f"from_diffusers ({class_name})"
    if class_name == ASYMMETRIC_CLASS:
        model = AsymmetricVQGAN(config)
        n_levels = len(config.ch_mult)
        # diffusers' condition-encoder layers past pyvq's L + 1 feed no blend point
        # (the config check above proved it): dropped.
        for k in range(n_levels + 1, CONDITION_ENCODER_LAYERS):
            for p in ("weight", "bias"):
                state.pop(f"decoder.condition_encoder.layers.{k}.{p}", None)
        load_into(model, state, lambda k: asym_diffusers_key(k, n_levels), what, transform=linear_to_conv)
        return finish(model)
    if class_name == "AutoencoderKL":
        model = AutoencoderKL(config)
        # use_quant_conv / use_post_quant_conv = False: no such modules in diffusers;
        # an identity 1x1 conv (weight I, bias 0) returns its input.
        for name, flag in (("quant_conv", "use_quant_conv"), ("post_quant_conv", "use_post_quant_conv")):
            if cfg.get(flag, True):
                continue
            if f"{name}.weight" in state or f"{name}.bias" in state:
                raise ValueError(f"{what}: {flag}=False but the weights contain {name}.*")
            conv = getattr(model, name)
            state[f"{name}.weight"] = torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(conv.out_channels)
    else:
        model = VQGAN(config)
    n_levels = len(config.ch_mult)
    load_into(model, state, lambda k: diffusers_key(k, n_levels), what, transform=linear_to_conv)
    return finish(model)
