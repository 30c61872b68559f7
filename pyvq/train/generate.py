"""Images from a prior and a tokenizer: what ``pyvq encode``, ``pyvq sample``
and ``pyvq inpaint`` run.

A prior (``MultinomialDiffusion`` or ``MultiGrainedTransformer`` over VQ
indices, ``GaussianDiffusion`` over BRICS key codes) samples or completes
code maps; the tokenizer that made its training codes decodes them. Keyword
arguments a prior's own ``sample`` / ``inpaint`` take (e.g. the
transformer's ``labels`` or ``temperature``) pass through ``prior_kwargs``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pyvq._checks import check_int


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


def _codebook_size(prior) -> int:
    """K of an indices prior (``num_codes`` or, for the diffusion priors, ``num_classes``)."""
    return int(getattr(prior, "num_codes", None) or prior.num_classes)


def _described(record: dict) -> str:
    """"VQGAN /runs/tok (sha256:...)" from a tokenizer record, what it has of it."""
    text = " ".join(v for v in (record.get("class"), record.get("path")) if v)
    if record.get("fingerprint"):
        text += f" ({record['fingerprint']})"
    return text.strip() or "no class, folder or fingerprint recorded"


def check_code_space(prior, tokenizer, *, tokenizer_name: str | None = None, force: bool = False) -> None:
    """Refuse a tokenizer whose codes the prior does not model.

    Errors (``ValueError``, naming both values): a prior of the other kind
    of codes; indices: the prior's K against the tokenizer's codebook size;
    keys: the prior's code channels against the tokenizer's
    ``code_channels``; a prior whose tokenizer record (``config.tokenizer``,
    written by ``PriorTrainer``) disagrees with the prior's own K / code
    shape; and, unless ``force``, a tokenizer whose weights' fingerprint
    (``pyvq.data.codes.tokenizer_fingerprint``) is not the recorded one (its
    codes mean other things, even at the same K). With ``force`` that last
    one is a warning. A prior without a record (trained before pyvq wrote
    it) or a record without a fingerprint gets one warning and only the K /
    shape checks. ``tokenizer_name`` (e.g. the folder it came from) names
    the tokenizer in the messages.
    """
    from pyvq.data.codes import tokenizer_fingerprint

    kind = getattr(prior, "code_kind", None)
    if kind is None:
        raise ValueError(f"the prior is a {type(prior).__name__}, not a pyvq prior (a vqddm_*, keycode_diffusion_* "
                         "or mgt_* run expected)")
    name = tokenizer_name or f"the {type(tokenizer).__name__} tokenizer"
    if getattr(tokenizer, "code_kind", None) is not None:
        raise ValueError(f"{name} is a prior ({type(tokenizer).__name__}), not a tokenizer: give the tokenizer run "
                         "whose codes the prior models (a VQGAN, EfficientVQGAN or BRICS run)")
    from pyvq.models.tokenizers import AsymmetricVQGAN, AutoencoderKL

    if isinstance(tokenizer, (AsymmetricVQGAN, AutoencoderKL)):
        raise ValueError(f"{name} is an {type(tokenizer).__name__}, which makes neither code indices nor key codes "
                         "(a VQGAN, EfficientVQGAN or BRICS run expected)")
    makes = "indices" if hasattr(tokenizer, "decode_indices") else "keys"
    if kind != makes:
        raise ValueError(f"the prior models {kind} but {name} makes {makes}")
    shape = tuple(prior.code_shape)
    if kind == "indices":
        K, tok_K = _codebook_size(prior), int(tokenizer.quantize.num_codes)
        if K != tok_K:
            raise ValueError(f"the prior models K = {K} code indices but {name} has a codebook of K = {tok_K} "
                             "codes: give the tokenizer whose codes the prior was trained on")
    elif hasattr(getattr(tokenizer, "config", None), "code_channels"):  # BRICS
        C, tok_C = shape[0], int(tokenizer.config.code_channels)
        if C != tok_C:
            raise ValueError(f"the prior models key codes of {C} channels but {name} makes {tok_C} "
                             "(code_channels): give the tokenizer whose codes the prior was trained on")
    record = getattr(prior.config, "tokenizer", None)
    if record is None:
        warnings.warn(f"the {type(prior).__name__} prior records no tokenizer (trained before pyvq recorded "
                      f"it): only its kind, K and code shape were checked against {name}", stacklevel=2)
        return
    if record.get("kind") != kind or tuple(record.get("shape") or ()) != shape or (
            kind == "indices" and record.get("num_classes") != _codebook_size(prior)):
        raise ValueError(f"the prior's tokenizer record ({record.get('kind')}, shape {record.get('shape')}, "
                         f"K = {record.get('num_classes')}) does not match the prior ({kind}, shape {list(shape)}"
                         + (f", K = {_codebook_size(prior)})" if kind == "indices" else ")"))
    if not record.get("fingerprint"):
        warnings.warn(f"the prior's record of its tokenizer ({_described(record)}) has no fingerprint (its "
                      f"codes.json was written before pyvq recorded one, or by hand): only its kind, K and code "
                      f"shape were checked against {name}", stacklevel=2)
        return
    got = tokenizer_fingerprint(tokenizer)
    if got != record["fingerprint"]:
        message = (f"the prior was trained on the codes of {_described(record)}, but {name} "
                   f"({type(tokenizer).__name__}, {got}) has other weights, so its codes mean other things")
        if not force:
            raise ValueError(message + "; give the tokenizer the prior was trained with, or force it "
                             "(pyvq sample / inpaint: --force-tokenizer)")
        warnings.warn(message + " (forced)", stacklevel=2)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@torch.no_grad()
def sample_images(prior, tokenizer, n: int, *, steps: int | None = None, seed: int = 0, batch_size: int = 16,
                  progress: bool = False, force_tokenizer: bool = False, check_tokenizer: bool = True,
                  **prior_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, H, W) in [-1, 1], codes) sampled from ``prior`` and
    decoded by ``tokenizer``; ``steps`` strided reverse steps (default: all;
    the prior's meaning of ``steps``); ``prior_kwargs`` go to ``prior.sample``.
    The tokenizer is checked first (``check_code_space``, with
    ``force=force_tokenizer``) unless ``check_tokenizer`` is False (the
    caller checked it)."""
    check_int("n", n, where="sample_images", minimum=1)
    if check_tokenizer:
        check_code_space(prior, tokenizer, force=force_tokenizer)
    prior.eval(), tokenizer.eval()
    g = _generator(seed)
    codes = torch.cat([prior.sample(min(batch_size, n - i), steps=steps, generator=g, progress=progress,
                                    **prior_kwargs)
                       for i in range(0, n, batch_size)])
    return torch.cat([decode_codes(tokenizer, codes[i:i + batch_size]) for i in range(0, n, batch_size)]), codes


