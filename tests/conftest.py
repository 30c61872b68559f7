"""Shared test fixtures and helpers. Real images come from scikit-image's
bundled samples (skimage.data, no download)."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors under Triton's interpreter on machines
# without a GPU; the variable must be set before anything imports triton.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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


@pytest.fixture(scope="session")
def skimage_patches():
    """(16, 3, 32, 32) float32 in [0, 1]: four skimage.data photographs
    (astronaut, chelsea, coffee, rocket), each resized to 64 x 64 with
    antialiasing and cut into four 32 x 32 tiles."""
    data = pytest.importorskip("skimage.data")
    tiles = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        img = F.interpolate(img[None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        tiles.append(img.unfold(2, 32, 32).unfold(3, 32, 32).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 32, 32))
    return torch.cat(tiles).clamp_(0, 1).contiguous()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored afterwards). On the shared
    2-core machine an OpenMP team of 2 stalls at every barrier whenever
    another process holds a core (measured: a small training test took 3 s
    on 1 thread, 13-17 s on 2 under load, 1.8 s on 2 when idle). Test files
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def triton_device() -> str:
    """The device Triton kernels run on in this session: "cpu" under the
    interpreter (TRITON_INTERPRET=1, set above without a GPU), else "cuda";
    skips the calling test module when neither is possible."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (Triton needs one of them)", allow_module_level=True)


def bad_arguments(ok, **changes):
    """A factory of keyword arguments: ``ok()`` with each named entry
    replaced by ``change(kwargs)`` (for parametrized bad-input tests)."""

    def make():
        kw = ok()
        for name, change in changes.items():
            kw[name] = change(kw)
        return kw

    return make


def assert_compiled_equals_eager(fn, tensors, rtol=1e-5, atol=1e-5):
    """``torch.compile(fn, fullgraph=True)`` equals eager ``fn`` on
    ``tensors``: the scalar ``fn`` returns and its gradients to each."""

    def run(f):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        loss = f(*leaves)
        return (loss, *torch.autograd.grad(loss, leaves))

    torch._dynamo.reset()
    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
