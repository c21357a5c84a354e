"""Which part of a segmentation network is its encoder, for loading only the encoder (and stem)
of a pretrained file, as nnU-Net's ``PretrainedTrainer`` does.

A network says it by a class attribute ``encoder_prefixes`` (state-dict key prefixes, the stem
included: :class:`~nnunet_acnorm.networks.GenesisUNet3D`, ``MedicalNetUNet3D``, ``STUNet``);
dynamic-network-architectures U-Nets (nnU-Net's own) have their encoder, stem included, under
``encoder.`` (their ``decoder.encoder`` alias is the same modules).
"""
from __future__ import annotations

from torch import nn

from nnunet_acnorm.errors import InputError


class NoEncoderError(InputError):
    """The network does not say which of its parts is the encoder."""


def encoder_prefixes(network: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of ``network``'s encoder (stem included)."""
    own = getattr(network, "encoder_prefixes", None)
    if own:
        return tuple(own)
    if isinstance(getattr(network, "encoder", None), nn.Module):
        return ("encoder.",)
    raise NoEncoderError(f"{type(network).__name__} has no 'encoder' submodule and no encoder_prefixes attribute, so "
                         "its encoder cannot be loaded alone; load the whole network instead (a trainer without "
                         "_encoderOnly)")


def is_encoder_key(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether state-dict key (or module name) ``key`` lies in the encoder given by ``prefixes``."""
    return (key + ".").startswith(prefixes)
