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

A user error (a missing folder, an unknown preset, a bad value, a run of the
wrong kind) prints one line, ``pyvq CMD: message``, and exits with status 1
(argparse's usage errors: 2); ``pyvq --debug CMD ...`` shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


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


def _note(command: str, message: str) -> None:
    """One line on stderr (rank 0 only under torchrun)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"pyvq {command}: {message}", file=sys.stderr)


def _lpips_weights() -> tuple[bool, str]:
    """(whether LPIPS's VGG16 backbone file is on this machine, a sentence
    naming the file, where it belongs and where it comes from)."""
    import os

    from pyvq.losses import backbone_weights

    filename, path, url = backbone_weights("vgg")
    return os.path.isfile(path), (f"the VGG16 weights file {filename} is not at {path} (pyvq never downloads; "
                                  f"fetch it from {url} and put it there).")


def _choose_perceptual(args, data: dict) -> None:
    """Resolve train's --lpips/--no-lpips and --perceptual-weight (or the
    YAML field) into ``data["perceptual_weight"]``. A contradiction, or an
    explicit request for the perceptual term on a machine without LPIPS's
    weights, is a one-line error naming what to drop. Left unset (nothing
    asked), ``_train`` decides: LPIPS when its weights are here, else a note
    and weight 0."""
    weight = data.get("perceptual_weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        return  # not a number: TrainConfig says so
    if args.perceptual_weight is not None:
        asked, drop = f"--perceptual-weight {args.perceptual_weight:g}", "--perceptual-weight"
    else:
        asked = drop = f"perceptual_weight: {weight} in {args.config}" if weight is not None else None
    if args.lpips is False:
        if weight is not None and weight > 0:
            raise SystemExit(f"pyvq train: --no-lpips contradicts {asked}: drop one of the two")
        data["perceptual_weight"] = 0.0
        return
    if args.lpips and weight is not None and weight <= 0:
        raise SystemExit(f"pyvq train: --lpips contradicts {asked} (no perceptual term): drop one of the two")
    if args.lpips and weight is None:
        asked = drop = "--lpips"
    if asked is None or (weight is not None and weight <= 0) or args.codes or data.get("codes"):
        return  # nothing asked for explicitly, no perceptual term, or a prior (no images, no LPIPS)
    present, why = _lpips_weights()
    if not present:
        raise SystemExit(f"pyvq train: {asked} asks for the perceptual (LPIPS) term, but {why} "
                         f"Drop {drop} (or pass --no-lpips) to train without it.")


def _build_lpips(requested: bool | None, command: str, verb: str):
    """The LPIPS module for eval / eval-inpaint: ``--no-lpips`` (False):
    None; no flag (None): LPIPS when its weights are here, else a one-line
    note and None; ``--lpips`` (True): LPIPS or a one-line error naming the
    flag to drop."""
    if requested is False:
        return None
    present, why = _lpips_weights()
    if not present:
        if requested:
            raise SystemExit(f"pyvq {command}: --lpips asks for LPIPS, but {why} "
                             f"Drop --lpips (or pass --no-lpips) to {verb} without it.")
        _note(command, f"{verb}s without LPIPS (lpips: null): {why} Pass --lpips to require it.")
        return None
    from pyvq.losses import build_lpips

    return build_lpips()


def _check_folders(config) -> None:
    """The folders a training run reads exist (before any note or run folder)."""
    import os

    given = [("--codes", config.codes)] if config.codes is not None else [("--data", config.data)]
    for flag, path in given:  # (--base may also be a Hub id: its loader names what is missing)
        if path != "builtin" and not os.path.isdir(path):
            raise SystemExit(f"pyvq train: {flag} {path} " + ("does not exist" if not os.path.exists(path)
                                                              else "is not a folder"))


def _train(args) -> int:
    from pyvq.train.config import TrainConfig
    from pyvq.train.trainer import Trainer

    data = {}
    if args.config:
        data = TrainConfig.read_yaml(args.config)
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
    _choose_perceptual(args, data)
    try:
        config = TrainConfig.from_dict(data)
    except TypeError as exc:  # a field of the wrong kind (a YAML `betas: 3`)
        raise SystemExit(f"pyvq train: {exc}") from None
    config.check_model()  # the preset, its overrides, codes vs data, --base, the image size
    _check_folders(config)
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("pyvq train: --device cuda, but torch sees no CUDA device here "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu")
    if config.codes is None and "perceptual_weight" not in data:
        present, why = _lpips_weights()
        if not present:
            config.perceptual_weight = 0.0  # recorded in config.json: the run trains without LPIPS
            _note("train", f"training without the perceptual (LPIPS) term: {why} "
                  "Pass --lpips (or --perceptual-weight W) to require it.")
    from pyvq.train.base import RunFolderError

    try:
        if config.codes is not None:
            from pyvq.train.prior_trainer import PriorTrainer

            trainer = PriorTrainer(config, args.out, resume=args.resume, overwrite=args.overwrite)
        else:
            trainer = Trainer(config, args.out, resume=args.resume, overwrite=args.overwrite)
    except (RunFolderError, PermissionError, NotADirectoryError) as exc:  # the run folder: one clear line
        raise SystemExit(f"pyvq train: {exc}") from None
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


def _run_kind(model) -> str:
    """``"prior"``, ``"asymmetric"`` or ``"tokenizer"``: what a loaded run holds."""
    from pyvq.models import Prior
    from pyvq.models.tokenizers import AsymmetricVQGAN

    if isinstance(model, Prior):
        return "prior"
    return "asymmetric" if isinstance(model, AsymmetricVQGAN) else "tokenizer"


def _describe(model) -> str:
    preset = getattr(model.config, "name", None)
    return type(model).__name__ + (f" ({preset})" if isinstance(preset, str) else "")


def _image_size(args, run: str, model, command: str, *, trained: bool) -> int:
    """--image-size, else (``trained``) the size the run trained at (its
    config.json), else the tokenizer's nominal resolution; checked against
    its downsampling factor."""
    import os

    size = args.image_size
    if size is None and trained:
        try:
            with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
                size = json.load(f).get("image_size")
        except (OSError, ValueError, AttributeError):
            size = None
    if size is None:
        size = getattr(model.config, "resolution", None)
    factor = model.downsample_factor
    if not isinstance(size, int) or size < factor or size % factor:
        raise SystemExit(f"pyvq {command}: --image-size must be a positive multiple of {factor} (the downsampling "
                         f"factor of {_describe(model)}), got {size}")
    return size


def _metrics_path(args, folder_data: bool) -> str:
    """Where eval writes: --out, else RUN/metrics.json for the built-in
    validation split, else a file named after the data
    (RUN/metrics_builtin_train.json, RUN/metrics_<folder>_<hash>.json)."""
    import hashlib
    import os

    if args.out:
        return args.out
    if not folder_data:
        name = "metrics.json" if args.split == "val" else f"metrics_builtin_{args.split}.json"
    else:
        folder = os.path.abspath(args.data)
        tag = hashlib.sha1(folder.encode()).hexdigest()[:8]
        name = f"metrics_{os.path.basename(folder.rstrip(os.sep)) or 'root'}_{tag}.json"
    return os.path.join(args.run, name)


def _eval(args) -> int:
    import os

    from pyvq.train.evaluate import data_record, evaluate, write_metrics

    model_dir = os.path.join(args.run, "model")
    if not os.path.isdir(args.run):
        raise SystemExit(f"pyvq eval: --run {args.run} is not a directory")
    if not os.path.isdir(model_dir):
        raise SystemExit(f"pyvq eval: {args.run} has no trained model (expected {model_dir})")
    model = _load(args.run, "--run", "eval")
    kind = _run_kind(model)
    if kind == "prior":
        raise SystemExit(f"pyvq eval: --run {args.run} holds a prior ({_describe(model)}); eval measures a "
                         f"tokenizer's reconstructions: give a tokenizer run (use `pyvq sample` for a prior)")
    if kind == "asymmetric":
        raise SystemExit(f"pyvq eval: --run {args.run} holds an asymmetric decoder ({_describe(model)}), "
                         f"which is evaluated on masks: use `pyvq eval-inpaint --tokenizer BASE_RUN --decoder "
                         f"{args.run}` (or `pyvq eval --run BASE_RUN` for its tokenizer)")
    size = _image_size(args, args.run, model, "eval", trained=True)
    if args.fid:
        _check_inception("eval")
    from pyvq.data import build_dataset

    dataset = build_dataset(args.data, size, args.split, augment=False)
    folder_data = args.data != "builtin"
    out = _metrics_path(args, folder_data)
    record = data_record(args.data, None if folder_data else args.split, size)
    _check_overwrite(out, record, args.overwrite)
    skipped = _drop_unreadable(dataset, args.data, "eval", f" (listed in {out} under data.skipped)")
    lpips = _build_lpips(args.lpips, "eval", "evaluate")
    metrics = evaluate(model, dataset, lpips=lpips, fid=args.fid)
    metrics["data"] = {**record, "num_images": metrics["num_images"], "skipped": [str(p) for p in skipped]}
    write_metrics(out, metrics)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out}")
    return 0


def _drop_unreadable(dataset, data: str, command: str, where: str = "") -> list:
    """Drop an image folder's unreadable files from ``dataset`` (so that no
    neighbour stands in for one) and name them in one line; returns their
    paths ([] for a dataset without files, e.g. builtin)."""
    import os

    if not hasattr(dataset, "drop_unreadable"):
        return []
    skipped = dataset.drop_unreadable()
    if skipped:
        names = ", ".join(os.path.relpath(p, data) for p in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        _note(command, f"skipped {len(skipped)} unreadable file(s) of {len(skipped) + len(dataset)} in {data}: "
              f"{names}{where}")
    return skipped


def _check_inception(command: str) -> None:
    """--fid needs torch-fidelity's Inception weights: a one-line error
    naming the flag before any work when they are not here."""
    import os

    from pyvq.metrics.fidelity import inception_weights

    filename, path, url = inception_weights()
    if not os.path.isfile(path):
        raise SystemExit(f"pyvq {command}: --fid needs torch-fidelity's Inception weights {filename} at "
                         f"{path} (pyvq never downloads; fetch it from {url}); drop --fid to "
                         f"evaluate without rFID/IS/KID")


def _check_overwrite(path: str, record: dict, overwrite: bool) -> None:
    """Refuse to replace a metrics file that records other data (another
    folder, split or image size) unless --overwrite."""
    import os

    if overwrite or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("data")
    except (OSError, ValueError, AttributeError):
        old = None
    if isinstance(old, dict) and any(old.get(k) != v for k, v in record.items()):
        raise SystemExit(f"pyvq eval: {path} holds the metrics of other data ({old.get('data')}, split "
                         f"{old.get('split')}, {old.get('image_size')} px); pass --out FILE to keep both or "
                         f"--overwrite to replace it")


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

    _at_least_one("eval-inpaint", ("--num", args.num))
    if args.fid:
        _check_inception("eval-inpaint")
    lpips = _build_lpips(args.lpips, "eval-inpaint", "evaluate")
    out = args.out or os.path.join(args.decoder, f"inpaint_{args.masks}")
    report = run_inpaint_eval(args.tokenizer, args.decoder, out, data=args.data, split=args.split,
                              masks=args.masks, num=args.num, image_size=args.image_size, lpips=lpips,
                              fid=args.fid, example_split=args.example_split, seed=args.seed)
    print(f"report: {report}")
    return 0


def _load(path: str, flag: str, command: str):
    """The model of a run (or model folder) given as ``flag``; a --prior must
    hold a prior and a --tokenizer a tokenizer (one line naming what it holds)."""
    import os

    from pyvq.models import load_run

    from safetensors import SafetensorError

    if not os.path.isdir(path):
        raise SystemExit(f"pyvq {command}: {flag} {path} is not a directory")
    folder = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    try:
        model = load_run(path)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"pyvq {command}: {flag} {path}: {os.path.join(folder, 'config.json')} is not valid "
                         f"JSON ({exc}); re-save the model or train it again") from None
    except SafetensorError as exc:
        raise SystemExit(f"pyvq {command}: {flag} {path}: {os.path.join(folder, 'model.safetensors')} is not a "
                         f"readable safetensors file ({exc}; truncated or corrupt?); re-save the model or train "
                         f"it again") from None
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"pyvq {command}: {flag} {path}: {exc}") from None
    kind = _run_kind(model)
    if flag == "--prior" and kind != "prior":
        raise SystemExit(f"pyvq {command}: --prior {path} holds a {kind} ({_describe(model)}), expected a prior "
                         f"run (`pyvq train --preset vqddm_tiny|mgt_tiny|... --codes CODES`)")
    if flag == "--tokenizer" and kind == "prior":
        raise SystemExit(f"pyvq {command}: --tokenizer {path} holds a prior ({_describe(model)}), expected a "
                         f"tokenizer run (VQGAN, EfficientVQGAN, BRICS, ...: the run whose codes the prior models)")
    return model


def _encode(args) -> int:
    from pyvq.data import build_dataset
    from pyvq.data.codes import encode_codes

    tokenizer = _load(args.tokenizer, "--tokenizer", "encode")
    if _run_kind(tokenizer) == "asymmetric":
        raise SystemExit(f"pyvq encode: --tokenizer {args.tokenizer} holds an asymmetric decoder "
                         f"({_describe(tokenizer)}), whose codes are its base tokenizer's: encode with the base "
                         f"run (--tokenizer BASE_RUN)")
    _at_least_one("encode", ("--repeats", args.repeats), ("--batch-size", args.batch_size))
    from pyvq.models.tokenizers import AutoencoderKL

    if isinstance(tokenizer, AutoencoderKL):
        raise SystemExit(f"pyvq encode: --tokenizer {args.tokenizer} holds an AutoencoderKL, whose latents are "
                         f"continuous; encode caches a VQ tokenizer's indices (VQGAN, EfficientVQGAN) or BRICS "
                         f"key codes")
    size = _image_size(args, args.tokenizer, tokenizer, "encode", trained=False)
    data = build_dataset(args.data, size, args.split)
    _drop_unreadable(data, args.data, "encode")
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


def _at_least_one(command: str, *flags) -> None:
    """Each ``(flag, value)`` given (not None) must be >= 1: one line naming the flag."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise SystemExit(f"pyvq {command}: {flag} must be >= 1, got {value}")


