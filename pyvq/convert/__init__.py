"""Load third-party tokenizer weights into pyvq models.

Two sources:

- ``from_taming(state_dict_or_path, preset_or_config, beta_term="codebook")
  -> VQGAN``: a taming-transformers VQGAN checkpoint (a Lightning ``.ckpt``,
  read without running any code it pickles, or its ``state_dict``), with
  taming's VQ loss convention set in the config. pyvq's module names are taming's, so keys map one to one
  except the codebook (taming ``quantize.embedding.weight``, pyvq
  ``quantize.codebook``); the training loss's modules (``loss.*``: the
  discriminator and LPIPS) are dropped. A checkpoint does not say its
  architecture, so the caller names it (a preset or a ``VQGANConfig``);
  nothing is inferred from the tensors.
- ``from_diffusers(model_or_dir) -> VQGAN | AutoencoderKL | AsymmetricVQGAN``:
  a diffusers ``VQModel``, ``AutoencoderKL`` or ``AsymmetricAutoencoderKL``,
  either the instance or a directory its ``save_pretrained`` wrote. The pyvq
  config is built from diffusers' config, and diffusers' module names are
  mapped onto taming's (table below). diffusers itself is never imported: a
  directory is read with ``json`` and ``safetensors``.

Both are strict: every tensor of the source is used (``loss.*`` aside), every
weight of the model is filled, shapes must agree; otherwise a ``ValueError``
lists the missing or unexpected keys, or names the key whose shape differs.
pyvq's codebook statistics (``quantize.cluster_size``, ``code_usage``,
``embed_sum``), which neither source has, are reset as by
``VectorQuantizer.load_codebook``. Models come back on the CPU, float32, in
eval mode (a half-precision source is widened exactly).

diffusers -> pyvq names (``n`` = number of resolution levels):

=============================================  ====================================
diffusers                                      pyvq (taming)
=============================================  ====================================
encoder.down_blocks.{i}.resnets.{j}.*          encoder.down.{i}.block.{j}.*
encoder.down_blocks.{i}.attentions.{j}.*       encoder.down.{i}.attn.{j}.*
encoder.down_blocks.{i}.downsamplers.0.conv    encoder.down.{i}.downsample.conv
decoder.up_blocks.{k}.resnets.{j}.*            decoder.up.{n-1-k}.block.{j}.*
decoder.up_blocks.{k}.attentions.{j}.*         decoder.up.{n-1-k}.attn.{j}.*
decoder.up_blocks.{k}.upsamplers.0.conv        decoder.up.{n-1-k}.upsample.conv
{en,de}coder.mid_block.resnets.{0,1}           {en,de}coder.mid.block_{1,2}
{en,de}coder.mid_block.attentions.0            {en,de}coder.mid.attn_1
{en,de}coder.conv_norm_out                     {en,de}coder.norm_out
resnet conv_shortcut (1x1)                     resnet nin_shortcut
attention group_norm, to_q, to_k, to_v,        attention norm, q, k, v, proj_out
to_out.0 (Linear, (C, C))                      (1x1 Conv2d, (C, C, 1, 1))
quantize.embedding.weight                      quantize.codebook
=============================================  ====================================

diffusers runs its ``up_blocks`` in storage order from the lowest resolution
up, so ``up_blocks[k]`` is pyvq's (and taming's) ``decoder.up[n-1-k]``;
pyvq, like taming, indexes ``decoder.up[i]`` by resolution level, the same
``i`` as ``encoder.down[i]``. Attention: the mid blocks always have one
(``mid_block_add_attention=True`` is required); the resolution levels have
none with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` (diffusers' default,
and every Stable Diffusion VAE), and one after every resnet with
``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``, exactly taming's
placement; those levels become ``attn_resolutions``, which pyvq shares
between encoder and decoder, so the two must put attention at the same
levels. Pre-0.14 diffusers attention names (``query``, ``key``, ``value``,
``proj_attn``) are accepted as diffusers itself accepts them.

``AsymmetricAutoencoderKL`` (diffusers' port of the asymmetric VQGAN)
becomes an ``AsymmetricVQGAN`` with ``base_kind="kl"``: ``encoder.*``,
``quant_conv``, ``post_quant_conv`` map as above onto ``base.*`` (base config
from ``down_block_out_channels`` / ``layers_per_down_block`` /
``down_block_types``), the ``MaskConditionDecoder`` as the table's
``decoder.*`` (config from ``up_block_out_channels`` /
``layers_per_up_block`` / ``up_block_types``; its attention levels are its
own), and ``decoder.condition_encoder.layers.{k}`` keeps its name. Mask
convention: both libraries take mask = 1 on the HOLE, so no conversion:
diffusers' ``decode(z, image=x, mask=m).sample`` is pyvq's
``decode(z, masked_image=(1 - m) * x, mask=m)`` (diffusers forms
``(1 - m) * x`` itself), and ``decode(z)`` without image and mask is the
plain decoder in both. diffusers' condition encoder always has five layers
and looks each blend point's feature up by its tensor shape; pyvq's has
``L + 1`` (L levels) and feeds blend point ``j`` from layer ``j``. The two
agree exactly when the decoder has at most four levels whose channels double
from the first, capped at the last (Stable Diffusion's layout); other
layouts are refused, and the layers past ``L`` (unused) are dropped.

Modules: ``loading`` (strict loading into a model, the finish), ``files``
(``torch.load`` of weights only, a diffusers folder's config and weights),
``taming`` (``from_taming``), ``diffusers`` (``from_diffusers``),
``diffusers_config`` (diffusers config -> pyvq config) and
``diffusers_keys`` (diffusers key names of pyvq weights).
"""

from __future__ import annotations

from pyvq.convert.diffusers import from_diffusers
from pyvq.convert.taming import from_taming

__all__ = ["from_diffusers", "from_taming"]
