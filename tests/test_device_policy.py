"""The device policy on its own: which path computes a layer's recalibrated affine
(norms/device_policy.py), and that the callers take the path it picks."""
import pytest
import torch
from torch import nn

from nnunet_acnorm import ACBatchNorm2d
from nnunet_acnorm.norms import device_policy, functional, torch_compat
from nnunet_acnorm.norms.device_policy import (BATCHED, DENSE, DENSE_ONE_THREAD, SORTED_MIN_CHANNELS, SORTED_NUMPY,
                                               SORTED_TORCH, affine_path)
from tests.factories.norms import pretrained_affines


@pytest.fixture
def threads():
    """``threads(n)``: torch's intra-op thread count for the test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_cpu_paths_by_channels_threads_and_compile_state(threads):
    low = SORTED_MIN_CHANNELS["cpu"]
    threads(1)
    assert affine_path(low - 1, "cpu", compiling=False) == DENSE
    assert affine_path(low, "cpu", compiling=False) == SORTED_NUMPY
    assert affine_path(low, torch.device("cpu"), compiling=True) == SORTED_TORCH   # NumPy cannot be traced
    assert affine_path(low - 1, "cpu", compiling=True) == DENSE
    threads(2)
    assert affine_path(low - 1, "cpu", compiling=False) == DENSE_ONE_THREAD
    assert affine_path(low - 1, "cpu", compiling=True) == DENSE                  # traced: the plain ops
    assert affine_path(10 ** 5, "cpu", compiling=False, method="dense") == DENSE_ONE_THREAD
    assert affine_path(8, "cpu", compiling=False, method="sorted") == SORTED_NUMPY


def test_batched_only_on_the_cpu_outside_compile():
    """A layer of a network's forward joins the one call whatever its C, on the CPU and not traced;
    elsewhere it keeps its own path. ``method='dense'`` is never batched (the batch is sorted)."""
    assert affine_path(8, "cpu", compiling=False, batched=True) == BATCHED
    assert affine_path(10 ** 4, "cpu", compiling=False, batched=True) == BATCHED
    assert affine_path(10 ** 4, "cpu", compiling=True, batched=True) == SORTED_TORCH
    assert affine_path(8, "cuda", compiling=False, batched=True) == DENSE
    assert affine_path(8, "cpu", compiling=False, method="dense", batched=True) in (DENSE, DENSE_ONE_THREAD)


def test_other_devices_and_bad_methods(monkeypatch):
    cuda = SORTED_MIN_CHANNELS["cuda"]
    assert affine_path(cuda - 1, "cuda", compiling=False) == DENSE
    assert affine_path(cuda, "cuda", compiling=False) == SORTED_TORCH
    assert affine_path(10 ** 6, "mps", compiling=False) == DENSE     # no threshold (and no float64)
    assert affine_path(10 ** 6, "meta", compiling=False) == DENSE
    with pytest.raises(ValueError, match="float64, which mps tensors cannot hold; use method='dense'"):
        affine_path(8, "mps", compiling=False, method="sorted")
    with pytest.raises(ValueError, match="method must be 'auto', 'dense' or 'sorted', got 'fast'"):
        affine_path(8, "cpu", compiling=False, method="fast")
    monkeypatch.setitem(SORTED_MIN_CHANNELS, "cpu", 4)   # the table is the one the rule reads
    assert affine_path(4, "cpu", compiling=False) == SORTED_NUMPY and functional.use_sorted_path(4, "cpu")
    assert functional.SORTED_MIN_CHANNELS is SORTED_MIN_CHANNELS and device_policy.has_float64 is \
        torch_compat.has_float64


@pytest.mark.parametrize("channels,n_threads,expected", [(32, 1, DENSE), (32, 2, DENSE_ONE_THREAD),
                                                         (SORTED_MIN_CHANNELS["cpu"], 2, SORTED_NUMPY)])
def test_recalibrated_affine_and_the_layer_take_the_chosen_path(threads, channels, n_threads, expected):
    """The autograd node of the affine shows the path that ran; only the NumPy sorted path keeps the
    source layout in the layer."""
    threads(n_threads)
    assert affine_path(channels, "cpu", compiling=False) == expected
    node = {DENSE: "AddmvBackward", DENSE_ONE_THREAD: "_DenseOneThreadBackward",
            SORTED_NUMPY: "_SortedRecalibratedAffineBackward"}[expected]
    torch.manual_seed(0)
    layer = ACBatchNorm2d.from_norm(pretrained_affines(nn.BatchNorm2d(channels)))
    weight, _ = layer.recalibrated_affine()
    assert type(weight.grad_fn).__name__.startswith(node), type(weight.grad_fn).__name__
    assert bool(layer._layout_cache) == (expected == SORTED_NUMPY)
