"""Multiresolution feature-grid encoding: pyvq against its plain-PyTorch reference.

For each shape, float32, all cores (or one GPU: ``--device cuda``), it prints the median time of three passes

  forward    out = grid_encode(coords, tables, ...) (inputs requiring grad)
  backward   the gradients to coords and tables of a given grad_out
             (one graph built beforehand, kept with retain_graph)
  fwd+bwd    both

for pyvq.ops.grid_encode (the kernel) and pyvq.reference.grid_encode side by
side, their ratio reference/pyvq, and the peak extra memory of each pass.
Shapes:

  brics  4 images of 64 x 64 points, G = 4 groups, d = 3, L = 16, F = 4,
         T = 2**18, resolutions level_resolutions(16, 4, 64), dense_mod
  ngp    N = 2**18 points, G = 1, d = 3, L = 16, F = 2, T = 2**19,
         resolutions level_resolutions(16, 16, 2048), hash (Instant-NGP)

    python benchmarks/bench_grid.py                # both shapes
    python benchmarks/bench_grid.py --quick        # 16x fewer points and table rows, one timed run
    python benchmarks/bench_grid.py --quick --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    Table,
    add_device_argument,
    median_time,
    peak_extra_memory,
    ratio,
    reexec_with_mmap_threshold,
    select_device,
)

# name, N, G, d, L, F, T, (levels, min_res, max_res), index
SHAPES = [
    ("brics", 4 * 64 * 64, 4, 3, 16, 4, 2**18, (16, 4, 64), "dense_mod"),
    ("ngp", 2**18, 1, 3, 16, 2, 2**19, (16, 16, 2048), "hash"),
]


def _passes(fn, coords, tables, res, index, grad_out):
    """The three timed callables of one implementation."""
    import torch

    def forward():
        return fn(coords, tables, res, index)

    def fwd_bwd():
        out = forward()
        return torch.autograd.grad(out, (coords, tables), grad_out)

    graph = {}

    def backward():  # after graph["out"] = forward()
        return torch.autograd.grad(graph["out"], (coords, tables), grad_out, retain_graph=True)

    return {"forward": forward, "backward": backward, "fwd+bwd": fwd_bwd}, graph


def main() -> None:
    reexec_with_mmap_threshold()
    import torch

    import pyvq
    from pyvq import reference
    from pyvq.ops import grid_encode, level_resolutions

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16x fewer points and table rows, one timed run of each")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of pyvq")
    p.add_argument("--ref-repeats", type=int, default=3, help="timed runs of the reference (slow)")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES), help="comma-separated subset")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "grid.json"))
    add_device_argument(p)
    args = p.parse_args()
    device = select_device(args.device)
    repeats, ref_repeats = (1, 1) if args.quick else (args.repeats, args.ref_repeats)

    def pyvq_fn(c, t, res, index):
        return grid_encode(c, t, res, index=index)

    kernel = pyvq._backend.use_kernel("grid_encode", device)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    table = Table(
        f"grid_encode, float32, {where}, "
        f"pyvq side: {'kernel' if kernel else 'reference (no grid_encode kernel in this build)'}",
        ["shape", "N", "pass", "pyvq_ms", "ref_ms", "ref/pyvq", "pyvq_MiB", "ref_MiB"],
    )
    table.header()
    wanted = set(args.shapes.split(","))
    for name, N, G, d, L, F, T, levels, index in SHAPES:
        if name not in wanted:
            continue
        if args.quick:
            N, T = N // 16, T // 16
        res = level_resolutions(*levels)
        g = torch.Generator().manual_seed(0)
        coords = torch.rand(N, G, d, generator=g).to(device).requires_grad_()
        # Instant-NGP initialises its tables uniformly in +-1e-4.
        tables = ((torch.rand(G, L, T, F, generator=g) * 2 - 1) * 1e-4).to(device).requires_grad_()
        grad_out = torch.randn(N, G, L * F, generator=g).to(device)

        ours, ours_graph = _passes(pyvq_fn, coords, tables, res, index, grad_out)
        refs, ref_graph = _passes(reference.grid_encode, coords, tables, res, index, grad_out)
        for pass_name in ("forward", "backward", "fwd+bwd"):
            mine, theirs = ours[pass_name], refs[pass_name]
            if pass_name == "backward":  # the graphs to differentiate, outside the measurements
                ours_graph["out"] = ours["forward"]()
                ref_graph["out"] = refs["forward"]()
            mine()  # warm up
            mem_pyvq = peak_extra_memory(mine)
            t_pyvq = median_time(mine, repeats=repeats, warmup=0)
            # The reference is slow: its measured run is its warm-up.
            mem_ref = peak_extra_memory(theirs)
            t_ref = median_time(theirs, repeats=ref_repeats, warmup=0, budget_s=60.0)
            table.add(shape=name, N=N, **{
                "pass": pass_name,
                "pyvq_ms": 1e3 * t_pyvq,
                "ref_ms": 1e3 * t_ref,
                "ref/pyvq": ratio(t_ref, t_pyvq),
                "pyvq_MiB": mem_pyvq,
                "ref_MiB": mem_ref,
            })
            if pass_name == "backward":  # free the retained graphs
                ours_graph.clear()
                ref_graph.clear()
    table.save(args.out)
    decoder_gflops()


def decoder_gflops() -> None:
    """GFLOPs of the brics_64x64x4 decoder for one 256 x 256 image
    (pyvq.models.cost: FlopCounterMode on the meta device, plus the grid
    retrieval counted by hand)."""
    from pyvq.models import get_preset
    from pyvq.models.cost import brics_decoder_gflops, brics_retrieval_gflops

    config = get_preset("brics_64x64x4")
    total, retrieval = brics_decoder_gflops(config), brics_retrieval_gflops(config)
    print(f"\nbrics_64x64x4 decoder, one 256x256 image: {total:.2f} GFLOPs "
          f"(feature retrieval {retrieval:.3f}; the paper's Table 3: 63.41 including retrieval, "
          f"retrieval alone about 0.27)")


if __name__ == "__main__":
    main()
