"""Images from a prior and a tokenizer: what ``pyvq encode``, ``pyvq sample``
and ``pyvq inpaint`` run.

A prior (``MultinomialDiffusion`` or ``MultiGrainedTransformer`` over VQ
indices, ``GaussianDiffusion`` over BRICS key codes) samples or completes
code maps; the tokenizer that made its training codes decodes them. Keyword
arguments a prior's own ``sample`` / ``inpaint`` take (e.g. the
transformer's ``labels`` or ``temperature``) pass through ``prior_kwargs``.
"""

from __future__ import annotations

import torch

from pyvq._checks import check_int
import torch.nn.functional as F


def decode_codes(tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] from int64 indices (B, h, w) of a VQ
    tokenizer or key codes (B, C, h, w) of BRICS."""
    if codes.dtype == torch.int64:
        if not hasattr(tokenizer, "decode_indices"):
            raise ValueError(f"decode_codes: the codes are indices but {type(tokenizer).__name__} has no codebook")
        out = tokenizer.decode_indices(codes)
    else:
        out = tokenizer.decode(codes)
    return out.float().clamp(-1, 1)


def _check_pair(prior, tokenizer) -> None:
    """The prior models the kind of codes the tokenizer makes."""
    kind = getattr(prior, "code_kind", None)
    if kind is None:
        raise ValueError(f"the prior is a {type(prior).__name__}, not a pyvq prior")
    makes = "indices" if hasattr(tokenizer, "decode_indices") else "keys"
    if kind != makes:
        raise ValueError(f"the prior models {kind} but the {type(tokenizer).__name__} tokenizer makes {makes}")


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@torch.no_grad()
def sample_images(prior, tokenizer, n: int, *, steps: int | None = None, seed: int = 0, batch_size: int = 16,
                  progress: bool = False, **prior_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, H, W) in [-1, 1], codes) sampled from ``prior`` and
    decoded by ``tokenizer``; ``steps`` strided reverse steps (default: all;
    the prior's meaning of ``steps``); ``prior_kwargs`` go to ``prior.sample``."""
    check_int("n", n, where="sample_images", minimum=1)
    _check_pair(prior, tokenizer)
    prior.eval(), tokenizer.eval()
    g = _generator(seed)
    codes = torch.cat([prior.sample(min(batch_size, n - i), steps=steps, generator=g, progress=progress,
                                    **prior_kwargs)
                       for i in range(0, n, batch_size)])
    return torch.cat([decode_codes(tokenizer, codes[i:i + batch_size]) for i in range(0, n, batch_size)]), codes


@torch.no_grad()
def inpaint_image(prior, tokenizer, image: torch.Tensor, mask: torch.Tensor, *, steps: int | None = None,
                  seed: int = 0, paste: bool = True, progress: bool = False, **prior_kwargs) -> dict:
    """Complete the masked region of one image through the prior.

    Args:
        image: (3, H, W) in [-1, 1], H and W the tokenizer's resolution.
        mask: (1, H, W) or (H, W), 1 = region to generate.
        paste: put the known pixels back after decoding (the tokenizer's
            reconstruction of them is lossy).
        prior_kwargs: further keyword arguments of ``prior.inpaint``.

    A code is kept (re-imposed from the image at every reverse step) when
    its f x f block of pixels (f the tokenizer's downsampling factor) has no
    masked pixel; every other code is generated.

    Returns:
        dict with ``completion`` (3, H, W), ``decoded`` (3, H, W) (the
        decoded codes, before pasting), ``keep`` (h, w) bool and ``codes``.
    """
    from pyvq.data.codes import tokenizer_codes

    _check_pair(prior, tokenizer)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"inpaint_image: argument 'image' must be (3, H, W), got {tuple(image.shape)}")
    mask = mask.float()
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[0] != 1 or mask.shape[1:] != image.shape[1:]:
        raise ValueError(f"inpaint_image: argument 'mask' must be (1, H, W) or (H, W) matching the image "
                         f"{tuple(image.shape[1:])}, got {tuple(mask.shape)}")
    prior.eval(), tokenizer.eval()
    _, codes = tokenizer_codes(tokenizer, image[None])
    h, w = codes.shape[-2:]
    f = image.shape[-1] // w
    keep = F.max_pool2d(mask[None], kernel_size=f, stride=f)[0, 0] == 0  # (h, w)
    keep_arg = keep[None] if codes.dtype == torch.int64 else keep[None, None].expand_as(codes)
    out = prior.inpaint(codes, keep_arg, steps=steps, generator=_generator(seed), progress=progress,
                        **prior_kwargs)
    decoded = decode_codes(tokenizer, out)[0]
    completion = mask * decoded + (1 - mask) * image if paste else decoded
    return {"completion": completion, "decoded": decoded, "keep": keep, "codes": out[0]}


def outpaint_canvas(image: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outpainting's input: ``image`` (3, S, S) shrunk into the centre of an
    S x S mid-grey canvas, leaving a frame ``border`` pixels wide, and the
    (1, S, S) mask of that frame (1 = region to generate)."""
    S = image.shape[-1]
    check_int("border", border, where="outpaint_canvas", minimum=1, maximum=(S - 1) // 2)
    inner = S - 2 * border
    small = F.interpolate(image[None].float(), size=(inner, inner), mode="bicubic", antialias=True,
                          align_corners=False)[0].clamp(-1, 1)
    canvas = torch.zeros(3, S, S)
    canvas[:, border:S - border, border:S - border] = small
    mask = torch.ones(1, S, S)
    mask[:, border:S - border, border:S - border] = 0
    return canvas, mask


def box_mask(size: int, box) -> torch.Tensor:
    """(1, size, size) mask, 1 inside the pixel box (y0, x0, y1, x1), rows
    y0 .. y1 - 1 and columns x0 .. x1 - 1."""
    y0, x0, y1, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= size and 0 <= x0 < x1 <= size):
        raise ValueError(f"box_mask: argument 'box' (y0, x0, y1, x1) must satisfy 0 <= y0 < y1 <= {size} and "
                         f"0 <= x0 < x1 <= {size}, got {(y0, x0, y1, x1)}")
    mask = torch.zeros(1, size, size)
    mask[:, y0:y1, x0:x1] = 1
    return mask


def _centre_square(img, size: int, resample):
    """A PIL image's centre square, resized to size x size."""
    w, h = img.size
    s = min(w, h)
    return img.resize((size, size), resample, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))


def read_image(path: str, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: the image's centre square, resized."""
    from PIL import Image

    from pyvq.data._common import pil_to_tensor, to_rgb

    with Image.open(path) as img:
        return pil_to_tensor(_centre_square(to_rgb(img), size, Image.Resampling.BICUBIC))


def read_mask(path: str, size: int) -> torch.Tensor:
    """(1, size, size) {0, 1} from a mask image (white / non-zero = region to
    generate), cropped and resized like ``read_image`` (nearest)."""
    from PIL import Image

    with Image.open(path) as img:
        img = _centre_square(img.convert("L"), size, Image.Resampling.NEAREST)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size)
    return (data > 127).float()[None]


def save_image_grid(path: str, images: torch.Tensor, nrow: int = 8, **labels) -> str:
    """Write (N, 3, H, W) images in [-1, 1] as one PNG grid; ``labels``
    (``row_labels``, ``col_labels``, ``title``, ``caption``, ``scale``) go to
    ``pyvq.train.figures.labelled_grid``. One image without labels is
    written as it is (no frame)."""
    from pyvq.train.figures import save_labelled_grid

    if images.shape[0] == 1 and not labels:
        labels = {"pad": 0}
    return save_labelled_grid(path, images, nrow, **labels)
