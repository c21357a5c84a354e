"""nnU-Net v2 checkpoints (checkpoint_final.pth / checkpoint_best.pth of another dataset)."""
from __future__ import annotations

from nnunet_acnorm.checkpoints.family import Intensity, PretrainedFamily, StateDict, plan_file_architecture
from nnunet_acnorm.checkpoints.keys import drop_aliases
from nnunet_acnorm.checkpoints.recognise import state_under


def _recognise(checkpoint) -> bool:
    weights = state_under(checkpoint, "network_weights")
    return (weights is not None and "nnssl_adaptation_plan" not in checkpoint
            and any(isinstance(k, str) and k.startswith("encoder.") for k in weights))


def _read_info(checkpoint, state) -> dict:
    info: dict = {"trainer_name": checkpoint.get("trainer_name")}
    init_args = checkpoint.get("init_args")
    if isinstance(init_args, dict) and isinstance(init_args.get("plans"), dict):
        plans, configuration = init_args["plans"], init_args.get("configuration")
        info.update(plans=plans, configuration=configuration, dataset_json=init_args.get("dataset_json"))
        config = plans.get("configurations", {}).get(configuration)
        if isinstance(config, dict) and "architecture" in config:
            info["architecture"] = config["architecture"]
    stem = [k for k in state if k.startswith("encoder.") and k.endswith(".conv.weight")
            and ".all_modules." not in k]
    if stem:
        info["stem_key"] = stem[0]
        info["input_channels"] = int(state[stem[0]].shape[1])
    return info


def _filter(state: StateDict, info: dict) -> StateDict:
    # the segmentation head always starts fresh (nnU-Net's own loader skips it too)
    return {k: v for k, v in drop_aliases(state).items() if not k.startswith("decoder.seg_layers.")}


def _plan(weights, config: dict, channel_names: dict, notes: list) -> None:
    if "architecture" in weights.info:
        plan_file_architecture(weights, config, channel_names, notes)
    else:
        notes.append("architecture: the file has no plans in its init_args; using the dataset's planned "
                     "architecture (pretraining with these plans, as nnU-Net's pretraining workflow does)")


NNUNET_V2 = PretrainedFamily(
    name="nnunet_v2",
    description="nnU-Net v2 checkpoint (supervised pretraining on another dataset)",
    members=("checkpoint_final.pth", "checkpoint_best.pth"),
    recognise=_recognise,
    network="(from the plans stored in the checkpoint's init_args)",
    spatial_dims=3,
    input_channels=None,
    intensity=Intensity("nnunet_plans"),
    norm_type="InstanceNorm (plans' norm_op)",
    loaded_parts="encoder + decoder",
    licence="that of the data it was trained on",
    state_dict_keys=("network_weights",),
    filter_state_dict=_filter,
    read_info=_read_info,
    encoder_prefixes=("encoder.",),
    plan_architecture=_plan,
)
