"""Asymmetric VQGAN decoders: parameters and GFLOPs per preset.

The paper's claim is that a heavier decoder barely changes total inference
cost, because the latent model dominates. This prints, for every asymmetric
preset, the new decoder's parameters and GFLOPs of one pass at the given
resolution (conditioned: condition encoder and blends included), next to the
base tokenizer decoder's, and the ratio. Counted with FlopCounterMode on the
meta device (no memory, no weights).

    python benchmarks/bench_asymmetric.py [--size 256]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Table, ratio  # noqa: E402


def main() -> None:
    from pyvq.models import list_presets
    from pyvq.models._pretrained import get_preset
    from pyvq.models.cost import decoder_gflops, decoder_parameter_count

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "asymmetric.json"))
    args = p.parse_args()
    table = Table(f"asymmetric decoders at {args.size}x{args.size}, batch 1",
                  ["preset", "params_M", "GFLOPs", "plain_GFLOPs", "base_GFLOPs", "GFLOPs/base"])
    table.header()
    for name in [n for n in list_presets() if n.startswith("asym_") and "tiny" not in n]:
        cfg = get_preset(name)
        base_name = name.rsplit("_", 1)[0] + "_base"
        g = decoder_gflops(cfg, args.size, args.size)
        plain = decoder_gflops(cfg, args.size, args.size, conditioned=False)
        base = decoder_gflops(get_preset(base_name), args.size, args.size, conditioned=False)
        table.add(preset=name, params_M=decoder_parameter_count(cfg) / 1e6, GFLOPs=g, plain_GFLOPs=plain,
                  base_GFLOPs=base, **{"GFLOPs/base": ratio(g, base)})
    table.save(args.out)


if __name__ == "__main__":
    main()
