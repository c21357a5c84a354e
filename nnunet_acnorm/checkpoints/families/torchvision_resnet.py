"""torchvision ResNet (ImageNet weights, e.g. resnet50-0676ba61.pth / resnet50-11ad3fa6.pth): 2D."""
from __future__ import annotations

from nnunet_acnorm.checkpoints.recognise import has_tensor
from nnunet_acnorm.checkpoints.family import Intensity, PretrainedFamily

RESNET_ENCODER = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
           (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}


#: what torchvision's and MoCo v2's ResNet-50 files share: the network and its ImageNet input
IMAGENET_RESNET50 = dict(
    network="torchvision.models.resnet50",
    spatial_dims=2,
    input_channels=3,
    intensity=Intensity("imagenet_rgb", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    norm_type="BatchNorm2d",
    stem_weight_key="conv1.weight",
    encoder_prefixes=RESNET_ENCODER,
    classifier="resnet",
)


def _recognise(checkpoint) -> bool:
    return isinstance(checkpoint, dict) and has_tensor(checkpoint, "conv1.weight", 4) and has_tensor(
        checkpoint, "layer1.0.conv1.weight", 4)


def resnet_info(state) -> dict:
    counts = []
    for layer in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{layer}.")}
        counts.append(max(blocks) + 1 if blocks else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    info = {"depth": _DEPTHS.get((*counts, bottleneck)), "input_channels": int(state["conv1.weight"].shape[1])}
    if "fc.weight" in state:
        info["pretrained_classes"] = int(state["fc.weight"].shape[0])
    return info


TORCHVISION_RESNET = PretrainedFamily(
    name="torchvision_resnet",
    description="torchvision ResNet-50 (ImageNet, supervised), 2D",
    members=("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    recognise=_recognise,
    loaded_parts="encoder (fc dropped)",
    licence="code BSD-3-Clause; weights trained on ImageNet (its terms: non-commercial research)",
    state_dict_keys=(),
    drop_prefixes=("fc.",),
    read_info=lambda checkpoint, state: resnet_info(state),
    **IMAGENET_RESNET50,
)
