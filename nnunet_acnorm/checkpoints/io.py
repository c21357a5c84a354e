"""Reading and writing checkpoints safely: one place for the rules every command follows.

- :func:`safe_torch_load`: ``torch.load(weights_only=True)`` with the numpy scalars, dtypes and
  arrays nnU-Net checkpoints hold in their logs allowed (data only), so no pickled code runs. A
  file that cannot be read raises :class:`CheckpointReadError` whose ``kind`` says why
  (``missing``, ``directory``, ``empty``, ``pickle``: it needs arbitrary pickled objects,
  ``corrupt``: truncated or not a PyTorch file) and whose message names the file; callers add
  what to do.
- :func:`atomic_torch_save`: write to a temporary file in the same folder, then ``os.replace``, so
  a kill during a save never leaves a truncated checkpoint under the real name.
- :func:`first_non_finite`: the first tensor of a state dict holding NaN or infinite values.
- :func:`plain_python`: numpy scalars in nested containers -> Python numbers (checkpoints that
  stock ``torch.load(weights_only=True)`` reads without any allow-list).
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np
import torch

from nnunet_acnorm.errors import InputError
from nnunet_acnorm.norms.torch_compat import weights_only_load
from nnunet_acnorm.outputs import replaced_file

#: why a checkpoint could not be read
KINDS = ("missing", "directory", "empty", "pickle", "corrupt")

_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", re.IGNORECASE)
#: weights-only load errors that mean "not a pickle at all" (a text file, a cut file), not "pickled objects"
_NOT_A_PICKLE = re.compile(r"Unsupported operand|invalid load key|truncated|Unsupported pickle protocol", re.IGNORECASE)
#: torch.load itself, even where a command replaces torch.load by a weights-only wrapper
_TORCH_LOAD = torch.load


class CheckpointReadError(InputError):
    """A checkpoint file cannot be read safely; ``kind`` is one of :data:`KINDS`."""

    def __init__(self, message: str, kind: str, path: str, detail: str = ""):
        super().__init__(message)
        self.kind = kind
        self.path = path
        #: for ``pickle``: the object the file pickles (e.g. ``posix.system``); else the loader's error
        self.detail = detail


def numpy_safe_globals() -> list:
    """numpy objects nnU-Net checkpoints hold (logs, best EMA): data only, safe to rebuild."""
    try:
        from numpy._core import multiarray  # NumPy 2 (NumPy 1.26: a shim of numpy.core.multiarray)
    except ImportError:
        from numpy.core import multiarray
    allowed = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line[:200]


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (numpy data allowed) or :class:`CheckpointReadError`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith((".pth", ".pt", ".tar", ".ckpt")))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise CheckpointReadError(f"{path} is a directory, not a checkpoint file{hint}; give the file itself",
                                  "directory", path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"{path}: no such file", "missing", path)
    if os.path.getsize(path) == 0:
        raise CheckpointReadError(f"{path}: the file is empty (an interrupted download or save)", "empty", path)
    try:
        return weights_only_load(path, map_location, numpy_safe_globals(), load=_TORCH_LOAD)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" not in message or _NOT_A_PICKLE.search(message):
            raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({_first_line(message)}); the file "
                                      "is corrupted or truncated", "corrupt", path, _first_line(message)) from None
        found = _UNSUPPORTED_GLOBAL.search(message)
        what = found.group(1) if found else ""
        raise CheckpointReadError(
            f"{path}: the file needs arbitrary pickled Python objects{f' (it pickles {what})' if what else ''}, "
            "which can run code when loaded; it was not loaded", "pickle", path, what) from None
    except (RuntimeError, EOFError, KeyError, OSError, ValueError, zipfile.BadZipFile, IndexError,
            AttributeError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                                  f"{_first_line(str(error))}); the file is corrupted or truncated", "corrupt", path,
                                  _first_line(str(error))) from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` onto ``path``
    (:func:`nnunet_acnorm.outputs.replaced_file`)."""
    with replaced_file(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file in the same folder, then ``os.replace`` onto ``path``."""
    with replaced_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def first_non_finite(state: dict) -> tuple[str | None, int]:
    """(the first key of ``state`` whose floating-point tensor holds NaN or infinite values, or None;
    how many tensors do)."""
    bad = [key for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    return (bad[0] if bad else None), len(bad)


def plain_python(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers, through dicts, lists and tuples."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_python(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_python(v) for v in value)
    return value

