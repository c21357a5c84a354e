"""One home for what differs between the torch versions and device types nnunet-acnorm supports.

nnU-Net 2.8 allows torch >= 2.1.2 and trains on ``-device cuda``, ``cpu`` and ``mps``. The code
elsewhere calls these helpers instead of the newest torch API:

- :func:`is_compiling`: ``torch.compiler.is_compiling`` (torch >= 2.3), else
  ``torch._dynamo.is_compiling``.
- :func:`autocast_off`: a block with autocast off for a device type, or no block at all where the
  device type has no autocast (``torch.autocast`` raises there even with ``enabled=False``: the
  meta device, mps before torch 2.5).
- :func:`has_float64`: whether tensors of a device type can be float64 (mps cannot).
- :func:`grad_scaler`: ``torch.amp.GradScaler("cuda")`` (torch >= 2.3), else
  ``torch.cuda.amp.GradScaler()``.
- :data:`RMS_NORM`: ``nn.RMSNorm`` (torch >= 2.4) or None; :data:`TORCH_VERSION`: (major, minor).
- :func:`weights_only_load`: ``torch.load(weights_only=True)`` with extra allowed globals:
  ``torch.serialization.safe_globals`` (torch >= 2.5), ``add_safe_globals`` (2.4), else
  :func:`restricted_load`, torch's file readers with a restricted unpickler that allows the
  weights-only globals of newer torch plus the extra ones (the same files load, the same ones are
  refused, with the message of torch's weights-only loader).
"""
from __future__ import annotations

import contextlib
import functools
import pickle
import types
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

#: (major, minor) of the running torch
TORCH_VERSION: tuple[int, int] = tuple(int(part) for part in torch.__version__.split(".")[:2])

#: nn.RMSNorm where torch has it (2.4), else None
RMS_NORM: type[nn.Module] | None = getattr(nn, "RMSNorm", None)

#: device types without float64 tensors
NO_FLOAT64_DEVICE_TYPES = frozenset({"mps"})


try:  # whether the caller is being traced by torch.compile; torch's own function either way, which
    # TorchDynamo knows (no graph break)
    from torch.compiler import is_compiling  # torch >= 2.3
except ImportError:
    from torch._dynamo import is_compiling


def _accepts_autocast(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)
    if check is not None:
        return bool(check(device_type))
    try:  # torch < 2.4: ask the constructor, with autocast off
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, enabled=False):
                pass
    except Exception:  # noqa: BLE001 - whatever it raises, this device type has no usable autocast
        return False
    return True


#: the device types ``torch.autocast`` accepts on this torch (decided once, at import: a constant that
#: torch.compile traces without a graph break)
AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "mps", "xpu", "hpu", "mtia", "meta")
                                  if _accepts_autocast(d))


def has_autocast(device_type: str) -> bool:
    """Whether ``torch.autocast`` accepts ``device_type`` (on this torch)."""
    return device_type in AUTOCAST_DEVICE_TYPES


def autocast_off(device_type: str):
    """A context in which autocast is off for ``device_type`` (nothing to switch off where the
    device type has no autocast)."""
    if device_type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def has_float64(device_type: str) -> bool:
    """Whether tensors of ``device_type`` can be float64."""
    return device_type not in NO_FLOAT64_DEVICE_TYPES


def grad_scaler():
    """nnU-Net's loss scaler for CUDA mixed precision, on any supported torch."""
    amp_scaler = getattr(torch.amp, "GradScaler", None)
    if amp_scaler is not None:
        return amp_scaler("cuda")
    return torch.cuda.amp.GradScaler()


def weights_only_load(path, map_location: Any, allowed_globals: Iterable, load: Callable = torch.load) -> Any:
    """``load(path, weights_only=True)`` with ``allowed_globals`` (classes or functions whose pickled
    references may be rebuilt) allowed besides torch's own. ``load``: ``torch.load`` or the function
    it was before a command replaced it."""
    allowed_globals = list(allowed_globals)
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals(allowed_globals):
            return load(path, map_location=map_location, weights_only=True)
    if hasattr(serialization, "add_safe_globals"):  # torch 2.4: no scoped form
        serialization.add_safe_globals(allowed_globals)
        return load(path, map_location=map_location, weights_only=True)
    return restricted_load(path, map_location, allowed_globals)


def restricted_load(path, map_location: Any, allowed_globals: Iterable) -> Any:
    """What ``torch.load`` does with a file (zip archive or legacy format), unpickled by
    :func:`_restricted_pickle_module`: the weights-only loading of torch < 2.4, which has no allow-list.
    Through torch.load's own file readers, not torch.load itself: that refuses any pickle module
    where weights-only loading is forced (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which the safe predict
    commands set)."""
    module = _restricted_pickle_module(tuple(allowed_globals))
    with serialization_files(path) as (archive, opened):
        if archive is not None:
            return torch.serialization._load(archive, map_location, module, encoding="utf-8")
        return torch.serialization._legacy_load(opened, map_location, module, encoding="utf-8")


@contextlib.contextmanager
def serialization_files(path):
    """(zip reader or None, the opened file) of a checkpoint, as torch.load opens it."""
    serialization = torch.serialization
    with serialization._open_file_like(path, "rb") as opened:
        if serialization._is_zipfile(opened):
            with serialization._open_zipfile_reader(opened) as archive:
                yield archive, opened
        else:
            yield None, opened


def _global_name(obj) -> str:
    return f"{obj.__module__}.{obj.__name__}"


def _default_weights_only_globals() -> dict:
    """What ``torch.load(weights_only=True)`` rebuilds without an allow-list: this torch's own list,
    plus what newer torch versions allow by default and this one has (devices, every dtype, sets,
    complex numbers, bytes of protocol 2; nnU-Net checkpoints hold a ``torch.device``)."""
    import _codecs
    import builtins
    import collections

    from torch import _utils
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = dict(_get_allowed_globals())
    extra = [torch.device, builtins.set, builtins.complex, builtins.bytearray, collections.Counter, _codecs.encode]
    extra += [getattr(_utils, name) for name in ("_rebuild_parameter_with_state", "_rebuild_qtensor",
                                                  "_rebuild_tensor_v3", "_rebuild_nested_tensor")
              if hasattr(_utils, name)]
    allowed.update({_global_name(obj): obj for obj in extra})
    allowed.update({f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


@functools.lru_cache(maxsize=8)
def _restricted_pickle_module(extra: tuple) -> types.ModuleType:
    """A pickle module whose Unpickler rebuilds only the weights-only globals and ``extra``; anything
    else is refused with the message torch's weights-only loader gives."""
    allowed = _default_weights_only_globals()
    for obj in extra:
        name = _global_name(obj)
        allowed[name] = obj
        for old, new in (("numpy.core.", "numpy._core."), ("numpy._core.", "numpy.core.")):
            if name.startswith(old):   # NumPy 2 renamed numpy.core: files of either NumPy load on both
                allowed[new + name[len(old):]] = obj

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            raise pickle.UnpicklingError(f"Weights only load failed: Unsupported global: GLOBAL {key}")

    module = types.ModuleType("nnunet_acnorm_weights_only_pickle")
    module.Unpickler = Unpickler
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return module
