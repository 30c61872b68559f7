"""The ``pyvq`` command.

    pyvq info [--json]     what was built: ops and their CPU/CUDA/reference
                           implementations, CUDA architectures, Triton
    pyvq train ...         train a tokenizer (also under torchrun)
    pyvq eval ...          evaluate a trained run, write metrics.json
    pyvq bench NAME        run a benchmark script from a source checkout
    pyvq demo ...          the main job: train, evaluate, ReFiT, report
    pyvq eval-inpaint ...  Asymmetric VQGAN decoder vs vanilla on inpainting masks
    pyvq demo-inpaint ...  train the tiny asymmetric decoder on the demo's VQGAN, evaluate
    pyvq encode ...        cache a tokenizer's codes of a dataset (for training a prior)
    pyvq train --codes ... train a prior (vqddm_*, keycode_diffusion_*, mgt_*) on cached codes
    pyvq sample ...        sample codes from a prior, decode them, write a PNG grid
    pyvq inpaint ...       complete the masked region of an image through a prior
                           (--mask FILE), outpaint it (--outpaint N) or
                           regenerate a box, optionally of a class (--box ... --label C)
"""

from __future__ import annotations

import argparse
import json
import sys


def _print_info(as_json: bool) -> int:
    import pyvq

    info = pyvq.info()
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    triton = info["triton"]
    print(f"pyvq {info['pyvq']}  torch {info['torch']} (CUDA {info['torch_cuda']}, "
          f"available: {info['cuda_available']})")
    print(f"extension: {info['extension']}; built with CUDA: {info['built_with_cuda']}"
          + (f" (archs {info['cuda_archs']})" if info["cuda_archs"] else ""))
    print(f"CPU kernels use: {info['cpu_isa']}; backend: {info['backend']}")
    print(f"triton: {'importable ' + triton.get('version', '') if triton['importable'] else 'not importable'}"
          f"{', interpreted' if triton['interpreted'] else ''}")
    print(f"\n{'op':<24}{'cpu':>6}{'cuda':>6}{'triton':>8}{'reference':>11}  cpu isa")
    for name, impl in info["ops"].items():
        marks = ["yes" if impl[k] else "NO" for k in ("cpu", "cuda", "reference")]
        triton_mark = "yes" if impl["triton"] else "-"
        print(f"{name:<24}{marks[0]:>6}{marks[1]:>6}{triton_mark:>8}{marks[2]:>11}  {impl.get('cpu_isa', '-')}")
    return 0


_TRAIN_FLAGS = {  # CLI flag -> TrainConfig field
    "steps": int, "batch_size": int, "image_size": int, "lr": float, "ckpt_every": int,
    "ckpt_minutes": float, "log_every": int, "image_every": int, "disc_start": int,
    "perceptual_weight": float, "ema_decay": float, "seed": int, "num_workers": int,
    "max_nonfinite_steps": int,
}


def _train(args) -> int:
    from pyvq.train.config import TrainConfig
    from pyvq.train.trainer import Trainer

    data = {}
    if args.config:
        data = TrainConfig.from_yaml(args.config).to_dict()
    if args.preset:
        data["model"] = args.preset
    if args.data:
        data["data"] = args.data
    if args.base:
        data["base"] = args.base
    if args.codes:
        data["codes"] = args.codes
    for name in _TRAIN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.disc_type:
        data["disc_type"] = args.disc_type
    if args.bf16:
        data["bf16"] = True
    if args.device:
        data["device"] = args.device
    config = TrainConfig.from_dict(data)
    if config.codes is not None:
        from pyvq.train.prior_trainer import PriorTrainer

        trainer = PriorTrainer(config, args.out, resume=args.resume)
    else:
        trainer = Trainer(config, args.out, resume=args.resume)
    from pyvq.train.base import NonFiniteLossError
    from pyvq.train.checkpoint import CheckpointWriteError

    try:
        scalars = trainer.train()
    except (NonFiniteLossError, CheckpointWriteError) as exc:  # one clear line, not a traceback
        if trainer.dist.is_main:  # every rank stops on a non-finite run; one line is enough
            print(f"pyvq train: {exc}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        print(f"run written to {args.out} (step {trainer.step}); last scalars: "
              + ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))
    from pyvq.train.distributed import cleanup_distributed

    cleanup_distributed()
    return 0


