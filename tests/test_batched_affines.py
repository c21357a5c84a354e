"""One recalibrated-affine call per network forward (``norms.batched``) on CPU.

Checked against the dense float64 formula (``tests/factories/norms.dense_oracle_s``) and against
the per-layer path, which it must reproduce bit for bit (the per-layer path set to "sorted" for
every C, since the batched one takes it for every C).
"""
import copy
import pickle

import pytest
import torch
from torch import nn

from nnunet_acnorm import acnorm_modules, convert_to_acnorm, fold_acnorm
from nnunet_acnorm.norms import batched, functional
from nnunet_acnorm.norms.functional import _SortedRecalibratedAffines
from nnunet_acnorm.norms.modules import PREPARED_AFFINE_KEY
from tests.factories.norms import dense_oracle_s as _oracle_s, pretrained_affines


def _layer_affines(c, gen, ties):
    sw = torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    sb = torch.randn(c, generator=gen, dtype=torch.float64)
    if ties:
        sb[: c * 2 // 3] = 0.0
    tw = sw + 0.05 * torch.randn(c, generator=gen, dtype=torch.float64)
    tb = sb + 0.05 * torch.randn(c, generator=gen, dtype=torch.float64)
    if ties:
        tb[: c // 3] = 0.0
    return sw, sb, tw.requires_grad_(True), tb.requires_grad_(True)


def test_batched_affines_and_gradients_equal_the_float64_oracle():
    gen = torch.Generator().manual_seed(0)
    sizes, taus = [1, 2, 3, 17, 64, 300, 4096, 5], [1.0, 0.5, 2.0, 0.1, 1.0, 0.05, 0.3, 1.0]
    layers = [_layer_affines(c, gen, ties=k % 2 == 1) for k, c in enumerate(sizes)]
    n = len(layers)
    tensors = [layer[i] for i in range(4) for layer in layers]
    out = _SortedRecalibratedAffines.apply(tuple(taus), None, *tensors)
    unused = 2   # layer 2's outputs get no gradient: its targets must get None, as unused parameters do
    loss, incoming = 0.0, []
    for k, c in enumerate(sizes):
        g = torch.randn(2, c, generator=gen, dtype=torch.float64)
        incoming.append(g)
        if k != unused:
            loss = loss + (out[k] * g[0]).sum() + (out[n + k] * g[1]).sum()
    loss.backward()
    for k, (sw, sb, tw, tb) in enumerate(layers):
        s = _oracle_s(sw, sb, tw, tb, taus[k])
        eye_s = torch.eye(sizes[k], dtype=torch.float64) + s
        tol = {"rtol": 1e-10, "atol": 1e-12}
        torch.testing.assert_close(out[k], tw.detach() @ eye_s.T, **tol)
        torch.testing.assert_close(out[n + k], tb.detach() @ eye_s.T, **tol)
        if k == unused:
            assert tw.grad is None and tb.grad is None
        else:
            torch.testing.assert_close(tw.grad, incoming[k][0] @ eye_s, **tol)
            torch.testing.assert_close(tb.grad, incoming[k][1] @ eye_s, **tol)


class _Net(nn.Module):
    """Norms of several sizes and types, one of them called twice, one branch unused in forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.wide = nn.Conv2d(16, 400, 1)
        self.gn = nn.GroupNorm(8, 400)
        self.narrow = nn.Conv2d(400, 16, 1)
        self.unused = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.gn(self.wide(x)))
        x = torch.relu(self.bn1(self.narrow(x)))     # the shared layer, a second time
        return self.head(x.mean((2, 3)))


def _pretrained_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = _Net().to(dtype)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            pretrained_affines(m)
    with torch.no_grad():
        net.bn1.bias[:5] = 0.0                        # ties
    convert_to_acnorm(net)
    with torch.no_grad():                              # targets away from the source
        for m in acnorm_modules(net).values():
            m.weight.add_(0.05 * torch.randn_like(m.weight))
            m.bias.add_(0.05 * torch.randn_like(m.bias))
    return net


class _CountCalls:
    def __init__(self, monkeypatch):
        self.batched = self.single = 0
        apply, single = _SortedRecalibratedAffines.apply, functional.recalibrated_affine

        def counted_apply(*args):
            self.batched += 1
            return apply(*args)

        def counted_single(*args, **kwargs):
            self.single += 1
            return single(*args, **kwargs)

        monkeypatch.setattr(_SortedRecalibratedAffines, "apply", counted_apply)
        from nnunet_acnorm.norms import modules
        monkeypatch.setattr(modules, "recalibrated_affine", counted_single)


def _step(net, x):
    net.zero_grad(set_to_none=True)
    y = net(x)
    y.square().sum().backward()
    return y.detach(), {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_network_forward_batches_its_layers_bit_for_bit(monkeypatch, dtype):
    net = _pretrained_net(dtype)
    per_layer = copy.deepcopy(net)
    batched.unbatch_affines(per_layer)
    monkeypatch.setitem(functional.SORTED_MIN_CHANNELS, "cpu", 1)
    calls = _CountCalls(monkeypatch)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    y, grads = _step(net, x)
    assert (calls.batched, calls.single) == (1, 0), "one call for the whole network"
    y_ref, grads_ref = _step(per_layer, x)
    assert calls.single == 3  # the per-layer copy: one per call of a layer
    assert torch.equal(y, y_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        if grads_ref[name] is None:
            assert grads[name] is None, name
        elif name.startswith("bn1."):   # used twice: one affine, its gradients summed first (other rounding)
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=1e-6 if dtype == torch.float32 else 1e-12)
        else:
            assert torch.equal(grads[name], grads_ref[name]), name
    assert grads["unused.weight"] is None and grads["bn1.weight"] is not None
    assert all(PREPARED_AFFINE_KEY not in m.__dict__ for m in net.modules()), "released after the forward"
    if dtype == torch.float64:   # and both equal the dense formula
        for layer in (net.bn1, net.gn):
            w, b = functional.recalibrated_affine(layer.source_weight, layer.source_bias, layer.weight,
                                                  layer.bias, layer.tau, method="dense")
            s = _oracle_s(layer.source_weight, layer.source_bias, layer.weight, layer.bias, layer.tau)
            torch.testing.assert_close(w, layer.weight.detach() @ (torch.eye(s.shape[0]) + s).T.double())


def test_eval_no_grad_children_and_errors_use_the_per_layer_paths(monkeypatch):
    net = _pretrained_net()
    calls = _CountCalls(monkeypatch)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        net(x)
        net(x)
    assert calls.batched == 0 and calls.single == 2, "eval without grad: each layer's cache, computed once"
    net.train()
    net.bn1(torch.randn(2, 16, 3, 3, dtype=torch.float64))   # a layer called on its own
    assert calls.batched == 0 and calls.single == 3

    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5, 6, 6, dtype=torch.float64))      # wrong channels: raises in the forward
    assert calls.batched == 1
    assert all(PREPARED_AFFINE_KEY not in m.__dict__ for m in net.modules()), "released after an error"
    assert not net.__dict__[batched._PREPARED_KEY]
    _step(net, x)
    assert calls.batched == 2


def test_frozen_layers_nesting_copies_and_folding(monkeypatch):
    net = _pretrained_net()
    calls = _CountCalls(monkeypatch)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    net.eval()
    net.requires_grad_(False)
    net.gn.requires_grad_(True)   # eval, with grad for one layer only: that one layer in the graph
    y = net(x)
    assert calls.batched == 0 and calls.single >= 1
    y.sum().backward()
    assert net.gn.weight.grad is not None
    net.requires_grad_(True)
    net.train()

    outer = nn.Sequential(net, nn.ReLU())
    convert_to_acnorm(outer)      # nothing left to convert; the outer network batches all layers
    before = calls.batched
    outer(x).sum().backward()
    assert calls.batched == before + 1, "the outer forward prepares; the inner one finds them prepared"
    for model in (copy.deepcopy(outer), pickle.loads(pickle.dumps(outer))):
        torch.testing.assert_close(model(x), outer(x), rtol=0, atol=0)
    fold_acnorm(outer)
    assert not outer._forward_pre_hooks and not outer._forward_hooks
    assert not net._forward_pre_hooks and not net._forward_hooks
    assert batched._LAYOUT_KEY not in net.__dict__


def test_the_network_layout_cache_follows_the_sources():
    net = _pretrained_net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    _step(net, x)
    entry = net.__dict__[batched._LAYOUT_KEY]["sorted"]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.step()                                     # targets move, sources stay
    _step(net, x)
    assert net.__dict__[batched._LAYOUT_KEY]["sorted"] is entry
    net.gn.set_source(net.gn.weight * 1.5, net.gn.bias)  # a new source: a new layout, and the new S
    y, _ = _step(net, x)
    assert net.__dict__[batched._LAYOUT_KEY]["sorted"] is not entry
    per_layer = copy.deepcopy(net)
    batched.unbatch_affines(per_layer)
    per_layer.gn.weight.grad = None
    torch.testing.assert_close(y, _step(per_layer, x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("taus", [[1e-5] * 4, [1e-4] * 4, [1e-3] * 4, [1e-2] * 4, [0.1] * 4, [1e-5, 0.1, 1e-3, 1e-4]],
                         ids=["1e-5", "1e-4", "1e-3", "1e-2", "0.1", "mixed"])
def test_calibrated_temperatures_are_exact_across_layers_without_overflow(taus):
    """The calibrated temperatures that occur in real networks (1e-5 .. 0.1, one per layer) on
    layers batched into one call: the decay across a layer boundary is exactly 0 (the sorted
    indicators jump down there, so exp(jump / tau) would overflow) and every output and gradient
    equals the float64 oracle; a RuntimeWarning (overflow in exp) fails the test."""
    gen = torch.Generator().manual_seed(3)
    sizes = [17, 300, 64, 5]
    layers = [_layer_affines(c, gen, ties=k == 1) for k, c in enumerate(sizes)]
    n = len(layers)
    out = _SortedRecalibratedAffines.apply(tuple(taus), None, *[layer[i] for i in range(4) for layer in layers])
    incoming = [torch.randn(2, c, generator=gen, dtype=torch.float64) for c in sizes]
    sum((out[k] * g[0]).sum() + (out[n + k] * g[1]).sum() for k, g in enumerate(incoming)).backward()
    for k, (sw, sb, tw, tb) in enumerate(layers):
        eye_s = torch.eye(sizes[k], dtype=torch.float64) + _oracle_s(sw, sb, tw, tb, taus[k])
        tol = {"rtol": 1e-10, "atol": 1e-12}
        torch.testing.assert_close(out[k], tw.detach() @ eye_s.T, **tol)
        torch.testing.assert_close(out[n + k], tb.detach() @ eye_s.T, **tol)
        torch.testing.assert_close(tw.grad, incoming[k][0] @ eye_s, **tol)
        torch.testing.assert_close(tb.grad, incoming[k][1] @ eye_s, **tol)
