"""Plans and a checkpoint for fine-tuning an nnU-Net dataset from a pretrained file (the library
behind ``nnUNetv2_acnorm_import``; the ranking uses it too).

:func:`import_pretrained`:

1. takes the file's weights (read once by :func:`nnunet_acnorm.checkpoints.load_pretrained`);
2. writes a NEW plans file (the source plans stay untouched) whose configuration builds the
   pretrained network: the family's planning hook (``PretrainedFamily.plan_architecture``) sets the
   architecture and the input normalisation it was pretrained with; here the patch size is made
   divisible as the network needs;
3. preprocesses the configuration with nnU-Net's own preprocessing when normalisation or spacing
   changed (otherwise the new plans reuse the existing preprocessed data);
4. writes an nnU-Net checkpoint ``{"network_weights": ...}`` holding every key of the planned
   network: the file's tensors where it has them (stem adapted when the number of input channels
   differs, convolution kernels bridged where only their spatial size differs), a fresh
   initialisation elsewhere (decoder of encoder-only files, segmentation head; with
   ``encoder_only`` the whole decoder, as nnU-Net's ``PretrainedTrainer`` does).

It prints nothing itself: each line of its report goes to the ``echo`` callable (the command passes
``print``, the ranking its log).
"""
from __future__ import annotations

import json
import os
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from nnunet_acnorm.checkpoints import PretrainedWeights, load_pretrained
from nnunet_acnorm.checkpoints.adapt import fit_tensor
from nnunet_acnorm.checkpoints.io import atomic_torch_save, atomic_write_text
from nnunet_acnorm.checkpoints.keys import canonical_keys
from nnunet_acnorm.networks.parts import is_encoder_key
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.nnunet.dataset import check_identifier, read_preprocessed_dataset


class ImportPlanError(InputError):
    """The pretrained file cannot be planned onto this dataset."""


