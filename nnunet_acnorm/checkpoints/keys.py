"""State-dict keys: the one home for the rules every loader applies to key names.

- aliases: dynamic-network-architectures networks register some modules twice (the U-Net's
  ``decoder.encoder`` is the encoder, ``all_modules`` lists the stages again); a state dict holds
  both names, loading the canonical key fills the alias;
- wrapper prefixes: DDP / DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) put one
  in front of every key;
- the segmentation head (``.seg_layers.``), which nnU-Net's ``-pretrained_weights`` loader skips;
- :func:`first_misfit`: that loader's rule ("every key of the network but the head is in the file,
  with the same shape"), plus finite values, as one check whose result each caller words for its
  own command.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

#: aliases of modules registered twice in dynamic-network-architectures networks
ALIAS_PARTS = (".all_modules.",)
ALIAS_PREFIXES = ("decoder.encoder.",)
#: prefixes that wrappers add to every key of a state dict (DDP / DataParallel, torch.compile)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: keys nnU-Net's -pretrained_weights loader does not transfer (they depend on the number of classes)
HEAD_KEY_PART = ".seg_layers."


def is_alias(key: str) -> bool:
    return key.startswith(ALIAS_PREFIXES) or any(part in key for part in ALIAS_PARTS)


def canonical_keys(keys: Iterable[str]) -> list[str]:
    """``keys`` without the alias names (in their order)."""
    return [k for k in keys if not is_alias(k)]


def drop_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not is_alias(k)}


def wrapper_prefix(keys) -> str | None:
    """The wrapper prefix every key of ``keys`` carries (``module.``, ``_orig_mod.``), or None."""
    keys = [k for k in keys if isinstance(k, str)]
    if not keys:
        return None
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in keys):
            return prefix
    return None


@dataclass(frozen=True)
class Misfit:
    """The first key of a network that a state dict cannot fill, and why."""

    key: str
    #: ``missing`` (not in the state dict), ``shape`` (another shape), ``nonfinite`` (NaN / inf values)
    kind: str
    network_shape: tuple[int, ...]
    file_shape: tuple[int, ...] | None = None


def first_misfit(network_state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                 keys: Iterable[str] | None = None) -> Misfit | None:
    """The first of ``keys`` (default: every key of ``network_state``, in its order) that ``weights``
    cannot fill: missing, of another shape, or holding NaN / infinite values; None if all fit."""
    for key in network_state if keys is None else keys:
        own = tuple(network_state[key].shape)
        if key not in weights:
            return Misfit(key, "missing", own)
        value = weights[key]
        if tuple(value.shape) != own:
            return Misfit(key, "shape", own, tuple(value.shape))
        if value.is_floating_point() and not torch.isfinite(value).all():
            return Misfit(key, "nonfinite", own, tuple(value.shape))
    return None


def transferable_keys(keys: Iterable[str]) -> list[str]:
    """The keys (of a network's state dict) that nnU-Net's -pretrained_weights loader fills: all but
    the segmentation head."""
    return [k for k in keys if HEAD_KEY_PART not in k]
