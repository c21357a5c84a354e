"""SuPreM U-Net: the Models Genesis 3D U-Net as the backbone of SuPreM's universal model."""
from __future__ import annotations

from nnunet_acnorm.checkpoints.recognise import has_tensor, state_under
from nnunet_acnorm.checkpoints.families.genesis import GENESIS_ENCODER, plan_genesis_unet
from nnunet_acnorm.checkpoints.families.genesis import _read_info as _genesis_info
from nnunet_acnorm.checkpoints.family import Intensity, PretrainedFamily

PREFIX = "module.backbone."


def _recognise(checkpoint) -> bool:
    return has_tensor(state_under(checkpoint, "net"), PREFIX + "down_tr64.ops.0.conv1.weight", 5)


def _keep_backbone(key: str) -> str | None:
    # everything outside the backbone (SuPreM's prompt/controller heads) and the output head go
    if not key.startswith(PREFIX):
        return None
    key = key[len(PREFIX):]
    return None if key.startswith("out_tr.") else key


def _read_info(checkpoint, state) -> dict:
    return _genesis_info(checkpoint, {k[len("module.backbone."):]: v for k, v in state.items()
                                      if k.startswith(PREFIX)})


SUPREM = PretrainedFamily(
    name="suprem",
    description="SuPreM U-Net backbone (supervised on AbdomenAtlas CT)",
    members=("supervised_suprem_unet_2100.pth",),
    recognise=_recognise,
    network="nnunet_acnorm.networks.genesis_unet3d.GenesisUNet3D",
    spatial_dims=3,
    input_channels=1,
    intensity=Intensity("ct_window", window=(-175.0, 250.0)),  # SuPreM training: ScaleIntensityRanged, clipped
    norm_type="BatchNorm3d",
    loaded_parts="encoder + decoder",
    licence="code MIT (SuPreM repository); weights trained on AbdomenAtlas 1.1 CT: check its terms",
    state_dict_keys=("net",),
    map_key=_keep_backbone,
    read_info=_read_info,
    stem_weight_key="down_tr64.ops.0.conv1.weight",
    encoder_prefixes=GENESIS_ENCODER,
    plan_architecture=plan_genesis_unet,
)