# -- the plans for the pretrained network ---------------------------------------------------------
def _round_patch(patch: list[int], divisors: list[int]) -> list[int]:
    return [max(d, (int(p) // d) * d) for p, d in zip(patch, divisors)]


def _divisors(strides) -> list[int]:
    return [int(v) for v in np.prod(np.array(strides, dtype=int), axis=0)]


@dataclass
class PlannedConfiguration:
    configuration: dict
    notes: list[str] = field(default_factory=list)


def plan_configuration(weights: PretrainedWeights, source_config: dict, channel_names: dict) -> PlannedConfiguration:
    """The configuration (nnU-Net plans format) for the pretrained network on this dataset: a copy of
    ``source_config`` edited by the family's planning hook, with a patch size the network can take."""
    family = weights.family
    config = deepcopy(source_config)
    config.pop("inherits_from", None)
    notes: list[str] = []
    dims = weights.spatial_dims
    if len(config["patch_size"]) != dims:
        raise ImportPlanError(f"the {family.name} network of this file is {dims}D but the configuration is "
                              f"{len(config['patch_size'])}D; use a {dims}D configuration "
                              f"(-c {'2d' if dims == 2 else '3d_fullres'})")
    if family.plan_architecture is None:
        raise ImportPlanError(f"{family.name} files carry no architecture this command can plan")
    family.plan_architecture(weights, config, channel_names, notes)
    kwargs = config["architecture"]["arch_kwargs"]
    strides = kwargs.get("strides")
    if len(strides[0]) != len(config["patch_size"]):
        raise ImportPlanError(f"the pretrained network is {len(strides[0])}D, configuration is "
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


def transfer_weights(weights: PretrainedWeights, network: nn.Module, num_input_channels: int,
                     encoder_only: bool = False) -> WeightTransfer:
    """Put the file's tensors into ``network`` (fresh elsewhere); refuse if the encoder did not match.

    Decoder tensors of the file whose shape does not fit start fresh (reported); encoder tensors
    must all be in the file with the network's shapes, up to what can be bridged (the stem's input
    channels, kernel sizes: :func:`~nnunet_acnorm.checkpoints.adapt.fit_tensor`). ``encoder_only``:
    nothing outside the family's encoder prefixes is taken from the file.
    """
    own = network.state_dict()
    encoder = weights.family.encoder_prefixes
    matched, adapted, unused, misfit = {}, [], [], []
    stems = set(weights.stem_weight_keys)
    for key, value in weights.state_dict.items():
        if key not in own or (encoder_only and not is_encoder_key(key, encoder)):
            unused.append(key)
            continue
        fitted = fit_tensor(value, tuple(own[key].shape), key in stems, num_input_channels)
        if fitted is None:
            misfit.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            continue
        matched[key] = fitted[0].to(own[key].dtype)
        if fitted[1]:
            adapted.append(f"{key}: {fitted[1]}")
    encoder_keys = [k for k in canonical_keys(own) if is_encoder_key(k, encoder)]
    missing_encoder = [k for k in encoder_keys if k not in matched]
    if not encoder_keys or missing_encoder:
        first = missing_encoder[0] if missing_encoder else "none"
        shape_note = next((m for m in misfit if m.startswith(first + " ")), None)
        raise ImportPlanError(
            f"{weights.path}: not even the encoder matched: {len(missing_encoder)} of {len(encoder_keys)} encoder "
            f"tensors of the planned {weights.family.name} network are not in the file"
            f"{' with the same shape' if misfit else ''} (first: {shape_note or first}; kernel sizes and the stem's "
            f"input channels can be bridged, other widths and depths cannot); {len(matched)} tensor(s) matched "
            "elsewhere. The file does not fit: check -f and the file")
    network.load_state_dict(matched, strict=False)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    fresh = [k for k in canonical_keys(state) if k not in matched]
    return WeightTransfer(state, sorted(matched), fresh, adapted, ([] if encoder_only else unused) + misfit)


def _group(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        head = ".".join(parts[:2]) if parts[0] in ("decoder", "encoder") else parts[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in groups.items())


# -- the import ---------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    plans_name: str
    plans_file: str
    checkpoint: str
    family: str
    loaded: list[str]
    fresh: list[str]
    adapted: list[str]
    preprocessed: bool
    #: "all" or "encoder" (the trainers' pretrained_parts that go with the checkpoint)
    parts: str = "all"


def _silent(line: str) -> None:
    pass


def _new_plans(plans: dict, configuration: str, new_config: dict, plans_name: str, weights: PretrainedWeights,
               source_plans: str) -> dict:
    new_plans = deepcopy(plans)
    new_plans["plans_name"] = plans_name
    new_plans["configurations"] = {configuration: new_config}
    new_plans["acnorm_pretrained"] = {"family": weights.family.name, "file": os.path.abspath(weights.path),
                                      "source_plans": source_plans}
    return new_plans


def _needs_preprocessing(new_config: dict, source_config: dict) -> bool:
    return (new_config["normalization_schemes"] != source_config["normalization_schemes"]
            or [float(s) for s in new_config["spacing"]] != [float(s) for s in source_config["spacing"]]
            or new_config.get("use_mask_for_norm") != source_config.get("use_mask_for_norm"))


def _build_network(weights: PretrainedWeights, arch: dict, num_inputs: int, num_outputs: int) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    try:
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                      num_inputs, num_outputs, allow_init=True, deep_supervision=True)
    except Exception as e:  # noqa: BLE001 - a plans/architecture mismatch, reported in one line
        raise ImportPlanError(f"cannot build the {weights.family.name} network from the planned architecture "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def copy_missing_dataset_json(dataset: str) -> str | None:
    """Copy ``nnUNet_raw/<dataset>/dataset.json`` into ``nnUNet_preprocessed/<dataset>/`` where that
    folder exists without one; returns the file written, or None.

    nnU-Net 2.8.1 preprocessing (and this import) read dataset.json from the preprocessed folder, and
    only planning (``nnUNetv2_plan_experiment``) puts it there: a dataset prepared as nnU-Net's
    pretraining workflow prepares the source (``nnUNetv2_extract_fingerprint``, then
    ``nnUNetv2_move_plans_between_datasets``) has plans but no dataset.json."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    raw, preprocessed = os.environ.get("nnUNet_raw"), os.environ.get("nnUNet_preprocessed")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError):
        return None  # read_preprocessed_dataset names the problem
    if not raw or not preprocessed:
        return None
    source, target = os.path.join(raw, name, "dataset.json"), os.path.join(preprocessed, name, "dataset.json")
    if os.path.isfile(target) or not os.path.isfile(source) or not os.path.isdir(os.path.dirname(target)):
        return None
    with open(source) as f:
        atomic_write_text(target, f.read())
    return target


def import_pretrained(dataset: str, configuration: str, file: str | PretrainedWeights, family: str | None = None,
                      trust_pickle: bool = False, source_plans: str = "nnUNetPlans", plans_name: str | None = None,
                      output: str | None = None, num_processes: int = 2, preprocess: bool = True,
                      overwrite: bool = False, echo=_silent, encoder_only: bool = False) -> ImportResult:
    """Plans, preprocessing and an nnU-Net checkpoint for fine-tuning ``dataset`` from ``file`` (a path,
    an nnU-Net results folder, or weights already read by :func:`~nnunet_acnorm.checkpoints.load_pretrained`).
    ``encoder_only``: take only the encoder (and stem) from the file; the decoder starts fresh."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if plans_name is not None:  # before anything is read or written: the name becomes a file name
        check_identifier(plans_name, "-pl (new plans identifier)")
    copied = copy_missing_dataset_json(dataset)
    if copied:
        echo(f"Copied the raw dataset.json to {copied} (nnU-Net's pretraining workflow does not; preprocessing needs it)")
    source = read_preprocessed_dataset(dataset, configuration, source_plans)
    plans_manager = PlansManager(source.plans)
    weights = file if isinstance(file, PretrainedWeights) else \
        load_pretrained(file, family=family, trust_pickle=trust_pickle)
    fam = weights.family
    if fam.plan_architecture is None and fam.classifier is not None:
        raise ImportPlanError(f"{weights.path}: a {weights.spatial_dims}D {fam.name} file ({weights.description}) "
                              "cannot initialise a segmentation network; use it with the classification trainer "
                              "(nnUNetv2_acnorm_cls_train)")
    source_config = plans_manager.get_configuration(configuration).configuration
    planned = plan_configuration(weights, source_config, source.dataset_json["channel_names"])  # works on a copy
    new_config = planned.configuration
    plans_name = plans_name or f"{source_plans}__{fam.name}"
    if plans_name == source_plans:
        raise ImportPlanError("the new plans name must differ from the source plans (-p); the source stays untouched")
    needs_preprocessing = _needs_preprocessing(new_config, source_config)
    if needs_preprocessing:
        new_config["data_identifier"] = f"{plans_name}_{configuration}"
    plans_file = os.path.join(source.folder, plans_name + ".json")
    checkpoint_file = output or os.path.join(source.folder, "acnorm_pretrained", f"{plans_name}__{configuration}.pth")
    num_inputs = len(source.dataset_json["channel_names"])
    num_outputs = plans_manager.get_label_manager(source.dataset_json).num_segmentation_heads
    network = _build_network(weights, new_config["architecture"], num_inputs, num_outputs)
    transfer = transfer_weights(weights, network, num_inputs, encoder_only)
    for existing in (plans_file, checkpoint_file):
        if os.path.exists(existing) and not overwrite:
            raise ImportPlanError(f"{existing} exists; pass --overwrite to replace it, or -o / -pl for new names")
    parts = "encoder" if encoder_only else "all"
    os.makedirs(os.path.dirname(os.path.abspath(checkpoint_file)), exist_ok=True)
    atomic_torch_save({"network_weights": transfer.state_dict, "acnorm_import": {
        "family": fam.name, "file": os.path.abspath(weights.path), "plans": plans_name, "configuration": configuration,
        "loaded_keys": transfer.loaded, "fresh_keys": transfer.fresh, "adapted": transfer.adapted, "parts": parts}},
        checkpoint_file)
    atomic_write_text(plans_file, json.dumps(_new_plans(source.plans, configuration, new_config, plans_name, weights,
                                                        source_plans), indent=4, sort_keys=False))
    result = ImportResult(plans_name, plans_file, checkpoint_file, fam.name, transfer.loaded, transfer.fresh,
                          transfer.adapted, needs_preprocessing and preprocess, parts)
    _report(echo, weights, new_config, planned.notes, transfer, result, num_outputs)
    _preprocess(echo, dataset, source.name, configuration, result, needs_preprocessing, num_processes, new_config)
    _report_commands(echo, dataset, configuration, result)
    return result


def _report(echo, weights: PretrainedWeights, config: dict, notes: list[str], transfer: WeightTransfer,
            result: ImportResult, num_outputs: int) -> None:
    fam = weights.family
    echo(f"Pretrained file: {weights.path} -> family {fam.name} ({weights.description}); licence of the weights: "
         f"{fam.licence}")
    folder = weights.info.get("results_folder")
    if folder:
        labels = [k for k in (weights.info.get("dataset_json") or {}).get("labels", {}) if k != "background"]
        echo(f"  nnU-Net results folder {folder}: its plans.json (configuration {weights.info.get('configuration')}, "
             f"trainer {weights.info.get('trainer_name')}) and dataset.json ({len(labels)} labels: "
             f"{', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''}) define the network")
    echo(f"Network: {config['architecture']['network_class_name']}; norm layers: {fam.norm_type}")
    for note in notes:
        echo(f"  {note}")
    echo(f"Loaded {len(transfer.loaded)} tensors from the file; {len(transfer.fresh)} start fresh"
         + (f": {_group(transfer.fresh)}" if transfer.fresh else ""))
    if result.parts == "encoder":
        echo("  --encoder_only: only the encoder (stem included) comes from the file; the decoder starts fresh")
    echo(f"  the segmentation head starts fresh ({num_outputs} outputs for this dataset's labels)")
    if transfer.unused:
        echo(f"  {len(transfer.unused)} tensor(s) of the file do not fit the planned network and are ignored "
             f"(first: {transfer.unused[0]})")
    for line in transfer.adapted:
        echo(f"  adapted (stem: averaged over the pretrained input channels, repeated, scaled; kernels: bridged): "
             f"{line}")


def _preprocess(echo, dataset: str, dataset_name: str, configuration: str, result: ImportResult,
                needs_preprocessing: bool, num_processes: int, new_config: dict) -> None:
    if needs_preprocessing and result.preprocessed:
        echo(f"Preprocessing {dataset_name} {configuration} with plans {result.plans_name} (normalisation/spacing "
             "changed)")
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess
        nnunet_preprocess([int(dataset_name[7:10])], result.plans_name, [configuration], [num_processes],
                          verbose=False, show_progress_bar=False)
    elif needs_preprocessing:
        echo(f"Preprocessing skipped: run nnUNetv2_preprocess -d {dataset} -plans_name {result.plans_name} "
             f"-c {configuration}")
    else:
        echo(f"Preprocessing: not needed (reuses {new_config['data_identifier']})")


def _report_commands(echo, dataset: str, configuration: str, result: ImportResult) -> None:
    trainer = "nnUNetTrainerACNorm" + ("_encoderOnly" if result.parts == "encoder" else "")
    echo(f"Plans identifier: {result.plans_name}")
    echo(f"Pretrained checkpoint: {result.checkpoint}")
    echo("Train and predict with:")
    echo(f"  nnUNetv2_train {dataset} {configuration} FOLD -p {result.plans_name} -tr {trainer} "
         f"-pretrained_weights {result.checkpoint}")
    echo(f"  nnUNetv2_predict -i INPUT -o OUTPUT -d {dataset} -c {configuration} -f FOLD -p {result.plans_name} "
         f"-tr {trainer}")
