"""Multi-grained attention: pyvq against its reference and global attention.

The attention core of an Efficient-VQGAN prior layer (Cao et al., Sec. 3.2),
float32, all cores (or one GPU: ``--device cuda``, where pyvq's side is its
Triton kernels), forward + backward (the gradients of all five tensors for
a given grad_out). Width 512, 8 heads (head_dim 64), block side Ws = 8, one
global token per block (G = (H / Ws)^2). Every column starts from the same
tensors, ``qkv`` (B, H, W, 3C) as the qkv linear writes it and ``gkv``
(B, G, 2C) for the globals, and returns (B, H, W, C) as the proj linear reads
it, so the linears are excluded for every column alike while each column's
own layout work (views, permutes, copies) is included:

  pyvq    pyvq.ops.multigrained_attention on strided views of qkv / gkv
  ref     pyvq.reference.multigrained_attention (pad + unfold + softmax), same views
  comp    torch.compile(pyvq.reference.multigrained_attention), same
  sdpa    torch.nn.functional.scaled_dot_product_attention of every token
          over all H x W tokens plus the G globals: the global attention the
          op replaces

Columns: median ms, the ratios peer/pyvq (above 1: pyvq faster), pyvq's
GFLOP/s over the products it computes (2 of M x keys x d per block forward,
5 more backward: scores, dP, dq, dk, dv), and each column's peak extra
memory (MiB).

    python benchmarks/bench_multigrained_attention.py            # latents 16/32/64, halo 2 and 4
    python benchmarks/bench_multigrained_attention.py --quick    # one timed run of each
    python benchmarks/bench_multigrained_attention.py --columns pyvq,sdpa --latents 64
    python benchmarks/bench_multigrained_attention.py --quick --device cuda

main() runs the op section; a later section (e.g. the prior's training
memory and sampling time, benchmarks/bench_multigrained_prior.py) plugs in
as another entry of SECTIONS: a function of the parsed arguments that returns
its tables.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (  # noqa: E402
    Table,
    add_device_argument,
    attention_side,
    current_device,
    measure_column,
    ratio,
    reexec_with_mmap_threshold,
    select_device,
    set_recompile_limit,
)

WIDTH, HEADS, BLOCK = 512, 8, 8
# latent side -> batch size (the op's cost grows with H * W, global attention's with (H * W)^2)
BATCH = {16: 4, 32: 4, 64: 1}
HALOS = (2, 4)
COLUMNS = ("pyvq", "ref", "comp", "sdpa")
BUDGET_S = 60.0  # most seconds of timed runs per column and row


def _split(qkv, gkv, B, H, W, heads, d):
    """q, k, v (B, heads, H, W, d) and global_k, global_v (B, heads, G, d): strided views."""
    q, k, v = qkv.view(B, H, W, 3, heads, d).permute(3, 0, 4, 1, 2, 5).unbind(0)
    gk, gv = gkv.view(B, gkv.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, gk, gv


def _op_core(fn, B, H, W, heads, d, ws, halo):
    """qkv, gkv -> (B, H, W, C) through an op of pyvq's signature."""

    def core(qkv, gkv):
        out = fn(*_split(qkv, gkv, B, H, W, heads, d), block_size=ws, halo=halo)
        return out.permute(0, 2, 3, 1, 4).reshape(B, H, W, heads * d)

    return core


