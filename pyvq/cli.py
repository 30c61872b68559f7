"""The ``pyvq`` command.

    pyvq info [--json]     what was built: ops and their CPU/CUDA/reference
                           implementations, CUDA architectures, Triton
    pyvq train ...         train a tokenizer (also under torchrun)
    pyvq eval ...          evaluate a trained run, write metrics.json
    pyvq bench NAME        run a benchmark script from a source checkout
    pyvq demo ...          the main job: train, evaluate, ReFiT, report
    pyvq eval-inpaint ...  Asymmetric VQGAN decoder vs vanilla on inpainting masks
    pyvq demo-inpaint ...  train the tiny asymmetric decoder on the demo's VQGAN, evaluate
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
    print(f"\n{'op':<20}{'cpu':>6}{'cuda':>6}{'reference':>11}")
    for name, impl in info["ops"].items():
        marks = ["yes" if impl[k] else "NO" for k in ("cpu", "cuda", "reference")]
        print(f"{name:<20}{marks[0]:>6}{marks[1]:>6}{marks[2]:>11}")
    return 0


_TRAIN_FLAGS = {  # CLI flag -> TrainConfig field
    "steps": int, "batch_size": int, "image_size": int, "lr": float, "ckpt_every": int,
    "ckpt_minutes": float, "log_every": int, "image_every": int, "disc_start": int,
    "perceptual_weight": float, "ema_decay": float, "seed": int, "num_workers": int,
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
    for name in _TRAIN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.bf16:
        data["bf16"] = True
    if args.device:
        data["device"] = args.device
    config = TrainConfig.from_dict(data)
    trainer = Trainer(config, args.out, resume=args.resume)
    scalars = trainer.train()
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
    if args.data == "builtin":
        from pyvq.data import BuiltinImages

        dataset = BuiltinImages(split=args.split, size=size)
    else:
        from pyvq.data import ImageFolder

        dataset = ImageFolder(args.data, size, crop="center")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvq", description="pyvq command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="report what was compiled and which backends are used")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")

    p_train = sub.add_parser("train", help="train a tokenizer (works under torchrun)")
    p_train.add_argument("--config", help="YAML file of TrainConfig fields")
    p_train.add_argument("--preset", help="model preset, e.g. vqgan_tiny")
    p_train.add_argument("--data", help="'builtin' or an image folder")
    p_train.add_argument("--base", help="trained tokenizer run (asymmetric presets: train only a new decoder)")
    p_train.add_argument("--out", required=True, help="run directory")
    p_train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p_train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p_train.add_argument("--device", choices=("cpu", "cuda"))
    for name, kind in _TRAIN_FLAGS.items():
        p_train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)

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

    args = parser.parse_args(argv)
    handlers = {"info": lambda a: _print_info(a.json), "train": _train, "eval": _eval,
                "bench": _bench, "demo": _demo, "eval-inpaint": _eval_inpaint,
                "demo-inpaint": _demo_inpaint}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
