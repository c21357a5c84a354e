"""``nnUNetv2_acnorm_import``: prepare an nnU-Net dataset for fine-tuning from a pretrained file.

    nnUNetv2_acnorm_import -d 501 -c 3d_fullres -i Genesis_Chest_CT.pt
    nnUNetv2_train 501 3d_fullres 0 -p <plans> -tr nnUNetTrainerACNorm -pretrained_weights <checkpoint>

1. reads the file safely and detects its family (``-f`` forces one);
2. writes a NEW plans file (the source plans stay untouched) whose configuration builds the
   pretrained network (architecture class by dotted path), with the input normalisation it was
   pretrained with, a patch size divisible as the network needs, and the pretraining spacing
   where the family fixes one (nnssl);
3. preprocesses the configuration with nnU-Net's own preprocessing when normalisation or spacing
   changed (otherwise the new plans reuse the existing preprocessed data);
4. writes an nnU-Net checkpoint ``{"network_weights": ...}`` holding every key of the planned
   network: the file's tensors where it has them (stem adapted when the number of input channels
   differs), a fresh initialisation elsewhere (decoder of encoder-only files, segmentation head);
5. prints the plans identifier, the checkpoint path, and the commands to train and predict.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from nnunet_acnorm.checkpoints import FAMILIES, PretrainedLoadError, PretrainedWeights, load_pretrained
from nnunet_acnorm.nnunet.dataset import PreprocessedDatasetError, check_identifier, read_preprocessed_dataset
from nnunet_acnorm.checkpoints.io import atomic_torch_save, atomic_write_text

GENESIS_NET = "nnunet_acnorm.networks.genesis_unet3d.GenesisUNet3D"
MEDICALNET_NET = "nnunet_acnorm.networks.medicalnet_resnet.MedicalNetUNet3D"
_ALIAS_PARTS = (".all_modules.",)
_ALIAS_PREFIXES = ("decoder.encoder.",)


class ImportError_(RuntimeError):
    """A user-facing error of the import command (printed as one line, exit code 1)."""


# -- input-channel adaptation ---------------------------------------------------------------------
def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-convolution weight [out, c_pre, *k] to ``in_channels`` inputs.

    The pretrained filters are averaged over their input channels, repeated for each new channel,
    and scaled by c_pre / in_channels, so that an input whose channels all carry the same image
    gives the pretrained response (1 -> n: repeat and divide by n; 3 -> 1: the sum of the three
    filters, as timm does for RGB -> grey).
    """
    c_pre = weight.shape[1]
    if in_channels == c_pre:
        return weight.clone()
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *([1] * (weight.dim() - 2))) * (c_pre / in_channels)


