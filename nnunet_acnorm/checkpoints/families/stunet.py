"""STU-Net S/B/L/H (supervised on TotalSegmentator), in nnU-Net v1's format: ``<name>.model`` (a
``torch.save`` dict: ``epoch``, ``state_dict``, ``optimizer_state_dict``, ``lr_scheduler_state_dict``,
``plot_stuff``, ``best_stuff``, maybe ``amp_grad_scaler``) and, beside it, ``<name>.model.pkl`` (a
pickled ``OrderedDict`` with the trainer's ``init`` arguments, its ``name``, e.g.
``STUNetTrainer_base``, and the nnU-Net v1 ``plans``). The release's nnU-Net v2 port saves
``network_weights`` with the same keys; both are recognised.

The ``.pkl`` is read with a data-only unpickler (:mod:`nnunet_acnorm.checkpoints.pickles`); it is
optional: the weights and the architecture come from the ``.model`` alone (widths, blocks and
kernels from the tensor shapes).
"""
from __future__ import annotations

import os
import re

from nnunet_acnorm.checkpoints.family import Intensity, PretrainedFamily, PretrainedLoadError, StateDict
from nnunet_acnorm.checkpoints.pickles import PickleReadError, read_data_pickle
from nnunet_acnorm.checkpoints.recognise import has_tensor, state_under
from nnunet_acnorm.networks.stunet import STUNET_SIZES, STUNET_STAGES, STUNET_TRAINERS, STUNet

STEM = "conv_blocks_context.0.0.conv1.weight"
STEM_SHORTCUT = "conv_blocks_context.0.0.conv3.weight"
_BLOCK = re.compile(r"^conv_blocks_context\.(\d+)\.(\d+)\.conv1\.weight$")
#: nnU-Net v1 normalisation names -> nnU-Net v2 classes
_V1_NORMALISATION = {"CT": "CTNormalization", "nonCT": "ZScoreNormalization", "noNorm": "NoNormalization"}


def _recognise(checkpoint) -> bool:
    state = state_under(checkpoint, "state_dict", "network_weights")
    return any(has_tensor(state, p + STEM, 5) for p in ("", "module."))


