"""pyvq.models.cost: the BRICS decoder's GFLOPs, argument checks, and the
helpers' old import path (the asymmetric helpers are checked against the
paper's presets in test_asymmetric.py)."""

from __future__ import annotations

import pytest

from pyvq.models import cost, get_preset


def test_brics_decoder_gflops():
    config = get_preset("brics_64x64x4")
    retrieval = cost.brics_retrieval_gflops(config)
    d = config.key_dim + 2
    assert retrieval * 1e9 == 64 * 64 * config.num_groups * config.levels * 2**d * ((d - 1) + 2 * config.features)
    total = cost.brics_decoder_gflops(config)
    assert round(total, 2) == 135.81  # the figure bench_grid.py prints
    assert cost.brics_decoder_gflops(get_preset("brics_tiny")) < total


def test_argument_checks():
    with pytest.raises(TypeError, match="argument 'config' must be a BRICSConfig, got AsymmetricVQGANConfig"):
        cost.brics_decoder_gflops(get_preset("asym_vqgan_tiny"))
    with pytest.raises(TypeError, match="brics_retrieval_gflops: .*got dict"):
        cost.brics_retrieval_gflops({})
    with pytest.raises(TypeError, match="expected an AsymmetricVQGAN or its config, got BRICSConfig"):
        cost.decoder_parameter_count(get_preset("brics_tiny"))
    with pytest.raises(ValueError, match="divisible by 16"):
        cost.decoder_gflops(get_preset("asym_vq_f16_base"), 250, 256)


def test_old_import_paths_still_work():
    import pyvq.nn as nn
    from pyvq.models.tokenizers import MaskConditionDecoder, decoder_gflops, decoder_parameter_count, mask_guided_blend

    assert MaskConditionDecoder is nn.MaskConditionDecoder and mask_guided_blend is nn.mask_guided_blend
    assert decoder_gflops is cost.decoder_gflops and decoder_parameter_count is cost.decoder_parameter_count
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        from pyvq.models import tokenizers

        tokenizers.nothing  # noqa: B018
