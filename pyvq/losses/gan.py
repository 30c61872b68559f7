"""PatchGAN discriminator and adversarial losses, as used by VQGAN.

The discriminator is pix2pix's N-layer PatchGAN in the form taming-transformers
trains it with (same layer layout and parameter names, ``main.<i>.*``, so its
discriminator weights load). The losses take raw logits of any shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ActNorm",
    "NLayerDiscriminator",
    "weights_init",
    "hinge_d_loss",
    "vanilla_d_loss",
    "hinge_g_loss",
    "non_saturating_g_loss",
    "adopt_weight",
    "adaptive_weight",
]


class ActNorm(nn.Module):
    """Per-channel affine ``y = scale * (x + loc)`` (Glow), (B, C, H, W) -> same.

    On the first forward in training mode, ``loc`` and ``scale`` are set from
    that batch so that ``y`` has zero mean and unit standard deviation per
    channel; afterwards they are ordinary parameters. ``initialized`` is a
    buffer, so the state survives ``state_dict`` round trips.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.eps = eps

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).float()
        mean, std = flat.mean(1), flat.std(1)
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1.0 / (std + self.eps)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized.item()):
            self._initialize(x)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """pix2pix / taming initialisation, for ``module.apply``: conv weights
    N(0, 0.02); BatchNorm weight N(1, 0.02) and bias 0. Conv biases keep
    PyTorch's default initialisation, as in taming."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: (B, input_nc, H, W) -> (B, 1, H', W') logits.

    Layout (kernel 4, padding 1): conv stride 2 + LeakyReLU(0.2); then
    ``n_layers - 1`` blocks conv stride 2 + norm + LeakyReLU with channels
    ``ndf * min(2**n, 8)``; one such block with stride 1; a final stride-1 conv
    to one channel. Each stride-2 conv halves the side, each stride-1 conv
    takes one pixel off, so with n_layers=3: 256 -> 30, 64 -> 6, 32 -> 2.

    Args:
        use_actnorm: :class:`ActNorm` instead of BatchNorm2d (then the convs
            before a norm keep their bias; with BatchNorm they have none).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: argument 'n_layers' must be >= 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's shift makes a conv bias redundant
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=use_bias),
            norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits: ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss of the hinge GAN (taming uses it for both D losses): ``-mean(fake)``."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: ``mean(softplus(-fake)) = -mean(log sigmoid(fake))``."""
    return F.softplus(-logits_fake).mean()


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before step ``threshold``, ``weight`` from it on."""
    return value if global_step < threshold else weight


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (Esser et al. 2021, eq. 7), a detached scalar:

        lambda = ||grad_{last_layer} rec_loss|| / (||grad_{last_layer} g_loss|| + eps)

    clamped to ``[0, max]``. ``last_layer`` is the weight of the decoder's last
    layer. Both gradients are taken with ``retain_graph=True``, so the caller
    can still backpropagate the total loss.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + eps)
    return torch.clamp(w, 0.0, max).detach()
