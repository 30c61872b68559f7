"""LPIPS perceptual distance (Zhang et al. 2018) over the ``lpips`` package.

The ``lpips`` package ships only its linear heads (``weights/v0.1/<net>.pth``);
the ImageNet backbone would come from torchvision, which downloads it on first
use into the torch hub cache. pyvq never downloads at run time, so:

* the backbone file is looked up *before* anything is constructed, at
  ``torch.hub.get_dir()/checkpoints/<file>``, the very path torchvision's
  download would have used (``<file>`` is the last component of the URL of
  torchvision's ``IMAGENET1K_V1`` weights, e.g. ``vgg16-397923af.pth``);
* when it is absent, :class:`~pyvq._weights.MissingWeightsError` (a
  ``RuntimeError``) names the file, the path it belongs at and its URL;
* ``lpips.LPIPS`` is always built with ``pnet_rand=True`` (torchvision never
  asked for weights, so it cannot download), and the backbone is then filled
  from the file by pyvq itself.

``pretrained_backbone=False`` keeps the random backbone on purpose: a
stand-in for tests, never a silent fallback.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from pyvq._weights import MissingWeightsError, require_weights

__all__ = ["LPIPS", "build_lpips", "backbone_weights", "MissingWeightsError", "perceptual_module", "reconstruction_terms"]

# torchvision's IMAGENET1K_V1 weights of each LPIPS trunk (torchvision 0.29:
# VGG16_Weights, AlexNet_Weights, SqueezeNet1_1_Weights). The cache file name
# is os.path.basename of the URL path, as in torch.hub.load_state_dict_from_url.
_BACKBONE_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
_ALIASES = {"vgg16": "vgg"}


def _canonical(net: str) -> str:
    name = _ALIASES.get(net, net)
    if name not in _BACKBONE_URLS:
        raise ValueError(f"LPIPS: argument 'net' must be one of {sorted(_BACKBONE_URLS)}, got {net!r}")
    return name


def backbone_weights(net: str = "vgg") -> tuple[str, str, str]:
    """``(filename, cache_path, url)`` of the ImageNet backbone LPIPS ``net`` needs.

    ``cache_path`` is ``torch.hub.get_dir()/checkpoints/filename``, resolved
    now (so it follows ``torch.hub.set_dir`` and ``$TORCH_HOME``).
    """
    url = _BACKBONE_URLS[_canonical(net)]
    filename = os.path.basename(url)
    return filename, os.path.join(torch.hub.get_dir(), "checkpoints", filename), url


def _load_backbone(trunk: nn.Module, state: dict, path: str, what: str) -> None:
    """Fill an lpips trunk from a torchvision ImageNet checkpoint.

    lpips splits torchvision's ``features`` Sequential into slices but keeps
    each layer's index as its name: ``slice{k}.{i}.{rest}`` in lpips is
    ``features.{i}.{rest}`` in torchvision, for VGG, AlexNet and SqueezeNet.
    The classifier weights in the file are not needed and not read into the
    module.
    """
    mapped, bad = {}, []
    for name, t in trunk.state_dict().items():
        key = "features." + name.split(".", 1)[1]
        src = state.get(key)
        if src is None or tuple(src.shape) != tuple(t.shape):
            bad.append(key)
        else:
            mapped[name] = src
    if bad:
        raise RuntimeError(
            f"{what}: {path} does not hold torchvision's ImageNet weights for this network "
            f"(missing or mis-shaped: {', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})"
        )
    trunk.load_state_dict(mapped, strict=True)


def _load_heads(model: nn.Module, path: str) -> None:
    """Load lpips' calibrated linear heads (``lin{k}.model.1.weight``), checking
    that every head is in the file (lpips itself loads them with strict=False)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = {k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
    if not heads or not heads <= state.keys():
        raise RuntimeError(f"LPIPS: {path} lacks the linear heads {sorted(heads - state.keys())}")
    model.load_state_dict({k: state[k] for k in heads}, strict=False)


class LPIPS(nn.Module):
    """Frozen LPIPS distance between images in [-1, 1].

    Args:
        net: backbone, ``"vgg"`` (default, as in taming-transformers), ``"alex"``
            or ``"squeeze"``.
        pretrained_backbone: load torchvision's ImageNet backbone weights from
            the torch hub cache (or ``backbone_path``); raise
            :class:`MissingWeightsError` if the file is not there. ``False``
            builds a randomly initialised backbone, explicitly (tests only:
            distances from it are not perceptual).
        backbone_path: an explicit path to the torchvision checkpoint, instead
            of the hub cache.

    The linear heads always carry lpips' calibrated v0.1 weights. The module is
    frozen: every parameter has ``requires_grad=False`` and it stays in eval
    mode even when a parent calls ``.train()`` (the heads contain dropout).
    Gradients still flow to the inputs.
    """

    def __init__(self, net: str = "vgg", *, pretrained_backbone: bool = True, backbone_path: str | None = None):
        super().__init__()
        net = _canonical(net)
        filename, _, url = backbone_weights(net)
        path = None
        if pretrained_backbone:
            # Checked before lpips/torchvision are even imported.
            path = require_weights(filename, url, f"LPIPS {net} backbone (torchvision ImageNet weights)", backbone_path)
        elif backbone_path is not None:
            raise ValueError("LPIPS: argument 'backbone_path' needs pretrained_backbone=True")

        # Read (plain tensors only) before building anything, so a bad file fails fast.
        state = torch.load(path, map_location="cpu", weights_only=True) if path is not None else None

        import lpips

        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated ``pretrained=`` interface.
            warnings.filterwarnings("ignore", message=r".*deprecated since 0\.13", category=UserWarning)
            self.model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        _load_heads(self.model, os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth"))
        if state is not None:
            _load_backbone(self.model.net, state, path, f"LPIPS {net} backbone")
            del state
        self.net = net
        self.pretrained_backbone = bool(pretrained_backbone)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: the frozen network is never put in training mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "none") -> torch.Tensor:
        """Distances between ``x`` and ``y`` ((B, 3, H, W), values in [-1, 1]).

        Returns (B,) per-image distances for ``reduction="none"``, their mean
        (a scalar) for ``"mean"``, their sum for ``"sum"``.
        """
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise TypeError("LPIPS: arguments 'x' and 'y' must be tensors")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: 'x' and 'y' must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS: 'x' must be (B, 3, H, W), got shape {tuple(x.shape)}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"LPIPS: argument 'reduction' must be 'none', 'mean' or 'sum', got {reduction!r}")
        d = self.model(x, y).reshape(x.shape[0])
        if reduction == "mean":
            return d.mean()
        if reduction == "sum":
            return d.sum()
        return d

    def extra_repr(self) -> str:
        return f"net={self.net!r}, pretrained_backbone={self.pretrained_backbone}"


