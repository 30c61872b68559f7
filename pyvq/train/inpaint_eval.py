"""Inpainting evaluation of an Asymmetric VQGAN decoder (Zhu et al. 2023).

The image is encoded whole (no prior yet: the latents are the original
image's), and four predictions are compared on a set of holes:

* ``vanilla``: the base tokenizer's own decoder, ``vanilla.decode(z)``;
* ``asymmetric``: the new decoder without a condition, ``asymmetric.decode(z)``;
* ``asymmetric_masked``: the new decoder with the known pixels,
  ``asymmetric.decode(z, masked_image=(1 - m) * x, mask=m)``;
* ``naive_blend``: the known pixels pasted over the vanilla output,
  ``m * vanilla + (1 - m) * x``.

Metrics per method (images in [-1, 1]; mask m = 1 on the hole):

* ``pre_error``: the paper's preserving error, the mean squared error
  between prediction and ground truth over the non-edited pixels (m = 0),
  averaged over those pixels (all channels) of the whole set;
* ``psnr``: PSNR over the whole image (data range 2), mean over images;
* ``lpips``: mean LPIPS, when an LPIPS module is given;
* FID / IS / KID (torch-fidelity's keys), with ``fid=True``.

Named mask sets (``inpaint_masks``): stroke widths and lengths are fractions
of the image's shorter side (``pyvq.data.irregular_mask`` settings), so the
sets look alike at every resolution. Mean hole ratio over 300 square masks:

========  ==========================  ==================================
name      what                        mean hole ratio (min-max of single)
========  ==========================  ==================================
thick     1-4 strokes, width 12-22%   0.31 (0.03-0.67)
medium    2-6 strokes, width 5-10%    0.19 (0.03-0.48)
thin      4-12 strokes, width 1-3.5%  0.11 at >= 64 px (0.03-0.21); at
                                      32 px the 1-pixel minimum width
                                      gives 0.20
box       ``box_mask`` defaults       0.21
hard      thick strokes or big boxes  every mask in [0.4, 0.5]
========  ==========================  ==================================

"hard" draws candidate i, attempt a from the generator seeded by
``(seed, "hard", i, a)`` (irregular for even i, boxes for odd i) and keeps
the first candidate whose hole ratio lies in [0.4, 0.5]; so mask i depends on
``(seed, i)`` and the image size only.
"""

from __future__ import annotations

import json
import os

import torch

from pyvq._checks import check_int
from pyvq.data._common import derived_generator
from pyvq.data.masks import box_mask, irregular_mask
from pyvq.metrics import fidelity_metrics, psnr
from pyvq.train.evaluate import latents

__all__ = [
    "MASK_SETS",
    "METHODS",
    "inpaint_masks",
    "pre_error",
    "inpaint_predictions",
    "evaluate_inpainting",
    "write_inpaint_report",
    "example_images",
    "decoder_base",
    "check_base",
    "run_inpaint_eval",
]

# irregular_mask settings of the stroke sets (fractions of the shorter side).
_STROKES = {
    "thick": dict(min_strokes=1, max_strokes=4, max_vertices=5, min_width=0.12, max_width=0.22,
                  min_length=0.1, max_length=0.5),
    "medium": dict(min_strokes=2, max_strokes=6, max_vertices=5, min_width=0.05, max_width=0.10,
                   min_length=0.1, max_length=0.4),
    "thin": dict(min_strokes=4, max_strokes=12, max_vertices=6, min_width=0.01, max_width=0.035,
                 min_length=0.05, max_length=0.35),
}
_HARD_STROKES = dict(min_strokes=2, max_strokes=6, max_vertices=6, min_width=0.15, max_width=0.3,
                     min_length=0.1, max_length=0.5)
_HARD_BOXES = dict(min_boxes=1, max_boxes=3, min_size=0.4, max_size=0.8, margin=0.0)
HARD_RANGE = (0.4, 0.5)
_HARD_MAX_ATTEMPTS = 1000

