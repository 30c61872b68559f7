"""Shared test fixtures and helpers."""

from __future__ import annotations

import os

import pytest
import torch

# Keep the suite quick and deterministic on 2 cores.
torch.manual_seed(0)


@pytest.fixture
def reference_backend(monkeypatch):
    """Run the test body with PYVQ_BACKEND=reference."""
    monkeypatch.setenv("PYVQ_BACKEND", "reference")
    yield


def half_precision_bound(out, ref_low, ref64, factor=2.0, atol=0.0):
    """flash-attention's rule: the kernel's error against a float64 oracle is
    at most ``factor`` times the error of the reference itself run in the
    same low precision (plus ``atol`` for exact zeros)."""
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_low.double() - ref64).abs().max().item()
    assert err <= factor * ref_err + atol, (err, ref_err)


def cuda_build_expected() -> bool:
    return os.environ.get("PYVQ_WITH_CUDA", "auto") == "1"
