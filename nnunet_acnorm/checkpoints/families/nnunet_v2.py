"""nnU-Net v2 checkpoints (checkpoint_final.pth / checkpoint_best.pth of another dataset), 2D or 3D.

The architecture comes from the plans the checkpoint was trained with: those in its ``init_args``,
or (a results folder given to the import, :mod:`nnunet_acnorm.checkpoints.results_folder`) the
folder's ``plans.json``. Plans of nnU-Net before 2.4 (``UNet_class_name``, ``conv_kernel_sizes``,
... instead of ``architecture``; TotalSegmentator's models) and configurations that inherit from
another (``inherits_from``) are resolved by nnU-Net's own ``PlansManager``.
"""
from __future__ import annotations

import warnings
from copy import deepcopy

from nnunet_acnorm.checkpoints.family import (Intensity, PretrainedFamily, PretrainedLoadError, StateDict,
                                             plan_file_architecture)
from nnunet_acnorm.checkpoints.keys import drop_aliases
from nnunet_acnorm.checkpoints.recognise import state_under


def _recognise(checkpoint) -> bool:
    weights = state_under(checkpoint, "network_weights")
    return (weights is not None and "nnssl_adaptation_plan" not in checkpoint
            and any(isinstance(k, str) and k.startswith("encoder.") for k in weights))


def configuration_architecture(plans: dict, configuration: str) -> dict:
    """The ``architecture`` entry of ``configuration`` in ``plans`` (any nnU-Net v2 plans format)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if configuration not in (plans.get("configurations") or {}):
        raise PretrainedLoadError(f"the plans {plans.get('plans_name')!r} have no configuration {configuration!r} "
                                  f"(they have {', '.join(plans.get('configurations') or {}) or 'none'})")
    try:
        with warnings.catch_warnings():  # the old-format warning: converting it is the point here
            warnings.simplefilter("ignore")
            manager = PlansManager(deepcopy(plans)).get_configuration(configuration)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise PretrainedLoadError(f"the plans' configuration {configuration!r} does not describe a network nnU-Net "
                                  f"can build ({type(e).__name__}: {e})") from None
    return deepcopy(manager.configuration["architecture"])


def _read_info(checkpoint, state) -> dict:
    info: dict = {"trainer_name": checkpoint.get("trainer_name")}
    init_args = checkpoint.get("init_args")
    if isinstance(init_args, dict) and isinstance(init_args.get("plans"), dict):
        plans, configuration = init_args["plans"], init_args.get("configuration")
        info.update(plans=plans, configuration=configuration, dataset_json=init_args.get("dataset_json"))
        if configuration in (plans.get("configurations") or {}):
            try:
                info["architecture"] = configuration_architecture(plans, configuration)
            except PretrainedLoadError as e:
                info["plans_problem"] = str(e)
    stem = [k for k in state if k.startswith("encoder.") and k.endswith(".conv.weight")
            and ".all_modules." not in k]
    if stem:
        info["stem_key"] = stem[0]
        info["input_channels"] = int(state[stem[0]].shape[1])
        info["spatial_dims"] = int(state[stem[0]].dim()) - 2
    return info


def _filter(state: StateDict, info: dict) -> StateDict:
    # the segmentation head always starts fresh (nnU-Net's own loader skips it too)
    return {k: v for k, v in drop_aliases(state).items() if not k.startswith("decoder.seg_layers.")}


def _plan(weights, config: dict, channel_names: dict, notes: list) -> None:
    if "architecture" in weights.info:
        plan_file_architecture(weights, config, channel_names, notes)
    else:
        why = weights.info.get("plans_problem") or "the file has no plans in its init_args"
        notes.append(f"architecture: {why}; using the dataset's planned architecture (pretraining with these "
                     "plans, as nnU-Net's pretraining workflow does)")


NNUNET_V2 = PretrainedFamily(
    name="nnunet_v2",
    description="nnU-Net v2 checkpoint (supervised pretraining on another dataset)",
    members=("checkpoint_final.pth", "checkpoint_best.pth",
             "Dataset291_TotalSegmentator_part1_organs_1559subj/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"),
    recognise=_recognise,
    network="(from the plans stored in the checkpoint's init_args or its results folder)",
    spatial_dims=3,
    input_channels=None,
    intensity=Intensity("nnunet_plans"),
    norm_type="InstanceNorm (plans' norm_op)",
    loaded_parts="encoder + decoder",
    licence="that of the data it was trained on (TotalSegmentator's 'total' models: Apache-2.0)",
    state_dict_keys=("network_weights",),
    filter_state_dict=_filter,
    read_info=_read_info,
    encoder_prefixes=("encoder.",),
    plan_architecture=_plan,
)
