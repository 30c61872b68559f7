"""Projected GAN discriminator (Sauer et al., "Projected GANs Converge
Faster"), the discriminator of Efficient-VQGAN's eq. 1.

Images are projected into the feature space of a frozen pretrained network
(a timm backbone, by default EfficientNet-lite0 as in both papers) and
judged there:

    x in [-1, 1] -> [0, 1] -> ImageNet normalisation (-> resize, optional)
      -> backbone features at 4 strides (frozen, eval mode)
      -> cross-channel mixing: a random 1x1 conv per scale (frozen)
      -> cross-scale mixing: top-down, each scale plus the upsampled coarser
         one, then a random 3x3 conv (frozen)
      -> one small discriminator per scale (trained): stride-2 4x4 conv
         blocks with spectral norm, batch norm and leaky ReLU down to at most
         4x4, then a 1-channel conv
      -> the per-scale logit maps, flattened and concatenated: (B, n)

The random projections are drawn once at construction and never trained,
as in the paper. The differentiable augmentation of Projected GAN is not
part of this module.

Pretrained weights are read from the local Hugging Face cache only (timm's
``timm/<name>.<tag>`` repositories, ``model.safetensors``); when they are
not there, ``MissingWeightsError`` names the repository and the file.
``pretrained=False`` builds a randomly initialised backbone (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyvq._checks import check_int
from pyvq._weights import MissingWeightsError

__all__ = ["ProjectedDiscriminator", "pretrained_backbone_file"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_WHERE = "ProjectedDiscriminator"


def _import_timm():
    try:
        import timm
    except ImportError as exc:  # an optional dependency of this module only
        raise ImportError(f"{_WHERE} needs timm (pip install timm==1.0.31)") from exc
    return timm


def pretrained_backbone_file(backbone: str) -> str:
    """Path of ``backbone``'s pretrained weights in the local Hugging Face
    cache; ``MissingWeightsError`` naming the repository when absent."""
    timm = _import_timm()
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise MissingWeightsError(f"{_WHERE}: timm has no Hugging Face weights for backbone {backbone!r}")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    raise MissingWeightsError(
        f"{_WHERE}: pretrained weights of backbone {backbone!r} (Hugging Face repository {repo!r}, file "
        f"'model.safetensors') are not in the local cache. pyvq never downloads at run time; fetch them with "
        f"`huggingface-cli download {repo} model.safetensors` on a machine with network access, or pass "
        f"pretrained=False for a random backbone."
    )


def _sn_conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias))


class _ScaleDiscriminator(nn.Sequential):
    """Stride-2 blocks from ``size`` down to at most 4, then 1-channel logits."""

    def __init__(self, channels: int, size: int):
        layers = []
        c = channels
        while size > 4:
            out = min(2 * c, 512)
            layers += [_sn_conv(c, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            c, size = out, size // 2
        layers.append(_sn_conv(c, 1, 3, 1, 1))
        super().__init__(*layers)


class ProjectedDiscriminator(nn.Module):
    """Multi-scale discriminator on frozen pretrained features; see the module docstring.

    Args:
        image_size: side of the (square) images it judges, after ``resize``.
        backbone: a timm model name with ``features_only`` support.
        pretrained: load the backbone's weights from the local cache (else random).
        channels: width of the random projections.
        resize: resize inputs to this side first (Projected GAN resizes small
            images to 224), or None.

    ``forward(x)``: (B, 3, H, W) images in [-1, 1] -> (B, n) logits.
    """

    def __init__(self, image_size: int, *, backbone: str = "tf_efficientnet_lite0", pretrained: bool = True,
                 channels: int = 64, resize: int | None = None):
        super().__init__()
        timm = _import_timm()
        check_int("image_size", image_size, where=_WHERE, minimum=1)
        check_int("channels", channels, where=_WHERE, minimum=1)
        if resize is not None:
            check_int("resize", resize, where=_WHERE, minimum=1)
        kwargs = {}
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = {"file": pretrained_backbone_file(backbone)}
        self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                          out_indices=(1, 2, 3, 4), **kwargs)
        self.backbone.requires_grad_(False)
        self.resize = resize
        side = resize or image_size
        widths = self.backbone.feature_info.channels()
        sizes = [max(1, -(-side // r)) for r in self.backbone.feature_info.reduction()]
        self.ccm = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in widths)
        self.csm = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in widths)
        for m in (self.ccm, self.csm):
            m.requires_grad_(False)
        self.heads = nn.ModuleList(_ScaleDiscriminator(channels, s) for s in sizes)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: batch-norm statistics stay the pretrained ones
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{_WHERE}: argument 'x' must be (B, 3, H, W) images in [-1, 1], got {got}")
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        feats = [ccm(f) for ccm, f in zip(self.ccm, self.backbone(x))]
        mixed = [None] * len(feats)
        coarser = None
        for i in reversed(range(len(feats))):
            f = feats[i]
            if coarser is not None:
                f = f + F.interpolate(coarser, size=f.shape[-2:], mode="bilinear", align_corners=False)
            coarser = f
            mixed[i] = self.csm[i](f)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, mixed)], dim=1)
