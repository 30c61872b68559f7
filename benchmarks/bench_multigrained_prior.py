"""MultiGrainedTransformer (Efficient-VQGAN's prior): training memory against
global attention, and sampling time against the block size.

1. Training-time peak memory (the paper's Table 6 pattern: 5.6 / 14.2 /
   58.1 GB for its model at latents 32 / 64 / 128 against MaskGIT's 6.8 /
   49.1 GB / OOM). One MVTM training step (``training_loss`` + backward, no
   optimizer) of the same small transformer (K 1024, width 64, depth 2,
   2 heads, Ws 8, Es 2, batch 1) at latents 32, 64 and 128, each in a fresh
   subprocess, peak extra resident memory over the model and data (VmHWM
   after clear_refs, ``benchmarks.harness.peak_extra_memory``), with:

   - ``multigrained``: the model as it is (``pyvq.ops.multigrained_attention``
     for the local tokens: the CPU kernel where the build has one, else the
     reference, which gathers each block's extended window);
   - ``global_sdpa``: ``global_attention=True``, every token attends to all
     H * W tokens plus the globals through ``scaled_dot_product_attention``
     with PyTorch's default CPU backend (a fused, flash-style kernel that
     keeps no attention matrix);
   - ``global_math``: the same under ``sdpa_kernel(SDPBackend.MATH)``: the
     attention matrix is materialised and kept for backward, as in
     MaskGIT's implementation; skipped (as the paper's OOM) where its
     estimated attention memory exceeds ``--max-gib``.

2. Sampling time per image against the block size at 16 x 16 latents
   (Fig. 9 pattern): Ws = 1, 2, 4, 8, 16, steps_per_block 8, halo 2, the
   same transformer at width 128, depth 4, 4 heads; G * min(8, Ws^2)
   forward passes per image.

Targets (reported, not asserted): latent-64 peak memory at most half of
global attention's; sampling time falls monotonically from Ws = 1 to 16.

    python benchmarks/bench_multigrained_prior.py            # latents 32, 64, 128; 3 timed sampling runs
    python benchmarks/bench_multigrained_prior.py --quick    # latents 16, 32; one timed sampling run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, median_time, peak_extra_memory, ratio, reexec_with_mmap_threshold  # noqa: E402

VARIANTS = ("multigrained", "global_sdpa", "global_math")
MEMORY_MODEL = dict(num_codes=1024, block_size=8, halo=2, width=64, depth=2, heads=2, mlp_ratio=4.0, dropout=0.0)
SAMPLING_MODEL = dict(num_codes=1024, latent_size=16, halo=2, width=128, depth=4, heads=4, mlp_ratio=4.0,
                      dropout=0.0)
BLOCK_SIZES = (1, 2, 4, 8, 16)


def _attention_gib(latent: int) -> float:
    """Estimated memory of materialised global attention in one training
    step: per layer and head the (N, N + G) scores and their softmax kept for
    backward, plus one more of the same in backward (float32)."""
    c = MEMORY_MODEL
    N = latent * latent
    G = N // c["block_size"] ** 2
    return 3 * c["depth"] * c["heads"] * N * (N + G) * 4 / 2**30


def _child(latent: int, variant: str, threads: int) -> None:
    """One configuration: print {"peak_mib", "step_s"} as JSON."""
    import contextlib
    import time

    import torch

    from pyvq.models import MultiGrainedTransformer, MultiGrainedTransformerConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = MultiGrainedTransformerConfig(latent_size=latent, global_attention=variant != "multigrained",
                                           **MEMORY_MODEL)
    model = MultiGrainedTransformer(config)
    codes = torch.randint(0, config.num_codes, (1, latent, latent))
    if variant == "global_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    else:
        ctx = contextlib.nullcontext()

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(codes, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach()

    with ctx:
        step()  # warm-up: first touch of the weights' gradients, allocator, kernels
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        mem = peak_extra_memory(step)
        dt = time.perf_counter() - t0
    print(json.dumps({"peak_mib": mem, "step_s": dt}))


def _memory_table(latents, threads: int, max_gib: float, out: str) -> None:
    import pyvq

    kernel = pyvq._backend.use_kernel("multigrained_attention", "cpu")
    c = MEMORY_MODEL
    table = Table(
        f"MVTM training step peak extra memory (MiB) and time (s), K {c['num_codes']}, width {c['width']}, "
        f"depth {c['depth']}, heads {c['heads']}, Ws {c['block_size']}, Es {c['halo']}, batch 1, {threads} "
        f"thread(s); multigrained op: {'CPU kernel' if kernel else 'reference (no CPU kernel in this build)'}",
        ["latent", "mg_MiB", "sdpa_MiB", "math_MiB", "math/mg", "sdpa/mg", "mg_s", "sdpa_s", "math_s"],
    )
    table.header()
    script = os.path.abspath(__file__)
    for latent in latents:
        row = {"latent": latent}
        for variant, key in zip(VARIANTS, ("mg", "sdpa", "math")):
            if variant == "global_math" and _attention_gib(latent) > max_gib:
                row[f"{key}_MiB"] = row[f"{key}_s"] = None
                row["math_skipped"] = f"estimated {_attention_gib(latent):.1f} GiB of attention > --max-gib {max_gib}"
                continue
            proc = subprocess.run([sys.executable, script, "--child", str(latent), variant, "--threads",
                                   str(threads)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"latent {latent} {variant} failed: {proc.stderr[-2000:]}", file=sys.stderr)
                row[f"{key}_MiB"] = row[f"{key}_s"] = None
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            row[f"{key}_MiB"], row[f"{key}_s"] = res["peak_mib"], res["step_s"]
        row["math/mg"] = ratio(row.get("math_MiB"), row.get("mg_MiB"))
        row["sdpa/mg"] = ratio(row.get("sdpa_MiB"), row.get("mg_MiB"))
        table.add(**row)
        if "math_skipped" in row:
            print(f"  global_math at latent {latent} skipped: {row['math_skipped']}")
    table.save(out)


def _sampling_table(n: int, repeats: int, out: str) -> None:
    import torch

    from pyvq.models import MultiGrainedTransformer, MultiGrainedTransformerConfig

    c = SAMPLING_MODEL
    table = Table(
        f"sampling time per image, 16x16 latents, K {c['num_codes']}, width {c['width']}, depth {c['depth']}, "
        f"heads {c['heads']}, Es {c['halo']}, steps_per_block 8, n = {n}, {torch.get_num_threads()} thread(s)",
        ["Ws", "blocks", "passes", "s/image", "ms/pass", "vs_Ws1"],
    )
    table.header()
    first = None
    for ws in BLOCK_SIZES:
        torch.manual_seed(0)
        model = MultiGrainedTransformer(MultiGrainedTransformerConfig(block_size=ws, **c)).eval()
        count = [0]
        handle = model.head.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        model.sample(n, steps_per_block=8, generator=torch.Generator().manual_seed(0))
        passes = count[0]
        handle.remove()

        def run():
            model.sample(n, steps_per_block=8, generator=torch.Generator().manual_seed(0))

        t = median_time(run, repeats=repeats, warmup=0, budget_s=120.0) / n
        first = first or t
        table.add(Ws=ws, blocks=model.config.num_blocks, passes=passes, **{"s/image": t,
                  "ms/pass": 1e3 * t * n / passes, "vs_Ws1": ratio(t, first)})
    table.save(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        reexec_with_mmap_threshold()
        p = argparse.ArgumentParser()
        p.add_argument("--child", nargs=2, metavar=("LATENT", "VARIANT"))
        p.add_argument("--threads", type=int, default=1)
        a = p.parse_args()
        _child(int(a.child[0]), a.child[1], a.threads)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="latents 16, 32; one timed sampling run")
    p.add_argument("--latents", help="comma-separated latent sides of the memory table (default 32,64,128)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (memory subprocesses and sampling; 1: on a shared 2-core machine an "
                   "OpenMP team of 2 stalls whenever another process holds a core)")
    p.add_argument("--max-gib", type=float, default=4.0,
                   help="skip materialised global attention above this estimated attention memory")
    p.add_argument("--n", type=int, default=1, help="images per sampling call")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling runs")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "multigrained_prior.json"))
    args = p.parse_args()
    latents = [int(v) for v in args.latents.split(",")] if args.latents else ([16, 32] if args.quick else
                                                                              [32, 64, 128])
    if not args.no_memory:
        _memory_table(latents, args.threads, args.max_gib, args.out)
    if not args.no_sampling:
        import torch

        torch.set_num_threads(args.threads)
        _sampling_table(args.n, 1 if args.quick else args.repeats, os.path.splitext(args.out)[0] + "_sampling.json")


if __name__ == "__main__":
    main()
