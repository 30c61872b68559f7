"""taming's loss convention through ``from_taming``, the VQGAN config and
the training recipe: a converted checkpoint puts beta on the codebook term,
as taming's VectorQuantizer2(legacy=True) does, so fine-tuning gives the
encoder and the codebook taming's gradients; the choice is saved with the
model and old configs load with pyvq's original convention."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from pyvq.convert import from_taming
from pyvq.models import VQGAN, VQGANConfig
from pyvq.train.recipes import recipe_for

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = VQGANConfig(
    embed_dim=4, n_embed=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
    resolution=16, norm_num_groups=8, beta=0.3,
)


@pytest.fixture(scope="module")
def taming_state():
    """A taming-named VQGAN state dict (random weights, codebook N(0, 1))."""
    torch.manual_seed(61)
    model = VQGAN(CONFIG)
    with torch.no_grad():
        model.quantize.codebook.normal_(generator=torch.Generator().manual_seed(62))
    stats = {"quantize.cluster_size", "quantize.code_usage"}
    return {
        ("quantize.embedding.weight" if k == "quantize.codebook" else k): v.clone()
        for k, v in model.state_dict().items()
        if k not in stats
    }


def _taming_loss(model: VQGAN, x: torch.Tensor) -> torch.Tensor:
    """taming's VectorQuantizer2(legacy=True) loss on ``model``'s encoder
    output, as taming writes it (beta on the codebook term)."""
    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1)
    codebook = model.quantize.codebook
    flat = z.reshape(-1, z.shape[-1])
    d = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.t()
    z_q = codebook[d.argmin(1)].view(z.shape)
    beta = model.config.beta
    return torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)


def _grads(model: VQGAN, loss: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_from_taming_fine_tunes_as_taming(taming_state):
    model = from_taming(taming_state, CONFIG)
    assert model.config.beta_term == "codebook" and model.quantize.beta_term == "codebook"
    reference = copy.deepcopy(model)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(63)) * 2 - 1
    want = _grads(reference, _taming_loss(reference, x))
    # the trainer's path: the recipe hands the quantiser's loss to the loss module
    output = model(x)
    got = _grads(model, recipe_for(model).loss_inputs(x, output)["codebook_loss"])
    assert set(got) == set(want) and "quantize.codebook" in got and "encoder.conv_in.weight" in got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7, msg=key)

    # pyvq's own convention gives other gradients (the test can fail)
    vqvae = from_taming(taming_state, CONFIG, beta_term="commitment")
    assert vqvae.config.beta_term == "commitment"
    other = _grads(vqvae, vqvae(x).aux.loss)
    assert not torch.allclose(other["quantize.codebook"], want["quantize.codebook"])
    assert not torch.allclose(other["encoder.conv_in.weight"], want["encoder.conv_in.weight"])


def test_from_taming_beta_term_argument(taming_state):
    assert from_taming(taming_state, dataclasses.asdict(CONFIG)).config.beta_term == "codebook"
    assert from_taming(taming_state, CONFIG, beta_term=None).config.beta_term == "commitment"  # the config's
    kept = dataclasses.replace(CONFIG, beta_term="codebook")
    assert from_taming(taming_state, kept, beta_term=None).config.beta_term == "codebook"
    with pytest.raises(ValueError, match=r"from_taming: argument 'beta_term' must be one of .*got 'legacy'"):
        from_taming(taming_state, CONFIG, beta_term="legacy")
    ema = dataclasses.replace(CONFIG, ema=True)
    with pytest.raises(ValueError, match=r"from_taming: argument 'beta_term'='codebook' needs ema=False"):
        from_taming(taming_state, ema)
    model = from_taming(taming_state, ema, beta_term=None)
    assert model.config.ema and model.config.beta_term == "commitment"


def test_beta_term_is_saved_and_old_configs_load(taming_state, tmp_path):
    model = from_taming(taming_state, CONFIG)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    assert data["beta_term"] == "codebook"
    assert VQGAN.from_pretrained(tmp_path).quantize.beta_term == "codebook"
    # a config.json written before the field existed: pyvq's convention then
    del data["beta_term"]
    path.write_text(json.dumps(data))
    assert VQGAN.from_pretrained(tmp_path).config.beta_term == "commitment"


def test_config_refuses_bad_beta_term():
    with pytest.raises(ValueError, match=r"VQGANConfig: field 'beta_term' must be one of"):
        dataclasses.replace(CONFIG, beta_term="taming")
    with pytest.raises(ValueError, match=r"VQGANConfig: field 'beta_term'='codebook' needs ema=False"):
        dataclasses.replace(CONFIG, beta_term="codebook", ema=True)
