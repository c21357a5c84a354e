"""Feature maps the regularisers look at, recorded with forward hooks (no change to the network).

- :func:`stage_modules`: the "stage outputs" of a network: nnU-Net's encoder stages
  (``encoder.stages.0`` ... ``encoder.stages.N``; the last is the bottleneck), torchvision /
  MedicalNet ResNets' ``layer1`` ... ``layer4``, the Models Genesis encoder's ``down_tr64`` ...
  ``down_tr512``.
- :class:`FeatureRecorder`: keeps the latest output (or input) of named modules while the module
  is in training mode; nothing is recorded in eval mode (validation, prediction).
- :func:`pooled`: a feature map averaged over its spatial axes, one row per sample.
"""
from __future__ import annotations

from torch import Tensor, nn


def stage_modules(network: nn.Module) -> list[str]:
    """Names (relative to ``network``) of the modules whose outputs are the network's stages."""
    names = dict(network.named_modules())
    encoder = getattr(network, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "stages", None), nn.Sequential):
        return [f"encoder.stages.{i}" for i in range(len(encoder.stages))]
    resnet = [f"layer{i}" for i in range(1, 5) if f"layer{i}" in names]
    if len(resnet) == 4:
        return resnet
    genesis = [n for n in ("down_tr64", "down_tr128", "down_tr256", "down_tr512") if n in names]
    if len(genesis) == 4:
        return genesis
    raise ValueError(f"{type(network).__name__}: no stage outputs found (expected nnU-Net's encoder.stages, "
                     "ResNet layer1..layer4 or Models Genesis down_tr64..down_tr512)")


def _first_tensor(value):
    while isinstance(value, (list, tuple)):
        value = value[0]
    return value


class FeatureRecorder:
    """Forward hooks on ``modules`` (name -> module); ``features[name]`` is the latest output
    (``inputs=True``: input) recorded in training mode. :meth:`remove` takes the hooks away."""

    def __init__(self, modules: dict[str, nn.Module], inputs: bool = False, always: bool = False):
        self.features: dict[str, Tensor] = {}
        self._handles = []
        for name, module in modules.items():
            if inputs:
                hook = self._pre_hook(name, always)
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name, always)))

    def _hook(self, name, always):
        def hook(module, args, output):
            if module.training or always:
                self.features[name] = _first_tensor(output)
        return hook

    def _pre_hook(self, name, always):
        def hook(module, args):
            if module.training or always:
                self.features[name] = _first_tensor(args)
        return hook

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


def pooled(feature: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C): the mean over the spatial axes (a (B, C) input is returned)."""
    return feature.flatten(2).mean(2) if feature.dim() > 2 else feature
