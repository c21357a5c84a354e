"""Which implementation computes an AC-Norm layer's recalibrated affine: the one home of the device
policy (:func:`affine_path`, for a layer's channel count, its device and the compile state).

The paths compute the same quantity, ((I + S) gamma_t, (I + S) beta_t):

==========================  ======================================================================
path                        where
==========================  ======================================================================
:data:`DENSE`               S as a C x C matrix in torch (``functional.sparse_correlation``),
                            below :data:`SORTED_MIN_CHANNELS` of the device type (every C on a
                            device type without one): CPU with one torch thread or under
                            torch.compile, other devices
:data:`DENSE_ONE_THREAD`    the dense ops on a CPU with several torch threads, run with one
                            (outside torch.compile): the same ops, the result of a one-thread run
:data:`SORTED_NUMPY`        the sorted O(C log C) path in NumPy (``_sorted_numpy``): CPU, outside
                            torch.compile (NumPy cannot be traced)
:data:`SORTED_TORCH`        the sorted path in torch (``functional._sorted_kept_sums``): other
                            devices with float64, and the CPU under torch.compile
:data:`BATCHED`             the NumPy sorted path for all the network's layers in one call
                            (``norms.batched``, asked with ``batched=True``): CPU, outside
                            torch.compile, whatever C
==========================  ======================================================================

Callers: ``functional.recalibrated_affine`` (a layer's own call), ``modules._ACNorm`` (whether it
keeps the NumPy path's source layout), ``batched`` (which layers join the network's one call).
"""
from __future__ import annotations

import torch

from nnunet_acnorm.norms.torch_compat import has_float64

DENSE, DENSE_ONE_THREAD, SORTED_NUMPY, SORTED_TORCH, BATCHED = (
    "dense", "dense_one_thread", "sorted_numpy", "sorted_torch", "batched")
#: the methods ``recalibrated_affine`` accepts (``"sorted"`` and ``"dense"`` force the algorithm)
METHODS = ("auto", "dense", "sorted")

#: the smallest channel count for which ``recalibrated_affine(method="auto")`` takes the sorted
#: O(C log C) path, per device type; below it the dense C x C path is faster. CPU: where the
#: forward + backward times of the two paths cross for the affine alone of one AC-Norm layer (CPU
#: time, one thread): ``benchmarks/benchmark_norm_layers.py --affine-only`` measures it, the figures
#: are in docs/performance.md ("The recalibrated affine alone"). With several torch threads on a
#: machine whose cores are busy, every small dense op opens a parallel region that waits for a core
#: (same page; hence the dense path on one thread); the sorted path runs single-threaded in NumPy. The
#: rule does not depend on the thread count, so that results do not either. CUDA: not measured
#: (nothing has run on a GPU: docs/performance.md); the dense path is a few large kernels and the
#: sorted one about a hundred small ones, so the dense one is kept up to 8192 channels (its saved S
#: is then 256 MiB). Other devices: dense. Change these where that benchmark shows otherwise.
SORTED_MIN_CHANNELS = {"cpu": 300, "cuda": 8192}


def use_sorted_path(num_channels: int, device: torch.device | str) -> bool:
    """Whether ``recalibrated_affine(method="auto")`` takes the sorted path for this layer."""
    threshold = SORTED_MIN_CHANNELS.get(torch.device(device).type)
    return threshold is not None and num_channels >= threshold


def affine_path(num_channels: int, device: torch.device | str, compiling: bool, method: str = "auto",
                batched: bool = False) -> str:
    """The path (:data:`DENSE`, :data:`DENSE_ONE_THREAD`, :data:`SORTED_NUMPY`, :data:`SORTED_TORCH`
    or :data:`BATCHED`) that computes the recalibrated affine of a layer of ``num_channels`` channels
    whose parameters are on ``device``, traced by torch.compile or not (``compiling``).

    ``method``: ``"auto"`` (sorted where :func:`use_sorted_path` says it is faster), ``"sorted"``
    (ValueError on a device without float64, such as mps) or ``"dense"``. ``batched``: the layer runs
    in a network's forward, whose affines :mod:`~nnunet_acnorm.norms.batched` may compute in one call:
    :data:`BATCHED` where that is possible, else the layer's own path.
    """
    if method not in METHODS:
        raise ValueError(f"recalibrated_affine: method must be 'auto', 'dense' or 'sorted', got {method!r}")
    device_type = torch.device(device).type
    numpy = device_type == "cpu" and not compiling
    if batched and numpy and method != "dense":
        return BATCHED
    sorted_path = method == "sorted" or (method == "auto" and use_sorted_path(num_channels, device))
    if sorted_path:
        if not has_float64(device_type):
            raise ValueError(f"recalibrated_affine: the sorted path computes in float64, which {device_type} tensors "
                             "cannot hold; use method='dense' (or 'auto')")
        return SORTED_NUMPY if numpy else SORTED_TORCH
    # (torch.get_num_threads only outside torch.compile, which need not trace it)
    return DENSE_ONE_THREAD if numpy and torch.get_num_threads() > 1 else DENSE
