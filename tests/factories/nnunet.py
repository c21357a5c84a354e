"""Shared helpers for tests that drive nnU-Net's console scripts on tiny generated datasets.

- :func:`make_tiny_dataset` writes a small nnU-Net raw dataset (NIfTI, ``dataset.json``) whose
  labels are learnable blobs with label-specific intensities.
- :func:`nnunet_env` gives an environment with ``nnUNet_raw/preprocessed/results`` in a tmp dir.
- :func:`run_console` runs an installed console script (next to ``sys.executable``) in a
  subprocess, as a user would, and fails the test with its output when it fails.
- :func:`build_once` builds an expensive input once per test run, shared by the pytest-xdist
  workers; :func:`planned_tiny_dataset` is such an input (a dataset planned and preprocessed by
  nnU-Net), :func:`copy_planned` puts a private copy of it under a test's folder.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent.parent
#: shim folder with test-only trainers (few iterations per epoch), for nnUNet_extTrainer
TEST_TRAINER_FOLDER = TESTS_DIR / "nnunet_ext_test_trainers"
#: the seed of every nnU-Net training a test runs (through ``nnUNet_acnorm_seed``, see :func:`nnunet_env`)
TRAINING_SEED = 0


def make_tiny_dataset(raw_dir, dataset_id: int, n_cases: int = 6, shape=(24, 24, 24), n_channels: int = 1,
                      n_labels: int = 2, name: str = "Tiny", spacing=(1.0, 1.0, 1.0), seed: int = 0,
                      intensity_offset: float = 0.0) -> Path:
    """Write ``Dataset{id:03d}_{name}`` under ``raw_dir`` and return its folder.

    ``n_labels`` counts background: labels 1..n_labels-1 are boxes at random places, each with its
    own mean intensity (plus ``intensity_offset``, to make a shifted "target domain"), on noise.
    """
    import SimpleITK as sitk

    if n_labels < 2:
        raise ValueError("n_labels counts background and must be >= 2")
    rng = np.random.default_rng(seed)
    folder = Path(raw_dir) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in shape)
    for case in range(n_cases):
        seg = np.zeros(shape, dtype=np.uint8)
        for label in range(1, n_labels):
            size = [max(2, s // 3) for s in shape]
            start = [int(rng.integers(0, s - z + 1)) for s, z in zip(shape, size)]
            seg[tuple(slice(a, a + z) for a, z in zip(start, size))] = label
        for channel in range(n_channels):
            image = rng.normal(0.0, 1.0, shape).astype(np.float32) + intensity_offset
            for label in range(1, n_labels):
                image[seg == label] += 3.0 * label + channel
            _write(sitk, image, folder / "imagesTr" / f"case_{case:03d}_{channel:04d}.nii.gz", spacing)
        _write(sitk, seg, folder / "labelsTr" / f"case_{case:03d}.nii.gz", spacing)
    dataset_json = {
        "channel_names": {str(c): "MR" for c in range(n_channels)},  # z-score normalisation
        "labels": {"background": 0, **{f"label{i}": i for i in range(1, n_labels)}},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def _write(sitk, array: np.ndarray, path: Path, spacing) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(path))


def copy_test_images(dataset_folder, out_dir, cases=(0,)) -> Path:
    """Copy some training images of a raw dataset into ``out_dir`` as an ``imagesTs``-like folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for image in sorted((Path(dataset_folder) / "imagesTr").glob(f"case_{case:03d}_*.nii.gz")):
            shutil.copy(image, out_dir / image.name)
    return out_dir


