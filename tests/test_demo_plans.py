"""The datasets of the demo and the experiments give nnU-Net plans a user would train on (issue 28):
no transposition into strips, 2D patches of at least 64 x 64 pixels with 3 x 3 kernels.

Plans only (fingerprint and ``nnUNetv2_plan_experiment`` through the console scripts); every task
that is some transfer's target (its plans are the ones both networks use) is checked, the demo's
included. The unseen-patient task fetches the TotalSegmentator sdist from PyPI once (cached).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nnunet_acnorm.demo import pipeline
from nnunet_acnorm.demo.datasets import DEMO_SPACING, TASKS, write_raw_dataset
from tests.factories.nnunet import TESTS_DIR, nnunet_env, run_console


def _experiment_targets() -> set[str]:
    spec = importlib.util.spec_from_file_location("finetune_experiment",
                                                  TESTS_DIR.parent / "experiments" / "finetune_experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return {t.target.name for t in module.TRANSFERS.values()}


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("demo_plans")
    env = nnunet_env(base, training=False)
    targets = _experiment_targets() | {pipeline.TARGET.name}
    ids = []
    for name in sorted(targets):
        write_raw_dataset(Path(env["nnUNet_raw"]), TASKS[name])
        ids.append(TASKS[name].dataset_id)
    run_console("nnUNetv2_extract_fingerprint", "-d", *ids, "-np", 1, env=env)
    run_console("nnUNetv2_plan_experiment", "-d", *ids, env=env)
    return {name: json.loads((Path(env["nnUNet_preprocessed"]) / TASKS[name].folder_name / "nnUNetPlans.json")
                             .read_text()) for name in targets}


def test_every_target_is_planned_as_axial_slices(plans):
    assert pipeline.TARGET.name in plans and "DemoCTSpineUnseenPatient" in plans
    for name, plan in plans.items():
        config = plan["configurations"]["2d"]
        kernels = config["architecture"]["arch_kwargs"]["kernel_sizes"]
        assert plan["transpose_forward"] == [0, 1, 2], name
        assert min(config["patch_size"]) >= 64, (name, config["patch_size"])
        assert kernels[0] == [3, 3], (name, kernels[0])
        assert config["spacing"] == [DEMO_SPACING] * 2, (name, config["spacing"])


def test_unseen_patient_is_held_out(tmp_path):
    task = TASKS["DemoCTSpineUnseenPatient"]
    folder = write_raw_dataset(tmp_path, task, held_out_dir=tmp_path / "test")
    assert task.held_out_cases == [task.unseen_case]
    assert not list((folder / "imagesTr").glob(f"{task.unseen_case}*"))
    import SimpleITK as sitk
    import numpy as np

    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "test" / "labelsTs" / f"{task.unseen_case}.nii.gz")))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "test" / "imagesTs" / f"{task.unseen_case}_0000.nii.gz")))
    # both structures are there, on their tissue (the label map's flipped y axis is resampled onto the
    # series): vertebrae on bone, back muscles on muscle
    for label in (1, 2):
        assert (seg == label).sum() > 300, label
    assert float(np.median(image[seg == 1])) > 120
    assert -50 < float(np.median(image[seg == 2])) < 100
