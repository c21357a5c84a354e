"""A planned nnU-Net dataset as the commands that start from ``-d -c [-p]`` read it.

nnU-Net's own loaders fail deep inside with a ``FileNotFoundError`` or ``KeyError`` when the
dataset was not planned; the import and ranking commands check first and name what to run.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from nnunet_acnorm.errors import InputError

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class PreprocessedDatasetError(InputError):
    """The dataset, its plans or the configuration cannot be found (one line for the user)."""


def check_identifier(value: str, what: str) -> str:
    """``value`` if it can name a file inside a dataset folder (plans identifier, configuration):
    letters, digits and ``_ . + -``, no path separator, no ``..``; else PreprocessedDatasetError."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value) or ".." in value:
        raise PreprocessedDatasetError(
            f"{what} {value!r} is not a valid identifier: it names a file inside the dataset's folder, so use only "
            "letters, digits and _ . + - (no path separators, no '..')")
    return value


@dataclass
class PreprocessedDataset:
    name: str
    folder: str
    plans_file: str
    plans: dict
    dataset_json: dict


def read_preprocessed_dataset(dataset: str, configuration: str,
                              plans_identifier: str = "nnUNetPlans") -> PreprocessedDataset:
    """Plans and dataset.json of ``dataset`` (id or name) under ``nnUNet_preprocessed``, with a
    check that ``configuration`` is planned."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    check_identifier(plans_identifier, "plans identifier")
    check_identifier(configuration, "configuration")
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:  # nnU-Net itself takes an empty value as set, and then fails on paths
        raise PreprocessedDatasetError("nnUNet_preprocessed is not set (or empty); set the nnU-Net environment "
                                       "variables")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise PreprocessedDatasetError(f"dataset {dataset}: {str(e).splitlines()[0]}") from None
    folder = os.path.join(preprocessed, name)
    plans_file = os.path.join(folder, plans_identifier + ".json")
    dataset_json_file = os.path.join(folder, "dataset.json")
    for needed in (plans_file, dataset_json_file):
        if not os.path.isfile(needed):
            raise PreprocessedDatasetError(
                f"{needed} not found: run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} first "
                "(or pass -p with existing plans)")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    planned = plans.get("configurations", {})
    if configuration not in planned:
        raise PreprocessedDatasetError(
            f"configuration {configuration!r} is not in {plans_file} (has: {', '.join(planned)})")
    return PreprocessedDataset(name, folder, plans_file, plans, dataset_json)