def _eval(args) -> int:
    import os

    from pyvq.models._pretrained import load_pretrained
    from pyvq.train.evaluate import evaluate, write_metrics

    model_dir = os.path.join(args.run, "model")
    if not os.path.isdir(model_dir):
        raise SystemExit(f"pyvq eval: {args.run} has no trained model (expected {model_dir})")
    model = load_pretrained(model_dir)
    size = args.image_size or model.config.resolution
    from pyvq.data import build_dataset

    dataset = build_dataset(args.data, size, args.split, augment=False)
    lpips = None
    if args.lpips:
        from pyvq.losses import build_lpips

        lpips = build_lpips()  # MissingWeightsError says which file is missing
    metrics = evaluate(model, dataset, lpips=lpips, fid=args.fid)
    out = args.out or os.path.join(args.run, "metrics.json")
    write_metrics(out, metrics)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out}")
    return 0


def _bench(args) -> int:
    import os
    import runpy

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", f"bench_{args.name.replace('-', '_')}.py")
    if not os.path.isfile(script):
        raise SystemExit(f"pyvq bench: {script} not found (benchmarks ship with the source checkout)")
    sys.argv = [script] + args.rest
    runpy.run_path(script, run_name="__main__")
    return 0


def _demo(args) -> int:
    from pyvq.demo import run_demo

    report = run_demo(args.out, train_steps=args.steps, finetune_steps=args.finetune_steps)
    print(f"\nreport: {report}")
    return 0


def _demo_inpaint(args) -> int:
    from pyvq.demo import run_inpaint_demo

    report = run_inpaint_demo(args.out, base_run=args.base, steps=args.steps, masks=args.masks)
    print(f"\nreport: {report}")
    return 0


def _eval_inpaint(args) -> int:
    import os

    from pyvq.train.inpaint_eval import run_inpaint_eval

    lpips = None
    if args.lpips:
        from pyvq.losses import build_lpips

        lpips = build_lpips()
    out = args.out or os.path.join(args.decoder, f"inpaint_{args.masks}")
    report = run_inpaint_eval(args.tokenizer, args.decoder, out, data=args.data, split=args.split,
                              masks=args.masks, num=args.num, image_size=args.image_size, lpips=lpips,
                              fid=args.fid, example_split=args.example_split, seed=args.seed)
    print(f"report: {report}")
    return 0


def _load(path: str, flag: str, command: str):
    import os

    from pyvq.models import load_run

    if not os.path.isdir(path):
        raise SystemExit(f"pyvq {command}: {flag} {path} is not a directory")
    try:
        return load_run(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"pyvq {command}: {flag} {path}: {exc}") from None


def _encode(args) -> int:
    from pyvq.data import build_dataset
    from pyvq.data.codes import encode_codes

    tokenizer = _load(args.tokenizer, "--tokenizer", "encode")
    size = args.image_size or tokenizer.config.resolution
    data = build_dataset(args.data, size, args.split)
    meta = encode_codes(tokenizer, data, args.out, repeats=args.repeats,
                        batch_size=args.batch_size, tokenizer_dir=args.tokenizer)
    print(f"wrote {meta['count']} {meta['kind']} of shape {tuple(meta['shape'])} to {args.out}")
    return 0


# Sampling flags that only some priors take (MultiGrainedTransformer): flag -> keyword of sample / inpaint.
_PRIOR_FLAGS = {"label": "labels", "temperature": "temperature", "guidance": "guidance_scale", "order": "order"}


