"""Classification networks and their pretrained weights.

- ``resnet`` (2D, RGB): torchvision's ResNet (depth 50 by default; 18/34/101/152 too) with a new
  ``fc`` (2048 -> n for ResNet-50); weights from a torchvision ImageNet file or a MoCo v2 file
  (family ``torchvision_resnet`` / ``moco_v2``; the depth is read from the file).
- ``genesis`` (3D, 1 channel): the Models Genesis encoder (``down_tr64 ... down_tr512``) with the
  authors' head ``classifier`` = GAP, Linear(512, 1024), ReLU, Linear(1024, n) (family ``genesis``:
  Models Genesis, Semantic Genesis, TransVW; the decoder of the file is not used).
- ``medicalnet`` (3D, 1 channel): a MedicalNet 3D ResNet (depth from the file) with ``classifier`` =
  GAP, Linear(512 x expansion, n) (family ``medicalnet``).

Reading and key mapping of the files is :func:`nnunet_acnorm.checkpoints.load_pretrained`'s
job; here the mapped state dict is loaded into the plain network, whose head stays random.
"""
from __future__ import annotations

from torch import Tensor, nn

from nnunet_acnorm.classification.errors import ClassificationInputError
from nnunet_acnorm.networks.genesis_unet3d import GenesisClassifier3D
from nnunet_acnorm.networks.medicalnet_resnet import MedicalNetResNet3D

#: pretrained family -> (architecture, dim, input channels)
FAMILY_ARCHITECTURES = {"torchvision_resnet": ("resnet", 2, 3), "moco_v2": ("resnet", 2, 3),
                        "genesis": ("genesis", 3, 1), "medicalnet": ("medicalnet", 3, 1)}
#: architecture -> (dim, input channels, prefix of the head trained from scratch)
ARCHITECTURES = {"resnet": (2, 3, "fc."), "genesis": (3, 1, "classifier."),
                 "medicalnet": (3, 1, "classifier.")}
#: the intensity scheme each 3D architecture was pretrained with
DEFAULT_INTENSITY = {"genesis": "ct", "medicalnet": "zscore"}
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


def build_network(config: dict) -> nn.Module:
    """The plain (BatchNorm) network of ``config``, randomly initialised."""
    architecture, n = config["architecture"], int(config["num_classes"])
    if architecture == "resnet":
        import torchvision
        depth = int(config.get("depth") or 50)
        if depth not in RESNET_DEPTHS:
            raise ClassificationInputError(f"2D ResNet depth must be one of {RESNET_DEPTHS}, got {depth}")
        return getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=n)
    if architecture == "genesis":
        return GenesisClassifier3D(input_channels=1, num_classes=n,
                                   base_features=int(config.get("base_features") or 32))
    if architecture == "medicalnet":
        return MedicalNetClassifier3D(depth=int(config["depth"]), num_classes=n,
                                      base_features=int(config.get("base_features") or 64),
                                      shortcut_type=config.get("shortcut_type"))
    raise ClassificationInputError(f"unknown architecture '{architecture}' (choose from {sorted(ARCHITECTURES)})")


def read_pretrained(path: str, family: str | None, trust_pickle: bool):
    """The pretrained file through the project's loader; errors become one-line input errors."""
    from nnunet_acnorm.checkpoints import load_pretrained
    try:
        return load_pretrained(path, family=family, trust_pickle=trust_pickle)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ClassificationInputError(str(e).strip().splitlines()[0] if str(e).strip() else
                                       f"cannot load pretrained file {path}") from None


def describe_pretrained(path: str, family: str | None, trust_pickle: bool) -> dict:
    """Architecture settings implied by a pretrained file: architecture, dim, depth, base width."""
    weights = read_pretrained(path, family, trust_pickle)
    name = weights.family.name
    if name not in FAMILY_ARCHITECTURES:
        raise ClassificationInputError(
            f"{path} is a '{name}' checkpoint; classification supports the families "
            f"{sorted(FAMILY_ARCHITECTURES)}")
    architecture, dim, channels = FAMILY_ARCHITECTURES[name]
    state = weights.state_dict
    info = dict(weights.info or {})
    out = {"architecture": architecture, "dim": dim, "in_channels": channels, "pretrained_family": name,
           "depth": None, "base_features": None, "shortcut_type": None}
    stem = state.get(weights.stem_weight_key or "")
    if stem is not None and int(stem.shape[1]) != channels:
        raise ClassificationInputError(f"{path}: the stem takes {int(stem.shape[1])} input channels; the "
                                       f"{architecture} classifier takes {channels}")
    if architecture == "resnet":
        if info.get("depth") not in RESNET_DEPTHS:
            raise ClassificationInputError(f"{path}: not a torchvision ResNet of depth {RESNET_DEPTHS}")
        out["depth"] = int(info["depth"])
    elif architecture == "genesis":
        out["base_features"] = int(state["down_tr64.ops.0.conv1.weight"].shape[0])
    elif architecture == "medicalnet":
        out["depth"] = int(info["depth"])
        out["base_features"] = int(state["conv1.weight"].shape[0])
        out["shortcut_type"] = info.get("shortcut_type")
    return out


def load_pretrained_weights(network: nn.Module, config: dict, path: str, trust_pickle: bool) -> str:
    """Load the pretrained file into the plain ``network`` (every key but the new head's must be
    filled); return a one-line description for the log."""
    weights = read_pretrained(path, config.get("pretrained_family"), trust_pickle)
    head = ARCHITECTURES[config["architecture"]][2]
    own = network.state_dict()
    state = {k: v for k, v in weights.state_dict.items() if not k.startswith(head)}
    used = {k: v for k, v in state.items() if k in own}
    unused = sorted(set(state) - set(used))
    if config["architecture"] != "genesis" and unused:  # genesis files carry the decoder: not used
        raise ClassificationInputError(
            f"{path}: {len(unused)} pretrained keys have no place in the {config['architecture']} "
            f"network (e.g. {unused[:3]}); is -pretrained_family right?")
    for key, value in used.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ClassificationInputError(
                f"{path}: '{key}' has shape {tuple(value.shape)}, the network expects {tuple(own[key].shape)}")
    missing = sorted(k for k in own if k not in used and not k.startswith(head))
    if missing:
        raise ClassificationInputError(
            f"{path} lacks {len(missing)} weights of the {config['architecture']} network (e.g. "
            f"{missing[:3]}): it is not a complete '{weights.family.name}' checkpoint")
    network.load_state_dict(used, strict=False)
    return (f"pretrained weights: {path} ({weights.family.name}), {len(used)} tensors loaded, "
            f"{len(unused)} unused (decoder/projection heads), head '{head.rstrip('.')}' trained from scratch")
