"""Plain pickles that published checkpoints come with (nnU-Net v1's ``*.model.pkl``: the trainer's
init arguments, its name and the plans), read without running code.

:func:`read_data_pickle` unpickles with an allow-list of data types only (Python containers,
``collections.OrderedDict``, numpy scalars, dtypes and arrays); any other global in the pickle
(a function such as ``os.system``, a class with a ``__reduce__``) is refused before it is looked
up, so nothing the file names is ever called.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any

import numpy as np

from nnunet_acnorm.errors import InputError

#: a plans pickle is a few kilobytes; anything far larger is not one
MAX_PICKLE_BYTES = 64 * 1024 * 1024


class PickleReadError(InputError):
    """A pickle that is not plain data (or not a readable pickle at all)."""


def _allowed() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict,
                                           ("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # pickles name numpy 1's or 2's module
        allowed[(module, "scalar")] = core.multiarray.scalar
        allowed[(module, "_reconstruct")] = core.multiarray._reconstruct
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        if name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = getattr(dtypes, name)
    return allowed


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path
        self._globals = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise PickleReadError(f"{self._path}: the pickle names {module}.{name}, which is not plain data (it could "
                                  "run code when loaded); it was not loaded")
        return found


def read_data_pickle(path: str | os.PathLike) -> Any:
    """The object pickled in ``path``, if it is plain data; else :class:`PickleReadError` (one line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PickleReadError(f"{path}: no such file")
    if os.path.getsize(path) > MAX_PICKLE_BYTES:
        raise PickleReadError(f"{path}: {os.path.getsize(path)} bytes is too large for a plans pickle")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _DataUnpickler(io.BytesIO(data), path).load()
    except PickleReadError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a malformed pickle is a bad file
        raise PickleReadError(f"{path}: not a readable pickle ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200] if str(error) else 'no details'})") from None
