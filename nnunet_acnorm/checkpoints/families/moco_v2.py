"""MoCo v2 (self-supervised on ImageNet, e.g. moco_v2_800ep_pretrain.pth.tar): 2D ResNet-50."""
from __future__ import annotations

from nnunet_acnorm.checkpoints.recognise import has_tensor, state_under
from nnunet_acnorm.checkpoints.family import PretrainedFamily
from nnunet_acnorm.checkpoints.families.torchvision_resnet import IMAGENET_RESNET50, resnet_info

PREFIX = "module.encoder_q."


def _recognise(checkpoint) -> bool:
    return has_tensor(state_under(checkpoint, "state_dict"), PREFIX + "conv1.weight", 4)


def _query_encoder(key: str) -> str | None:
    # encoder_k (momentum encoder) and the queue are dropped; the projection head (fc.*) too
    if not key.startswith(PREFIX):
        return None
    key = key[len(PREFIX):]
    return None if key.startswith("fc.") else key


def _read_info(checkpoint, state) -> dict:
    info = resnet_info({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
    info.pop("pretrained_classes", None)
    info["arch"] = checkpoint.get("arch")
    info["epoch"] = checkpoint.get("epoch")
    return info


MOCO_V2 = PretrainedFamily(
    name="moco_v2",
    description="MoCo v2 ResNet-50 query encoder (self-supervised on ImageNet), 2D",
    members=("moco_v2_200ep_pretrain.pth.tar", "moco_v2_800ep_pretrain.pth.tar"),
    recognise=_recognise,
    loaded_parts="encoder (projection head, momentum encoder, queue dropped)",
    licence="CC-BY-NC 4.0 (MoCo repository)",
    state_dict_keys=("state_dict",),
    map_key=_query_encoder,
    read_info=_read_info,
    **IMAGENET_RESNET50,
)
