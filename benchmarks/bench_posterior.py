"""Multinomial-diffusion posterior and KL: pyvq against its plain-PyTorch reference.

VQ-DDM's training loss on a batch of code maps: B = 32 images of 16 x 16
codes, K classes, float32, all cores (or one GPU: ``--device cuda``). For each K it prints the median time
of two passes

  kl fwd+bwd      kl = multinomial_kl(x_t, x0, logits, alpha_t, alpha_bar_prev)
                  and its gradient w.r.t. the logits for a given grad_out
  posterior fwd   multinomial_posterior(x_t, logits, alpha_t, alpha_bar_prev)
                  (the model posterior, what a sampler calls every step)

for pyvq.ops (the kernels), pyvq.reference (log-space PyTorch: log_softmax,
logaddexp, logsumexp) and torch.compile(reference), side by side; the ratios
reference/pyvq and compiled/pyvq; pyvq's bandwidth over the least traffic
a pass needs (posterior: read the logits, write the output; KL fwd+bwd: read
the logits twice, write the gradient); and the peak extra memory of each,
in MiB and in units of one (B, K, 16, 16) float32 tensor (the logits).

    python benchmarks/bench_posterior.py                # K = 512, 1024, 8192
    python benchmarks/bench_posterior.py --quick        # B = 4, one timed run of each
    python benchmarks/bench_posterior.py --ks 512 --no-compile
    python benchmarks/bench_posterior.py --quick --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    Table,
    add_device_argument,
    measure_column,
    median_time,
    ratio,
    reexec_with_mmap_threshold,
    select_device,
)

KS = (512, 1024, 8192)
B, H, W = 32, 16, 16


def _passes(posterior, kl, x_t, x0, logits, alpha_t, alpha_bar_prev, grad_kl):
    """The timed callables of one implementation: {pass name: fn}."""
    import torch

    def kl_fwd_bwd():
        out = kl(x_t, x0, logits, alpha_t, alpha_bar_prev)
        return torch.autograd.grad(out, logits, grad_kl)

    def posterior_fwd():
        with torch.no_grad():
            return posterior(x_t, logits, alpha_t, alpha_bar_prev)

    return {"kl fwd+bwd": kl_fwd_bwd, "posterior fwd": posterior_fwd}


# Least bytes each pass must move, in units of one (B, K, H, W) tensor.
_TRAFFIC_UNITS = {"kl fwd+bwd": 3, "posterior fwd": 2}


def main() -> None:
    reexec_with_mmap_threshold()
    import torch

    import pyvq
    from pyvq import reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B = 4 instead of 32, one timed run of each")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each method")
    p.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated numbers of classes K")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--no-sampling", action="store_true", help="skip the tiny VQ-DDM sampling-step table")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "posterior.json"))
    add_device_argument(p)
    args = p.parse_args()
    device = select_device(args.device)
    batch = 4 if args.quick else B
    repeats = 1 if args.quick else args.repeats
    budget = 60.0

    kernel = all(pyvq._backend.use_kernel(op, device) for op in ("multinomial_posterior", "multinomial_kl"))
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    table = Table(
        f"multinomial posterior / KL, float32, B = {batch}, {H}x{W} codes, {where}, "
        f"pyvq side: {'kernel' if kernel else 'reference (no posterior kernels in this build)'}; "
        f"*_x: peak extra memory in (B, K, {H}, {W}) float32 tensors",
        ["K", "pass", "pyvq_ms", "ref_ms", "comp_ms", "ref/pyvq", "comp/pyvq", "pyvq_GB/s",
         "pyvq_MiB", "ref_MiB", "comp_MiB", "pyvq_x", "ref_x", "comp_x"],
    )
    table.header()
    impls = {
        "pyvq": (pyvq.ops.multinomial_posterior, pyvq.ops.multinomial_kl),
        "ref": (reference.multinomial_posterior, reference.multinomial_kl),
    }
    if not args.no_compile:
        impls["comp"] = (torch.compile(reference.multinomial_posterior), torch.compile(reference.multinomial_kl))

    for K in (int(k) for k in args.ks.split(",")):
        g = torch.Generator().manual_seed(K)
        x0 = torch.randint(0, K, (batch, H, W), generator=g)
        # about half the codes still at z_0, the rest resampled
        x_t = torch.where(torch.rand(batch, H, W, generator=g) < 0.5, x0,
                          torch.randint(0, K, (batch, H, W), generator=g))
        logits = (3.0 * torch.randn(batch, K, H, W, generator=g)).requires_grad_()
        alpha_bar_prev = 0.02 + 0.96 * torch.rand(batch, generator=g)
        alpha_t = 1.0 - 0.2 * torch.rand(batch, generator=g)
        grad_kl = torch.randn(batch, H, W, generator=g)
        x0, x_t, alpha_bar_prev, alpha_t, grad_kl = (t.to(device) for t in (x0, x_t, alpha_bar_prev, alpha_t, grad_kl))
        logits = logits.detach().to(device).requires_grad_()
        unit_mib = logits.numel() * logits.element_size() / 2**20

        passes = {name: _passes(*fns, x_t, x0, logits, alpha_t, alpha_bar_prev, grad_kl)
                  for name, fns in impls.items()}
        for pass_name in ("kl fwd+bwd", "posterior fwd"):
            row = {"K": K, "pass": pass_name}
            for name, fns in passes.items():
                # The reference's measured run of peak memory is its warm-up
                # (it is slow); pyvq and compiled warm up first.
                measure_column(row, name, fns[pass_name], repeats=repeats, budget_s=budget, warm=name != "ref")
                mem = row[f"{name}_MiB"]
                row[f"{name}_x"] = None if mem is None else mem / unit_mib
            row["ref/pyvq"] = ratio(row["ref_ms"], row["pyvq_ms"])
            row["comp/pyvq"] = ratio(row.get("comp_ms"), row["pyvq_ms"])
            row["pyvq_GB/s"] = (_TRAFFIC_UNITS[pass_name] * unit_mib * 2**20 / (row["pyvq_ms"] * 1e-3) / 1e9
                                if row["pyvq_ms"] else None)
            table.add(**row)
    table.save(args.out)
    if not args.no_sampling:
        _sampling_table(16 if not args.quick else 4, 5 if not args.quick else 2, args.out, device)


def _sampling_table(n: int, steps: int, out: str, device) -> None:
    """Seconds per reverse step of the tiny VQ-DDM (vqddm_tiny at K = 256,
    16 x 16 codes: the demo tokenizer's codebook) sampling ``n`` code maps,
    with the kernels and with PYVQ_BACKEND=reference. A step is one UNet
    call, the model posterior and a categorical draw; the UNet dominates."""
    import dataclasses

    import torch

    from pyvq.models import MultinomialDiffusion, get_preset

    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("vqddm_tiny"), num_classes=256, code_size=16)
    model = MultinomialDiffusion(config).eval().to(device)
    table = Table(f"vqddm_tiny sampling, K = 256, 16x16 codes, n = {n}, {steps} strided steps per run, {device}",
                  ["backend", "s/step", "ref/kernel"])
    table.header()
    times = {}
    for backend in ("kernel", "reference"):
        os.environ["PYVQ_BACKEND"] = backend

        def run():
            model.sample(n, steps=steps, generator=torch.Generator(device).manual_seed(0))

        times[backend] = median_time(run, repeats=3, warmup=1, budget_s=60.0) / steps
    os.environ.pop("PYVQ_BACKEND")
    for backend in ("kernel", "reference"):
        table.add(backend=backend, **{"s/step": times[backend],
                                      "ref/kernel": ratio(times["reference"], times[backend])})
    table.save(os.path.splitext(out)[0] + "_sampling.json")


if __name__ == "__main__":
    main()