def stunet_architecture(state: StateDict) -> dict:
    """Widths, residual blocks and kernel sizes per stage, read from an STU-Net state dict."""
    blocks: dict[int, int] = {}
    for key in state:
        if m := _BLOCK.match(key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    if sorted(blocks) != list(range(STUNET_STAGES)):
        raise PretrainedLoadError(f"STU-Net checkpoint: encoder stages {sorted(blocks)} found, "
                                  f"{STUNET_STAGES} expected (conv_blocks_context.0 ... .{STUNET_STAGES - 1})")
    firsts = [state[f"conv_blocks_context.{s}.0.conv1.weight"] for s in range(STUNET_STAGES)]
    return {"features_per_stage": [int(w.shape[0]) for w in firsts],
            "blocks_per_stage": [blocks[s] for s in range(STUNET_STAGES)],
            "kernel_sizes": [[int(k) for k in w.shape[2:]] for w in firsts]}


def stunet_size(architecture: dict) -> str | None:
    """"S", "B", "L" or "H" where the widths and blocks are a released size's, else None."""
    found = (tuple(architecture["features_per_stage"]), tuple(architecture["blocks_per_stage"]))
    return next((size for size, preset in STUNET_SIZES.items() if preset == found), None)


def _read_info(checkpoint, state) -> dict:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    architecture = stunet_architecture(state)
    info = {"stunet": architecture, "size": stunet_size(architecture), "input_channels": int(state[STEM].shape[1]),
            "stem_keys": (STEM, STEM_SHORTCUT) if STEM_SHORTCUT in state else (STEM,)}
    head = state.get("seg_outputs.0.weight")
    if head is not None:
        info["pretrained_outputs"] = int(head.shape[0])
    return info


def _plain(value):
    """numpy arrays and scalars of the v1 plans -> lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def read_model_pkl(path: str) -> dict:
    """Facts of ``<path>.pkl`` (nnU-Net v1's trainer pickle), read without running code; {} if absent."""
    pkl = path + ".pkl"
    if not os.path.isfile(pkl):
        return {"companion": None}
    try:
        data = read_data_pickle(pkl)
    except PickleReadError as e:
        raise PretrainedLoadError(f"{e}. The .model alone is enough to fine-tune: move {os.path.basename(pkl)} away, "
                                  "or replace it with the one of the STU-Net release") from None
    if not isinstance(data, dict) or not isinstance(data.get("plans"), dict):
        raise PretrainedLoadError(f"{pkl}: not an nnU-Net v1 trainer pickle (no 'plans' entry)")
    plans = data["plans"]
    stages = plans.get("plans_per_stage") or {}
    stage = stages[max(stages)] if stages else {}
    schemes = plans.get("normalization_schemes") or {}
    return {"companion": pkl, "trainer_name": data.get("name"), "pretrain": {
        "spacing": _plain(stage.get("current_spacing")), "patch_size": _plain(stage.get("patch_size")),
        "normalization": [_V1_NORMALISATION.get(str(v), str(v)) for _, v in sorted(schemes.items())],
        "num_classes": plans.get("num_classes"), "modalities": dict(plans.get("modalities") or {})}}


def _strides(dataset_strides: list) -> list[list[int]]:
    """The dataset's first five downsamplings, padded with [1, 1, 1]: what the released fine-tuning
    trainers make of a target's plans (STU-Net always has six stages)."""
    downsamplings = [list(map(int, s)) for s in dataset_strides[1:STUNET_STAGES]]
    downsamplings += [[1, 1, 1]] * (STUNET_STAGES - 1 - len(downsamplings))
    return [[1, 1, 1]] + downsamplings


def _plan(weights, config: dict, channel_names: dict, notes: list) -> None:
    info, architecture = weights.info, weights.info["stunet"]
    strides = _strides(config["architecture"]["arch_kwargs"]["strides"])
    config["architecture"] = {"network_class_name": f"{STUNet.__module__}.{STUNet.__name__}", "arch_kwargs": {
        **architecture, "strides": strides}, "_kw_requires_import": []}
    size = info.get("size")
    name = f"STU-Net-{size} (released as {STUNET_TRAINERS[size]})" if size else "STU-Net of a custom width"
    notes.append(f"{name}: features {architecture['features_per_stage']}, blocks {architecture['blocks_per_stage']}; "
                 f"strides {strides} (the dataset's first five downsamplings, as the released fine-tuning trainers)")
    pretrain = info.get("pretrain")
    if pretrain:
        notes.append(f"pretraining ({info.get('trainer_name')}, {os.path.basename(info['companion'])}): spacing "
                     f"{pretrain['spacing']}, patch {pretrain['patch_size']}, normalisation {pretrain['normalization']}; "
                     "kept the dataset's spacing and normalisation, as the authors' fine-tuning (the target's own plans)")
    else:
        notes.append("no .model.pkl beside the file: the pretraining plans are not known (the release: 1.5 mm, "
                     "128^3 patches); kept the dataset's spacing and normalisation")


STUNET = PretrainedFamily(
    name="stunet",
    description="STU-Net S/B/L/H (supervised on TotalSegmentator CT, nnU-Net v1 format)",
    members=("small_ep4k.model", "base_ep4k.model", "large_ep4k.model", "huge_ep4k.model"),
    recognise=_recognise,
    network=f"{STUNet.__module__}.{STUNet.__name__}",
    spatial_dims=3,
    input_channels=None,
    intensity=Intensity("dataset_plans"),
    norm_type="InstanceNorm3d",
    loaded_parts="encoder + decoder (seg_outputs heads fresh)",
    licence="code Apache-2.0 (STU-Net repository); weights trained on the TotalSegmentator dataset (CC BY 4.0)",
    state_dict_keys=("state_dict", "network_weights"),
    strip_prefixes=("module.",),
    drop_prefixes=("seg_outputs.",),
    read_info=_read_info,
    read_companion=read_model_pkl,
    stem_weight_key=STEM,
    encoder_prefixes=STUNet.encoder_prefixes,
    plan_architecture=_plan,
)

__all__ = ["STUNET", "read_model_pkl", "stunet_architecture", "stunet_size"]
