"""Windowed (shifted) attention: pyvq against its reference and the public peers.

The attention core of a Swin block, float32, all cores (or one GPU:
``--device cuda``, where pyvq's side is its Triton kernels). Every column starts
from the same tensor, ``qkv`` (B, H, W, 3C) as the qkv linear writes it, and
returns (B, H, W, C) as the proj linear reads it, so the linears themselves
are excluded for every column alike, while each column's own layout work
(views, partition / roll copies, permutes) is included:

  pyvq    pyvq.ops.window_attention on strided q, k, v views of qkv
          (B, heads, H, W, d), then a permute to (B, H, W, C)
  ref     pyvq.reference.window_attention, same views and permute
  comp    torch.compile(pyvq.reference.window_attention), same
  timm    timm's core: torch.roll, timm.models.swin_transformer.window_partition
          of qkv, the attention exactly as timm's WindowAttention.forward
          computes it on (nW * B, N, C) (its default, non-fused path: q * scale,
          q @ k^T, + its relative position bias, + its block's shift mask,
          softmax, @ v), window_reverse, torch.roll back
  flex    torch.nn.attention.flex_attention, compiled, on the grid's tokens in
          place: a block mask for "same window of the rolled grid and same
          region", a score_mod adding the bias; forward only on the CPU (its CPU
          backward is not supported: "FlexAttention does not support backward
          on CPU"), forward and backward on CUDA; the block mask built once per
          shape outside the timing

Two tables, each per shape and shift: forward + backward (the gradients of
qkv and the bias table for a given grad_out) and forward only (no_grad).
Columns: median ms, the ratios peer/pyvq (above 1: pyvq faster), pyvq's
GFLOP/s over the window products it computes (2 of N x N x d per window
forward, 7 forward + backward: the forward's two, and the backward's score
recompute, dP, dq, dk, dv), and each column's peak extra memory (MiB).

    python benchmarks/bench_window_attention.py            # Swin-T and tokenizer shapes
    python benchmarks/bench_window_attention.py --quick    # B = 2, half the grid, one timed run
    python benchmarks/bench_window_attention.py --columns pyvq,timm --no-forward-only
    python benchmarks/bench_window_attention.py --threads 1   # on a loaded machine
    python benchmarks/bench_window_attention.py --quick --device cuda
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
    time_and_memory,
)

# name, B, H, W, C, heads, window, shifts
SHAPES = [
    ("swin-t", 8, 56, 56, 96, 3, 7, (0, 3)),       # Swin-T stage 1
    ("tokenizer", 8, 64, 64, 128, 4, 8, (0, 4)),   # EfficientVQGAN's first stage
]
QUICK_SHAPES = [
    ("swin-t", 2, 28, 28, 96, 3, 7, (0, 3)),
    ("tokenizer", 2, 32, 32, 128, 4, 8, (0, 4)),
]
COLUMNS = ("pyvq", "ref", "comp", "timm", "flex")
BUDGET_S = 60.0  # most seconds of timed runs per column and row


def _split(qkv, B, H, W, heads, d):
    """q, k, v (B, heads, H, W, d): strided views of qkv (B, H, W, 3C). Unbound along the
    "3" axis in place, so that autograd's stack of their gradients is already in qkv's
    layout (one copy; unbinding a permuted view costs a second one)."""
    return tuple(t.permute(0, 3, 1, 2, 4) for t in qkv.view(B, H, W, 3, heads, d).unbind(3))


def _op_core(fn, B, H, W, heads, d, w, shift):
    """qkv, table -> (B, H, W, C) through an op of pyvq's signature."""

    def core(qkv, table):
        q, k, v = _split(qkv, B, H, W, heads, d)
        out = fn(q, k, v, window_size=w, shift=shift, bias_table=table)
        return out.permute(0, 2, 3, 1, 4).reshape(B, H, W, heads * d)

    return core