def _sdpa_core(B, H, W, heads, d):
    """Global attention of every token over the grid and the globals."""
    import torch
    import torch.nn.functional as F

    L = H * W

    def core(qkv, gkv):
        q, k, v = qkv.view(B, L, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        gk, gv = gkv.view(B, gkv.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, torch.cat([k, gk], 2), torch.cat([v, gv], 2))
        return out.permute(0, 2, 1, 3).reshape(B, H, W, heads * d)

    return core


def _gflop(B, H, W, heads, d, ws, halo, G, products):
    """GFLOP of `products` (M x keys x d) products per block, keys = clipped window + G."""
    nb = H // ws

    def span(b):
        return min(H, (b + 1) * ws + halo) - max(0, b * ws - halo)

    keys = sum(span(bi) * span(bj) + G for bi in range(nb) for bj in range(nb))
    return B * heads * products * 2 * ws * ws * keys * d / 1e9


def op_tables(args) -> list:
    """The op section: one forward + backward table over latents and halos."""
    import torch

    import pyvq
    from pyvq import reference

    set_recompile_limit(64)  # one graph per shape and halo
    compiled = torch.compile(reference.multigrained_attention, dynamic=False)
    side, where = attention_side("multigrained_attention", current_device())
    cols = [c for c in args.columns.split(",") if c]
    peers = [c for c in cols if c != "pyvq"]
    repeats = 1 if args.quick else args.repeats
    table = Table(
        f"multi-grained attention fwd+bwd, float32, {where}, pyvq side: {side}; "
        f"width {WIDTH}, {HEADS} heads, Ws {BLOCK}, G = blocks; from qkv (B, H, W, 3C) to (B, H, W, C)",
        ["latent", "B", "halo"] + [f"{c}_ms" for c in cols] + [f"{c}/pyvq" for c in peers]
        + ["pyvq_GFLOP/s"] + [f"{c}_MiB" for c in cols],
    )
    table.header()
    for latent in [int(x) for x in args.latents.split(",") if x]:
        for halo in HALOS:
            table.add(**_op_row(cols, latent, halo, compiled, repeats))
    return [table]


def _op_row(cols, latent, halo, compiled, repeats) -> dict:
    """One latent size and halo: every column's time and memory."""
    import torch

    import pyvq
    from pyvq import reference

    B, H, W, C, heads, ws = BATCH.get(latent, 1), latent, latent, WIDTH, HEADS, BLOCK
    d = C // heads
    G = (H // ws) * (W // ws)
    cores = {}
    for name in cols:
        if name == "pyvq":
            cores[name] = _op_core(pyvq.ops.multigrained_attention, B, H, W, heads, d, ws, halo)
        elif name == "ref":
            cores[name] = _op_core(reference.multigrained_attention, B, H, W, heads, d, ws, halo)
        elif name == "comp":
            cores[name] = _op_core(compiled, B, H, W, heads, d, ws, halo)
        elif name == "sdpa":
            cores[name] = _sdpa_core(B, H, W, heads, d)
    g = torch.Generator().manual_seed(0)
    device = current_device()
    qkv = torch.randn(B, H, W, 3 * C, generator=g).to(device).requires_grad_()
    gkv = torch.randn(B, G, 2 * C, generator=g).to(device).requires_grad_()
    grad = torch.randn(B, H, W, C, generator=g).to(device)
    row = {"latent": latent, "B": B, "halo": halo, "H": H, "W": W, "C": C, "heads": heads, "block": ws, "G": G}
    for name, core in cores.items():

        def fwd_bwd(core=core):
            out = core(qkv, gkv)
            return torch.autograd.grad(out, (qkv, gkv), grad)

        # The reference is slow: its memory run is its warm-up.
        measure_column(row, name, fwd_bwd, repeats=repeats, budget_s=BUDGET_S, warm=name != "ref")
    for name in cores:
        if name != "pyvq":
            row[f"{name}/pyvq"] = ratio(row.get(f"{name}_ms"), row.get("pyvq_ms"))
    if row.get("pyvq_ms"):
        row["pyvq_GFLOP/s"] = _gflop(B, H, W, heads, d, ws, halo, G, 7) / (row["pyvq_ms"] * 1e-3)
    return row


# name -> function(args) returning tables; the first writes --out, the others <out stem>_<name>.json
SECTIONS = {"op": op_tables}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed run of each column")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each column")
    p.add_argument("--columns", default=",".join(COLUMNS), help=f"comma-separated subset of {','.join(COLUMNS)}")
    p.add_argument("--latents", default="16,32,64", help="comma-separated latent sides")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "multigrained_attention.json"))
    add_device_argument(p)
    return p


def main(argv=None) -> None:
    reexec_with_mmap_threshold()
    args = parser().parse_args(argv)
    select_device(args.device)
    stem, ext = os.path.splitext(args.out)
    for s, name in enumerate(n for n in args.sections.split(",") if n):
        for i, table in enumerate(SECTIONS[name](args)):
            table.save(args.out if s == 0 and i == 0 else f"{stem}_{name}{'' if i == 0 else i}{ext}")


if __name__ == "__main__":
    main()