def _prior_kwargs(prior, args, command: str, method: str, defaults: dict | None = None) -> dict:
    """The keyword arguments of ``prior.<method>`` set by the optional
    sampling flags; a flag the prior does not take is an error naming it."""
    import inspect

    takes = inspect.signature(getattr(prior, method)).parameters
    kwargs = {}
    for flag, key in _PRIOR_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            if defaults and key in defaults and key in takes:
                kwargs[key] = defaults[key]
            continue
        if key not in takes:
            raise SystemExit(f"pyvq {command}: --{flag} is not an option of a {type(prior).__name__} prior")
        kwargs[key] = value
    return kwargs


def _sample(args) -> int:
    import os

    from pyvq.train.generate import sample_images, save_image_grid

    prior = _load(args.prior, "--prior", "sample")
    tokenizer = _load(args.tokenizer, "--tokenizer", "sample")
    kwargs = _prior_kwargs(prior, args, "sample", "sample")
    try:
        images, _ = sample_images(prior, tokenizer, args.n, steps=args.steps, seed=args.seed, progress=True,
                                  **kwargs)
    except ValueError as exc:
        raise SystemExit(f"pyvq sample: {exc}") from None
    out = args.out or os.path.join(args.prior, "samples.png")
    save_image_grid(out, images, nrow=args.nrow or max(1, int(args.n**0.5 + 0.5)))
    print(f"wrote {out}")
    return 0


