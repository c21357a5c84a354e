"""The calibrated temperature (tau="auto") against an independent oracle of its definition."""
import pytest
import torch
from torch import nn

from nnunet_acnorm import ACBatchNorm2d, ACInstanceNorm2d, convert_to_acnorm
from nnunet_acnorm.norms import AUTO_TAU, acnorm_modules, calibrated_tau, indicators_near_constant
from nnunet_acnorm.norms.modules import describe_temperatures
from tests import reference_acnorm as ref


def _norm(cls, c, seed, beta_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    plain = cls(c, affine=True) if cls is nn.InstanceNorm2d else cls(c)
    with torch.no_grad():
        plain.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=gen))
        plain.bias.copy_(beta_scale * torch.randn(c, generator=gen))
    return plain


@pytest.mark.parametrize("c,beta_scale,diagonal", [(8, 1.0, 0.5), (64, 0.01, 0.5), (256, 3.0, 0.5),
                                                    (32, 0.05, 0.2), (32, 0.05, 0.8)])
def test_calibrated_tau_hits_the_diagonal_of_the_oracle(c, beta_scale, diagonal):
    plain = _norm(nn.BatchNorm2d, c, seed=c, beta_scale=beta_scale)
    tau = calibrated_tau(plain.weight, plain.bias, diagonal)
    assert tau is not None and tau > 0
    assert ref.step0_mean_diagonal(plain.weight.detach(), plain.bias.detach(), tau) == pytest.approx(diagonal,
                                                                                                    abs=1e-5)
    # scale invariance: indicators 10x wider need a 10x larger temperature
    wide = calibrated_tau(plain.weight, 10 * plain.bias, diagonal)
    assert wide == pytest.approx(10 * tau, rel=1e-4)


def test_paper_tau_is_nearly_uniform_on_narrow_indicators_and_auto_is_not():
    """The issue's measurement in miniature: y spread 0.01 across 64 channels."""
    plain = _norm(nn.InstanceNorm2d, 64, seed=1, beta_scale=0.01)
    fixed = ACInstanceNorm2d.from_norm(plain, tau=1.0)
    auto = ACInstanceNorm2d.from_norm(plain, tau=AUTO_TAU)
    assert fixed.sparse_correlation().diagonal().mean().item() < 2.0 / 64
    assert auto.sparse_correlation().diagonal().mean().item() == pytest.approx(0.5, abs=1e-4)
    assert auto.tau_calibrated and auto.tau < 0.05


def test_auto_layer_output_equals_the_two_pass_oracle_at_its_tau():
    torch.manual_seed(0)
    plain = _norm(nn.BatchNorm2d, 12, seed=3, beta_scale=0.2)
    layer = ACBatchNorm2d.from_norm(plain, tau=AUTO_TAU).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 12, 5, 5)
    for _ in range(3):  # move the targets away from the source
        opt.zero_grad()
        (layer(x) * torch.randn_like(x)).sum().backward()
        opt.step()
    layer.eval()
    expected = ref.two_pass(ref.batch_norm_fn(layer.running_mean, layer.running_var, False), x,
                            layer.source_weight, layer.source_bias, layer.weight, layer.bias, layer.tau)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_temperature_is_a_function_of_the_source_and_survives_a_state_dict():
    plain = _norm(nn.BatchNorm2d, 16, seed=4, beta_scale=0.3)
    layer = ACBatchNorm2d.from_norm(plain, tau=AUTO_TAU)
    with torch.no_grad():  # training moves the targets, not the source: tau stays
        layer.weight.mul_(1.1)
    fresh = ACBatchNorm2d(16, tau=AUTO_TAU)
    assert not fresh.tau_calibrated
    fresh.load_state_dict(layer.state_dict())
    assert fresh.tau == layer.tau and fresh.tau_calibrated
    plain_loaded = ACBatchNorm2d(16, tau=AUTO_TAU)
    plain_loaded.load_state_dict(plain.state_dict())  # a plain checkpoint: source = its affines
    assert plain_loaded.tau == pytest.approx(layer.tau, rel=1e-12)


def test_untrained_affines_cannot_be_calibrated_and_fall_back_to_the_paper_tau():
    layer = ACInstanceNorm2d.from_norm(nn.InstanceNorm2d(8, affine=True), tau=AUTO_TAU)
    assert not layer.tau_calibrated and layer.tau == 1.0
    assert calibrated_tau(torch.ones(8), torch.zeros(8)) is None
    assert calibrated_tau(torch.ones(8), 1e-7 * torch.randn(8)) is None   # near-constant, within tolerance
    assert calibrated_tau(torch.ones(1), torch.ones(1)) is None           # one channel
    assert indicators_near_constant(torch.full((5,), 3.0) + 1e-6 * torch.arange(5))
    assert not indicators_near_constant(torch.tensor([0.0, 0.01, 0.02]))
    assert "near-constant" in describe_temperatures([layer])


def test_convert_and_describe():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), _norm(nn.BatchNorm2d, 8, seed=5), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    convert_to_acnorm(model, tau=AUTO_TAU, tau_diagonal=0.3)
    layers = acnorm_modules(model)
    assert [m.tau_calibrated for m in layers.values()] == [True, False]
    text = describe_temperatures(layers.values())
    assert "diagonal 0.3" in text and "1 layer(s) with near-constant" in text


@pytest.mark.parametrize("bad", ["Auto", 0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_temperatures_are_refused(bad):
    with pytest.raises(ValueError, match="tau"):
        ACBatchNorm2d(4, tau=bad)
    with pytest.raises(ValueError, match="tau_diagonal"):
        ACBatchNorm2d(4, tau=AUTO_TAU, tau_diagonal=1.0)
