"""A VQGAN training step with pyvq's kernels against PYVQ_BACKEND=reference.

Same model, batch and seed; the generator and discriminator steps both run
(disc_start=0). Prints the median step times side by side and their ratio,
and writes JSON.

    python benchmarks/bench_train_step.py [--quick] [--device cuda]

A step ends with its losses read on the host, so on CUDA its wall time is
the GPU's.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, add_device_argument, ratio, select_device  # noqa: E402


def main() -> None:
    import torch

    from pyvq.train.benchmark import compare_backends
    from pyvq.train.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small configuration, fewer steps")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "train_step.json"))
    add_device_argument(p)
    args = p.parse_args()
    device = select_device(args.device)
    # (preset, image size, batch, quantizer overrides): the tiny model as is,
    # and with the codebook of taming's f16_16384 model (16384 x 256), where
    # the nearest-code search is a real part of the step.
    big_codebook = {"n_embed": 16384, "embed_dim": 256}
    shapes = [("vqgan_tiny", 32, 16, {})]
    if not args.quick:
        shapes += [("vqgan_tiny", 64, 8, {}), ("vqgan_tiny", 64, 8, big_codebook)]
    steps = 5 if args.quick else 10
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    table = Table(f"VQGAN training step, {where}",
                  ["preset", "codes", "image", "batch", "kernel_s", "reference_s", "reference/kernel"])
    table.header()
    for preset, size, batch, overrides in shapes:
        config = TrainConfig(model=preset, model_overrides=overrides, image_size=size, batch_size=batch,
                             steps=1000, disc_start=0, perceptual_weight=0.0, warmup_steps=1,
                             device=device.type)
        k, r = compare_backends(config, steps=steps)
        codes = overrides.get("n_embed", 256)
        table.add(preset=preset, codes=codes, image=size, batch=batch, kernel_s=k, reference_s=r,
                  **{"reference/kernel": ratio(r, k)})
    table.save(args.out)


if __name__ == "__main__":
    main()