def _timm_core(B, H, W, heads, d, w, shift):
    """timm's window-attention core and the bias table it reads (see the module docstring)."""
    import torch
    from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

    C = heads * d
    block = SwinTransformerBlock(C, (H, W), heads, window_size=w, shift_size=shift).to(current_device())
    attn, mask = block.attn, block.attn_mask  # mask: (nW, N, N) 0 / -100, or None
    N = w * w

    def core(qkv, table):
        del table  # attn.relative_position_bias_table, through attn._get_rel_pos_bias()
        x = torch.roll(qkv, (-shift, -shift), (1, 2)) if shift else qkv
        x = window_partition(x, (w, w)).view(-1, N, 3 * C)
        B_ = x.shape[0]
        q, k, v = x.reshape(B_, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * attn.scale
        a = q @ k.transpose(-2, -1)
        a = a + attn._get_rel_pos_bias()
        if mask is not None:
            nw = mask.shape[0]
            a = a.view(-1, nw, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            a = a.view(-1, heads, N, N)
        a = attn.softmax(a)
        o = (a @ v).transpose(1, 2).reshape(B_, N, C)
        o = window_reverse(o.view(-1, w, w, C), (w, w), H, W)
        return torch.roll(o, (shift, shift), (1, 2)) if shift else o

    return core, attn.relative_position_bias_table


def _flex_core(B, H, W, heads, d, w, shift):
    """FlexAttention on the grid's tokens (forward only on the CPU), or None where it is missing."""
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("torch.nn.attention.flex_attention not available: no flex column")
        return None
    L = H * W
    device = current_device()
    tok = torch.arange(L, device=device)
    rr, rc = (tok // W - shift) % H, (tok % W - shift) % W  # the rolled position of each token

    def axis_region(p, n):
        return torch.where(p < n - w, 0, torch.where(p < n - shift, 1, 2)) if shift else torch.zeros_like(p)

    window = (rr // w) * (W // w) + rc // w
    region = 3 * axis_region(rr, H) + axis_region(rc, W)
    lr, lc = rr % w, rc % w

    def mask_mod(b, h, qi, ki):
        return (window[qi] == window[ki]) & (region[qi] == region[ki])

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=L, device=str(device))
    flex = torch.compile(flex_attention, dynamic=False)

    def core(qkv, table):
        q, k, v = qkv.view(B, L, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)

        def score_mod(s, b, h, qi, ki):
            return s + table[(lr[qi] - lr[ki] + w - 1) * (2 * w - 1) + (lc[qi] - lc[ki] + w - 1), h]

        out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return out.permute(0, 2, 1, 3).reshape(B, H, W, heads * d)

    return core


def _cores(columns, B, H, W, heads, d, w, shift, compiled):
    """{column: core(qkv, table)} and the bias table every column uses (timm's)."""
    import pyvq
    from pyvq import reference

    timm_core, table = _timm_core(B, H, W, heads, d, w, shift)
    cores = {}
    for name in columns:
        if name == "pyvq":
            cores[name] = _op_core(pyvq.ops.window_attention, B, H, W, heads, d, w, shift)
        elif name == "ref":
            cores[name] = _op_core(reference.window_attention, B, H, W, heads, d, w, shift)
        elif name == "comp":
            cores[name] = _op_core(compiled, B, H, W, heads, d, w, shift)
        elif name == "timm":
            cores[name] = timm_core
        elif name == "flex":
            core = _flex_core(B, H, W, heads, d, w, shift)
            if core is not None:
                cores[name] = core
    return cores, table


def _window_gflop(B, H, W, heads, d, w, products):
    """GFLOP of `products` (N x N x d) matrix products per window."""
    windows = B * heads * (H // w) * (W // w)
    return windows * products * 2 * (w * w) ** 2 * d / 1e9


def op_tables(args) -> list:
    """The op section: forward + backward and forward-only tables."""
    import torch

    import pyvq
    from pyvq import reference

    set_recompile_limit(64)  # one graph per shape, shift and grad mode
    compiled = torch.compile(reference.window_attention, dynamic=False)
    device = current_device()
    side, where = attention_side("window_attention", device)
    columns = [c for c in args.columns.split(",") if c]
    passes = ["fwd+bwd"] + ([] if args.no_forward_only else ["forward"])
    flex_backward = device.type == "cuda"
    if "flex" in columns and "fwd+bwd" in passes and not flex_backward:
        print("flex: forward only (FlexAttention does not support backward on CPU)")
    repeats = 1 if args.quick else args.repeats
    tables = []
    for pass_name in passes:
        cols = [c for c in columns if c != "flex" or pass_name == "forward" or flex_backward]
        peers = [c for c in cols if c != "pyvq"]
        table = Table(
            f"window attention {pass_name}, float32, {where}, pyvq side: {side}; "
            f"from qkv (B, H, W, 3C) to (B, H, W, C), linears excluded",
            ["shape", "shift"] + [f"{c}_ms" for c in cols] + [f"{c}/pyvq" for c in peers]
            + ["pyvq_GFLOP/s"] + [f"{c}_MiB" for c in cols],
        )
        table.header()
        for shape, B, H, W, C, heads, w, shifts in (QUICK_SHAPES if args.quick else SHAPES):
            for shift in shifts:
                table.add(**_op_row(cols, pass_name, shape, B, H, W, C, heads, w, shift, compiled, repeats))
        tables.append(table)
    return tables


def _op_row(cols, pass_name, shape, B, H, W, C, heads, w, shift, compiled, repeats) -> dict:
    """One shape and shift of one pass: every column's time and memory."""
    import torch

    d = C // heads
    cores, table = _cores(cols, B, H, W, heads, d, w, shift, compiled)
    g = torch.Generator().manual_seed(0)
    device = current_device()
    qkv = torch.randn(B, H, W, 3 * C, generator=g).to(device).requires_grad_()
    with torch.no_grad():
        table.copy_(torch.empty(table.shape).normal_(0.0, 0.02, generator=g))
    grad = torch.randn(B, H, W, C, generator=g).to(device)
    row = {"shape": shape, "shift": shift, "B": B, "H": H, "W": W, "C": C, "heads": heads, "window": w}
    for name, core in cores.items():
        fn = _timed(core, qkv, table, grad, pass_name, detached=name == "flex")
        # The reference is slow: its memory run is its warm-up.
        measure_column(row, name, fn, repeats=repeats, budget_s=BUDGET_S, warm=name != "ref")
    for name in cores:
        if name != "pyvq":
            row[f"{name}/pyvq"] = ratio(row.get(f"{name}_ms"), row.get("pyvq_ms"))
    if row.get("pyvq_ms"):
        flop = _window_gflop(B, H, W, heads, d, w, 7 if pass_name == "fwd+bwd" else 2)
        row["pyvq_GFLOP/s"] = flop / (row["pyvq_ms"] * 1e-3)
    return row


def _timed(core, qkv, table, grad, pass_name, detached):
    """The timed callable of one column and pass."""
    import torch

    if pass_name == "forward":
        x, tab = (qkv.detach(), table.detach()) if detached else (qkv, table)

        def forward():
            with torch.no_grad():
                return core(x, tab)

        return forward

    def fwd_bwd():
        out = core(qkv, table)
        return torch.autograd.grad(out, (qkv, table), grad)

    return fwd_bwd


# Tokenizer throughput at one latent size (the paper's Table 2 pattern: 142
# vs 112 img/s for Efficient-VQGAN vs VQGAN on an A100 at f = 16).
TOKENIZER_PAIRS = (("effvqgan_f16", "vqgan_f16_1024", 256),)
QUICK_TOKENIZER_PAIRS = (("effvqgan_f16", "vqgan_f16_1024", 128),)


def tokenizer_tables(args) -> list:
    """Reconstruction images/s of EfficientVQGAN against the VQGAN at the
    same latent size (f = 16), eval mode, no grad, batch ``args.batch``."""
    import torch

    from pyvq.models import get_preset, model_class_for

    device = current_device()
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    table = Table(
        f"tokenizer reconstruction throughput, float32, {where}, batch {args.batch}",
        ["model", "peer", "size", "latent", "model_img/s", "peer_img/s", "model/peer", "model_Mparams",
         "peer_Mparams"],
    )
    table.header()
    repeats = 1 if args.quick else 3
    for name, peer, size in (QUICK_TOKENIZER_PAIRS if args.quick else TOKENIZER_PAIRS):
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        row = {"model": name, "peer": peer, "size": size}
        for key, preset in (("model", name), ("peer", peer)):
            torch.manual_seed(0)
            config = get_preset(preset)
            model = model_class_for(config)(config).eval().to(device)
            row["latent"] = size // model.downsample_factor

            def reconstruct(model=model):
                with torch.no_grad():
                    return model(x).x_rec

            t, _ = time_and_memory(reconstruct, repeats=repeats, budget_s=BUDGET_S)
            row[f"{key}_img/s"] = args.batch / t
            row[f"{key}_Mparams"] = sum(p.numel() for p in model.parameters()) / 1e6
        row["model/peer"] = ratio(row["model_img/s"], row["peer_img/s"])
        table.add(**row)
    return [table]


def main() -> None:
    reexec_with_mmap_threshold()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B = 2 and half the grid, one timed run of each")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each column")
    p.add_argument("--columns", default=",".join(COLUMNS), help=f"comma-separated subset of {','.join(COLUMNS)}")
    p.add_argument("--no-forward-only", action="store_true", help="skip the forward-only table")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default torch's; 1 keeps a shared machine's other load out of "
                        "the OpenMP barriers)")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer throughput table")
    p.add_argument("--batch", type=int, default=2, help="images per reconstruction call (tokenizer table)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "window_attention.json"))
    add_device_argument(p)
    args = p.parse_args()
    select_device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    # Each section is a function of the parsed arguments returning its tables;
    # the op section below writes --out, a further section writes its own
    # file next to it (e.g. <out stem>_<section>.json).
    stem, ext = os.path.splitext(args.out)
    for i, table in enumerate(op_tables(args)):
        table.save(args.out if i == 0 else f"{stem}_forward{ext}")
    if not args.no_tokenizer:
        for table in tokenizer_tables(args):
            table.save(f"{stem}_tokenizer{ext}")


if __name__ == "__main__":
    main()
