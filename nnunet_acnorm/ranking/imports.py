"""What the ranking reuses in the target's preprocessed folder instead of importing again.

A candidate that does not fit the target plans goes through ``nnUNetv2_acnorm_import``, which
writes plans, a checkpoint and, where the normalisation or spacing changes, a preprocessed copy of
the dataset. Ranking the same files again, or files imported before with
``nnUNetv2_acnorm_import``, must not add another set each time:

- :func:`earlier_import`: plans written by an import of the same weights (the import's checkpoint
  holds exactly the file's tensors), for the same source plans and configuration, whose checkpoint
  and preprocessed data are there. Which command made it (the ranking, or ``nnUNetv2_acnorm_import``
  with any ``-pl``) does not matter; only the default checkpoint place is looked at
  (``acnorm_pretrained/<plans>__<configuration>.pth``).
- :func:`share_preprocessed_data`: a new import whose preprocessing (spacing, normalisation,
  resampling, transposition) equals that of existing plans with preprocessed data points its
  ``data_identifier`` there, as nnU-Net's own configurations share data; nnU-Net preprocesses only
  where none fits (:func:`provide_preprocessed_data`).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from nnunet_acnorm.checkpoints import PretrainedLoadError, read_checkpoint
from nnunet_acnorm.checkpoints.io import CheckpointReadError, atomic_write_text

#: the configuration entries (and plans entries) that decide nnU-Net's preprocessed data
PREPROCESSING_ENTRIES = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                         "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs",
                         "preprocessor_name")
PLANS_PREPROCESSING_ENTRIES = ("transpose_forward", "foreground_intensity_properties_per_channel")


@dataclass
class EarlierImport:
    plans_name: str
    plans_file: str
    checkpoint_file: str


def default_checkpoint(folder: str, plans_name: str, configuration: str) -> str:
    """Where ``nnUNetv2_acnorm_import`` writes its checkpoint unless told otherwise (``-o``)."""
    return os.path.join(folder, "acnorm_pretrained", f"{plans_name}__{configuration}.pth")


def earlier_import(weights, folder: str, source_plans: str, configuration: str,
                   first: str | None = None) -> EarlierImport | None:
    """Plans in ``folder`` imported from the same weights as ``weights`` (a PretrainedWeights) onto
    ``source_plans`` for ``configuration``, with checkpoint and preprocessed data; ``first``: the
    plans name to try first. None if there are none."""
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(folder, "*.json")))
    names.sort(key=lambda name: name != first)
    for name in names:
        plans_file = os.path.join(folder, name + ".json")
        plans = _read_json(plans_file)
        record = plans.get("acnorm_pretrained") if isinstance(plans, dict) else None
        if not isinstance(record, dict) or record.get("family") != weights.family.name \
                or record.get("source_plans") != source_plans or configuration not in plans.get("configurations", {}):
            continue
        checkpoint_file = default_checkpoint(folder, name, configuration)
        data = os.path.join(folder, plans["configurations"][configuration].get("data_identifier", ""))
        if os.path.isfile(checkpoint_file) and os.path.isdir(data) and os.listdir(data) \
                and _holds_the_weights(checkpoint_file, weights):
            return EarlierImport(name, plans_file, checkpoint_file)
    return None


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _holds_the_weights(checkpoint_file: str, weights) -> bool:
    """Whether the import's checkpoint holds exactly the file's tensors where the import took them
    (its ``loaded_keys``; an adapted stem is compared by shape only)."""
    try:
        checkpoint = read_checkpoint(checkpoint_file)
    except (PretrainedLoadError, CheckpointReadError):
        return False
    info, stored = checkpoint.get("acnorm_import", {}), checkpoint.get("network_weights", {})
    adapted = {entry.split(":", 1)[0] for entry in info.get("adapted", [])}
    loaded = info.get("loaded_keys", [])
    if not loaded or set(loaded) - set(weights.state_dict) or set(loaded) - set(stored):
        return False
    for key in loaded:
        mine, theirs = weights.state_dict[key], stored[key]
        if key in adapted:
            if mine.shape[0] != theirs.shape[0]:
                return False
        elif mine.shape != theirs.shape or not torch.equal(mine.to(theirs.dtype), theirs):
            return False
    return True


def preprocessing_of(plans: dict, configuration: str) -> str:
    """What decides the preprocessed data of ``configuration`` in ``plans``, as a comparable text."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = PlansManager(plans).get_configuration(configuration).configuration  # inherits_from resolved
    entries = {key: config.get(key) for key in PREPROCESSING_ENTRIES}
    entries.update({key: plans.get(key) for key in PLANS_PREPROCESSING_ENTRIES})
    return json.dumps(entries, sort_keys=True, default=str)


def share_preprocessed_data(plans_file: str, configuration: str) -> str | None:
    """Point the ``data_identifier`` of ``configuration`` in ``plans_file`` at existing preprocessed
    data of another plans file of the same folder with the same preprocessing; returns that data
    identifier, or None (nothing changed)."""
    folder = os.path.dirname(plans_file)
    plans = _read_json(plans_file)
    own = plans["configurations"][configuration]
    if os.path.isdir(os.path.join(folder, own["data_identifier"])):
        return None
    wanted = preprocessing_of(plans, configuration)
    for other_file in sorted(glob.glob(os.path.join(folder, "*.json"))):
        other = _read_json(other_file)
        if other_file == plans_file or not isinstance(other, dict) or \
                configuration not in other.get("configurations", {}):
            continue
        identifier = other["configurations"][configuration].get("data_identifier")
        data = os.path.join(folder, identifier or "")
        if identifier and os.path.isdir(data) and os.listdir(data) and preprocessing_of(other, configuration) == wanted:
            own["data_identifier"] = identifier
            atomic_write_text(plans_file, json.dumps(plans, indent=4, sort_keys=False))
            return identifier
    return None


def provide_preprocessed_data(dataset_name: str, plans_file: str, configuration: str) -> str:
    """Preprocessed data for ``configuration`` of the plans in ``plans_file``: what is there, data of
    other plans with the same preprocessing (:func:`share_preprocessed_data`), or nnU-Net's
    preprocessing (one process). Returns a note saying which."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

    identifier = _read_json(plans_file)["configurations"][configuration]["data_identifier"]
    if os.path.isdir(os.path.join(os.path.dirname(plans_file), identifier)):
        return f"preprocessed data: {identifier}"
    shared = share_preprocessed_data(plans_file, configuration)
    if shared is not None:
        return f"preprocessed data: {shared} (the same preprocessing; not copied)"
    plans_name = os.path.basename(plans_file)[:-5]
    nnunet_preprocess([int(dataset_name[7:10])], plans_name, [configuration], [1], verbose=False,
                      show_progress_bar=False)
    return f"preprocessed data: {identifier} (preprocessed now: normalisation or spacing changed)"