def _output_png(out: str | None, prior: str, default: str, command: str) -> str:
    """The PNG path of ``sample``/``inpaint`` (``--out``, or ``default`` in
    the prior's folder), checked writable before any work."""
    import os

    from pyvq.train.logger import check_writable_dir

    path = out or os.path.join(prior, default)
    what = "the folder of --out" if out else f"--prior (where {default} is written without --out)"
    try:
        check_writable_dir(os.path.dirname(os.path.abspath(path)), what)
    except (PermissionError, NotADirectoryError) as exc:
        raise SystemExit(f"pyvq {command}: {exc}") from None
    return path


def _check_tokenizer(prior, tokenizer, args, command: str) -> None:
    """``check_code_space`` of --prior and --tokenizer, before any work: an
    error exits with one line naming both; a warning prints as one line."""
    from pyvq.train.generate import check_code_space

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_code_space(prior, tokenizer, tokenizer_name=f"--tokenizer {args.tokenizer}",
                             force=args.force_tokenizer)
        except ValueError as exc:
            raise SystemExit(f"pyvq {command}: --prior {args.prior}: {exc}") from None
    for w in caught:
        print(f"pyvq {command}: warning: {w.message}", file=sys.stderr)


def _sample(args) -> int:
    import os

    from pyvq.train.generate import sample_images, save_image_grid

    _at_least_one("sample", ("--n", args.n), ("--steps", args.steps), ("--nrow", args.nrow))
    out = _output_png(args.out, args.prior, "samples.png", "sample")
    prior = _load(args.prior, "--prior", "sample")
    tokenizer = _load(args.tokenizer, "--tokenizer", "sample")
    _check_tokenizer(prior, tokenizer, args, "sample")
    kwargs = _prior_kwargs(prior, args, "sample", "sample")
    images, _ = sample_images(prior, tokenizer, args.n, steps=args.steps, seed=args.seed, progress=True,
                              check_tokenizer=False, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_image_grid(out, images, nrow=args.nrow or max(1, int(args.n**0.5 + 0.5)))
    print(f"wrote {out}")
    return 0


def _inpaint(args) -> int:
    import os

    import torch

    from pyvq.train.generate import (box_mask, image_size, inpaint_image, outpaint_canvas, read_image, read_mask,
                                     save_image_grid)

    _at_least_one("inpaint", ("--steps", args.steps))
    target = _output_png(args.out, args.prior, "inpaint.png", "inpaint")
    prior = _load(args.prior, "--prior", "inpaint")
    tokenizer = _load(args.tokenizer, "--tokenizer", "inpaint")
    _check_tokenizer(prior, tokenizer, args, "inpaint")
    f = tokenizer.downsample_factor
    size = prior.code_shape[-1] * f  # the image size the prior's codes come from
    files = [(args.image, "--image")] + ([(args.mask, "--mask")] if args.mask else [])
    for path, flag in files:
        if not os.path.isfile(path):
            raise SystemExit(f"pyvq inpaint: {flag} {path} is not a file")
    source = image_size(args.image)
    image = read_image(args.image, size)
    defaults = None
    try:
        if args.mask:
            mask = read_mask(args.mask, size, like=source)
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
    out = inpaint_image(prior, tokenizer, image, mask, steps=args.steps, seed=args.seed, paste=args.paste,
                        check_tokenizer=False, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    save_image_grid(target, out["completion"][None], nrow=1)
    panel = os.path.splitext(target)[0] + "_panel.png"
    from pyvq.train.figures import tint_holes

    save_image_grid(panel, torch.stack([image, tint_holes(image, mask), out["decoded"], out["completion"]]), nrow=4,
                    col_labels=["input", "mask (holes magenta)", "decoded codes", "completion"],
                    scale=max(1, 128 // image.shape[-1]))
    print(f"wrote {target} and {panel} (input, masked, decoded codes, completion); "
          f"{int((~out['keep']).sum())} of {out['keep'].numel()} codes generated")
    if source != (size, size):
        w, h = source
        print(f"note: the image is {w} x {h} pixels; its centre {min(w, h)} x {min(w, h)} square was resized to "
              f"{size} x {size} (the prior's {size // f} x {size // f} codes x the tokenizer's factor {f}), "
              f"so the completion is {size} x {size}")
    return 0


_STEPS_HELP = ("sampling steps: a diffusion prior's strided reverse steps (default: all); a "
               "MultiGrainedTransformer's decoding steps per block (default: its config's)")


_FORCE_HELP = ("use --tokenizer although its weights are not those of the tokenizer the prior was trained "
               "with (same K and code shape; a warning instead of an error)")


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
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
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
    p_train.add_argument("--overwrite", action="store_true",
                         help="start a new run into a non-empty --out: its old contents are moved to "
                         "OUT.replaced-<date>-<time> once the new run is set up (nothing is deleted)")
    p_train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p_train.add_argument("--device", choices=("cpu", "cuda"))
    for name, kind in _TRAIN_FLAGS.items():
        if name != "perceptual_weight":
            p_train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    p_train.add_argument("--perceptual-weight", dest="perceptual_weight", type=float, metavar="W",
                         help="weight of the LPIPS term (0: none; needs the VGG16 weights when > 0)")
    p_train.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None,
                         help="--no-lpips: train without the perceptual term (weight 0); --lpips: require it. "
                         "Default: used when its VGG16 weights are in the torch hub cache, else left out with a note")
    p_train.add_argument("--disc-type", dest="disc_type", choices=DISC_TYPES,
                         help="the GAN discriminator: patchgan (default) or projected (timm backbone, cached weights)")

    p_eval = sub.add_parser("eval", help="evaluate a trained run and write metrics.json")
    p_eval.add_argument("--run", required=True, help="run directory written by pyvq train")
    p_eval.add_argument("--data", default="builtin", help="'builtin' (its validation split) or an image folder")
    p_eval.add_argument("--split", default="val", choices=("train", "val"))
    p_eval.add_argument("--image-size", type=int)
    p_eval.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None,
                        help="LPIPS (needs the VGG16 weights in the torch hub cache); default: used when they are "
                        "there, else left out with a note (metrics.json: lpips null)")
    p_eval.add_argument("--fid", action=argparse.BooleanOptionalAction, default=False,
                        help="rFID/IS/KID via torch-fidelity (needs its Inception weights)")
    p_eval.add_argument("--out", help="metrics file (default RUN/metrics.json for the built-in val split, "
                        "RUN/metrics_builtin_train.json, RUN/metrics_<folder>_<hash>.json for a folder)")
    p_eval.add_argument("--overwrite", action="store_true",
                        help="replace a metrics file that records other data (otherwise refused)")

    p_bench = sub.add_parser("bench", help="run benchmarks/bench_NAME.py of a source checkout")
    p_bench.add_argument("name", help="codebook, train-step, ...")
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")

    p_demo = sub.add_parser("demo", help="train a tiny VQGAN, evaluate, ReFiT, write a report")
    p_demo.add_argument("--out", default="runs/demo")
    p_demo.add_argument("--steps", type=int, default=None)
    p_demo.add_argument("--finetune-steps", type=int, default=None)

    p_inp = sub.add_parser("eval-inpaint", help="compare an Asymmetric VQGAN decoder with the vanilla one on masks")
    p_inp.add_argument("--tokenizer", help="run directory of the decoder's base VQGAN / AutoencoderKL (default: the "
                       "base its run was trained on, train --base; another tokenizer is refused)")
    p_inp.add_argument("--decoder", required=True, help="run directory of the AsymmetricVQGAN")
    p_inp.add_argument("--data", default="builtin", help="'builtin' or an image folder")
    p_inp.add_argument("--split", default="val", choices=("train", "val"),
                       help="split of the built-in photographs (an image folder is used whole)")
    p_inp.add_argument("--masks", default="thick", choices=("thick", "medium", "thin", "box", "hard"))
    p_inp.add_argument("--num", type=int, default=32, help="number of images")
    p_inp.add_argument("--image-size", type=int)
    p_inp.add_argument("--seed", type=int, default=0, help="mask seed")
    p_inp.add_argument("--example-split", default="train", choices=("train", "val", "all"),
                       help="built-in split of the example images ('text', 'page' are train); with --data "
                       "FOLDER the examples are its first two images")
    p_inp.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None,
                       help="LPIPS (needs the VGG16 weights); default: used when they are there, else left out")
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
    p_sample.add_argument("--force-tokenizer", action="store_true", help=_FORCE_HELP)
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
                        "resized to the prior's resolution (every code that decodes into it: a VQ code whose "
                        "block it touches, a BRICS key whose tiled cells it touches); with --label, as that "
                        "class (a class-conditional prior)")
    p_inpt.add_argument("--steps", type=int, help=_STEPS_HELP)
    p_inpt.add_argument("--seed", type=int, default=0)
    p_inpt.add_argument("--paste", action=argparse.BooleanOptionalAction, default=True,
                        help="put the known pixels back after decoding")
    p_inpt.add_argument("--out", help="PNG path (default PRIOR/inpaint.png; a _panel.png is written beside it)")
    p_inpt.add_argument("--force-tokenizer", action="store_true", help=_FORCE_HELP)
    _add_prior_flags(p_inpt)

    for p in sub.choices.values():  # --debug also after the command (SUPPRESS: keep the global one's value)
        if p is not p_bench:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    handlers = {"info": lambda a: _print_info(a.json), "train": _train, "eval": _eval,
                "bench": _bench, "demo": _demo, "eval-inpaint": _eval_inpaint,
                "demo-inpaint": _demo_inpaint, "encode": _encode, "sample": _sample, "inpaint": _inpaint}
    from pyvq.train.distributed import DistributedFailure

    try:
        return handlers[args.command](args)
    except DistributedFailure as exc:  # another rank died or is stuck: one line, exit status 1
        raise SystemExit(f"pyvq {args.command}: {exc}") from None
    except _user_errors() as exc:  # bad input, not a bug: one line, exit status 1 (--debug: the traceback)
        if args.debug:
            raise
        raise SystemExit(f"pyvq {args.command}: {_one_line(exc)}") from None


def _user_errors() -> tuple:
    """The exceptions that mean bad input rather than a bug: printed as one
    line by ``main``. RuntimeError, AssertionError, ... keep their traceback."""
    import yaml
    from PIL import UnidentifiedImageError

    from pyvq.losses import MissingWeightsError

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            IsADirectoryError, MissingWeightsError, yaml.YAMLError, UnidentifiedImageError)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (an OSError's names its file)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
