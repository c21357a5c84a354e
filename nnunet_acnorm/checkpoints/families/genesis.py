"""Models Genesis, Semantic Genesis and TransVW: the Models Genesis 3D U-Net (BatchNorm)."""
from __future__ import annotations

from nnunet_acnorm.checkpoints.family import Intensity, PretrainedFamily
from nnunet_acnorm.checkpoints.recognise import any_key_starts, has_tensor, state_under
from nnunet_acnorm.networks.genesis_unet3d import GENESIS_CT_WINDOW

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


def plan_genesis_unet(weights, config: dict, channel_names: dict, notes: list) -> None:
    """Planning hook of the families built on the Models Genesis 3D U-Net (Genesis, SuPreM): CT goes
    into the network raw and the network applies the family's pretraining window."""
    window = weights.family.intensity.window
    arch_kwargs = {"base_features": int(weights.info.get("base_features", 32)), "act": "relu",
                   "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "input_window": None}
    n_channels = len(channel_names)
    if all(str(v).lower() == "ct" for v in channel_names.values()):
        arch_kwargs["input_window"] = list(window)
        config["normalization_schemes"] = ["NoNormalization"] * n_channels
        config["use_mask_for_norm"] = [False] * n_channels
        notes.append(f"intensity: raw HU into the network, which clips to [{window[0]:g}, {window[1]:g}] "
                     "and scales to [0, 1] as in pretraining (plans: NoNormalization)")
    else:
        notes.append("intensity: the dataset is not CT, so the pretraining window does not apply; "
                     f"keeping the dataset's normalisation {config['normalization_schemes']}")
    config["architecture"] = {"network_class_name": weights.family.network, "arch_kwargs": arch_kwargs,
                              "_kw_requires_import": []}


GENESIS = PretrainedFamily(
    name="genesis",
    description="Models Genesis / Semantic Genesis / TransVW 3D U-Net (self-supervised on chest CT)",
    members=("Genesis_Chest_CT.pt", "semantic_genesis_chest_ct.pt", "TransVW_chest_ct.pt"),
    recognise=_recognise,
    network="nnunet_acnorm.networks.genesis_unet3d.GenesisUNet3D",
    spatial_dims=3,
    input_channels=1,
    intensity=Intensity("ct_window", window=GENESIS_CT_WINDOW),
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
    plan_architecture=plan_genesis_unet,
    classifier="genesis",
)
