"""AC-Corr against hand-computed values, and its layer selection."""
import math

import pytest
import torch
from torch import nn

from nnunet_acnorm import ac_corr_from_model, ac_corr_from_state_dicts, convert_to_acnorm
from nnunet_acnorm.norms.ac_corr import ac_corr_of_layer, deepest_encoder_layer, norm_affines
from tests.factories.networks import plain_conv_unet

E = math.exp
W = torch.full((3,), 1 - 1e-5, dtype=torch.float64)  # |w| + eps = 1: y = beta exactly


def test_hand_computed_three_channels():
    source_b = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    target_b = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    # rows 0 and 2 keep only their diagonal; row 1 sits between source 0 and 1: a tie, both kept
    expected = 2 / (1 + E(-1) + E(-2)) + 2 / (2 + E(-1))
    assert ac_corr_of_layer(W, source_b, W, target_b) == pytest.approx(expected, rel=1e-6)
    expected_tau2 = 2 / (1 + E(-0.5) + E(-1)) + 2 / (2 + E(-0.5))
    assert ac_corr_of_layer(W, source_b, W, target_b, tau=2.0) == pytest.approx(expected_tau2, rel=1e-6)


def test_all_tied_at_step_zero_is_full_matrix():
    w, b = torch.ones(4), torch.zeros(4)
    assert ac_corr_of_layer(w, b, w, b) == pytest.approx(4.0)  # every row: four ties of 1/4 each


def test_range_is_zero_to_channels():
    torch.manual_seed(0)
    for _ in range(20):
        sw, sb, tw, tb = (torch.randn(16) for _ in range(4))
        assert 0 < ac_corr_of_layer(sw, sb, tw, tb) <= 16 + 1e-5


def test_state_dict_pair_and_model_agree_on_default_layer():
    torch.manual_seed(0)
    model = plain_conv_unet()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_acnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(torch.randn(2, 1, 16, 16, 16))[0]
    out.square().mean().backward()
    optimizer.step()
    from_model = ac_corr_from_model(model)
    finetuned = {k: v for k, v in model.state_dict().items() if "source_" not in k}
    from_pair = ac_corr_from_state_dicts(pretrained, finetuned)
    assert list(from_model.per_layer) == ["encoder.stages.3.0.convs.1.norm"]
    assert from_pair.per_layer == pytest.approx(from_model.per_layer)
    assert from_model.score == pytest.approx(from_pair.score)
    everything = ac_corr_from_model(model, layers="all")
    assert len(everything.per_layer) == 14  # duplicates (all_modules, decoder.encoder) counted once
    assert everything.score == pytest.approx(sum(everything.per_layer.values()) / 14)
    chosen = ac_corr_from_model(model, layers=["decoder.stages.0.convs.0.norm"])
    assert list(chosen.per_layer) == ["decoder.stages.0.convs.0.norm"]


def test_deepest_encoder_layer_of_known_families():
    genesis = ["down_tr64.ops.0.bn1", "down_tr512.ops.1.bn1", "up_tr256.ops.0.bn1", "clc_out.bn1"]
    assert deepest_encoder_layer(genesis) == "down_tr512.ops.1.bn1"
    resnet = ["bn1", "layer1.0.bn1", "layer4.2.bn3"]
    assert deepest_encoder_layer(resnet) == "layer4.2.bn3"


def test_norm_affines_skips_conv_biases():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    assert list(norm_affines(model.state_dict())) == ["1"]


def test_unknown_layer_and_plain_model_errors():
    model = plain_conv_unet()
    with pytest.raises(ValueError, match="convert_to_acnorm"):
        ac_corr_from_model(model)
    convert_to_acnorm(model)
    with pytest.raises(KeyError, match="encoder.stages.9.norm"):
        ac_corr_from_model(model, layers=["encoder.stages.9.norm"])
