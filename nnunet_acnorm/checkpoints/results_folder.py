"""nnU-Net v2 results folders as pretrained input (TotalSegmentator's models are published as such):

    Dataset291_TotalSegmentator_part1_organs_1559subj/
        nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/      <- the model folder
            plans.json  dataset.json
            fold_0/checkpoint_final.pth

:func:`locate_results_folder` accepts the model folder, a ``fold_X`` folder or a checkpoint inside
one, and returns the checkpoint to read plus the folder's ``plans.json`` / ``dataset.json`` (what
nnU-Net's own predictor builds the network from); :func:`apply_results_folder` puts them into the
weights' facts, so that the import builds the network of those plans.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nnunet_acnorm.checkpoints.family import PretrainedLoadError, PretrainedWeights
from nnunet_acnorm.checkpoints.families.nnunet_v2 import configuration_architecture
from nnunet_acnorm.inputs import read_json_object

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")


@dataclass
class ResultsFolder:
    model_folder: str
    checkpoint: str
    plans: dict
    dataset_json: dict
    #: from the folder's name ``<trainer>__<plans>__<configuration>``, where it has that form
    trainer: str | None = None
    configuration: str | None = None


def _is_model_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "plans.json")) and os.path.isfile(os.path.join(folder, "dataset.json"))


def _checkpoint_in(fold: str) -> str | None:
    return next((os.path.join(fold, n) for n in CHECKPOINT_NAMES if os.path.isfile(os.path.join(fold, n))), None)


def _checkpoint_of_model_folder(folder: str) -> str:
    folds = sorted(n for n in os.listdir(folder) if n.startswith("fold_") and _checkpoint_in(os.path.join(folder, n)))
    if len(folds) == 1:
        return _checkpoint_in(os.path.join(folder, folds[0]))
    if not folds:
        raise PretrainedLoadError(f"{folder}: an nnU-Net results folder without a trained fold (no fold_*/"
                                  f"{' or '.join(CHECKPOINT_NAMES)}); give a checkpoint file")
    raise PretrainedLoadError(f"{folder}: holds {len(folds)} trained folds ({', '.join(folds)}); give the checkpoint "
                              f"of one, e.g. -i {os.path.join(folder, folds[0], 'checkpoint_final.pth')}")


def locate_results_folder(path: str) -> ResultsFolder | None:
    """The results folder ``path`` is or lies in (model folder, fold folder, checkpoint in a fold), or None."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and _is_model_folder(path):
        model_folder, checkpoint = path, _checkpoint_of_model_folder(path)
    elif os.path.isdir(path) and os.path.basename(path).startswith("fold_") and _is_model_folder(os.path.dirname(path)):
        model_folder, checkpoint = os.path.dirname(path), _checkpoint_in(path)
        if checkpoint is None:
            raise PretrainedLoadError(f"{path}: no {' or '.join(CHECKPOINT_NAMES)} in this fold folder")
    elif os.path.isfile(path) and os.path.basename(os.path.dirname(path)).startswith("fold_") \
            and _is_model_folder(os.path.dirname(os.path.dirname(path))):
        model_folder, checkpoint = os.path.dirname(os.path.dirname(path)), path
    else:
        return None
    parts = split_model_folder_name(os.path.basename(model_folder))
    trainer, configuration = (parts[0], parts[2]) if parts else (None, None)
    plans, dataset_json = (read_json_object(os.path.join(model_folder, name), PretrainedLoadError)
                           for name in ("plans.json", "dataset.json"))
    return ResultsFolder(model_folder, checkpoint, plans, dataset_json, trainer, configuration)


def split_model_folder_name(name: str) -> tuple[str, str, str] | None:
    """(trainer, plans identifier, configuration) of a model folder named
    ``<trainer>__<plans>__<configuration>``; the plans identifier may hold ``__`` itself (the plans
    nnUNetv2_acnorm_import writes, ``nnUNetPlans__genesis``); None for another name."""
    parts = name.split("__")
    if len(parts) < 3 or not all(parts):
        return None
    return parts[0], "__".join(parts[1:-1]), parts[-1]


def apply_results_folder(weights: PretrainedWeights, folder: ResultsFolder) -> None:
    """Make the folder's plans and dataset.json the source of ``weights``' architecture (nnU-Net v2 files)."""
    if weights.family.name != "nnunet_v2":
        return
    configuration = weights.info.get("configuration") or folder.configuration
    if configuration is None:
        raise PretrainedLoadError(f"{folder.checkpoint}: the configuration it was trained with is neither in the "
                                  f"checkpoint nor in the folder name {os.path.basename(folder.model_folder)!r}")
    weights.info.update(plans=folder.plans, dataset_json=folder.dataset_json, configuration=configuration,
                        results_folder=folder.model_folder,
                        architecture=configuration_architecture(folder.plans, configuration))
    weights.info.pop("plans_problem", None)
    if not weights.info.get("trainer_name"):
        weights.info["trainer_name"] = folder.trainer
