"""The ops' value checks never synchronise with the host on CUDA.

On CPU a bad index, alpha or coordinate raises a ValueError at once (the
check reads the data). On CUDA the same checks run on the device
(``pyvq._checks.assert_values``, i.e. ``torch._assert_async``): a bad value
is a device-side assertion reported at the next synchronisation.

Without a GPU, the CUDA branch is exercised on CPU tensors by emptying
``pyvq._checks.HOST_CHECKED_DEVICES`` (so CPU tensors take the device
branch; ``torch._assert_async`` on a CPU tensor raises its message as a
RuntimeError at once) while every Python-level host read of a tensor
(``item``, ``tolist``, ``bool``, ``int``, ``float``, ``nonzero``) raises:
a passing call proves the device branch reads nothing on the host.

The CUDA tests run each op under ``torch.cuda.set_sync_debug_mode("error")``
and check, in a subprocess (a device-side assert leaves the CUDA context
unusable), that a bad value is reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyvq
from pyvq import ops
from pyvq import _checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = 5


def _inputs(device: str) -> dict:
    """Small valid inputs of every op, on ``device``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    B, S = 2, 3
    return {
        "x": randn(7, 4), "codebook": randn(K, 4),
        "coords": torch.rand(6, 2, 3, generator=g).to(device), "tables": randn(2, 2, 16, 2),
        "x_t": torch.randint(K, (B, S), generator=g).to(device),
        "x0": torch.randint(K, (B, S), generator=g).to(device),
        "logits": randn(B, K, S),
        "alpha_t": torch.tensor([0.9, 0.5]).to(device), "alpha_bar_prev": torch.tensor([0.7, 1.0]).to(device),
        "q": randn(1, 2, 4, 4, 8), "k": randn(1, 2, 4, 4, 8), "v": randn(1, 2, 4, 4, 8),
        "bias_table": randn(9, 2), "global_k": randn(1, 2, 4, 8), "global_v": randn(1, 2, 4, 8),
    }


def _leaf(t):
    return t.detach().clone().requires_grad_()


# Each call returns a scalar built from the op's outputs; the differentiable
# ones take leaves so that backward runs too.
CALLS = {
    "nearest_code": lambda a: ops.nearest_code(_leaf(a["x"]), _leaf(a["codebook"]))[1].sum(),
    "grid_encode": lambda a: ops.grid_encode(_leaf(a["coords"]), _leaf(a["tables"]), [3, 7]).sum(),
    "multinomial_posterior[indices]": lambda a: ops.multinomial_posterior(
        a["x_t"], a["x0"], a["alpha_t"], a["alpha_bar_prev"], num_classes=K).exp().sum(),
    "multinomial_posterior[logits]": lambda a: ops.multinomial_posterior(
        a["x_t"], _leaf(a["logits"]), a["alpha_t"], a["alpha_bar_prev"]).exp().sum(),
    "multinomial_kl": lambda a: ops.multinomial_kl(
        a["x_t"], a["x0"], _leaf(a["logits"]), a["alpha_t"], a["alpha_bar_prev"]).sum(),
    "window_attention": lambda a: ops.window_attention(
        _leaf(a["q"]), _leaf(a["k"]), _leaf(a["v"]), window_size=2, shift=1, bias_table=_leaf(a["bias_table"])).sum(),
    "multigrained_attention": lambda a: ops.multigrained_attention(
        _leaf(a["q"]), _leaf(a["k"]), _leaf(a["v"]), _leaf(a["global_k"]), _leaf(a["global_v"]),
        block_size=2, halo=1).sum(),
}


def _set(name, index, value):
    """A change of ``_inputs`` that writes ``value`` at ``index`` of input ``name``."""

    def change(a):
        t = a[name].clone()
        t[index] = value
        a[name] = t
        return a

    return change


# (call, change to the inputs, the argument the message must name)
BAD = [
    ("multinomial_posterior[indices]", _set("x_t", (0, 1), K), "x_t"),
    ("multinomial_posterior[indices]", _set("x_t", (1, 0), -1), "x_t"),
    ("multinomial_posterior[indices]", _set("x0", (0, 2), K + 3), "x0"),
    ("multinomial_posterior[logits]", _set("x_t", (1, 2), K), "x_t"),
    ("multinomial_posterior[logits]", _set("alpha_t", 0, 0.0), "alpha_t"),
    ("multinomial_posterior[logits]", _set("alpha_bar_prev", 1, float("nan")), "alpha_bar_prev"),
    ("multinomial_posterior[indices]", _set("alpha_t", 1, 1.5), "alpha_t"),
    ("multinomial_kl", _set("x_t", (0, 0), -2), "x_t"),
    ("multinomial_kl", _set("x0", (1, 1), K), "x0"),
    ("multinomial_kl", _set("alpha_bar_prev", 0, -0.5), "alpha_bar_prev"),
    ("grid_encode", _set("coords", (3, 1, 2), float("nan")), "coords"),
]
BAD_IDS = [f"{call}-{arg}-{i}" for i, (call, _, arg) in enumerate(BAD)]


