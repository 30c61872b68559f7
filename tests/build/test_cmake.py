"""The CMake build (CMakeLists.txt) of csrc/ as a plain shared library.

Configures and builds `libpyvq_ops.so` CPU-only into a temporary directory,
then loads it with `torch.ops.load_library` in a fresh interpreter (one that
never imports pyvq, whose pyvq._C registers the same ops) and checks
`torch.ops.pyvq.nearest_code` against a brute-force torch computation.

The CUDA toolkit root and libnvrtc that torch's CMake package needs (for a
CUDA build of torch, even CPU-only) are found by CMakeLists.txt itself; this
test exercises that detection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def _tool(name: str) -> str | None:
    """`name` on PATH, else next to this interpreter (pip's cmake/ninja)."""
    found = shutil.which(name)
    if found is None:
        here = os.path.join(os.path.dirname(sys.executable), name)
        found = here if os.access(here, os.X_OK) else None
    return found


def _have_cuda_toolkit() -> bool:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return True
    return shutil.which("nvcc") is not None


CHECK = textwrap.dedent(
    """
    import sys
    import torch

    assert "pyvq" not in sys.modules
    torch.ops.load_library(sys.argv[1])
    op = torch.ops.pyvq.nearest_code
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(
        "pyvq::nearest_code", "CUDA"), "a CPU-only build registered CUDA"

    g = torch.Generator().manual_seed(0)
    # float64 so the brute-force argmin has no near-ties to disagree on.
    x = torch.randn(2, 150, 24, dtype=torch.float64, generator=g)
    codebook = torch.randn(37, 24, dtype=torch.float64, generator=g)
    flat = x.reshape(-1, 24)

    dist, idx = op(x, codebook, "l2")
    assert dist.dtype == torch.float64 and idx.dtype == torch.int64
    assert idx.shape == dist.shape == (2, 150), (idx.shape, dist.shape)
    ref_idx = torch.cdist(flat, codebook).argmin(-1)
    assert torch.equal(idx.reshape(-1), ref_idx), "l2 indices differ"
    ref_dist = (flat - codebook[ref_idx]).pow(2).sum(-1)
    torch.testing.assert_close(dist.reshape(-1), ref_dist)

    dist, idx = op(x, codebook, "cosine")
    sim = torch.nn.functional.normalize(flat, dim=-1) @ \\
        torch.nn.functional.normalize(codebook, dim=-1).T
    ref_idx = sim.argmax(-1)
    assert torch.equal(idx.reshape(-1), ref_idx), "cosine indices differ"
    torch.testing.assert_close(dist.reshape(-1), 1 - sim.max(-1).values)

    # float32, non-contiguous rows: same answer as on a contiguous copy.
    xt = torch.randn(24, 300, generator=g).T
    d32, i32 = op(xt, codebook.float(), "l2")
    ref_idx = torch.cdist(xt.double(), codebook).argmin(-1)
    agree = (i32 == ref_idx).float().mean().item()
    assert agree > 0.99, agree
    assert torch.equal(i32, op(xt.contiguous(), codebook.float(), "l2")[1])
    print("OK")
    """
)


def test_cmake_cpu_build_loads_and_matches_bruteforce(tmp_path):
    cmake, ninja = _tool("cmake"), _tool("ninja")
    missing = [n for n, p in (("cmake", cmake), ("ninja", ninja)) if p is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found on PATH")
    if torch.version.cuda is not None and not _have_cuda_toolkit():
        pytest.skip(
            "torch is a CUDA build, whose CMake package needs a CUDA toolkit "
            "(nvcc or CUDA_HOME) even for a CPU-only library; none found"
        )

    build = tmp_path / "build"
    configure = [
        cmake, "-S", ROOT, "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPYVQ_PYTHON={sys.executable}",
        "-DPYVQ_WITH_CUDA=OFF",
    ]
    jobs = os.environ.get("MAX_JOBS", "2")
    for cmd, timeout in ((configure, 120),
                         ([cmake, "--build", str(build), "--parallel", jobs], 600)):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )

    lib = build / "libpyvq_ops.so"
    assert lib.is_file(), sorted(p.name for p in build.iterdir())

    script = tmp_path / "check_ops.py"
    script.write_text(CHECK)
    proc = subprocess.run(
        [sys.executable, str(script), str(lib)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "OK", proc.stdout + proc.stderr
