"""rFID, Inception Score and KID through torch-fidelity, without downloads.

torch-fidelity fetches its Inception-v3 weights on first use. Here the file
must already be in the torch hub cache (or be passed explicitly); otherwise
``MissingWeightsError`` says which file and where. Tests and users with
their own network register a feature extractor with
``torch_fidelity.register_feature_extractor`` and pass its name.
"""

from __future__ import annotations

import torch

from pyvq._weights import hub_checkpoint_path, require_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)


class _Uint8Images(torch.utils.data.Dataset):
    """(N, 3, H, W) images in [-1, 1] served as uint8, as torch-fidelity expects."""

    def __init__(self, images: torch.Tensor):
        self.images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fidelity_metrics(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    fid: bool = True,
    isc: bool = True,
    kid: bool = True,
    feature_extractor: str | None = None,
    weights_path: str | None = None,
    kid_subset_size: int | None = None,
    batch_size: int = 64,
    **kwargs,
) -> dict:
    """FID / IS / KID between ``real`` and ``fake`` images ((N, 3, H, W) in [-1, 1]).

    Args:
        feature_extractor: a name registered with torch-fidelity; default its
            Inception-v3 ("inception-v3-compat"), whose weights must be in the
            torch hub cache or at ``weights_path``.
        kid_subset_size: KID subset size (default min(1000, N)).
        kwargs: passed to ``torch_fidelity.calculate_metrics``.

    Returns:
        torch-fidelity's dict (keys such as ``frechet_inception_distance``,
        ``inception_score_mean``, ``kernel_inception_distance_mean``).
    """
    import torch_fidelity

    for name, t in (("real", real), ("fake", fake)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"fidelity_metrics: argument '{name}' must be (N, 3, H, W), got {getattr(t, 'shape', t)}")
    if feature_extractor is None:
        kwargs["feature_extractor_weights_path"] = _checked_inception(weights_path)
    elif weights_path is not None:
        kwargs["feature_extractor_weights_path"] = weights_path
    n = min(real.shape[0], fake.shape[0])
    kwargs.setdefault("save_cpu_ram", True)  # in-memory images: no loader workers
    return torch_fidelity.calculate_metrics(
        input1=_Uint8Images(fake),
        input2=_Uint8Images(real),
        fid=fid,
        isc=isc,
        kid=kid,
        feature_extractor=feature_extractor,
        kid_subset_size=kid_subset_size or min(1000, n),
        batch_size=batch_size,
        cuda=fake.is_cuda,
        cache=False,
        verbose=False,
        **kwargs,
    )


def inception_weights() -> tuple[str, str, str]:
    """``(filename, cache_path, url)`` of the Inception weights ``--fid``
    needs (the path resolved now, in the torch hub cache)."""
    return INCEPTION_FILE, hub_checkpoint_path(INCEPTION_FILE), INCEPTION_URL


def _checked_inception(weights_path: str | None) -> str:
    path = require_weights(INCEPTION_FILE, INCEPTION_URL, "torch-fidelity Inception-v3", weights_path)
    # torch-fidelity unpickles the file with weights_only=False; make sure it
    # is a plain state dict first, so that load runs no foreign code.
    torch.load(path, map_location="cpu", weights_only=True)
    return path
