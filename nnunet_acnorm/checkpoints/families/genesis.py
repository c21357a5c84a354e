"""Models Genesis, Semantic Genesis and TransVW: the Models Genesis 3D U-Net (BatchNorm)."""
from __future__ import annotations

from nnunet_acnorm.checkpoints.recognise import any_key_starts, has_tensor, state_under
from nnunet_acnorm.checkpoints.family import PretrainedFamily

GENESIS_ENCODER = ("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512.")


def _recognise(checkpoint) -> bool:
    state = state_under(checkpoint, "state_dict")
    if state is None:
        return False
    # the stem, or (a decoder-only file, refused later by the import) the last decoder stage
    return any(has_tensor(state, p + key, 5) for p in ("module.", "")
               for key in ("down_tr64.ops.0.conv1.weight", "up_tr64.ops.0.conv1.weight"))


def _read_info(checkpoint, state) -> dict:
    for prefix in ("module.", ""):
        stem = state.get(prefix + "down_tr64.ops.0.conv1.weight")
        last = state.get(prefix + "up_tr64.ops.1.conv1.weight")
        if stem is not None or last is not None:
            info = {"base_features": int(stem.shape[0]) if stem is not None else int(last.shape[0]) // 2,
                    "has_decoder": any_key_starts(state, prefix + "up_tr64.")}
            if stem is not None:
                info["input_channels"] = int(stem.shape[1])
            return info
    return {}


GENESIS = PretrainedFamily(
    name="genesis",
    description="Models Genesis / Semantic Genesis / TransVW 3D U-Net (self-supervised on chest CT)",
    members=("Genesis_Chest_CT.pt", "semantic_genesis_chest_ct.pt", "TransVW_chest_ct.pt"),
    recognise=_recognise,
    network="nnunet_acnorm.networks.genesis_unet3d.GenesisUNet3D",
    spatial_dims=3,
    input_channels=1,
    intensity_normalisation="ct_window[-1000,1000]->[0,1]",
    norm_type="BatchNorm3d",
    loaded_parts="encoder + decoder",
    licence="code MIT; weights from the authors on request (research use; check their terms)",
    state_dict_keys=("state_dict",),
    strip_prefixes=("module.",),
    # out_tr: pretext head; clc_out / projection_head / prototypes: Semantic Genesis, TransVW heads
    drop_prefixes=("out_tr.", "clc_out.", "projection_head", "prototypes"),
    read_info=_read_info,
    stem_weight_key="down_tr64.ops.0.conv1.weight",
    encoder_prefixes=GENESIS_ENCODER,
)