@torch.no_grad()
def inpaint_image(prior, tokenizer, image: torch.Tensor, mask: torch.Tensor, *, steps: int | None = None,
                  seed: int = 0, paste: bool = True, progress: bool = False, force_tokenizer: bool = False,
                  check_tokenizer: bool = True, **prior_kwargs) -> dict:
    """Complete the masked region of one image through the prior.

    Args:
        image: (3, H, W) in [-1, 1], H and W the tokenizer's resolution.
        mask: (1, H, W) or (H, W), 1 = region to generate.
        paste: put the known pixels back after decoding (the tokenizer's
            reconstruction of them is lossy).
        force_tokenizer: ``check_code_space``'s ``force``; it checks the
            tokenizer first, unless ``check_tokenizer`` is False (the
            caller checked it).
        prior_kwargs: further keyword arguments of ``prior.inpaint``.

    A code is kept (re-imposed from the image at every reverse step) when
    ``tokenizer.known_codes(mask)`` says so: for VQ tokenizers when its
    f x f block of pixels (f the downsampling factor) has no masked pixel,
    for BRICS when every pixel block it feeds through its tiling lies
    outside the mask; every other code is generated.

    Returns:
        dict with ``completion`` (3, H, W), ``decoded`` (3, H, W) (the
        decoded codes, before pasting), ``keep`` (h, w) bool and ``codes``.
    """
    from pyvq.data.codes import tokenizer_codes

    if check_tokenizer:
        check_code_space(prior, tokenizer, force=force_tokenizer)
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
    if not hasattr(tokenizer, "known_codes"):
        raise ValueError(f"inpaint_image: the {type(tokenizer).__name__} tokenizer has no known_codes(mask), "
                         "the method that says which of its codes a mask leaves known")
    keep = tokenizer.known_codes(mask)  # (h, w): the tokenizer's rule (BRICS: its tiling)
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


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def read_image(path: str, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: the image's centre square, resized."""
    from PIL import Image

    from pyvq.data._common import pil_to_tensor, to_rgb

    with Image.open(path) as img:
        return pil_to_tensor(_centre_square(to_rgb(img), size, Image.Resampling.BICUBIC))


def read_mask(path: str, size: int, like: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, size, size) {0, 1} from a mask image (white / non-zero = region to
    generate), cropped and resized like ``read_image`` (nearest).
    ``like``: the (width, height) of the image the mask belongs to; a mask of
    another size is refused (``ValueError`` naming both sizes), as cropping
    and resizing it would move the region."""
    from PIL import Image

    with Image.open(path) as img:
        if like is not None and tuple(img.size) != tuple(like):
            raise ValueError(f"the mask {path} is {img.size[0]} x {img.size[1]} pixels but the image is "
                             f"{like[0]} x {like[1]}: give a mask of the image's size")
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
