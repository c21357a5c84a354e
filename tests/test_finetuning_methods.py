"""The fine-tuning baselines' pieces (nnunet_acnorm.finetuning) against independent implementations
of their published formulas: plain loops and NumPy here, no helper of the package is used for the
expected values. Values and gradients; StochNorm on 3-D, 4-D and 5-D inputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_acnorm.finetuning import (DELTARegulariser, L2SPRegulariser, ScaledWarmupPolyLRScheduler, StochNorm1d,
                                      StochNorm2d, StochNorm3d, bss_penalty, convert_to_stochnorm,
                                      discriminative_param_groups, feature_distance, frozen_epochs, set_frozen,
                                      stage_modules)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


class TinyEncoder(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm(4), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), norm(6), nn.ReLU()))

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class TinyUNetLike(nn.Module):
    """encoder.stages + a head, as nnU-Net's networks name them."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.encoder = TinyEncoder(norm)
        self.seg_layers = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.seg_layers(self.encoder(x)[-1])


# -- L2-SP -------------------------------------------------------------------------------------------
def test_l2sp_value_and_gradient_match_formula_and_new_parameters_need_no_anchor():
    torch.manual_seed(0)
    net = TinyUNetLike()
    anchor = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("seg_layers")}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    alpha, beta = 0.07, 0.013
    reg = L2SPRegulariser(net, anchor, alpha=alpha, beta=beta)  # seg_layers have no anchor: no KeyError
    value = reg()
    value.backward()
    expected, grads = 0.0, {}
    for name, p in net.named_parameters():
        w = _np(p).ravel()
        if name in anchor:
            w0 = _np(anchor[name]).ravel()
            for i in range(w.size):
                expected += alpha / 2 * (w[i] - w0[i]) ** 2
            grads[name] = alpha * (w - w0)
        else:
            for i in range(w.size):
                expected += beta / 2 * w[i] ** 2
            grads[name] = beta * w
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert set(reg.new_names) == {"seg_layers.weight", "seg_layers.bias"}
    for name, p in net.named_parameters():
        np.testing.assert_allclose(_np(p.grad).ravel(), grads[name], rtol=1e-5, atol=1e-9)


def test_l2sp_state_round_trip_is_exact_and_zero_at_the_anchor():
    torch.manual_seed(1)
    net = TinyUNetLike()
    reg = L2SPRegulariser.from_network(net, lambda n: n.startswith("seg_layers"), alpha=0.01, beta=0.0)
    assert reg().item() == 0.0  # at the pretrained weights and without beta
    state = reg.state()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    restored = L2SPRegulariser.from_state(net, state)
    assert restored.anchored_names == reg.anchored_names
    for n in reg.anchored_names:
        assert torch.equal(restored.anchor[n], reg.anchor[n])
    assert restored().item() == pytest.approx(reg().item())
    with pytest.raises(ValueError, match="does not have"):
        L2SPRegulariser(net, {"nope.weight": torch.zeros(1)})


# -- DELTA -------------------------------------------------------------------------------------------
def test_delta_feature_distance_matches_loops_with_uniform_attention():
    torch.manual_seed(2)
    live = [torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 5, 2, 2, 2, requires_grad=True)]
    ref = [torch.randn(2, 3, 4, 5), torch.randn(2, 5, 2, 2, 2)]
    value = feature_distance(live, ref)
    value.backward()
    expected = 0.0
    for a, b in zip(live, ref):
        a, b = _np(a), _np(b)
        n_batch, n_channels = a.shape[:2]
        positions = int(np.prod(a.shape[2:]))
        for c in range(n_channels):
            attention = 1.0 / n_channels  # W_jc, uniform
            d = 0.0
            for i in range(n_batch):
                d += ((a[i, c] - b[i, c]) ** 2).sum()
            expected += attention * d / (n_batch * positions)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    for a, b in zip(live, ref):
        np.testing.assert_allclose(_np(a.grad), 2 * (_np(a) - _np(b)) / a.numel(), rtol=1e-5, atol=1e-9)


def test_delta_regulariser_against_a_frozen_copy_by_hand():
    torch.manual_seed(3)
    net = TinyUNetLike(norm=nn.BatchNorm2d)
    pretrained = copy.deepcopy(net).eval()
    stages = stage_modules(net)
    assert stages == ["encoder.stages.0", "encoder.stages.1"]
    reg = DELTARegulariser(net, "encoder", stages, alpha=0.3)
    assert not any(p.requires_grad for p in reg.reference.parameters()) and not reg.reference.training
    assert not any("reference" in k for k in net.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    net.train()
    x = torch.randn(3, 2, 8, 8)
    net(x)
    value = reg()
    value.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if n.startswith("encoder")}
    assert net.seg_layers.weight.grad is None  # the head has no feature term
    # by hand: stage outputs of the live network (train mode) and the pretrained one (eval mode)
    net.zero_grad()
    h, h0, expected = x, x, 0.0
    for stage, stage0 in zip(net.encoder.stages, pretrained.encoder.stages):
        h, h0 = stage(h), stage0(h0).detach()
        expected = expected + 0.3 * ((h - h0) ** 2).sum() / h.numel()
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for n, p in net.named_parameters():
        if n.startswith("encoder"):
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7)
    # eval forwards (validation, prediction) are not recorded; the state restores the copy exactly
    net.eval()
    net(x)
    with pytest.raises(RuntimeError, match="no training forward"):
        reg()
    restored = DELTARegulariser(net, "encoder", stages, alpha=0.3, reference_state=reg.reference_state())
    for k, v in pretrained.encoder.state_dict().items():
        assert torch.equal(restored.reference.state_dict()[k], v), k


