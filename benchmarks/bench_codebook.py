"""Nearest-codebook search: pyvq against the plain-PyTorch formulas and faiss.

For each (N, K, D), float32, all cores (or one GPU: ``--device cuda``), it prints the median time of

  pyvq       pyvq.ops.nearest_code (blocked kernel, fused argmin)
  reference  ||x||^2 + ||c||^2 - 2 x c^T, argmin (taming-transformers' VQGAN)
  compiled   torch.compile(reference)     (what a user would try first)
  cdist      torch.cdist(x, c).argmin(1)
  faiss      faiss.IndexFlatL2.search(k=1), when faiss-cpu is installed
             (CPU only: on --device cuda the column needs faiss-gpu's
             GpuIndexFlatL2, and is left out, saying so, without it)

with the ratios pyvq/faiss and reference/pyvq, pyvq's GFLOP/s (2 N K D
flops), the peak extra memory of pyvq and of the reference, and how many
indices disagree with faiss (ties within rounding may differ).

    python benchmarks/bench_codebook.py            # every shape
    python benchmarks/bench_codebook.py --quick    # the smallest shape only
    python benchmarks/bench_codebook.py --quick --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    Table,
    add_device_argument,
    import_faiss,
    median_time,
    peak_extra_memory,
    ratio,
    reexec_with_mmap_threshold,
    select_device,
)

SHAPES = [(16384, 1024, 256), (65536, 16384, 256), (65536, 8192, 32), (65536, 1024, 8)]


def taming_reference(x, codebook):
    """The expanded-distance formula of taming-transformers' VectorQuantizer."""
    import torch

    d = (
        x.pow(2).sum(1, keepdim=True)
        + codebook.pow(2).sum(1)
        - 2 * torch.einsum("nd,kd->nk", x, codebook)
    )
    return d.argmin(1)


def main() -> None:
    reexec_with_mmap_threshold()
    import torch

    import pyvq

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the smallest shape")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "codebook.json"))
    add_device_argument(p)
    args = p.parse_args()
    device = select_device(args.device)

    faiss = import_faiss()
    gpu_faiss = faiss is not None and hasattr(faiss, "GpuIndexFlatL2")
    if device.type == "cuda" and faiss is not None and not gpu_faiss:
        print("faiss has no GPU index here (faiss-gpu is not installed): no faiss column on cuda")
        faiss = None

    shapes = SHAPES[:1] if args.quick else SHAPES
    where = (f"{torch.get_num_threads()} threads, cpu_isa={pyvq.info()['cpu_isa']}" if device.type == "cpu"
             else f"{device} ({torch.cuda.get_device_name(device)})")
    table = Table(
        f"nearest_code, float32, {where}",
        ["N", "K", "D", "pyvq_s", "ref_s", "compiled_s", "cdist_s", "faiss_s",
         "pyvq/faiss", "ref/pyvq", "GFLOP/s", "pyvq_MiB", "ref_MiB", "diff_faiss"],
    )
    table.header()
    compiled = None if args.no_compile else torch.compile(taming_reference)
    for N, K, D in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, D, generator=g).to(device)
        cb = torch.randn(K, D, generator=g).to(device)
        budget = 60.0

        def run_pyvq():
            return pyvq.ops.nearest_code(x, cb)

        run_pyvq()  # warm the pages of the output allocator
        mem_pyvq = peak_extra_memory(run_pyvq)
        t_pyvq = median_time(run_pyvq, repeats=args.repeats)
        mem_ref = peak_extra_memory(lambda: taming_reference(x, cb))
        t_ref = median_time(lambda: taming_reference(x, cb), repeats=args.repeats,
                            warmup=0, budget_s=budget)
        t_comp = None
        if compiled is not None:
            try:
                t_comp = median_time(lambda: compiled(x, cb), repeats=args.repeats, budget_s=budget)
            except Exception as e:  # a compiler failure must not cost the other columns
                print(f"torch.compile(reference) failed, no compiled column: {type(e).__name__}: {e}")
                compiled = None
        t_cdist = median_time(lambda: torch.cdist(x, cb).argmin(1), repeats=args.repeats,
                              warmup=0, budget_s=budget)
        t_faiss = diff = None
        if faiss is not None:
            if device.type == "cuda":
                index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), D)
            else:
                index = faiss.IndexFlatL2(D)
            index.add(cb.cpu().numpy())
            xn = x.cpu().numpy()
            t_faiss = median_time(lambda: index.search(xn, 1), repeats=args.repeats)
            fi = torch.from_numpy(index.search(xn, 1)[1][:, 0])
            diff = int((run_pyvq()[0].cpu() != fi).sum())
        table.add(
            N=N, K=K, D=D, pyvq_s=t_pyvq, ref_s=t_ref, compiled_s=t_comp, cdist_s=t_cdist,
            faiss_s=t_faiss, **{
                "pyvq/faiss": ratio(t_pyvq, t_faiss),
                "ref/pyvq": ratio(t_ref, t_pyvq),
                "GFLOP/s": 2.0 * N * K * D / t_pyvq / 1e9,
                "pyvq_MiB": mem_pyvq,
                "ref_MiB": mem_ref,
                "diff_faiss": diff,
            },
        )
    table.save(args.out)


if __name__ == "__main__":
    main()
