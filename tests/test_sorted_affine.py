"""The sorted O(C log C) recalibrated affine and the eval-mode affine cache.

The oracle here is the formula itself, vectorised in float64 in the test factories
(``tests/factories/norms.dense_oracle_s``, no package code): A = softmax(-|yt_i - ys_j| / tau),
S = A where A >= diag(A), weight' = (I + S) gamma_t.
Both implementations of the sorted path are checked: NumPy (what CPU tensors use) and torch (what
other devices and torch.compile use, run here on CPU).
"""
import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_acnorm import ACBatchNorm2d, ACInstanceNorm3d
from nnunet_acnorm.norms import _sorted_numpy, functional
from nnunet_acnorm.norms.functional import calibrated_tau, recalibrated_affine
from nnunet_acnorm.norms.torch_compat import TORCH_VERSION
from tests.factories.norms import dense_oracle_s as _oracle_s, pretrained_affines


def _affines(c, case, gen):
    sw = torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    sw *= torch.sign(torch.randn(c, generator=gen, dtype=torch.float64))
    sb = torch.randn(c, generator=gen, dtype=torch.float64)
    if case == "ties":
        sb[: max(1, c * 2 // 3)] = 0.0          # many equal beta: identical indicators
    elif case == "all_tied":
        sw[:], sb[:] = 1.0, 0.0                 # untrained affines: every indicator 0
    elif case == "gamma_near_zero":
        sw[: max(1, c // 10)] = 1e-7 * torch.sign(sw[: max(1, c // 10)])
    tw = sw + 0.05 * torch.randn(c, generator=gen, dtype=torch.float64)
    tb = sb + 0.05 * torch.randn(c, generator=gen, dtype=torch.float64)
    if case == "ties":
        tb[: c // 3] = 0.0                      # targets exactly on the tied sources too
    if case == "gamma_near_zero":
        tw[-1] = 3e-7
    return sw, sb, tw, tb


def _torch_backend(sw, sb, tw, tb, tau):
    """Both outputs and the transposed product of the torch implementation (float64)."""
    ys, yt = sb / (sw.abs() + 1e-5), tb / (tw.abs() + 1e-5)
    kept, saved = functional._sorted_kept_sums(ys, yt, tau, torch.stack([tw, tb]))
    return kept, lambda v: functional._sorted_transposed(v, saved)


def _numpy_backend(sw, sb, tw, tb, tau):
    ys, yt = (sb / (sw.abs() + 1e-5)).numpy(), (tb / (tw.abs() + 1e-5)).numpy()
    kept, saved = _sorted_numpy.kept_sums(ys, yt, tau, torch.stack([tw, tb]).numpy())
    return torch.from_numpy(kept), lambda v: torch.from_numpy(_sorted_numpy.transposed(v.numpy(), saved))


CASES = ["plain", "ties", "all_tied", "gamma_near_zero"]


@pytest.mark.parametrize("backend", [_numpy_backend, _torch_backend], ids=["numpy", "torch"])
@pytest.mark.parametrize("c", [1, 2, 3, 17, 300, 4096])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tau_kind", ["one", "calibrated"])
def test_sorted_sums_equal_the_float64_oracle(backend, c, case, tau_kind):
    gen = torch.Generator().manual_seed(c * 7 + CASES.index(case))
    sw, sb, tw, tb = _affines(c, case, gen)
    tau = 1.0
    if tau_kind == "calibrated":  # from (at most) 256 channels: calibration itself is O(C^2) per step
        tau = calibrated_tau(sw[:256], sb[:256]) or 1.0
        if case == "plain" and c > 2:
            assert tau < 0.2
    s = _oracle_s(sw, sb, tw, tb, tau)
    kept, transposed = backend(sw, sb, tw, tb, tau)
    weights = torch.stack([tw, tb])
    scale = weights.abs().max()
    torch.testing.assert_close(kept, weights @ s.T, rtol=1e-10, atol=1e-13 * scale)
    v = torch.randn(2, c, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(transposed(v), v @ s, rtol=1e-10, atol=1e-13 * v.abs().sum())


@pytest.mark.parametrize("c", [5, 600])
def test_small_calibrated_tau_with_a_wide_spread_does_not_overflow(c):
    """tau ~ 1e-4 with indicators spread over ~10: exponents ~1e5, far beyond float64's exp range."""
    gen = torch.Generator().manual_seed(c)
    sw = torch.ones(c, dtype=torch.float64)
    sb = torch.linspace(-5, 5, c, dtype=torch.float64)[torch.randperm(c, generator=gen)]
    tw, tb = sw.clone(), sb + 1e-4 * torch.randn(c, generator=gen, dtype=torch.float64)
    tau = 1e-4
    s = _oracle_s(sw, sb, tw, tb, tau)
    for backend in (_numpy_backend, _torch_backend):
        kept, transposed = backend(sw, sb, tw, tb, tau)
        assert torch.isfinite(kept).all()
        torch.testing.assert_close(kept, torch.stack([tw, tb]) @ s.T, rtol=1e-10, atol=1e-12)
        v = torch.randn(2, c, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(transposed(v), v @ s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["sorted", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recalibrated_affine_outputs_and_gradients(method, dtype):
    c = 700  # above the CPU threshold: auto takes the sorted path
    assert method != "auto" or functional.use_sorted_path(c, "cpu")
    gen = torch.Generator().manual_seed(1)
    sw, sb, tw, tb = (t.to(dtype) for t in _affines(c, "ties", gen))
    tw.requires_grad_(True)
    tb.requires_grad_(True)
    weight, bias = recalibrated_affine(sw, sb, tw, tb, 0.5, method=method)
    assert weight.dtype == bias.dtype == dtype
    gw, gb = torch.randn(c, generator=gen).to(dtype), torch.randn(c, generator=gen).to(dtype)
    (weight * gw + bias * gb).sum().backward()
    assert tw.grad.dtype == dtype
    s = _oracle_s(sw, sb, tw, tb, 0.5)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(weight.double(), tw.detach().double() @ (torch.eye(c) + s).T, **tol)
    torch.testing.assert_close(bias.double(), tb.detach().double() @ (torch.eye(c) + s).T, **tol)
    torch.testing.assert_close(tw.grad.double(), gw.double() @ (torch.eye(c) + s), **tol)
    torch.testing.assert_close(tb.grad.double(), gb.double() @ (torch.eye(c) + s), **tol)


def test_dense_and_sorted_agree_in_a_module_above_the_threshold():
    torch.manual_seed(0)
    plain = pretrained_affines(nn.BatchNorm2d(512).double())
    layer = ACBatchNorm2d.from_norm(plain)
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn(512, dtype=torch.float64))
    x = torch.randn(2, 512, 3, 3, dtype=torch.float64)
    y = layer(x)  # auto: sorted
    y.square().sum().backward()
    grads = (layer.weight.grad.clone(), layer.bias.grad.clone())
    w, b = recalibrated_affine(layer.source_weight, layer.source_bias, layer.weight, layer.bias,
                               layer.tau, method="dense")
    layer.zero_grad()
    y_dense = nn.functional.batch_norm(x, None, None, w, b, True)
    y_dense.square().sum().backward()
    torch.testing.assert_close(y, y_dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], layer.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[1], layer.bias.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(TORCH_VERSION < (2, 2), reason="torch 2.1's TorchDynamo cannot trace the sorted path's autograd "
                    "function with fullgraph=True (docs/development.md, torch floor); nnU-Net compiles without "
                    "fullgraph, where it runs eager behind a graph break")
def test_sorted_path_under_torch_compile():
    """torch.compile traces the torch implementation (NumPy is not traceable)."""
    torch.manual_seed(0)
    layer = pretrained_affines(ACBatchNorm2d(400), set_source=True)
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn(400))
    x = torch.randn(2, 400, 3, 3)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
    y, y_compiled = layer(x), compiled(x)
    torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_compiled.sum().backward()
    torch.testing.assert_close(compiled.weight.grad, layer.weight.grad, rtol=1e-5, atol=1e-5)


def test_the_threshold_depends_on_device_and_size():
    cpu = functional.SORTED_MIN_CHANNELS["cpu"]
    assert functional.use_sorted_path(cpu, "cpu") and not functional.use_sorted_path(cpu - 1, "cpu")
    assert not functional.use_sorted_path(4096, "cuda")
    assert not functional.use_sorted_path(10 ** 6, "meta")
    with pytest.raises(ValueError, match="method"):
        recalibrated_affine(torch.ones(3), torch.zeros(3), torch.ones(3), torch.zeros(3), method="fast")


# -- near-ties: the kept set is decided exactly ---------------------------------------------------

def _exact_kept(ys, yt):
    ys, yt = [Fraction(float(v)) for v in ys], [Fraction(float(v)) for v in yt]
    return [[abs(t - y) <= abs(t - ys[i]) for y in ys] for i, t in enumerate(yt)]


def test_near_ties_at_the_mirror_point_are_decided_exactly():
    """Sources at the mirror point 2 yt_i - ys_i (an exact tie: kept) and one ulp either side."""
    gen = np.random.default_rng(0)
    ys = list(gen.normal(size=6))
    yt = list(np.array(ys) + gen.normal(scale=0.3, size=6))
    for i in range(6):
        mirror = 2 * yt[i] - ys[i]
        ys += [mirror, np.nextafter(mirror, np.inf), np.nextafter(mirror, -np.inf)]
        yt += [gen.normal()] * 3
    ys, yt = np.array(ys), np.array(yt)
    expected = np.array(_exact_kept(ys, yt))
    for y, order, rank, q, low, high in (
            _sorted_numpy.kept_intervals(ys, yt),
            (t.numpy() for t in functional._kept_intervals(torch.from_numpy(ys), torch.from_numpy(yt)))):
        kept = np.zeros_like(expected)
        for i in range(len(ys)):
            kept[i, order[low[i]:high[i]]] = True
        assert (kept == expected).all()
        assert kept.diagonal().all()


# -- the eval-mode affine cache ---------------------------------------------------------------------

class _Counting:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = functional.recalibrated_affine

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        from nnunet_acnorm.norms import modules
        monkeypatch.setattr(modules, "recalibrated_affine", counted)


def _layer(c=6, cls=ACBatchNorm2d):
    torch.manual_seed(0)
    plain = cls.plain_norm_class(c) if cls is ACBatchNorm2d else cls.plain_norm_class(c, affine=True)
    layer = cls.from_norm(pretrained_affines(plain))
    with torch.no_grad():
        layer.weight.add_(0.2)
    return layer


@torch.no_grad()
def _predict(layer, x):
    return layer(x)


def test_eval_affine_is_computed_once_per_parameter_version(monkeypatch):
    counter = _Counting(monkeypatch)
    layer = _layer().eval()
    x = torch.randn(2, 6, 4, 4)
    reference = _predict(layer, x)
    for _ in range(3):
        torch.testing.assert_close(_predict(layer, x), reference, rtol=0, atol=0)
    with torch.inference_mode():
        layer(x)
        layer(x)
    assert counter.calls == 2  # once under no_grad, once in inference mode
    w, b = recalibrated_affine(layer.source_weight, layer.source_bias, layer.weight, layer.bias, layer.tau)
    expected = nn.functional.batch_norm(x, layer.running_mean, layer.running_var, w, b, False)
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)

    def changed(action):
        before = counter.calls
        action()
        out = _predict(layer, x)
        assert counter.calls == before + 1, "the cache must be invalidated"
        _predict(layer, x)
        assert counter.calls == before + 1, "and then reused"
        return out

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def step():
        layer.weight.grad = torch.ones(6)
        layer.bias.grad = torch.ones(6)
        optimizer.step()

    out = changed(step)
    assert not torch.equal(out, reference)
    changed(lambda: layer.load_state_dict(copy.deepcopy(layer.state_dict())))
    changed(lambda: layer.set_source(layer.weight * 1.1, layer.bias))
    changed(lambda: setattr(layer, "tau", 0.5))
    changed(lambda: layer.double() and layer.float())
    with torch.no_grad():
        changed(lambda: layer.bias.copy_(torch.zeros(6)))
    changed(lambda: setattr(layer, "weight", nn.Parameter(torch.ones(6))))
    changed(layer.clear_affine_cache)
    # .data bypasses the version counter: the documented limitation, and its remedy
    stale = _predict(layer, x)
    layer.weight.data.mul_(2.0)
    assert torch.equal(_predict(layer, x), stale)
    layer.clear_affine_cache()
    assert not torch.equal(_predict(layer, x), stale)


def test_no_cache_in_training_or_where_gradients_are_needed(monkeypatch):
    counter = _Counting(monkeypatch)
    layer = _layer(cls=ACInstanceNorm3d)
    x = torch.randn(2, 6, 3, 3, 3)
    layer.train()
    layer(x)
    layer(x)
    assert counter.calls == 2
    layer.eval()
    layer(x).sum().backward()  # eval mode with grad: the affine must stay in the graph
    layer(x).sum().backward()
    assert counter.calls == 4 and layer.weight.grad is not None
    with torch.no_grad():
        layer(x)
        layer(x)
    assert counter.calls == 5


def test_cache_across_inference_mode_and_copies():
    layer = _layer()
    layer.eval()
    x = torch.randn(2, 6, 4, 4)
    with torch.inference_mode():
        y_inference = layer(x)
    with torch.no_grad():
        y = layer(x)       # not an inference tensor: recomputed outside inference mode
    x_grad = x.clone().requires_grad_(True)
    layer.requires_grad_(False)
    layer(x_grad).sum().backward()  # input gradients through cached (non-inference) affines
    torch.testing.assert_close(y, y_inference, rtol=0, atol=0)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.weight.mul_(3.0)
        assert not torch.equal(clone(x), layer(x))


def test_unfolded_eval_model_equals_folded_model():
    from nnunet_acnorm import convert_to_acnorm, fold_acnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.GroupNorm(2, 8))
    convert_to_acnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 9, 9)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    folded = copy.deepcopy(model)
    fold_acnorm(folded)
    with torch.no_grad():
        torch.testing.assert_close(model(x), folded(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), folded(x), rtol=1e-6, atol=1e-6)
        assert math.isfinite(float(model(x).sum()))


def test_the_source_layout_is_reused_only_while_source_and_tau_are_unchanged():
    torch.manual_seed(0)
    layer = pretrained_affines(ACBatchNorm2d(400).double(), set_source=True)

    def check():
        with torch.no_grad():
            layer.weight.add_(0.05 * torch.randn(400, dtype=torch.float64))
        w, b = layer.recalibrated_affine()
        s = _oracle_s(layer.source_weight, layer.source_bias, layer.weight, layer.bias, layer.tau)
        torch.testing.assert_close(w, layer.weight.detach() @ (torch.eye(400) + s).T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, layer.bias.detach() @ (torch.eye(400) + s).T, rtol=1e-10, atol=1e-12)

    check()
    entry = layer._layout_cache["sorted"]
    check()
    assert layer._layout_cache["sorted"] is entry, "a new target, the same source: reused"
    layer.tau = 0.3
    check()
    assert layer._layout_cache["sorted"] is not entry
    entry = layer._layout_cache["sorted"]
    with torch.no_grad():
        layer.source_bias.mul_(2.0)
    check()
    assert layer._layout_cache["sorted"] is not entry
    layer.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert layer._layout_cache == {}
    check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    gen = torch.Generator().manual_seed(2)
    sw, sb, tw, tb = (t.to(dtype) for t in _affines(400, "plain", gen))
    tw.requires_grad_(True)
    weight, bias = recalibrated_affine(sw, sb, tw, tb, method="sorted")
    assert weight.dtype == dtype
    weight.float().sum().backward()
    assert tw.grad.dtype == dtype
    s = _oracle_s(sw, sb, tw, tb, 1.0)
    torch.testing.assert_close(weight.double(), tw.detach().double() @ (torch.eye(400) + s).T,
                               rtol=2e-2, atol=2e-2)


def test_dense_path_with_several_threads_equals_the_one_thread_result():
    gen = torch.Generator().manual_seed(5)
    sw, sb, tw, tb = (t.float() for t in _affines(200, "ties", gen))
    g = torch.randn(2, 200, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            w, b = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
            out = recalibrated_affine(sw, sb, w, b, 0.7, method="dense")
            (out[0] * g[0] + out[1] * g[1]).sum().backward()
            assert torch.get_num_threads() == n
            results.append((out[0], out[1], w.grad, b.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_search_guesses_never_change_the_result(monkeypatch):
    """The interval search starts from a guess (the last call's counts, or the own source's tie
    group) that is checked exactly: whatever the drift of the targets between calls, and whichever
    of its branches it takes (guesses right, corrected in the window, bisected over the segment,
    full search), the sums equal the dense float64 oracle and a fresh computation."""
    gen = torch.Generator().manual_seed(11)
    sizes = [40, 300, 2100]
    parts = [_affines(c, "ties" if c == 300 else "plain", gen) for c in sizes]
    sw, sb, tw, tb = (torch.cat([p[k] for p in parts]) for k in range(4))
    offsets = [0, 40, 340, 2440]
    ys = (sb / (sw.abs() + 1e-5)).numpy()
    layout = _sorted_numpy.source_layout(ys, 0.5, offsets)
    branches = []
    bisect = _sorted_numpy._bisect
    monkeypatch.setattr(_sorted_numpy, "_bisect",
                        lambda y, v, lo, hi: (branches.append(v.size), bisect(y, v, lo, hi))[1])
    drift = torch.zeros_like(tw)
    calls = []
    for step, scale in enumerate([0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1.0, 1e-6]):
        drift += scale * torch.randn(drift.shape, generator=gen, dtype=torch.float64)
        tw2, tb2 = tw, tb + drift
        yt = (tb2 / (tw2.abs() + 1e-5)).numpy()
        weights = torch.stack([tw2, tb2]).numpy()
        before = len(branches)
        kept, _ = _sorted_numpy.kept_sums(ys, yt, 0.5, weights, layout)
        calls.append(branches[before:])   # []: full search; [window, segment]: corrected
        fresh, _ = _sorted_numpy.kept_sums(ys, yt, 0.5, weights, _sorted_numpy.source_layout(ys, 0.5, offsets))
        assert np.array_equal(kept, fresh), step
        for k, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            s = _oracle_s(sw[lo:hi], sb[lo:hi], tw2[lo:hi], tb2[lo:hi], 0.5)
            torch.testing.assert_close(torch.from_numpy(kept[:, lo:hi]), torch.stack([tw2, tb2])[:, lo:hi] @ s.T,
                                       rtol=1e-10, atol=1e-12)
    assert calls[0] == [] and calls[5] == [], "far from the guesses: the full search"
    corrected = [c for c in calls if c]
    assert corrected and all(len(c) == 2 for c in corrected)
    assert any(window > 0 for window, _ in corrected) and any(far > 0 for _, far in corrected), \
        "some guesses corrected within the window, some over the whole segment"
