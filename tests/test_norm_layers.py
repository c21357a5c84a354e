"""AC-Norm modules against an independent two-pass implementation of the formula."""
import copy

import zlib

import pytest
import torch
from torch import nn

from nnunet_acnorm import (ACBatchNorm1d, ACBatchNorm2d, ACBatchNorm3d, ACGroupNorm, ACInstanceNorm2d,
                           ACInstanceNorm3d)
from nnunet_acnorm.norms import ACNORM_FOR_PLAIN
from tests import reference_acnorm as ref
from tests.factories.norms import pretrained_affines


@pytest.fixture(autouse=True)
def float64_default():
    """Tight comparisons in float64 (float32 and autocast are covered separately); restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _plain(kind, c):
    return {
        "bn1d": lambda: nn.BatchNorm1d(c), "bn2d": lambda: nn.BatchNorm2d(c),
        "bn3d": lambda: nn.BatchNorm3d(c), "in1d": lambda: nn.InstanceNorm1d(c, affine=True),
        "in2d": lambda: nn.InstanceNorm2d(c, affine=True),
        "in3d": lambda: nn.InstanceNorm3d(c, affine=True),
        "gn": lambda: nn.GroupNorm(2 if c % 2 == 0 else 1, c),
    }[kind]()


SPATIAL = {"bn1d": (7,), "bn2d": (5, 6), "bn3d": (3, 4, 5), "in1d": (9,), "in2d": (5, 6),
           "in3d": (3, 4, 5), "gn": (4, 5)}
KINDS = list(SPATIAL)


def _affines(c, case, gen):
    w = torch.empty(c).uniform_(0.5, 1.5, generator=gen) * torch.sign(torch.randn(c, generator=gen))
    b = torch.randn(c, generator=gen)
    if case == "ties":
        b[: max(1, c * 2 // 3)] = 0.0  # many beta = 0: identical indicators
    elif case == "gamma_near_zero":
        w[0] = 1e-7
        w[-1] = -3e-6
    return w, b


def _reference_fn(kind, plain, training, running):
    if kind.startswith("bn"):
        return ref.batch_norm_fn(running[0], running[1], training or running[0] is None)
    if kind.startswith("in"):
        return ref.instance_norm_fn()
    return ref.group_norm_fn(plain.num_groups)


CASES = [("plain", 1.0, 6, 3), ("ties", 1.0, 6, 3), ("gamma_near_zero", 1.0, 6, 3),
         ("plain", 0.3, 6, 3), ("plain", 4.0, 5, 2), ("plain", 1.0, 1, 3), ("plain", 1.0, 4, 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case,tau,channels,batch", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_two_pass(kind, case, tau, channels, batch, training):
    if kind.startswith("bn") and batch == 1 and training and kind == "bn1d":
        pytest.skip("BatchNorm1d needs more than one value per channel in training")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, case, tau, channels, batch)).encode()))  # not hash(): salted
    plain = _plain(kind, channels)
    sw, sb = _affines(channels, case, gen)
    with torch.no_grad():
        plain.weight.copy_(sw)
        plain.bias.copy_(sb)
        if kind.startswith("bn"):
            plain.running_mean.normal_(generator=gen)
            plain.running_var.uniform_(0.5, 2.0, generator=gen)
    module = ACNORM_FOR_PLAIN[type(plain)].from_norm(plain, tau=tau)
    # move the targets away from the source, as fine-tuning does
    with torch.no_grad():
        module.weight.add_(0.3 * torch.randn(channels, generator=gen))
        module.bias.add_(0.3 * torch.randn(channels, generator=gen))
    module.train(training)

    x = torch.randn(batch, channels, *SPATIAL[kind], generator=gen) * 2 + 1
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    tw = module.weight.detach().clone().requires_grad_(True)
    tb = module.bias.detach().clone().requires_grad_(True)
    running = (plain.running_mean.clone(), plain.running_var.clone()) if kind.startswith("bn") else (None, None)

    y = module(x)
    y_ref = ref.two_pass(_reference_fn(kind, plain, training, running), x_ref, sw, sb, tw, tb, tau)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn(y.shape, generator=gen)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(module.weight.grad, tw.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(module.bias.grad, tb.grad, rtol=1e-9, atol=1e-9)
    assert module.source_weight.grad is None
    torch.testing.assert_close(module.source_weight, sw, rtol=0, atol=0)


def test_running_stats_updated_once_per_step():
    plain = nn.BatchNorm2d(4)
    module = ACBatchNorm2d.from_norm(plain)
    x = torch.randn(3, 4, 5, 5)
    module.train()
    plain.train()
    module(x)
    plain(x)  # one plain update is the reference; the two-pass reference would update twice
    torch.testing.assert_close(module.running_mean, plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(module.running_var, plain.running_var, rtol=0, atol=0)
    assert int(module.num_batches_tracked) == 1


def test_cumulative_moving_average_like_plain_bn():
    plain = nn.BatchNorm1d(3, momentum=None)
    module = ACBatchNorm1d.from_norm(plain)
    for _ in range(3):
        x = torch.randn(8, 3)
        module(x)
        plain(x)
    torch.testing.assert_close(module.running_mean, plain.running_mean)
    torch.testing.assert_close(module.running_var, plain.running_var)


@pytest.mark.parametrize("kind", KINDS)
def test_step_zero_is_diagonal_plus_ties(kind):
    gen = torch.Generator().manual_seed(3)
    plain = _plain(kind, 6)
    sw, sb = _affines(6, "ties", gen)
    with torch.no_grad():
        plain.weight.copy_(sw)
        plain.bias.copy_(sb)
    module = ACNORM_FOR_PLAIN[type(plain)].from_norm(plain)
    s = module.sparse_correlation()
    ys = sb / (sw.abs() + 1e-5)
    assert torch.equal(s > 0, ys[:, None] == ys[None, :]), "only the diagonal and exact ties survive"
    # the output is the plain norm's x_hat under the affine ((I + S) gamma, (I + S) beta)
    x = torch.randn(2, 6, *SPATIAL[kind], generator=gen)
    shape = (1, -1, *[1] * len(SPATIAL[kind]))
    x_hat = (plain.train()(x) - sb.view(shape)) / sw.view(shape)
    expected = x_hat * (sw + s @ sw).view(shape) + (sb + s @ sb).view(shape)
    torch.testing.assert_close(module(x), expected)


def test_step_zero_without_ties_is_one_plus_diagonal_times_plain():
    plain = nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([1.0, 0.8, 1.3, 0.6, 1.1]))
        plain.bias.copy_(torch.tensor([0.1, -0.4, 0.7, 0.25, -1.0]))
    module = ACInstanceNorm3d.from_norm(plain)
    s = module.sparse_correlation()
    assert torch.count_nonzero(s - torch.diag(s.diagonal())) == 0
    x = torch.randn(2, 5, 3, 3, 3)
    torch.testing.assert_close(module(x), plain(x) * (1 + s.diagonal()).view(1, -1, 1, 1, 1))


@pytest.mark.parametrize("cls,shape", [(ACBatchNorm3d, (4, 8, 4, 4, 4)), (ACInstanceNorm2d, (4, 8, 6, 6)),
                                       (lambda c: ACGroupNorm(4, c), (4, 8, 6, 6))])
def test_training_keeps_source_bit_identical_and_moves_targets(cls, shape):
    torch.manual_seed(0)
    module = pretrained_affines(cls(8), set_source=True)
    source = (module.source_weight.clone(), module.source_bias.clone())
    target = (module.weight.detach().clone(), module.bias.detach().clone())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(module.weight), id(module.bias)}
    for _ in range(50):
        optimizer.zero_grad()
        x = torch.randn(shape)
        loss = (module(x) - 2.0 * x.roll(1, dims=1)).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert torch.equal(module.source_weight, source[0]) and torch.equal(module.source_bias, source[1])
    assert (module.weight - target[0]).abs().max() > 1e-2
    assert (module.bias - target[1]).abs().max() > 1e-2
    assert all(p is not module.source_weight for p in module.parameters())


def test_state_dict_round_trip_and_plain_state_dict_sets_both():
    plain = pretrained_affines(nn.BatchNorm3d(4))
    with torch.no_grad():
        plain.running_mean.normal_()
    module = ACBatchNorm3d(4)
    assert not module.source_is_set
    assert set(module.state_dict()) == set(plain.state_dict()), "unset source: plain keys only"
    module.load_state_dict(plain.state_dict())  # strict
    assert module.source_is_set
    for a, b in ((module.source_weight, plain.weight), (module.weight, plain.weight),
                 (module.source_bias, plain.bias), (module.bias, plain.bias),
                 (module.running_mean, plain.running_mean)):
        assert torch.equal(a, b)
    with torch.no_grad():
        module.weight.mul_(1.5)
    state = module.state_dict()
    assert {"source_weight", "source_bias"} <= set(state)
    fresh = ACBatchNorm3d(4)
    fresh.load_state_dict(state)  # strict, with source keys
    assert fresh.source_is_set
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_plain_state_dict_without_num_batches_tracked_loads():
    plain = nn.BatchNorm2d(3)
    state = {k: v for k, v in plain.state_dict().items() if k != "num_batches_tracked"}
    module = ACBatchNorm2d(3)
    result = module.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert module.source_is_set and torch.equal(module.source_weight, plain.weight)
    assert torch.equal(module.running_var, plain.running_var)


def test_unset_source_follows_target_in_eval_and_is_frozen_by_training():
    module = ACInstanceNorm2d(3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    module.eval()
    module(torch.randn(1, 3, 4, 4))
    assert not module.source_is_set
    module.train()
    with pytest.warns(UserWarning, match="AC-Norm needs a pretrained source"):
        module(torch.randn(1, 3, 4, 4))
    assert module.source_is_set and torch.equal(module.source_weight, torch.tensor([1.0, 2.0, 0.5]))


def test_eval_mode_follows_norm_type():
    torch.manual_seed(1)
    bn = ACBatchNorm2d.from_norm(nn.BatchNorm2d(3)).eval()
    inorm = ACInstanceNorm2d.from_norm(nn.InstanceNorm2d(3, affine=True)).eval()
    x = torch.randn(2, 3, 8, 8) * 5 + 3
    # BN eval: running statistics (mean 0, var 1 here), so the output is an affine map of x
    w, b = bn.recalibrated_affine()
    torch.testing.assert_close(bn(x), x / (1 + 1e-5) ** 0.5 * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
    # IN eval: per-sample statistics
    y = inorm(x)
    w, b = inorm.recalibrated_affine()
    x_hat = (y - b.view(1, -1, 1, 1)) / w.view(1, -1, 1, 1)
    torch.testing.assert_close(x_hat.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_unbatched_instance_norm_input():
    module = ACInstanceNorm2d.from_norm(nn.InstanceNorm2d(3, affine=True))
    x = torch.randn(3, 5, 5)
    torch.testing.assert_close(module(x), module(x[None])[0])


def test_float32_autocast_and_compile():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    module = ACBatchNorm2d.from_norm(nn.BatchNorm2d(8).float()).float()
    conv = nn.Conv2d(3, 8, 3).float()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float32)
    reference = module(conv(x))
    assert reference.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(conv(x))
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    w, _ = module.recalibrated_affine()
    assert w.dtype == torch.float32
    compiled = torch.compile(copy.deepcopy(module), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(conv(x)), module(conv(x)))


def test_group_norm_groups_and_repr():
    module = ACGroupNorm(2, 6, tau=0.5)
    assert "tau=0.5" in repr(module) and "source=not set" in repr(module)
    plain = module.to_plain()
    assert isinstance(plain, nn.GroupNorm) and plain.num_groups == 2


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ACBatchNorm2d, ACInstanceNorm3d])
def test_no_affine_is_refused(cls):
    with pytest.raises(ValueError, match="affine=True"):
        cls(4, affine=False)


def test_bad_tau_and_groups():
    with pytest.raises(ValueError, match="tau"):
        ACBatchNorm2d(4, tau=0)
    with pytest.raises(ValueError, match="divisible"):
        ACGroupNorm(3, 8)


def test_wrong_shapes_in_state_dict_name_the_key():
    module = ACInstanceNorm3d(4)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\[5\].*\[4\]"):
        module.load_state_dict(nn.InstanceNorm3d(5, affine=True).state_dict())
    assert not module.source_is_set, "a failed load must not set the source"
    bad = ACInstanceNorm3d.from_norm(nn.InstanceNorm3d(5, affine=True)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for source_weight"):
        module.load_state_dict(bad)
    assert not module.source_is_set


def test_nan_affines_are_refused():
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.bias[1] = float("nan")
    with pytest.raises(RuntimeError, match="bias contains NaN"):
        ACBatchNorm2d(3).load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="NaN"):
        ACBatchNorm2d(3).set_source(torch.ones(3), torch.tensor([0.0, float("inf"), 0.0]))
    with pytest.raises(ValueError, match="shape"):
        ACBatchNorm2d(3).set_source(torch.ones(4), torch.zeros(4))


def test_wrong_input_dims():
    with pytest.raises(ValueError, match="5D"):
        ACBatchNorm3d(2)(torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        ACInstanceNorm2d(2)(torch.randn(2, 3, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [ACBatchNorm3d, ACInstanceNorm3d, lambda c: ACGroupNorm(4, c)])
def test_cuda_autocast_matches_float32(cls, amp_dtype):
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 8, 3, padding=1).float().cuda()
    module = pretrained_affines(cls(8).float().cuda(), set_source=True)
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float32, device="cuda")
    reference = module(conv(x))
    with torch.autocast("cuda", dtype=amp_dtype):
        y = module(conv(x))
    y.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32 and torch.isfinite(module.weight.grad).all()
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
