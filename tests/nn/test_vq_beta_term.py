"""VectorQuantizer's ``beta_term``: which loss term ``beta`` weighs.

"commitment" (VQ-VAE): mean((q - sg[z])^2) + beta * mean((z - sg[q])^2);
"codebook" (taming-transformers' VectorQuantizer2 with legacy=True):
beta * mean((q - sg[z])^2) + mean((z - sg[q])^2). The gradients with respect
to z and to the codebook are compared with the same formula written directly
in plain torch, and, without normalisation, with its closed form.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyvq.nn import VectorQuantizer


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _direct_loss(z: torch.Tensor, codebook: torch.Tensor, beta: float, beta_term: str, l2: bool) -> torch.Tensor:
    """The VQ loss of (B, D, H, W) latents, written out in plain torch."""
    zz = F.normalize(z, dim=1) if l2 else z
    codes = F.normalize(codebook, dim=1) if l2 else codebook
    flat = zz.permute(0, 2, 3, 1).reshape(-1, zz.shape[1])
    idx = torch.cdist(flat.detach(), codes.detach()).argmin(dim=1)
    q = codes[idx]
    codebook_term = ((q - flat.detach()) ** 2).mean()
    commitment_term = ((flat - q.detach()) ** 2).mean()
    if beta_term == "codebook":
        return beta * codebook_term + commitment_term
    return codebook_term + beta * commitment_term


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("beta", [0.25, 2.0])
@pytest.mark.parametrize("beta_term", ["commitment", "codebook"])
def test_gradients_match_the_direct_formula(beta_term, beta, l2):
    torch.manual_seed(0)
    vq = VectorQuantizer(12, 4, beta=beta, beta_term=beta_term, l2_normalize=l2)
    vq.load_codebook(torch.randn(12, 4, generator=_gen(1), dtype=torch.float64).float())
    vq = vq.double()
    z = torch.randn(2, 4, 3, 5, generator=_gen(2), dtype=torch.float64, requires_grad=True)
    out = vq(z)
    out.loss.backward()

    z_ref = z.detach().clone().requires_grad_(True)
    cb_ref = vq.codebook.detach().clone().requires_grad_(True)
    want = _direct_loss(z_ref, cb_ref, beta, beta_term, l2)
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(vq.codebook.grad, cb_ref.grad, rtol=1e-10, atol=1e-14)
    assert z.grad.abs().max() > 0 and vq.codebook.grad.abs().max() > 0

    if not l2:
        # closed form: d/dz = 2 w_z (z - q) / n, d/dc_k = sum over z assigned to k of 2 w_c (q - z) / n
        w_z, w_c = (1.0, beta) if beta_term == "codebook" else (beta, 1.0)
        n = z.numel()
        q = vq.codes_from_indices(out.indices).detach()
        torch.testing.assert_close(z.grad, 2 * w_z * (z.detach() - q) / n)
        per_vector = (2 * w_c * (q - z.detach()) / n).permute(0, 2, 3, 1).reshape(-1, 4)
        want_cb = torch.zeros_like(vq.codebook).index_add_(0, out.indices.reshape(-1), per_vector)
        torch.testing.assert_close(vq.codebook.grad, want_cb)


def test_conventions_differ_in_gradients_only():
    z = torch.randn(2, 4, 3, 3, generator=_gen(3))
    grads = {}
    for term in ("commitment", "codebook"):
        vq = VectorQuantizer(8, 4, beta=0.25, beta_term=term)
        vq.load_codebook(torch.randn(8, 4, generator=_gen(4)))
        zz = z.clone().requires_grad_(True)
        out = vq(zz)
        out.loss.backward()
        grads[term] = (out.loss.detach(), zz.grad, vq.codebook.grad)
    (loss_a, gz_a, gc_a), (loss_b, gz_b, gc_b) = grads["commitment"], grads["codebook"]
    torch.testing.assert_close(loss_a, loss_b)  # both (1 + beta) * mean((z - q)^2)
    torch.testing.assert_close(gz_b, gz_a / 0.25)  # encoder: weight 1 instead of beta
    torch.testing.assert_close(gc_b, gc_a * 0.25)  # codebook: weight beta instead of 1


def test_beta_term_errors_and_repr():
    with pytest.raises(ValueError, match=r"VectorQuantizer: argument 'beta_term' must be one of \('commitment', "
                                         r"'codebook'\), got 'legacy'"):
        VectorQuantizer(8, 4, beta_term="legacy")
    with pytest.raises(ValueError, match=r"VectorQuantizer: argument 'beta_term'='codebook' needs ema=False"):
        VectorQuantizer(8, 4, beta_term="codebook", ema=True)
    # EMA: the loss is beta * commitment, the only meaningful combination
    vq = VectorQuantizer(8, 4, beta=0.5, ema=True, beta_term="commitment").eval()
    z = torch.randn(10, 4, generator=_gen(5), requires_grad=True)
    out = vq(z)
    q = vq.codes_from_indices(out.indices)
    torch.testing.assert_close(out.loss, 0.5 * ((z.detach() - q) ** 2).mean())
    assert "beta_term='codebook'" in repr(VectorQuantizer(8, 4, beta_term="codebook"))