def nnunet_env(base_dir, training: bool = True, extra_trainer_folders=(), **extra) -> dict:
    """os.environ plus nnU-Net folders under ``base_dir`` (created), a single thread, and, with
    ``training``, no data-augmentation workers (``nnUNet_n_proc_DA=0``; not for planning, where it
    crashes). ``extra_trainer_folders`` are prepended to ``nnUNet_extTrainer``. Trainings are seeded
    (``nnUNet_acnorm_seed`` = :data:`TRAINING_SEED`, read by the plugin's trainers and the test
    trainers; ``extra`` or the caller may set or remove it)."""
    from nnunet_acnorm.nnunet.seeding import SEED_ENV

    base = Path(base_dir)
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(base / sub)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_def_n_proc="1", PYTHONUNBUFFERED="1",
               nnUNet_compile="false", **{SEED_ENV: str(TRAINING_SEED)})
    if training:
        env["nnUNet_n_proc_DA"] = "0"
    else:
        env.pop("nnUNet_n_proc_DA", None)
    if extra_trainer_folders:
        parts = [str(f) for f in extra_trainer_folders] + [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        env["nnUNet_extTrainer"] = os.pathsep.join(parts)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def console_script(name: str) -> str:
    """Path of an installed console script of the running interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"console script {name} not installed next to {sys.executable}")
        return found
    return str(path)


def run_console(script: str, *args, env: dict | None = None, timeout: float = 600, check: bool = True,
                cwd=None) -> subprocess.CompletedProcess:
    """Run console script ``script`` with ``args`` in a process of its own (a fork of a preloaded
    interpreter, :mod:`tests.console_server`; ``ACNORM_TEST_FRESH_PROCESSES=1``: a fresh one); with
    ``check``, fail the test (showing stdout and stderr) on a non-zero exit. Returns the
    CompletedProcess (text output)."""
    from tests import console_server

    cmd = [console_script(script), *[str(a) for a in args]]
    proc = console_server.run(cmd, env=env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        import pytest

        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-6000:]}"
                    f"\n--- stderr (tail) ---\n{proc.stderr[-6000:]}", pytrace=False)
    return proc


def acnorm_trainer_env(base_dir, training: bool = True, **extra) -> dict:
    """:func:`nnunet_env` with the test trainers and the plugin's trainer folder on nnUNet_extTrainer
    (explicitly: an editable install has no start-up hook; the hook has its own test)."""
    from nnunet_acnorm.nnunet.discovery import trainer_shim_folder

    env = nnunet_env(base_dir, training=training, extra_trainer_folders=(TEST_TRAINER_FOLDER,), **extra)
    parts = [p for p in env["nnUNet_extTrainer"].split(os.pathsep) if p]
    if trainer_shim_folder() not in parts:
        parts.append(trainer_shim_folder())
    env["nnUNet_extTrainer"] = os.pathsep.join(parts)
    return env


def build_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name`` built by ``build(folder)`` once per test run: in the run's temporary folder
    (under pytest-xdist the parent of each worker's ``basetemp``, which the workers share), under a
    file lock, so that a second worker waits for the first one's build instead of building it again.
    Treat it as read-only (copy what a test changes)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").is_file():
            staging = root / f"{name}.building"
            for old in (folder, staging):
                if old.exists():
                    shutil.rmtree(old)
            staging.mkdir()
            build(staging)
            staging.rename(folder)
            (folder / ".complete").touch()
    return folder


#: the shared planned dataset: nnU-Net id, name, configuration
TINY_ID, TINY_NAME, TINY_CONFIG = 931, "Dataset931_Tiny", "3d_fullres"


def planned_tiny_dataset(tmp_path_factory) -> Path:
    """``Dataset931_Tiny`` (:func:`make_tiny_dataset`: 5 cases of 24^3, 2 labels, seed 0) planned and
    preprocessed for 3d_fullres by ``nnUNetv2_plan_and_preprocess``, once per test run
    (:func:`build_once`); the folder holds ``raw/`` and ``preprocessed/``."""
    def build(folder: Path) -> None:
        env = acnorm_trainer_env(folder, training=False)
        make_tiny_dataset(env["nnUNet_raw"], TINY_ID, n_cases=5, name=TINY_NAME.split("_", 1)[1], seed=0)
        run_console("nnUNetv2_plan_and_preprocess", "-d", TINY_ID, "-c", TINY_CONFIG, "-np", 1, "-npfp", 1, env=env)

    return build_once(tmp_path_factory, "planned_" + TINY_NAME, build)


def copy_planned(shared, base) -> None:
    """Copy the ``raw/`` and ``preprocessed/`` folders of a :func:`build_once` dataset into ``base``
    (the folders :func:`nnunet_env` points nnU-Net to)."""
    for sub in ("raw", "preprocessed"):
        shutil.copytree(Path(shared) / sub, Path(base) / sub, dirs_exist_ok=True)