def _inpaint(args) -> int:
    import os

    import torch

    from pyvq.train.generate import (box_mask, inpaint_image, outpaint_canvas, read_image, read_mask,
                                     save_image_grid)

    prior = _load(args.prior, "--prior", "inpaint")
    tokenizer = _load(args.tokenizer, "--tokenizer", "inpaint")
    f = tokenizer.downsample_factor
    size = prior.code_shape[-1] * f  # the image size the prior's codes come from
    files = [(args.image, "--image")] + ([(args.mask, "--mask")] if args.mask else [])
    for path, flag in files:
        if not os.path.isfile(path):
            raise SystemExit(f"pyvq inpaint: {flag} {path} is not a file")
    image = read_image(args.image, size)
    defaults = None
    try:
        if args.mask:
            mask = read_mask(args.mask, size)
        elif args.outpaint is not None:
            image, mask = outpaint_canvas(image, args.outpaint * f)
            defaults = {"order": "center_out"}  # grow the image outwards from the known centre
        else:
            mask = box_mask(size, args.box)
    except ValueError as exc:
        flag = "--mask" if args.mask else "--outpaint" if args.outpaint is not None else "--box"
        raise SystemExit(f"pyvq inpaint: {flag}: {exc} (the image is {size} x {size} pixels, "
                         f"{size // f} x {size // f} codes)") from None
    kwargs = _prior_kwargs(prior, args, "inpaint", "inpaint", defaults)
    try:
        out = inpaint_image(prior, tokenizer, image, mask, steps=args.steps, seed=args.seed, paste=args.paste,
                            **kwargs)
    except ValueError as exc:
        raise SystemExit(f"pyvq inpaint: {exc}") from None
    target = args.out or os.path.join(args.prior, "inpaint.png")
    save_image_grid(target, out["completion"][None], nrow=1)
    panel = os.path.splitext(target)[0] + "_panel.png"
    from pyvq.train.figures import tint_holes

    save_image_grid(panel, torch.stack([image, tint_holes(image, mask), out["decoded"], out["completion"]]), nrow=4,
                    col_labels=["input", "mask (holes magenta)", "decoded codes", "completion"],
                    scale=max(1, 128 // image.shape[-1]))
    print(f"wrote {target} and {panel} (input, masked, decoded codes, completion); "
          f"{int((~out['keep']).sum())} of {out['keep'].numel()} codes generated")
    return 0


_STEPS_HELP = ("sampling steps: a diffusion prior's strided reverse steps (default: all); a "
               "MultiGrainedTransformer's decoding steps per block (default: its config's)")


def _add_prior_flags(parser) -> None:
    """The flags of ``_PRIOR_FLAGS`` (MultiGrainedTransformer priors)."""
    from pyvq.models.priors.multigrained import ORDERS

    g = parser.add_argument_group("MultiGrainedTransformer priors")
    g.add_argument("--label", type=int, help="class label (a class-conditional prior; default: the null class)")
    g.add_argument("--temperature", type=float, help="token temperature (0: argmax; default: the config's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (1: none, the default)")
    g.add_argument("--order", choices=ORDERS, help="block order (default raster)")


def main(argv: list[str] | None = None) -> int:
    from pyvq.train.config import DISC_TYPES

    parser = argparse.ArgumentParser(prog="pyvq", description="pyvq command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="report what was compiled and which backends are used")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")

    p_train = sub.add_parser("train", help="train a tokenizer (works under torchrun)")
    p_train.add_argument("--config", help="YAML file of TrainConfig fields")
    p_train.add_argument("--preset", help="model preset, e.g. vqgan_tiny")
    p_train.add_argument("--data", help="'builtin' or an image folder")
    p_train.add_argument("--base", help="trained tokenizer run (asymmetric presets: train only a new decoder)")
    p_train.add_argument("--codes", help="codes folder from `pyvq encode` (prior presets: vqddm_*, "
                         "keycode_diffusion_*, mgt_*)")
    p_train.add_argument("--out", required=True, help="run directory")
    p_train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p_train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p_train.add_argument("--device", choices=("cpu", "cuda"))
    for name, kind in _TRAIN_FLAGS.items():
        p_train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    p_train.add_argument("--disc-type", dest="disc_type", choices=DISC_TYPES,
                         help="the GAN discriminator: patchgan (default) or projected (timm backbone, cached weights)")

    p_eval = sub.add_parser("eval", help="evaluate a trained run and write metrics.json")
    p_eval.add_argument("--run", required=True, help="run directory written by pyvq train")
    p_eval.add_argument("--data", default="builtin", help="'builtin' (its validation split) or an image folder")
    p_eval.add_argument("--split", default="val", choices=("train", "val"))
    p_eval.add_argument("--image-size", type=int)
    p_eval.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True,
                        help="LPIPS (needs VGG16 weights in the torch hub cache)")
    p_eval.add_argument("--fid", action=argparse.BooleanOptionalAction, default=False,
                        help="rFID/IS/KID via torch-fidelity (needs its Inception weights)")
    p_eval.add_argument("--out", help="metrics file (default RUN/metrics.json)")

    p_bench = sub.add_parser("bench", help="run benchmarks/bench_NAME.py of a source checkout")
    p_bench.add_argument("name", help="codebook, train-step, ...")
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")

    p_demo = sub.add_parser("demo", help="train a tiny VQGAN, evaluate, ReFiT, write a report")
    p_demo.add_argument("--out", default="runs/demo")
    p_demo.add_argument("--steps", type=int, default=None)
    p_demo.add_argument("--finetune-steps", type=int, default=None)

    p_inp = sub.add_parser("eval-inpaint", help="compare an Asymmetric VQGAN decoder with the vanilla one on masks")
    p_inp.add_argument("--tokenizer", required=True, help="run directory of the base VQGAN / AutoencoderKL")
    p_inp.add_argument("--decoder", required=True, help="run directory of the AsymmetricVQGAN")
    p_inp.add_argument("--data", default="builtin", help="'builtin' or an image folder")
    p_inp.add_argument("--split", default="val", choices=("train", "val"))
    p_inp.add_argument("--masks", default="thick", choices=("thick", "medium", "thin", "box", "hard"))
    p_inp.add_argument("--num", type=int, default=32, help="number of images")
    p_inp.add_argument("--image-size", type=int)
    p_inp.add_argument("--seed", type=int, default=0, help="mask seed")
    p_inp.add_argument("--example-split", default="train", choices=("train", "val", "all"),
                       help="built-in split of the example images ('text', 'page' are train)")
    p_inp.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True)
    p_inp.add_argument("--fid", action=argparse.BooleanOptionalAction, default=False)
    p_inp.add_argument("--out", help="report directory (default DECODER_RUN/inpaint_MASKS)")

    p_dinp = sub.add_parser("demo-inpaint", help="train the tiny Asymmetric VQGAN decoder on the demo's VQGAN, "
                            "write an inpainting report")
    p_dinp.add_argument("--base", default="runs/demo/train", help="the demo's VQGAN run (pyvq demo writes it)")
    p_dinp.add_argument("--out", default="runs/demo-inpaint")
    p_dinp.add_argument("--steps", type=int, default=None, help="decoder training steps (default 2400)")
    p_dinp.add_argument("--masks", default="hard", choices=("thick", "medium", "thin", "box", "hard"))

    p_enc = sub.add_parser("encode", help="cache a tokenizer's codes of a dataset for training a prior")
    p_enc.add_argument("--tokenizer", required=True,
                       help="run directory (or model folder) of a VQ tokenizer (VQGAN, EfficientVQGAN) or BRICS")
    p_enc.add_argument("--data", default="builtin", help="'builtin' or an image folder")
    p_enc.add_argument("--split", default="train", choices=("train", "val"))
    p_enc.add_argument("--image-size", type=int, help="default: the tokenizer's resolution")
    p_enc.add_argument("--repeats", type=int, default=1,
                       help="passes over the data (fresh random crops and flips each pass)")
    p_enc.add_argument("--batch-size", type=int, default=16)
    p_enc.add_argument("--out", required=True, help="codes folder to write")

    p_sample = sub.add_parser("sample", help="sample from a prior and decode with its tokenizer into a PNG grid")
    p_sample.add_argument("--prior", required=True, help="prior run directory")
    p_sample.add_argument("--tokenizer", required=True, help="the tokenizer run whose codes the prior models")
    p_sample.add_argument("--n", type=int, default=16, help="number of samples")
    p_sample.add_argument("--steps", type=int, help=_STEPS_HELP)
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--nrow", type=int, help="images per row (default: about sqrt(n))")
    p_sample.add_argument("--out", help="PNG path (default PRIOR/samples.png)")
    _add_prior_flags(p_sample)

    p_inpt = sub.add_parser("inpaint", help="complete the masked region of an image through a prior")
    p_inpt.add_argument("--prior", required=True, help="prior run directory")
    p_inpt.add_argument("--tokenizer", required=True, help="the tokenizer run whose codes the prior models")
    p_inpt.add_argument("--image", required=True, help="image file (its centre square is used)")
    region = p_inpt.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", help="inpaint: mask image, white (> 127) = region to generate")
    region.add_argument("--outpaint", type=int, metavar="N",
                        help="outpaint: shrink the image into the centre and generate a frame N codes wide "
                        "(N x the tokenizer's factor in pixels) around it; --order defaults to center_out")
    region.add_argument("--box", type=int, nargs=4, metavar=("Y0", "X0", "Y1", "X1"),
                        help="box edit: regenerate the pixel box rows Y0..Y1-1, columns X0..X1-1 of the image "
                        "resized to the prior's resolution (every code it touches); with --label, as that "
                        "class (a class-conditional prior)")
    p_inpt.add_argument("--steps", type=int, help=_STEPS_HELP)
    p_inpt.add_argument("--seed", type=int, default=0)
    p_inpt.add_argument("--paste", action=argparse.BooleanOptionalAction, default=True,
                        help="put the known pixels back after decoding")
    p_inpt.add_argument("--out", help="PNG path (default PRIOR/inpaint.png; a _panel.png is written beside it)")
    _add_prior_flags(p_inpt)

    args = parser.parse_args(argv)
    handlers = {"info": lambda a: _print_info(a.json), "train": _train, "eval": _eval,
                "bench": _bench, "demo": _demo, "eval-inpaint": _eval_inpaint,
                "demo-inpaint": _demo_inpaint, "encode": _encode, "sample": _sample, "inpaint": _inpaint}
    from pyvq.train.distributed import DistributedFailure

    try:
        return handlers[args.command](args)
    except DistributedFailure as exc:  # another rank died or is stuck: one line, exit status 1
        raise SystemExit(f"pyvq {args.command}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
