"""The ``pyvq`` command.

    pyvq info [--json]     what was built: ops and their CPU/CUDA/reference
                           implementations, CUDA architectures, Triton
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvq", description="pyvq command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="report what was compiled and which backends are used")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info(args.json)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
