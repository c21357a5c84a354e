"""MedicalNet / Med3D 3D ResNet-10 ... 200 (BatchNorm, encoder only)."""
from __future__ import annotations

import re

from nnunet_acnorm.networks.medicalnet_resnet import MEDICALNET_LAYERS
from nnunet_acnorm.checkpoints.recognise import has_tensor, state_under
from nnunet_acnorm.checkpoints.family import Intensity, PretrainedFamily, PretrainedLoadError

_BLOCK = re.compile(r"^(?:module\.)?layer(\d)\.(\d+)\.")


def _recognise(checkpoint) -> bool:
    state = state_under(checkpoint, "state_dict")
    return any(has_tensor(state, p + "conv1.weight", 5) and has_tensor(state, p + "layer1.0.conv1.weight", 5)
               for p in ("module.", ""))


def _read_info(checkpoint, state) -> dict:
    counts = [0, 0, 0, 0]
    for key in state:
        if m := _BLOCK.match(key):
            counts[int(m[1]) - 1] = max(counts[int(m[1]) - 1], int(m[2]) + 1)
    bottleneck = any(k.endswith("layer1.0.conv3.weight") for k in state)
    kind = "bottleneck" if bottleneck else "basic"
    depth = next((d for d, (k, blocks) in MEDICALNET_LAYERS.items() if k == kind and tuple(counts) == blocks), None)
    if depth is None:
        raise PretrainedLoadError(f"MedicalNet checkpoint: {kind} blocks {counts} per layer match no ResNet depth "
                                  f"({sorted(MEDICALNET_LAYERS)})")
    shortcut = "B" if any(".layer2.0.downsample.0.weight" in "." + k for k in state) else "A"
    stem = state.get("module.conv1.weight", state.get("conv1.weight"))
    return {"depth": depth, "shortcut_type": shortcut, "input_channels": int(stem.shape[1]),
            "base_features": int(stem.shape[0])}


def _plan(weights, config: dict, channel_names: dict, notes: list) -> None:
    info = weights.info
    config["architecture"] = {"network_class_name": weights.family.network, "arch_kwargs": {
        "depth": int(info["depth"]), "shortcut_type": info["shortcut_type"],
        "base_features": int(info["base_features"]), "decoder_features": [64, 32, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}, "_kw_requires_import": []}
    config["normalization_schemes"] = ["ZScoreNormalization"] * len(channel_names)
    notes.append("intensity: z-score per image (nnU-Net ZScoreNormalization), as MedicalNet's pretraining")


MEDICALNET = PretrainedFamily(
    name="medicalnet",
    description="MedicalNet (Med3D) 3D ResNet-10/18/34/50/101/152/200 encoder",
    members=("resnet_10.pth", "resnet_18.pth", "resnet_34.pth", "resnet_50.pth", "resnet_101.pth",
             "resnet_152.pth", "resnet_200.pth", "resnet_10_23dataset.pth"),
    recognise=_recognise,
    network="nnunet_acnorm.networks.medicalnet_resnet.MedicalNetUNet3D",
    spatial_dims=3,
    input_channels=1,
    intensity=Intensity("zscore_foreground"),
    norm_type="BatchNorm3d",
    loaded_parts="encoder",
    licence="MIT",
    state_dict_keys=("state_dict",),
    strip_prefixes=("module.",),
    drop_prefixes=("conv_seg.", "fc."),
    read_info=_read_info,
    stem_weight_key="conv1.weight",
    encoder_prefixes=("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."),
    plan_architecture=_plan,
    classifier="medicalnet",
)
