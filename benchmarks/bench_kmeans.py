"""k-means: pyvq against its plain-PyTorch reference and faiss.

For each (N, D, k), float32 Gaussian data, it prints the median time of one
clustering (seeding + ``--iters`` Lloyd iterations, tol = 0) by

  pyvq       pyvq.ops.kmeans (AFK-MC2 seeding, Lloyd over the nearest_code kernel)
  reference  pyvq.reference.kmeans (the same algorithm over a full N x k
             distance matrix and argmin)
  compiled   torch.compile(reference)     (what a user would try first)
  faiss      faiss.Kmeans (random seeding, the same number of iterations, no
             subsampling), when faiss-cpu is installed (on --device cuda
             only with faiss-gpu, gpu=True; left out, saying so, without it)

with the ratios ref/pyvq, comp/pyvq and pyvq/faiss, the peak extra memory
of pyvq and of the reference, the inertia of faiss's clustering over
pyvq's (above 1: pyvq's is better), and whether pyvq and the reference
returned the same centroids bit for bit. A column whose run takes longer
than 30 s is timed once. Under CPU contention (another process on the
cores) the multi-threaded columns stall at OpenMP barriers; ``--threads 1``
gives steadier ratios there.

    python benchmarks/bench_kmeans.py              # every shape
    python benchmarks/bench_kmeans.py --quick      # the smallest shape only
    python benchmarks/bench_kmeans.py --threads 1 --no-compile
    python benchmarks/bench_kmeans.py --quick --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    Table, add_device_argument, import_faiss, median_time, ratio, reexec_with_mmap_threshold, select_device,
    time_and_memory,
)

# (N, D, k); the last is ReFiT's scale (a 1024-code codebook re-built from
# 100k encoder outputs).
SHAPES = [(20000, 16, 64), (65536, 32, 256), (100000, 64, 1024)]


def _inertia(x, centroids):
    import pyvq

    return float(pyvq.ops.nearest_code(x.double(), centroids.double())[1].sum())


def main() -> None:
    reexec_with_mmap_threshold()
    import torch

    import pyvq
    from pyvq import reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the smallest shape")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations of every method")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of torch and faiss")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "kmeans.json"))
    add_device_argument(p)
    args = p.parse_args()
    device = select_device(args.device)

    faiss = import_faiss()
    if device.type == "cuda" and faiss is not None and not hasattr(faiss, "StandardGpuResources"):
        print("faiss has no GPU support here (faiss-gpu is not installed): no faiss column on cuda")
        faiss = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)

    compiled = None
    if not args.no_compile:
        # the seeding's Python loops break the graph many times; say so once, not per break
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        compiled = torch.compile(reference.kmeans)

    shapes = SHAPES[:1] if args.quick else SHAPES
    where = (f"{torch.get_num_threads()} threads, cpu_isa={pyvq.info()['cpu_isa']}" if device.type == "cpu"
             else str(device))
    table = Table(
        f"kmeans, AFK-MC2 + {args.iters} Lloyd iterations, float32, {where}",
        ["N", "D", "k", "pyvq_s", "ref_s", "compiled_s", "faiss_s", "ref/pyvq", "comp/pyvq",
         "pyvq/faiss", "pyvq_MiB", "ref_MiB", "inertia_f/p", "same_as_ref"],
    )
    table.header()
    budget = 30.0  # seconds of timed runs a slow column may take (at least one run)
    for N, D, k in shapes:
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(0)).to(device)
        opts = dict(iters=args.iters, tol=0.0, seed=0)

        last = {}  # the centroids of each method's last run

        def run_pyvq():
            last["pyvq"] = pyvq.ops.kmeans(x, k, **opts)

        def run_ref():
            last["ref"] = reference.kmeans(x, k, **opts)

        # pyvq warms up first (its first call's one-time allocations would
        # count as its memory); the slow reference's memory run is its warm-up
        t_pyvq, mem_pyvq = time_and_memory(run_pyvq, repeats=args.repeats)
        t_ref, mem_ref = time_and_memory(run_ref, repeats=args.repeats, budget_s=budget, warm=False)
        same = bool(torch.equal(last["pyvq"], last["ref"]))

        t_comp = None
        if compiled is not None:
            try:
                t_comp = median_time(lambda: compiled(x, k, **opts), repeats=args.repeats, budget_s=budget)
            except Exception as e:  # a compiler failure must not cost the other columns
                print(f"torch.compile(reference) failed, no compiled column: {type(e).__name__}: {e}")
                compiled = None

        t_faiss = inertia_ratio = None
        if faiss is not None:
            xn = x.cpu().numpy()

            def run_faiss():
                km = faiss.Kmeans(D, k, niter=args.iters, seed=0, max_points_per_centroid=N,
                                  gpu=device.type == "cuda")
                km.train(xn)
                last["faiss"] = torch.from_numpy(km.centroids).to(device)

            t_faiss = median_time(run_faiss, repeats=args.repeats, budget_s=budget)
            inertia_ratio = ratio(_inertia(x, last["faiss"]), _inertia(x, last["pyvq"]))

        row = {"N": N, "D": D, "k": k, "pyvq_s": t_pyvq, "ref_s": t_ref, "compiled_s": t_comp, "faiss_s": t_faiss}
        row["ref/pyvq"], row["comp/pyvq"] = ratio(t_ref, t_pyvq), ratio(t_comp, t_pyvq)
        row["pyvq/faiss"] = ratio(t_pyvq, t_faiss)
        row.update(pyvq_MiB=mem_pyvq, ref_MiB=mem_ref, same_as_ref=same)
        row["inertia_f/p"] = inertia_ratio
        table.add(**row)
    table.save(args.out)


if __name__ == "__main__":
    main()