# --- the device branch on CPU, with host reads forbidden --------------------

def _run(call, inputs):
    """The scalar of ``call`` on ``inputs``, its backward run where it has one."""
    loss = CALLS[call](inputs)
    if loss.requires_grad:
        loss.backward()
    return loss.detach()


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _no_host_read(*args, **kwargs):
    raise AssertionError("a host read of a tensor (item/tolist/bool/int/float/nonzero) in the device branch")


def _take_device_branch(monkeypatch):
    """CPU tensors take the CUDA (device-assert) branch; host reads raise."""
    monkeypatch.setattr(_checks, "HOST_CHECKED_DEVICES", ())
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, _no_host_read)


@pytest.fixture
def device_branch(monkeypatch):
    _take_device_branch(monkeypatch)
    yield


def test_value_check_modes():
    assert _checks.value_check(torch.zeros(3)) == "host"
    assert _checks.value_check(torch.zeros(0)) == "skip"
    assert _checks.value_check(torch.zeros(3, device="meta")) == "skip"
    if torch.cuda.is_available():
        assert _checks.value_check(torch.zeros(3, device="cuda")) == "device"


def test_fixture_forbids_host_reads(device_branch):
    """The patch really catches a host read (so the tests below can fail)."""
    with pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(()) > 0)
    with pytest.raises(AssertionError, match="host read"):
        torch.ones(1).item()
    with pytest.raises(AssertionError, match="host read"):
        int(torch.ones((), dtype=torch.long))


@pytest.mark.parametrize("call", list(CALLS))
def test_device_branch_reads_nothing_on_host(call, monkeypatch):
    expected = _run(call, _inputs("cpu"))
    _take_device_branch(monkeypatch)
    got = _run(call, _inputs("cpu"))
    monkeypatch.undo()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("call,change,arg", BAD, ids=BAD_IDS)
def test_device_branch_reports_bad_values(call, change, arg, device_branch):
    with pytest.raises(RuntimeError, match=f"argument '{arg}'"):
        CALLS[call](change(_inputs("cpu")))


@pytest.mark.parametrize("call,change,arg", BAD, ids=BAD_IDS)
def test_host_branch_raises_value_error(call, change, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        CALLS[call](change(_inputs("cpu")))


# --- CUDA -------------------------------------------------------------------

def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("call", list(CALLS))
def test_cuda_no_sync(call):
    _need_cuda()
    inputs = _inputs("cuda")
    _run(call, inputs)  # warm-up: lazy initialisation (handles, Triton compilation) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _run(call, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), _run(call, _inputs("cpu")), rtol=1e-4, atol=1e-4)


_BAD_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.ops.test_no_host_sync import BAD, CALLS, _inputs
call, change, arg = BAD[{i}]
inputs = change(_inputs("cuda"))
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
CALLS[call](inputs)  # no host sync, so no error yet
torch.cuda.set_sync_debug_mode("default")
print("QUEUED", flush=True)
torch.cuda.synchronize()
print("NOT REPORTED", flush=True)
"""


@pytest.mark.parametrize("i", range(len(BAD)), ids=BAD_IDS)
def test_cuda_bad_value_is_a_device_assert(i):
    _need_cuda()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_BAD_SCRIPT.format(root=ROOT, i=i))],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    out = proc.stdout + proc.stderr
    assert "QUEUED" in out, out[-3000:]  # the op call itself neither synced nor raised
    assert proc.returncode != 0 and "NOT REPORTED" not in out, out[-3000:]
    assert "device-side assert" in out, out[-3000:]
    # torch passes the message to the device (printed there); older versions
    # print only their generic text.
    arg = BAD[i][2]
    assert f"argument '{arg}'" in out or "single nonzero value" in out, out[-3000:]


def test_kernels_are_registered_for_cuda_when_built_with_cuda():
    """The CUDA tests above exercise the kernels only in a CUDA build."""
    _need_cuda()
    info = pyvq.info()
    if not info["built_with_cuda"]:
        pytest.skip("pyvq was built without CUDA (the CUDA tests ran the reference fallback)")
    for op in ("nearest_code", "grid_encode", "multinomial_posterior", "multinomial_kl"):
        assert info["ops"][op]["cuda"], op