MASK_SETS = ("thick", "medium", "thin", "box", "hard")
METHODS = ("vanilla", "asymmetric", "asymmetric_masked", "naive_blend")


def _hard_mask(height: int, width: int, seed: int, index: int) -> torch.Tensor:
    lo, hi = HARD_RANGE
    for attempt in range(_HARD_MAX_ATTEMPTS):
        g = derived_generator(seed, "hard", index, attempt)
        if index % 2 == 0:
            m = irregular_mask(height, width, generator=g, **_HARD_STROKES)
        else:
            m = box_mask(height, width, generator=g, **_HARD_BOXES)
        if lo <= float(m.mean()) <= hi:
            return m
    raise RuntimeError(
        f"inpaint_masks('hard'): no mask with a hole ratio in [{lo}, {hi}] after {_HARD_MAX_ATTEMPTS} "
        f"draws at {height} x {width} (image too small?)"
    )


def inpaint_masks(name: str, n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``n`` masks of the named set (see the module docstring): (n, 1, H, W)
    float32 in {0, 1}, 1 = hole. Mask i depends on ``(name, seed, i)`` and the
    size only."""
    if name not in MASK_SETS:
        raise ValueError(f"inpaint_masks: unknown mask set {name!r}; choose from {MASK_SETS}")
    check_int("n", n, where="inpaint_masks", minimum=0)
    check_int("seed", seed, where="inpaint_masks", minimum=0)
    masks = []
    for i in range(n):
        if name == "hard":
            masks.append(_hard_mask(height, width, seed, i))
            continue
        g = derived_generator(seed, name, i)
        if name == "box":
            masks.append(box_mask(height, width, generator=g))
        else:
            masks.append(irregular_mask(height, width, generator=g, **_STROKES[name]))
    if not masks:
        return torch.zeros(0, 1, height, width)
    return torch.stack(masks)


def pre_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared error over the pixels with ``mask == 0`` (all channels,
    all images pooled). ``mask`` (B or 1, 1, H, W), 1 = hole. NaN when every
    pixel is a hole."""
    if pred.shape != target.shape:
        raise ValueError(f"pre_error: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = (1.0 - mask.to(pred.dtype)).expand_as(pred)
    count = keep.sum()
    if count == 0:
        return float("nan")
    return float((((pred.double() - target.double()) ** 2) * keep.double()).sum() / count.double())


@torch.no_grad()
def inpaint_predictions(vanilla, asymmetric, x: torch.Tensor, masks: torch.Tensor) -> dict:
    """The four predictions (see the module docstring) for one batch:
    {method: (B, C, H, W)} clamped to [-1, 1]. ``masks`` (B or 1, 1, H, W)."""
    if masks.dim() == 3:
        masks = masks[:, None]
    masks = masks.to(device=x.device, dtype=x.dtype)
    if masks.shape[0] == 1 and x.shape[0] != 1:
        masks = masks.expand(x.shape[0], -1, -1, -1)
    z, _ = latents(asymmetric, x)
    van = vanilla.decode(z).float().clamp(-1, 1)
    out = {
        "vanilla": van,
        "asymmetric": asymmetric.decode(z).float().clamp(-1, 1),
        "asymmetric_masked": asymmetric.decode(z, masked_image=(1.0 - masks) * x, mask=masks).float().clamp(-1, 1),
        "naive_blend": masks * van + (1.0 - masks) * x.float(),
    }
    return out


@torch.no_grad()
def evaluate_inpainting(vanilla, asymmetric, images: torch.Tensor, masks: torch.Tensor, *, lpips=None,
                        fid: bool = False, feature_extractor: str | None = None, batch_size: int = 16,
                        return_predictions: bool = False):
    """Compare the four methods on ``images`` (N, 3, H, W) in [-1, 1] with
    ``masks`` (N or 1, 1, H, W), 1 = hole.

    ``vanilla`` is the base tokenizer (``VQGAN`` / ``AutoencoderKL``) with
    its decoder; ``asymmetric`` an ``AsymmetricVQGAN`` on it (its frozen
    encoder gives the latents both decoders see).

    Returns {method: {"pre_error", "psnr", "lpips" (if given), FID/KID keys
    (if ``fid``)}}; with ``return_predictions`` also {method: (N, 3, H, W)}.
    """
    if images.dim() != 4:
        raise ValueError(f"evaluate_inpainting: images must be (N, C, H, W), got {tuple(images.shape)}")
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.shape[0] == 1:
        masks = masks.expand(images.shape[0], -1, -1, -1)
    if masks.shape[0] != images.shape[0] or masks.shape[1] != 1 or masks.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"evaluate_inpainting: masks must be (N or 1, 1, H, W) for images {tuple(images.shape)}, "
            f"got {tuple(masks.shape)}"
        )
    vanilla.eval()
    asymmetric.eval()
    device = next(asymmetric.parameters()).device
    preds = {m: [] for m in METHODS}
    for xb, mb in zip(images.split(batch_size), masks.split(batch_size)):
        out = inpaint_predictions(vanilla, asymmetric, xb.to(device), mb.to(device))
        for m in METHODS:
            preds[m].append(out[m].cpu())
    preds = {m: torch.cat(v) for m, v in preds.items()}
    x = images.float().cpu()
    mk = masks.float().cpu()
    results = {}
    for method, y in preds.items():
        r = {"pre_error": pre_error(y, x, mk), "psnr": float(psnr(x, y).mean())}
        if lpips is not None:
            dev = next(lpips.parameters(), torch.empty(0)).device
            r["lpips"] = float(torch.cat([lpips(a.to(dev), b.to(dev)).flatten().cpu()
                                          for a, b in zip(x.split(batch_size), y.split(batch_size))]).mean())
        if fid:
            r.update({k: float(v) for k, v in fidelity_metrics(x, y, feature_extractor=feature_extractor).items()})
        results[method] = r
    if return_predictions:
        return results, preds
    return results


def example_images(split: str = "train", size: int = 64, names=("text", "page")) -> torch.Tensor:
    """Centre crops (resized to ``size``) of the built-in photographs
    ``names`` that are in ``split`` ("train", "val" or "all"; "text" and
    "page" are train images); when none of ``names`` is in the split, the
    split's first two images. (K, 3, size, size) in [-1, 1]."""
    import torch.nn.functional as F

    from pyvq.data import builtin_image_names, load_builtin_image

    available = builtin_image_names(split)
    chosen = [n for n in names if n in available] or list(available[:2])
    out = []
    for name in chosen:
        img = load_builtin_image(name)
        h, w = img.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[:, top:top + s, left:left + s]
        out.append(F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0])
    return torch.stack(out).clamp(-1, 1)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_inpaint_report(out_dir: str, results: dict, *, examples=None, title: str = "Inpainting evaluation",
                         info: dict | None = None) -> str:
    """Write ``metrics.json``, ``report.md`` and, when ``examples`` is given,
    ``examples.png`` into ``out_dir``; returns the path of ``report.md``.

    ``examples``: ``(images, masks, predictions)`` with images (K, 3, H, W)
    in [-1, 1], masks (K, 1, H, W) and predictions {method: (K, 3, H, W)}
    (``vanilla``, ``asymmetric_masked``, ``naive_blend`` are shown). The PNG
    has one row per image, columns: input (hole greyed out), mask, vanilla,
    asymmetric (with mask), naive blend.
    ``info``: extra key/values stored in metrics.json and listed in the report.
    """
    os.makedirs(out_dir, exist_ok=True)
    payload = {"results": results}
    if info:
        payload["info"] = info
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(payload, f, indent=1)

    metrics = []
    for r in results.values():
        for k in r:
            if k not in metrics:
                metrics.append(k)
    lines = [f"# {title}", ""]
    if info:
        lines += [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines += ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method, r in results.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(r.get(k)) for k in metrics) + " |")
    lines.append("")
    van = results.get("vanilla", {}).get("pre_error")
    asym = results.get("asymmetric_masked", {}).get("pre_error")
    if van is not None and asym is not None:
        ratio = van / asym if asym > 0 else float("inf")
        lines.append(f"Pre_error ratio vanilla / asymmetric-with-mask: **{ratio:.3g}** "
                     f"({van:.4g} / {asym:.4g}; > 1 means the asymmetric decoder preserves the known "
                     "region better).")
        plain = results.get("asymmetric", {}).get("pre_error")
        if plain is not None:
            lines.append(f"Without the mask the asymmetric decoder's Pre_error is {plain:.4g} against the vanilla "
                         f"decoder's {van:.4g} ({'no worse' if plain <= van else 'worse'}).")
        lines.append("")
    lines.append("pre_error: MSE on the non-edited pixels (mask = 0), images in [-1, 1]; psnr over the "
                 "whole image. Latents are the original image's (pure reconstruction, no prior).")
    if examples is not None:
        images, masks, preds = examples
        from pyvq.train.figures import save_labelled_grid

        cols = [images * (1 - masks) + masks * 0.0, (masks * 2 - 1).expand_as(images), preds["vanilla"],
                preds["asymmetric_masked"], preds["naive_blend"]]
        save_labelled_grid(os.path.join(out_dir, "examples.png"), torch.stack(cols, 1).flatten(0, 1), len(cols),
                           col_labels=["input (hole grey)", "mask (white = hole)", "vanilla", "asymmetric + mask",
                                       "naive blend"], scale=max(1, 96 // images.shape[-1]))
        lines += ["", "![examples](examples.png)", "",
                  "Columns: input (hole shown grey), mask (white = hole), vanilla decoder, asymmetric decoder "
                  "with mask, naive blend."]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def decoder_base(decoder_dir: str) -> str | None:
    """The base tokenizer run an asymmetric decoder run was trained on: its
    config.json's ``base`` (``pyvq train --base``); None when it has none."""
    path = os.path.join(decoder_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("base")


def check_base(vanilla, asymmetric, *, tokenizer: str = "the tokenizer", decoder: str = "the decoder",
               recorded: str | None = None) -> None:
    """``vanilla`` is the base ``asymmetric`` was built on: its encoder-side
    weights (every tensor of ``asymmetric.base``) equal the decoder's frozen
    copy; else ``ValueError`` naming both (and ``recorded``, the base the
    decoder's run names, when known). Decoding the frozen encoder's latents
    with another tokenizer's decoder compares nothing."""
    from pyvq.data.codes import tokenizer_fingerprint

    own = asymmetric.base.state_dict()
    theirs = vanilla.state_dict()
    same = type(vanilla).__name__ == type(asymmetric.base).__name__ and all(
        k in theirs and theirs[k].shape == v.shape and torch.equal(theirs[k].to(v.device), v) for k, v in own.items())
    if same:
        return
    hint = f" (its run was trained on --base {recorded})" if recorded else ""
    raise ValueError(f"{tokenizer} ({type(vanilla).__name__}, {tokenizer_fingerprint(vanilla)}) is not the base "
                     f"of {decoder}{hint}: the decoder's frozen encoder ({type(asymmetric.base).__name__}, "
                     f"{tokenizer_fingerprint(asymmetric.base)}) has other weights; give the decoder's base as "
                     "the tokenizer, or leave it out to use the base its run records")


def run_inpaint_eval(tokenizer_dir: str | None, decoder_dir: str, out_dir: str, *, data: str = "builtin",
                     split: str = "val", masks: str = "thick", num: int = 32, image_size: int | None = None,
                     lpips=None, fid: bool = False, example_split: str = "train", example_size: int | None = None,
                     seed: int = 0, info: dict | None = None) -> str:
    """What ``pyvq eval-inpaint`` runs: load both models (``*_dir/model``),
    evaluate on ``num`` images of ``data`` with the named mask set, write the
    report into ``out_dir``; returns the report path.

    ``tokenizer_dir``: the base tokenizer run; None takes the one the
    decoder's run records (``decoder_base``). Either way it must be the
    decoder's base (``check_base``: ``ValueError`` naming both otherwise).
    ``split``: the built-in photographs' split (an image folder has none and
    is used whole). ``examples.png`` shows the built-in "text" and "page"
    photographs of ``example_split`` for ``data="builtin"``, else the first
    two images of the folder. ``example_size``: side of the example crops in
    ``examples.png`` (default: the evaluation size; the decoders are
    convolutional, so a larger one shows more detail). ``info``: extra
    entries for the report's header."""
    from pyvq.models import load_pretrained

    def load(run_dir, what):
        model_dir = os.path.join(run_dir, "model")
        if not os.path.isdir(model_dir):
            raise SystemExit(f"pyvq eval-inpaint: {what} {run_dir} has no trained model (expected {model_dir})")
        return load_pretrained(model_dir)

    asymmetric = load(decoder_dir, "--decoder")
    if not hasattr(asymmetric, "config") or not hasattr(asymmetric.config, "base_kind"):
        raise SystemExit(f"pyvq eval-inpaint: --decoder {decoder_dir} does not hold an AsymmetricVQGAN")
    recorded = decoder_base(decoder_dir)
    if tokenizer_dir is None:
        if recorded is None:
            raise ValueError(f"--decoder {decoder_dir} records no base tokenizer run (its config.json has no "
                             "'base'): pass --tokenizer, the run it was built on")
        tokenizer_dir = recorded
    vanilla = load(tokenizer_dir, "--tokenizer")
    if not hasattr(vanilla, "decoder"):
        raise SystemExit(f"pyvq eval-inpaint: --tokenizer {tokenizer_dir} has no decoder (a VQGAN / AutoencoderKL run?)")
    check_base(vanilla, asymmetric, tokenizer=f"--tokenizer {tokenizer_dir}", decoder=f"--decoder {decoder_dir}",
               recorded=recorded)
    size = image_size or asymmetric.config.base().resolution
    from pyvq.data import build_dataset

    builtin = data == "builtin"
    dataset = build_dataset(data, size, split, augment=False)
    n = min(num, len(dataset))
    if n < 1:
        raise SystemExit(f"pyvq eval-inpaint: no images in {data!r}")
    images = torch.stack([dataset[i] for i in range(n)])
    mk = inpaint_masks(masks, n, size, size, seed=seed)
    results = evaluate_inpainting(vanilla, asymmetric, images, mk, lpips=lpips, fid=fid)
    ex_size = example_size or size
    if builtin:
        ex = example_images(example_split, ex_size)
        examples = f"built-in photographs ({example_split} split)"
    else:
        ex_data = dataset if ex_size == size else build_dataset(data, ex_size, split, augment=False)
        ex = torch.stack([ex_data[i] for i in range(min(2, len(ex_data)))])
        examples = f"the first {len(ex)} images of {data}"
    ex_masks = inpaint_masks(masks, ex.shape[0], ex_size, ex_size, seed=seed + 1)
    _, ex_preds = evaluate_inpainting(vanilla, asymmetric, ex, ex_masks, return_predictions=True)
    info = {"tokenizer": tokenizer_dir, "decoder": decoder_dir,
            "data": data if builtin else os.path.abspath(data),
            "split": split if builtin else "none (an image folder, used whole)", "masks": masks,
            "num_images": n, "image_size": size, "seed": seed, "examples": examples,
            "mean_hole_ratio": round(float(mk.mean()), 4), **(info or {})}
    return write_inpaint_report(out_dir, results, examples=(ex, ex_masks, ex_preds),
                                title=f"Inpainting evaluation ({masks} masks)", info=info)