# -- the plans for the pretrained network ---------------------------------------------------------
def _round_patch(patch: list[int], divisors: list[int]) -> list[int]:
    return [max(d, (int(p) // d) * d) for p, d in zip(patch, divisors)]


def _divisors(strides) -> list[int]:
    return [int(v) for v in np.prod(np.array(strides, dtype=int), axis=0)]


def _parse_window(norm: str) -> tuple[float, float] | None:
    if norm.startswith("ct_window["):
        lo, hi = norm[len("ct_window["):].split("]")[0].split(",")
        return float(lo), float(hi)
    return None


@dataclass
class PlannedConfiguration:
    configuration: dict
    notes: list[str] = field(default_factory=list)


def plan_configuration(weights: PretrainedWeights, source_config: dict, channel_names: dict) -> PlannedConfiguration:
    """The configuration (nnU-Net plans format) for the pretrained network on this dataset."""
    family, info = weights.family, weights.info
    config = deepcopy(source_config)
    config.pop("inherits_from", None)
    n_channels = len(channel_names)
    notes: list[str] = []
    if len(config["patch_size"]) != family.spatial_dims:
        raise ImportError_(f"the {family.name} network is {family.spatial_dims}D but configuration has a "
                           f"{len(config['patch_size'])}D patch; use a 3d configuration (-c 3d_fullres)")
    is_ct = [str(v).lower() == "ct" for v in channel_names.values()]
    if family.network == GENESIS_NET:
        window = _parse_window(family.intensity_normalisation)
        arch_kwargs = {"base_features": int(info.get("base_features", 32)), "act": "relu",
                       "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "input_window": None}
        if all(is_ct):
            arch_kwargs["input_window"] = list(window)
            config["normalization_schemes"] = ["NoNormalization"] * n_channels
            config["use_mask_for_norm"] = [False] * n_channels
            notes.append(f"intensity: raw HU into the network, which clips to [{window[0]:g}, {window[1]:g}] "
                         "and scales to [0, 1] as in pretraining (plans: NoNormalization)")
        else:
            notes.append("intensity: the dataset is not CT, so the pretraining window does not apply; "
                         f"keeping the dataset's normalisation {config['normalization_schemes']}")
        config["architecture"] = {"network_class_name": GENESIS_NET, "arch_kwargs": arch_kwargs,
                                  "_kw_requires_import": []}
    elif family.network == MEDICALNET_NET:
        config["architecture"] = {"network_class_name": MEDICALNET_NET, "arch_kwargs": {
            "depth": int(info["depth"]), "shortcut_type": info["shortcut_type"],
            "base_features": int(info["base_features"]), "decoder_features": [64, 32, 16],
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}, "_kw_requires_import": []}
        config["normalization_schemes"] = ["ZScoreNormalization"] * n_channels
        notes.append("intensity: z-score per image (nnU-Net ZScoreNormalization), as MedicalNet's pretraining")
    elif "architecture" in info:
        config["architecture"] = deepcopy(info["architecture"])
        if family.name == "nnssl":
            config["normalization_schemes"] = list(info.get("normalization_schemes") or ["ZScoreNormalization"])
            config["normalization_schemes"] = (config["normalization_schemes"] * n_channels)[:n_channels]
            if info.get("spacing"):
                spacing = [float(s) for s in info["spacing"]]
                if [float(s) for s in config["spacing"]] != spacing:
                    notes.append(f"spacing: {config['spacing']} -> {spacing} (the pretraining spacing)")
                config["spacing"] = spacing
            if info.get("patch_size"):
                notes.append(f"patch size: nnssl recommends {list(info['patch_size'])} for fine-tuning; keeping "
                             "the dataset's (divisible by the network's strides); edit the plans to change it")
    elif family.name == "nnunet_v2":
        notes.append("architecture: the file has no plans in its init_args; using the dataset's planned "
                     "architecture (pretraining with these plans, as nnU-Net's pretraining workflow does)")
    else:
        raise ImportError_(f"{family.name} files carry no architecture this command can plan")
    kwargs = config["architecture"]["arch_kwargs"]
    strides = kwargs.get("strides")
    if len(strides[0]) != len(config["patch_size"]):
        raise ImportError_(f"the pretrained network is {len(strides[0])}D, configuration is "
                           f"{len(config['patch_size'])}D: use a matching configuration")
    divisors = _divisors(strides)
    patch = _round_patch(config["patch_size"], divisors)
    if patch != list(config["patch_size"]):
        notes.append(f"patch size: {config['patch_size']} -> {patch} (divisible by {divisors})")
    config["patch_size"] = patch
    return PlannedConfiguration(config, notes)


# -- the checkpoint ---------------------------------------------------------------------------------
@dataclass
class WeightTransfer:
    state_dict: dict
    loaded: list[str]
    fresh: list[str]
    adapted: list[str]
    unused: list[str]


def _canonical(keys) -> list[str]:
    return [k for k in keys if not k.startswith(_ALIAS_PREFIXES) and not any(p in k for p in _ALIAS_PARTS)]


def transfer_weights(weights: PretrainedWeights, network: nn.Module, num_input_channels: int) -> WeightTransfer:
    """Put the file's tensors into ``network`` (fresh elsewhere); refuse if the encoder did not match.

    Decoder tensors of the file whose shape does not fit start fresh (reported); encoder tensors
    must all be in the file with the network's shapes (the stem may differ in input channels).
    """
    own = network.state_dict()
    matched, adapted, unused, misfit = {}, [], [], []
    stem_key = weights.stem_weight_key
    for key, value in weights.state_dict.items():
        if key not in own:
            unused.append(key)
            continue
        target = own[key]
        if tuple(value.shape) == tuple(target.shape):
            matched[key] = value.to(target.dtype)
        elif (key == stem_key and value.dim() == target.dim() and value.shape[0] == target.shape[0]
              and value.shape[2:] == target.shape[2:] and target.shape[1] == num_input_channels):
            matched[key] = adapt_stem_weight(value, num_input_channels).to(target.dtype)
            adapted.append(f"{key}: {value.shape[1]} -> {num_input_channels} input channels")
        else:
            misfit.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
    encoder_keys = [k for k in _canonical(own) if k.startswith(weights.family.encoder_prefixes)]
    missing_encoder = [k for k in encoder_keys if k not in matched]
    if not encoder_keys or missing_encoder:
        first = missing_encoder[0] if missing_encoder else "none"
        shape_note = next((m for m in misfit if m.startswith(first + " ")), None)
        raise ImportError_(
            f"{weights.path}: not even the encoder matched: {len(missing_encoder)} of {len(encoder_keys)} encoder "
            f"tensors of the planned {weights.family.name} network are not in the file"
            f"{' with the same shape' if misfit else ''} (first: {shape_note or first}); "
            f"{len(matched)} tensor(s) matched elsewhere. The file does not fit: check -f and the file")
    network.load_state_dict(matched, strict=False)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    fresh = [k for k in _canonical(state) if k not in matched]
    return WeightTransfer(state, sorted(matched), fresh, adapted, unused + misfit)


def _group(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        head = ".".join(parts[:2]) if parts[0] in ("decoder", "encoder") else parts[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in groups.items())


# -- the command ----------------------------------------------------------------------------------
def run_import(dataset: str, configuration: str, file: str, family: str | None = None, trust_pickle: bool = False,
               source_plans: str = "nnUNetPlans", plans_name: str | None = None, output: str | None = None,
               num_processes: int = 2, preprocess: bool = True, overwrite: bool = False) -> dict:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        if plans_name is not None:  # before anything is read or written: the name becomes a file name
            check_identifier(plans_name, "-pl (new plans identifier)")
        source = read_preprocessed_dataset(dataset, configuration, source_plans)
    except PreprocessedDatasetError as e:
        raise ImportError_(str(e)) from None
    dataset_name, folder = source.name, source.folder
    plans, dataset_json = source.plans, source.dataset_json
    plans_manager = PlansManager(plans)

    weights = load_pretrained(file, family=family, trust_pickle=trust_pickle)
    fam = weights.family
    if fam.spatial_dims == 2:
        raise ImportError_(f"{file}: a 2D {fam.name} file ({weights.description}) cannot initialise a 3D "
                           "segmentation network; use it with the classification trainer (nnUNetv2_acnorm_cls_train)")
    source_config = plans_manager.get_configuration(configuration).configuration
    planned = plan_configuration(weights, source_config, dataset_json["channel_names"])  # works on a copy
    new_config = planned.configuration
    plans_name = plans_name or f"{source_plans}__{fam.name}"
    if plans_name == source_plans:
        raise ImportError_("the new plans name must differ from the source plans (-p); the source stays untouched")
    needs_preprocessing = (new_config["normalization_schemes"] != source_config["normalization_schemes"]
                           or [float(s) for s in new_config["spacing"]] != [float(s) for s in source_config["spacing"]]
                           or new_config.get("use_mask_for_norm") != source_config.get("use_mask_for_norm"))
    if needs_preprocessing:
        new_config["data_identifier"] = f"{plans_name}_{configuration}"
    new_plans = deepcopy(plans)
    new_plans["plans_name"] = plans_name
    new_plans["configurations"] = {configuration: new_config}
    new_plans["acnorm_pretrained"] = {"family": fam.name, "file": os.path.abspath(file),
                                      "source_plans": source_plans}

    plans_file = os.path.join(folder, plans_name + ".json")
    checkpoint_file = output or os.path.join(folder, "acnorm_pretrained", f"{plans_name}__{configuration}.pth")

    num_inputs = len(dataset_json["channel_names"])
    label_manager = plans_manager.get_label_manager(dataset_json)
    arch = new_config["architecture"]
    try:
        network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         num_inputs, label_manager.num_segmentation_heads, allow_init=True,
                                         deep_supervision=True)
    except Exception as e:  # noqa: BLE001 - a plans/architecture mismatch, reported in one line
        raise ImportError_(f"cannot build the {fam.name} network from the planned architecture "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    transfer = transfer_weights(weights, network, num_inputs)
    for existing in (plans_file, checkpoint_file):
        if os.path.exists(existing) and not overwrite:
            raise ImportError_(f"{existing} exists; pass --overwrite to replace it, or -o / -pl for new names")

    os.makedirs(os.path.dirname(os.path.abspath(checkpoint_file)), exist_ok=True)
    atomic_torch_save({"network_weights": transfer.state_dict,
                       "acnorm_import": {"family": fam.name, "file": os.path.abspath(file), "plans": plans_name,
                                         "configuration": configuration, "loaded_keys": transfer.loaded,
                                         "fresh_keys": transfer.fresh, "adapted": transfer.adapted}},
                      checkpoint_file)
    atomic_write_text(plans_file, json.dumps(new_plans, indent=4, sort_keys=False))

    print(f"Pretrained file: {file} -> family {fam.name} ({weights.description}); licence of the weights: "
          f"{fam.licence}")
    print(f"Network: {arch['network_class_name']}; norm layers: {fam.norm_type}")
    for note in planned.notes:
        print(f"  {note}")
    print(f"Loaded {len(transfer.loaded)} tensors from the file; {len(transfer.fresh)} start fresh"
          + (f": {_group(transfer.fresh)}" if transfer.fresh else ""))
    if transfer.unused:
        print(f"  {len(transfer.unused)} tensor(s) of the file do not fit the planned network and are ignored "
              f"(first: {transfer.unused[0]})")
    for line in transfer.adapted:
        print(f"  stem adapted (averaged over the pretrained input channels, repeated, scaled): {line}")
    if needs_preprocessing and preprocess:
        print(f"Preprocessing {dataset_name} {configuration} with plans {plans_name} (normalisation/spacing changed)")
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess
        nnunet_preprocess([int(dataset_name[7:10])], plans_name, [configuration], [num_processes], verbose=False,
                          show_progress_bar=False)
    elif needs_preprocessing:
        print(f"Preprocessing skipped: run nnUNetv2_preprocess -d {dataset} -plans_name {plans_name} -c {configuration}")
    else:
        print(f"Preprocessing: not needed (reuses {new_config['data_identifier']})")
    print(f"Plans identifier: {plans_name}")
    print(f"Pretrained checkpoint: {checkpoint_file}")
    print("Train and predict with:")
    print(f"  nnUNetv2_train {dataset} {configuration} FOLD -p {plans_name} -tr nnUNetTrainerACNorm "
          f"-pretrained_weights {checkpoint_file}")
    print(f"  nnUNetv2_predict -i INPUT -o OUTPUT -d {dataset} -c {configuration} -f FOLD -p {plans_name} "
          "-tr nnUNetTrainerACNorm")
    return {"plans_name": plans_name, "plans_file": plans_file, "checkpoint": checkpoint_file,
            "family": fam.name, "loaded": transfer.loaded, "fresh": transfer.fresh, "adapted": transfer.adapted,
            "preprocessed": needs_preprocessing and preprocess}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_acnorm_import",
        description="Prepare an nnU-Net dataset for fine-tuning from a pretrained checkpoint: new plans for the "
                    "pretrained network, preprocessing if needed, and an nnU-Net checkpoint for -pretrained_weights.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-i", dest="file", required=True, help="the pretrained checkpoint file")
    p.add_argument("-f", dest="family", choices=sorted(FAMILIES), default=None,
                   help="force the family (default: detected from the file's content)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow a file that needs arbitrary pickled Python objects (can run code: only for trusted files)")
    p.add_argument("-p", dest="source_plans", default="nnUNetPlans", help="source plans identifier (default nnUNetPlans)")
    p.add_argument("-pl", dest="plans_name", default=None,
                   help="identifier of the new plans (default <source plans>__<family>)")
    p.add_argument("-o", dest="output", default=None,
                   help="checkpoint to write (default nnUNet_preprocessed/<dataset>/acnorm_pretrained/<plans>__<config>.pth)")
    p.add_argument("-np", dest="num_processes", type=int, default=2, help="processes for preprocessing (default 2)")
    p.add_argument("--no_preprocess", action="store_true", help="do not run the preprocessing (print the command)")
    p.add_argument("--overwrite", action="store_true", help="replace plans/checkpoint written by an earlier import")
    return p


def import_entry(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run_import(args.dataset, args.configuration, args.file, args.family, args.trust_pickle, args.source_plans,
                   args.plans_name, args.output, args.num_processes, not args.no_preprocess, args.overwrite)
    except (ImportError_, PretrainedLoadError) as e:
        print(f"nnUNetv2_acnorm_import: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    import_entry()
