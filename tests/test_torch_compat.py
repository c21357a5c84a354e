"""The torch-version and device-type guards (nnunet_acnorm/norms/torch_compat.py) and the paths that
use them: AC-Norm on a device type without autocast (the meta device here; mps on older torch), no
float64 where the device has none (mps), the weights-only loading of older torch."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_acnorm.norms import ACBatchNorm2d, ACInstanceNorm3d, convert_to_acnorm, functional, torch_compat
from tests.factories.norms import pretrained_affines


def test_autocast_off_where_the_device_type_has_no_autocast():
    assert torch_compat.has_autocast("cpu") and "meta" not in torch_compat.AUTOCAST_DEVICE_TYPES
    with torch_compat.autocast_off("meta"):   # torch.autocast("meta", enabled=False) raises
        pass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
        with torch_compat.autocast_off("cpu"):
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_acnorm_network_trains_on_the_meta_device():
    """A training step of AC-Norm layers on a device type without autocast (meta: shapes only, no
    host reads); it failed in the affine's autocast block (torch.autocast("meta", enabled=False))."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(),
                            nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.LeakyReLU(), nn.Conv3d(4, 2, 1))
    for norm in (network[1], network[4]):
        pretrained_affines(norm)
    convert_to_acnorm(network, tau="auto")   # the temperature is calibrated here, on the CPU
    network = network.to("meta").train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    output = network(torch.randn(2, 1, 6, 6, 6, device="meta"))
    output.square().mean().backward()
    optimizer.step()
    assert output.shape == (2, 2, 6, 6, 6) and output.device.type == "meta"
    assert network[1].weight.grad is not None and network[1].weight.grad.device.type == "meta"


def test_sorted_path_is_refused_where_the_device_has_no_float64(monkeypatch):
    """mps has no float64; the sorted path computes in it. Checked by the device-type rule on the
    meta device, marked as one without float64 for the test."""
    assert not torch_compat.has_float64("mps") and torch_compat.has_float64("cuda")
    monkeypatch.setattr(torch_compat, "NO_FLOAT64_DEVICE_TYPES", frozenset({"mps", "meta"}))
    w, b = torch.ones(8, device="meta"), torch.zeros(8, device="meta")
    with pytest.raises(ValueError, match="float64, which meta tensors cannot hold; use method='dense'"):
        functional.recalibrated_affine(w, b, w, b, 1.0, method="sorted")
    weight, bias = functional.recalibrated_affine(w, b, w, b, 1.0, method="auto")   # dense: float32
    assert weight.shape == (8,) and weight.dtype == torch.float32


def test_calibration_is_computed_on_the_cpu_in_float64_whatever_the_input():
    """The temperature of float32 (or float16) affines is the float64 one: the calibration copies the
    C-vectors to the CPU as float64 (what keeps it off an mps device)."""
    gen = torch.Generator().manual_seed(3)
    w64 = 1 + 0.3 * torch.randn(32, generator=gen, dtype=torch.float64)
    b64 = 0.5 * torch.randn(32, generator=gen, dtype=torch.float64)
    w32, b32 = w64.float(), b64.float()
    expected = functional.calibrated_tau(w32.double(), b32.double())
    assert expected is not None
    assert functional.calibrated_tau(w32, b32) == expected
    assert functional.source_diagonal(w32, b32, expected) == pytest.approx(functional.DEFAULT_DIAGONAL, rel=1e-5)


def test_grad_scaler_and_is_compiling_exist_on_this_torch():
    """torch's own is_compiling (TorchDynamo knows it: no graph break), and nnU-Net's loss scaler."""
    newest = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    assert torch_compat.is_compiling is (newest or torch._dynamo.is_compiling) and not torch_compat.is_compiling()
    scaler = torch_compat.grad_scaler()
    assert hasattr(scaler, "scale") and hasattr(scaler, "unscale_")


def _nnunet_like_checkpoint() -> dict:
    from collections import OrderedDict
    return {"network_weights": OrderedDict(w=torch.randn(3, 2), b=torch.arange(3)),
            "init_args": {"device": torch.device("cpu"), "fold": 0},
            "logging": {"ema_fg_dice": [np.float64(0.5), np.float32(0.25)], "shape": np.array([1, 2])},
            "_best_ema": np.float64(0.5), "dtypes": [torch.float16, torch.bfloat16, torch.bool]}


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_weights_only_fallback_of_older_torch_loads_checkpoints_and_refuses_code(tmp_path, monkeypatch,
                                                                                legacy_format):
    """The restricted loading that torch < 2.4 uses (torch has no allow-list there) reads what
    ``torch.load(weights_only=True)`` with the numpy allow-list reads, and refuses pickled code
    with the message of torch's weights-only loader; also where weights-only loading is forced
    (the safe predict commands set TORCH_FORCE_WEIGHTS_ONLY_LOAD, and torch.load then refuses any
    pickle module). Run on this torch, whatever its version."""
    from nnunet_acnorm.checkpoints.io import numpy_safe_globals

    path = tmp_path / "checkpoint.pth"
    checkpoint = _nnunet_like_checkpoint()
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy_format)
    reference = torch_compat.weights_only_load(path, "cpu", numpy_safe_globals())
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    loaded = torch_compat.restricted_load(path, "cpu", numpy_safe_globals())
    for result in (loaded, reference):
        assert torch.equal(result["network_weights"]["w"], checkpoint["network_weights"]["w"])
        assert result["init_args"]["device"] == torch.device("cpu") and result["_best_ema"] == 0.5
        assert result["dtypes"] == checkpoint["dtypes"] and result["logging"]["shape"].tolist() == [1, 2]
    marker = tmp_path / "pwned"
    torch.save({"network_weights": {}, "x": _RunsCode(str(marker))}, tmp_path / "evil.pth",
               _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(pickle.UnpicklingError, match=r"Weights only load failed.*GLOBAL (posix|os)\.system"):
        torch_compat.restricted_load(tmp_path / "evil.pth", "cpu", numpy_safe_globals())
    assert not marker.exists()


def test_acnorm_layers_build_and_convert_without_the_newest_norm_classes():
    """conversion names nn.RMSNorm only where torch has it (2.4); the rest works either way."""
    assert torch_compat.RMS_NORM is getattr(nn, "RMSNorm", None)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv3d(4, 4, 1), nn.InstanceNorm3d(4, affine=True))
    convert_to_acnorm(net)
    assert isinstance(net[1], ACBatchNorm2d) and isinstance(net[3], ACInstanceNorm3d)


def test_weights_only_fallback_reads_numpy_scalars_of_either_numpy(tmp_path):
    """NumPy 2 pickles its scalars as numpy._core.multiarray.scalar, NumPy 1 as numpy.core....: a
    checkpoint written under either loads under both (the older torch's path runs with NumPy 1)."""
    from nnunet_acnorm.checkpoints.io import numpy_safe_globals

    path = tmp_path / "legacy.pth"
    torch.save({"ema": np.float64(0.5)}, path, _use_new_zipfile_serialization=False)   # protocol 2: text GLOBALs
    data = path.read_bytes()
    mine, other = (b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    if mine not in data:
        mine, other = other, mine
    assert mine in data
    path.write_bytes(data.replace(mine, other))
    assert torch_compat.restricted_load(path, "cpu", numpy_safe_globals())["ema"] == 0.5
