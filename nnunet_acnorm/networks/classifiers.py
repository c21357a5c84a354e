"""Classification networks and their pretrained weights.

- ``resnet`` (2D, RGB): torchvision's ResNet (depth 50 by default; 18/34/101/152 too) with a new
  ``fc`` (2048 -> n for ResNet-50); weights from a torchvision ImageNet file or a MoCo v2 file
  (family ``torchvision_resnet`` / ``moco_v2``; the depth is read from the file).
- ``genesis`` (3D, 1 channel): the Models Genesis encoder (``down_tr64 ... down_tr512``) with the
  authors' head ``classifier`` = GAP, Linear(512, 1024), ReLU, Linear(1024, n) (family ``genesis``:
  Models Genesis, Semantic Genesis, TransVW; the decoder of the file is not used).
- ``medicalnet`` (3D, 1 channel): a MedicalNet 3D ResNet (depth from the file) with ``classifier`` =
  GAP, Linear(512 x expansion, n) (family ``medicalnet``).

Each pretrained family names the classifier its weights fit (``PretrainedFamily.classifier``);
:mod:`nnunet_acnorm.classification.pretrained` reads the file and fills the network (the head
stays random). :data:`ARCHITECTURES` holds, declaratively, what the classification trainer needs
to know of each network: how to build it and how to read its size (depth, width) from a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from nnunet_acnorm.errors import InputError
from nnunet_acnorm.networks.genesis_unet3d import GenesisClassifier3D
from nnunet_acnorm.networks.medicalnet_resnet import MedicalNetResNet3D

RESNET_DEPTHS = (18, 34, 50, 101, 152)


class MedicalNetClassifier3D(MedicalNetResNet3D):
    """MedicalNet encoder (file key names at the top level) + GAP + Linear(out_channels, n)."""

    def __init__(self, depth: int = 18, num_classes: int = 2, input_channels: int = 1,
                 base_features: int = 64, shortcut_type: str | None = None) -> None:
        super().__init__(depth, input_channels, shortcut_type=shortcut_type, base_features=base_features)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1),
                                        nn.Linear(self.out_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(super().forward(x))


def _build_resnet(config: dict, num_classes: int) -> nn.Module:
    import torchvision

    depth = int(config.get("depth") or 50)
    if depth not in RESNET_DEPTHS:
        raise InputError(f"2D ResNet depth must be one of {RESNET_DEPTHS}, got {depth}")
    return getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)


def _build_genesis(config: dict, num_classes: int) -> nn.Module:
    return GenesisClassifier3D(input_channels=1, num_classes=num_classes,
                               base_features=int(config.get("base_features") or 32))


def _build_medicalnet(config: dict, num_classes: int) -> nn.Module:
    return MedicalNetClassifier3D(depth=int(config["depth"]), num_classes=num_classes,
                                  base_features=int(config.get("base_features") or 64),
                                  shortcut_type=config.get("shortcut_type"))


def _resnet_settings(state: dict, info: dict) -> dict:
    if info.get("depth") not in RESNET_DEPTHS:
        raise InputError(f"not a torchvision ResNet of depth {RESNET_DEPTHS}")
    return {"depth": int(info["depth"])}


def _genesis_settings(state: dict, info: dict) -> dict:
    return {"base_features": int(state["down_tr64.ops.0.conv1.weight"].shape[0])}


def _medicalnet_settings(state: dict, info: dict) -> dict:
    return {"depth": int(info["depth"]), "base_features": int(state["conv1.weight"].shape[0]),
            "shortcut_type": info.get("shortcut_type")}


@dataclass(frozen=True)
class ClassifierArchitecture:
    """What the classification trainer needs to know of one network."""

    dim: int
    in_channels: int
    #: prefix of the head trained from scratch
    head: str
    #: ``build(config, num_classes)``: the plain (BatchNorm) network, randomly initialised
    build: Callable[[dict, int], nn.Module]
    #: ``settings(mapped state dict, the family's info)``: the config entries (depth, width) of a file
    settings: Callable[[dict, dict], dict]
    #: the intensity scheme the network was pretrained with (None: the user chooses)
    default_intensity: str | None = None


ARCHITECTURES = {
    "resnet": ClassifierArchitecture(2, 3, "fc.", _build_resnet, _resnet_settings),
    "genesis": ClassifierArchitecture(3, 1, "classifier.", _build_genesis, _genesis_settings, "ct"),
    "medicalnet": ClassifierArchitecture(3, 1, "classifier.", _build_medicalnet, _medicalnet_settings, "zscore"),
}


def build_network(config: dict) -> nn.Module:
    """The plain (BatchNorm) network of ``config``, randomly initialised."""
    architecture = ARCHITECTURES.get(config["architecture"])
    if architecture is None:
        raise InputError(f"unknown architecture '{config['architecture']}' (choose from {sorted(ARCHITECTURES)})")
    return architecture.build(config, int(config["num_classes"]))
