"""pyvq.info() and the `pyvq info` command report what was built."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pyvq
from pyvq import _backend
from tests.conftest import cuda_build_expected


def test_info_lists_every_op_with_cpu_and_reference():
    info = pyvq.info()
    assert info["pyvq"] == pyvq.__version__
    assert info["torch"] == torch.__version__
    assert info["extension"] == "loaded"
    assert set(info["ops"]) == set(_backend.CPP_OPS)
    for name, impl in info["ops"].items():
        assert impl["cpu"], f"{name} has no CPU kernel registered"
        assert impl["reference"], f"{name} has no reference"
    assert info["cpu_isa"] in ("avx512-bf16", "avx512", "generic")
    assert isinstance(info["triton"]["importable"], bool)


LEVELS = ("generic", "avx512", "avx512-bf16")  # csrc/common/cpu_isa.h, lowest first


def test_cpu_isa_follows_the_override(monkeypatch):
    """PYVQ_CPU_ISA caps the level every CPU kernel uses, read at each call."""
    monkeypatch.delenv("PYVQ_CPU_ISA", raising=False)
    best = pyvq.info()["cpu_isa"]
    for cap in LEVELS:
        monkeypatch.setenv("PYVQ_CPU_ISA", cap)
        assert pyvq.info()["cpu_isa"] == LEVELS[min(LEVELS.index(cap), LEVELS.index(best))]
    monkeypatch.setenv("PYVQ_CPU_ISA", "")
    assert pyvq.info()["cpu_isa"] == best


def test_each_op_reports_its_cpu_isa(monkeypatch):
    """Every op's CPU file reports the level its kernel runs at: the CPU's
    level capped by what the op has code for, and by PYVQ_CPU_ISA."""
    monkeypatch.delenv("PYVQ_CPU_ISA", raising=False)
    info = pyvq.info()
    level = LEVELS.index(info["cpu_isa"])
    best = {"nearest_code": "avx512-bf16", "grid_encode": "generic",
            "multinomial_posterior": "avx512", "multinomial_kl": "avx512", "window_attention": "avx512",
            "multigrained_attention": "avx512"}
    assert set(best) == set(info["ops"])
    for name, impl in info["ops"].items():
        assert impl["cpu_isa"] == LEVELS[min(level, LEVELS.index(best[name]))], name
    monkeypatch.setenv("PYVQ_CPU_ISA", "generic")
    assert {name: impl["cpu_isa"] for name, impl in pyvq.info()["ops"].items()} == dict.fromkeys(best, "generic")


def test_unknown_cpu_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("PYVQ_CPU_ISA", "avx2")
    with pytest.raises(RuntimeError, match="PYVQ_CPU_ISA must be 'generic', 'avx512' or 'avx512-bf16'.*got 'avx2'"):
        pyvq.info()
    with pytest.raises(RuntimeError, match="PYVQ_CPU_ISA.*got 'avx2'"):
        pyvq.ops.nearest_code(torch.randn(4, 3), torch.randn(5, 3))
    alphas = torch.full((2,), 0.5)
    with pytest.raises(RuntimeError, match="PYVQ_CPU_ISA.*got 'avx2'"):
        pyvq.ops.multinomial_posterior(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 4, 3), alphas, alphas)


def test_every_registered_pyvq_op_is_listed():
    """No op is registered with the dispatcher without info() knowing it."""
    registered = {
        name.split("::", 1)[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("pyvq::")
    }
    # Triton ops (``<op>_triton``, registered when their module is imported)
    # are listed in their op's "triton" column instead.
    public = {n for n in registered if not n.startswith("_") and not n.endswith("_triton")}
    assert public == set(_backend.CPP_OPS)


# Ops whose CUDA path is Triton (triton_kernels/<op>.py) rather than csrc/<op>/*.cu.
TRITON_CUDA_OPS = ("window_attention", "multigrained_attention")


def test_cuda_kernels_registered_when_built_with_cuda():
    info = pyvq.info()
    if not cuda_build_expected():
        # A CPU-only build must say so rather than claim CUDA kernels.
        assert info["built_with_cuda"] or not any(o["cuda"] for o in info["ops"].values())
        return
    assert info["built_with_cuda"], "PYVQ_WITH_CUDA=1 build did not compile CUDA"
    assert info["cuda_archs"], "no CUDA architectures recorded"
    for name, impl in info["ops"].items():
        if name in TRITON_CUDA_OPS:
            # Their CUDA path is the Triton kernels (pyvq::<op>_triton), not a C++ CUDA kernel.
            assert not impl["cuda"] and impl["triton"], f"{name}: expected Triton kernels and no C++ CUDA kernel"
            continue
        assert impl["cuda"], f"{name} has no CUDA kernel registered"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyvq::{name}", "CUDA")


def test_cli_info_text_and_json():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "pyvq.cli", "info"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in _backend.CPP_OPS:
        assert name in out.stdout
    out = subprocess.run([sys.executable, "-m", "pyvq.cli", "info", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ops"].keys() == pyvq.info()["ops"].keys()


def test_triton_column_names_the_ops_with_triton_kernels():
    pytest.importorskip("triton", reason="triton is not installed")
    info = pyvq.info()
    assert {name for name, impl in info["ops"].items() if impl["triton"]} == {"window_attention", "multigrained_attention"}
    out = subprocess.run([sys.executable, "-m", "pyvq.cli", "info"], capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("window_attention"))
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert "triton" in header.split() and row.split()[header.split().index("triton")] == "yes"