# -- BSS ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_bss_value_and_gradient_match_svd_formula(k):
    torch.manual_seed(4 + k)
    features = torch.randn(4, 6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    eta = 0.05
    value = bss_penalty(features, k=k, eta=eta)
    value.backward()
    f = _np(features)
    n, c = f.shape[:2]
    matrix = np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            matrix[i, j] = f[i, j].sum() / f[i, j].size  # one pooled feature vector per sample
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)  # descending
    expected = eta * sum(s[-i] ** 2 for i in range(1, k + 1))
    grad_matrix = sum(eta * 2 * s[-i] * np.outer(u[:, -i], vt[-i]) for i in range(1, k + 1))  # d sigma^2 = 2 sigma u v^T
    positions = f[0, 0].size
    assert value.item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(_np(features.grad), np.broadcast_to(grad_matrix[:, :, None, None, None] / positions,
                                                                   f.shape), rtol=1e-5, atol=1e-10)


# -- StochNorm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,cls,bn", [((6, 4, 7), StochNorm1d, nn.BatchNorm1d),
                                          ((4, 3, 5, 6), StochNorm2d, nn.BatchNorm2d),
                                          ((3, 5, 4, 3, 4), StochNorm3d, nn.BatchNorm3d)])
def test_stochnorm_p0_is_batchnorm_training_and_p1_uses_running_statistics(shape, cls, bn):
    torch.manual_seed(7)
    channels = shape[1]
    plain = bn(channels)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5), plain.bias.uniform_(-0.5, 0.5)
        plain.running_mean.uniform_(-1, 1), plain.running_var.uniform_(0.5, 2)
    x = torch.randn(*shape) * 2 + 0.3
    axes = (0,) + tuple(range(2, len(shape)))
    view = (1, channels) + (1,) * (len(shape) - 2)
    for p in (0.0, 1.0):
        sn = cls(channels)
        sn.load_state_dict(plain.state_dict(), strict=True)
        sn.p = p
        ref = copy.deepcopy(plain)
        old_mean, old_var = ref.running_mean.clone(), ref.running_var.clone()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = sn.train()(xa)
        if p == 0:
            expected = ref.train()(xb)
        else:  # BatchNorm with the moving statistics (those before this step)
            expected = ((xb - old_mean.view(view)) / torch.sqrt(old_var.view(view) + ref.eps)) \
                * ref.weight.view(view) + ref.bias.view(view)
            ref.train()(x)  # the running statistics are updated as by BatchNorm
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sn.running_mean, ref.running_mean)
        torch.testing.assert_close(sn.running_var, ref.running_var)
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    # p = 0.5: every channel is one of the two; eval mode is the plain BatchNorm's eval
    sn = cls(channels)
    sn.load_state_dict(plain.state_dict())
    moving = ((x - plain.running_mean.view(view)) / torch.sqrt(plain.running_var.view(view) + plain.eps)) \
        * plain.weight.view(view) + plain.bias.view(view)
    mean, var = x.mean(axes, keepdim=True), x.var(axes, unbiased=False, keepdim=True)
    batch = (x - mean) / torch.sqrt(var + plain.eps) * plain.weight.view(view) + plain.bias.view(view)
    out = sn.train()(x).detach()
    for c in range(channels):
        assert torch.allclose(out[:, c], moving[:, c], atol=1e-5) or torch.allclose(out[:, c], batch[:, c], atol=1e-5)
    after = bn(channels)
    after.load_state_dict(sn.state_dict(), strict=True)  # the statistics this step updated
    torch.testing.assert_close(sn.eval()(x), after.eval()(x))


def test_convert_to_stochnorm_keeps_state_dict_keys_and_values():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)),
                        nn.BatchNorm1d(3), nn.InstanceNorm3d(4, affine=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert convert_to_stochnorm(net, p=0.25) == 3
    assert [type(m).__name__ for m in (net[1], net[2][1], net[3])] == ["StochNorm3d", "StochNorm2d", "StochNorm1d"]
    assert type(net[4]) is nn.InstanceNorm3d and net[1].p == 0.25
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    plain = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)),
                          nn.BatchNorm1d(3), nn.InstanceNorm3d(4, affine=True))
    plain.load_state_dict(after, strict=True)  # and back into a BatchNorm network
    with pytest.raises(ValueError):
        convert_to_stochnorm(net, p=1.5)


# -- LP-FT, discriminative lr -------------------------------------------------------------------------
def test_lpft_freezing_and_discriminative_learning_rates():
    assert [frozen_epochs(100, f) for f in (0.0, 0.1, 0.001, 0.5)] == [0, 10, 1, 50]
    assert frozen_epochs(1, 0.5) == 0  # never the whole training
    net = TinyUNetLike()
    net.train()
    set_frozen(net.encoder, True)
    assert not any(p.requires_grad for p in net.encoder.parameters()) and net.seg_layers.weight.requires_grad
    assert not net.encoder.stages[0][1].training  # frozen BatchNorm statistics
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    running = net.encoder.stages[0][1].running_mean.clone()
    net(torch.randn(2, 2, 8, 8)).sum().backward()
    opt.step()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("encoder"), n
    assert torch.equal(net.encoder.stages[0][1].running_mean, running)
    set_frozen(net.encoder, False)
    assert all(p.requires_grad for p in net.parameters())

    groups = discriminative_param_groups(net, lambda n: n.startswith("encoder."), factor=0.25)
    assert [g["name"] for g in groups] == ["decoder_and_head", "encoder"]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = ScaledWarmupPolyLRScheduler(opt, peak_lr=0.01, max_epochs=10, warmup_epochs=2)
    for epoch in range(10):
        sched.step(epoch)
        base = sched.lr_at(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(base)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * base)