def build_lpips(
    net: str = "vgg", *, pretrained_backbone: bool = True, backbone_path: str | None = None
) -> LPIPS:
    """A frozen :class:`LPIPS` (see there). Raises :class:`MissingWeightsError`
    when ``pretrained_backbone`` is set and the backbone file is not on this
    machine; never downloads."""
    return LPIPS(net, pretrained_backbone=pretrained_backbone, backbone_path=backbone_path)


def perceptual_module(weight: float, perceptual: nn.Module | None = None) -> nn.Module | None:
    """The LPIPS module a loss with perceptual weight ``weight`` uses: None
    when the weight is 0, else ``perceptual`` or ``build_lpips()`` (which
    raises ``MissingWeightsError`` when the VGG weights are missing)."""
    if weight <= 0:
        return None
    return perceptual if perceptual is not None else build_lpips()


def reconstruction_terms(inputs, reconstructions, *, pixel_loss: str, pixel_weight: float,
                         perceptual: nn.Module | None, perceptual_weight: float):
    """``(nll, pixel, perceptual)`` scalars of a reconstruction loss:
    ``nll = pixel_weight * pixel + perceptual_weight * perceptual``, the
    pixel term the mean L1 (``pixel_loss="l1"``) or squared error, the
    perceptual term the mean of ``perceptual(inputs, reconstructions)`` (0
    when ``perceptual`` is None)."""
    diff = inputs - reconstructions
    pix = (diff.abs() if pixel_loss == "l1" else diff.square()).mean()
    nll = pixel_weight * pix
    if perceptual is None:
        return nll, pix, torch.zeros((), dtype=pix.dtype, device=pix.device)
    p = perceptual(inputs.contiguous(), reconstructions.contiguous()).mean()
    return nll + perceptual_weight * p, pix, p
