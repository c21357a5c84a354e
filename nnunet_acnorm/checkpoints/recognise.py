"""Small helpers the families use to recognise files by content."""
from __future__ import annotations

from typing import Any, Mapping

import torch


def state_under(checkpoint: Any, *keys: str) -> Mapping | None:
    """The mapping under the first of ``keys`` (none given: the checkpoint itself)."""
    if not isinstance(checkpoint, Mapping):
        return None
    if not keys:
        return checkpoint
    for key in keys:
        value = checkpoint.get(key)
        if isinstance(value, Mapping):
            return value
    return None


def has_tensor(state: Mapping | None, key: str, dims: int | None = None) -> bool:
    if state is None:
        return False
    value = state.get(key)
    return isinstance(value, torch.Tensor) and (dims is None or value.dim() == dims)


def any_key_starts(state: Mapping | None, prefix: str) -> bool:
    return state is not None and any(isinstance(k, str) and k.startswith(prefix) for k in state)
