"""How the commands read the files they are given: one home for the guarded reads several layers share.

- :func:`read_json_object`: a JSON file that must hold an object; anything else (missing,
  unreadable, not JSON, another JSON type) is one :class:`~nnunet_acnorm.errors.InputError` of the
  caller's type naming the file.
- :func:`sha256_file`: the SHA-256 of a file, read in blocks (checkpoints and archives are large).

Examples::

    plans = read_json_object(os.path.join(model_folder, "plans.json"), PretrainedLoadError)
    assert sha256_file(archive) == EXPECTED_SHA256
"""
from __future__ import annotations

import hashlib
import json
import os

from nnunet_acnorm.errors import InputError


def read_json_object(path: str | os.PathLike, error: type[InputError]) -> dict:
    """The JSON object in ``path``; raises ``error`` with one line naming the file otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a JSON object is expected, found {type(data).__name__}")
    return data


def sha256_file(path: str | os.PathLike) -> str:
    """The hexadecimal SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
