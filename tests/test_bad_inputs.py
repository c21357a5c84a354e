"""A battery of bad inputs and faults against the commands, through the real console scripts.

Each case checks that the command gives one clear line naming the file, key or option at fault
(or resumes correctly), that no pickled code runs, and that nothing existing is changed. The 16
cases of issue 11 ("Checkpoints you can trust") are marked ``issue 11``; the others were handled
before and are kept here so that they stay handled.

One module-scoped nnU-Net model: the shared tiny dataset (planned and preprocessed once per test
run, tests/factories/nnunet.py), fine-tuned for one epoch with ``nnUNetTrainerACNorm_tinyTest -pretrained_weights`` from a checkpoint in nnU-Net's
format. Tests that change checkpoints work on their own copy of ``nnUNet_results``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.factories import checkpoints as cf
from tests.factories.nnunet import (TINY_CONFIG, TINY_ID, TINY_NAME, acnorm_trainer_env, console_script,
                                    copy_planned, copy_test_images, planned_tiny_dataset, run_console)

pytestmark = pytest.mark.integration

DATASET, NAME, CONFIG = TINY_ID, TINY_NAME, TINY_CONFIG  # the shared planned dataset
TRAINER = "nnUNetTrainerACNorm_tinyTest"
MODEL = f"{TRAINER}__nnUNetPlans__{CONFIG}"
SOURCE_KEYS = (".source_weight", ".source_bias")
REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Pickles as a call of os.system: loading the file unsafely creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(folder) -> dict:
    folder = Path(folder)
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(proc, *fragments: str) -> str:
    """The command failed with one clear line (its last line on stderr, no traceback) holding ``fragments``."""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-5000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines, text[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in the error line:\n{lines[-1]}\n---\n{text[-3000:]}"
    return lines[-1]


#: what the weights-only unpickler of torch < 2.4 rebuilds (torch 2.1.2's list; it has no allow-list to add to):
#: containers, tensors, storages, dtypes; not torch.device (nor numpy scalars, sets, ...)
_TORCH_2_1_WEIGHTS_ONLY = {"collections.OrderedDict", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
                           "torch.Size", "torch.Tensor", "torch._tensor._rebuild_from_type_v2"} | {
    f"torch._utils._rebuild_{name}" for name in ("parameter", "tensor", "tensor_v2", "sparse_tensor",
                                                  "meta_tensor_no_storage", "nested_tensor")}


def _refused_by_torch_2_1_weights_only(path) -> list[str]:
    """The globals in a checkpoint's pickle that torch 2.1's ``torch.load(weights_only=True)`` refuses."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    refused = []
    for opcode, arg, _ in pickletools.genops(data):
        assert opcode.name != "STACK_GLOBAL", "torch.save writes protocol 2 (GLOBAL) pickles"
        if opcode.name == "GLOBAL":
            name = arg.replace(" ", ".")
            if name in _TORCH_2_1_WEIGHTS_ONLY or (name.startswith("torch.") and (
                    name.endswith("Storage") or isinstance(getattr(torch, name[6:], None), torch.dtype))):
                continue
            refused.append(name)
    return refused


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    copy_planned(planned_tiny_dataset(tmp_path_factory), base)  # the shared planned dataset, a private copy
    env_plan = acnorm_trainer_env(base, training=False)
    raw = Path(env_plan["nnUNet_raw"]) / NAME
    pre = Path(env_plan["nnUNet_preprocessed"]) / NAME
    arch = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"][CONFIG]["architecture"]
    files = base / "files"
    source = cf.save_nnunet_v2_checkpoint(files / "source" / "checkpoint_final.pth", architecture=arch,
                                          num_classes=2, seed=1)
    env = acnorm_trainer_env(base)
    run_console("nnUNetv2_train", DATASET, CONFIG, 0, "-tr", TRAINER, "-device", "cpu", "-pretrained_weights",
                source, env={**env, "ACNORM_TEST_SKIP_VALIDATION": "1"})
    results = Path(env["nnUNet_results"])
    fold = results / NAME / MODEL / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "checkpoint_best.pth").is_file()
    images = copy_test_images(raw, base / "imagesTs", cases=(0,))
    return {"base": base, "env": env, "env_plan": env_plan, "pre": pre, "arch": arch, "source": source,
            "results": results, "images": images, "files": files}


@pytest.fixture
def results_copy(model, tmp_path):
    """A private copy of the trained nnUNet_results: (env using it, model folder, fold_0 folder)."""
    results = tmp_path / "results"
    shutil.copytree(model["results"], results)
    env = {**model["env"], "nnUNet_results": str(results)}
    folder = results / NAME / MODEL
    return env, folder, folder / "fold_0"


def _strip_sources(path) -> None:
    checkpoint = _load(path)
    weights = checkpoint["network_weights"]
    assert any(k.endswith(SOURCE_KEYS) for k in weights)
    checkpoint["network_weights"] = type(weights)((k, v) for k, v in weights.items() if not k.endswith(SOURCE_KEYS))
    torch.save(checkpoint, path)


def _with_code(path, marker) -> None:
    checkpoint = _load(path)
    checkpoint["trainer_notes"] = _RunsCode(marker)
    torch.save(checkpoint, path)


def _train(env, *args, **extra):
    return run_console("nnUNetv2_train", DATASET, CONFIG, 0, "-tr", TRAINER, "-device", "cpu", *args,
                       env={**env, **extra}, check=False)


# == issue 11: strict AC-Norm reload ==============================================================
def test_stripped_checkpoint_refused_by_continue_and_val(results_copy):
    """issue 11: a checkpoint without its source buffers is refused by --c and --val (one line)."""
    env, _, fold = results_copy
    _strip_sources(fold / "checkpoint_final.pth")
    before = _tree(fold)
    for flag in ("--c", "--val"):
        line = _error_line(_train(env, flag, ACNORM_TEST_EPOCHS="2"), "checkpoint_final.pth",
                           "holds no source affines", "stripped or edited")
        assert "first: 'encoder." in line
    after = _tree(fold)
    assert {k: v for k, v in after.items() if not k.startswith("training_log")} == \
        {k: v for k, v in before.items() if not k.startswith("training_log")}


def test_stripped_checkpoint_refused_by_predict_and_fold(model, results_copy, tmp_path):
    """issue 11: nnUNetv2_predict_from_modelfolder, nnUNetv2_predict, the safe predict entry and the
    fold command refuse a checkpoint without its source buffers (it was accepted silently)."""
    env, folder, fold = results_copy
    _strip_sources(fold / "checkpoint_final.pth")
    stock = run_console("nnUNetv2_predict_from_modelfolder", "-i", model["images"], "-o", tmp_path / "p1",
                        "-m", folder, "-f", 0, "-device", "cpu", env=env, check=False)
    assert stock.returncode != 0 and "source_weight/source_bias are missing" in stock.stderr, stock.stderr[-3000:]
    stock = run_console("nnUNetv2_predict", "-i", model["images"], "-o", tmp_path / "p2", "-d", DATASET, "-c",
                        CONFIG, "-f", 0, "-tr", TRAINER, "-device", "cpu", env=env, check=False)
    assert stock.returncode != 0 and "source_weight/source_bias are missing" in stock.stderr, stock.stderr[-3000:]
    assert not list((tmp_path / "p2").glob("*.nii.gz"))
    safe = run_console("nnUNetv2_acnorm_predict_from_modelfolder", "-i", model["images"], "-o", tmp_path / "p3",
                       "-m", folder, "-f", 0, "-device", "cpu", env=env, check=False)
    _error_line(safe, "source_weight/source_bias are missing")
    fold_cmd = run_console("nnUNetv2_acnorm_fold", "-i", folder, env=env, check=False)
    _error_line(fold_cmd, "checkpoint_final.pth", "holds no source affines")
    assert not any(p.name.startswith(("nnUNetTrainer__", ".nnUNetTrainer__")) for p in folder.parent.iterdir())


# == issue 11: no pickled code runs ================================================================
def test_continue_does_not_run_pickled_code(results_copy, tmp_path):
    """issue 11: --c on a checkpoint_latest.pth whose pickle calls os.system: refused, nothing runs."""
    env, _, fold = results_copy
    marker = tmp_path / "pwned"
    shutil.copy(fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    _with_code(fold / "checkpoint_latest.pth", marker)
    digest = _sha(fold / "checkpoint_latest.pth")
    _error_line(_train(env, "--c", ACNORM_TEST_EPOCHS="2"), "checkpoint_latest.pth",
                "needs arbitrary pickled Python objects", "posix.system")
    assert not marker.exists()
    assert _sha(fold / "checkpoint_latest.pth") == digest


def test_pickled_code_named_by_pretrained_weights_fold_and_safe_predict(model, results_copy, tmp_path):
    """issue 11: -pretrained_weights and the fold command said "corrupted" for a pickled-code file;
    they now say it needs arbitrary pickled objects (as import, cls and rank do); no code runs,
    also not in nnUNetv2_acnorm_predict_from_modelfolder."""
    env, folder, fold = results_copy
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_checkpoint.pth"
    shutil.copy(model["source"], evil)
    _with_code(evil, marker)
    fresh = {**env, "nnUNet_results": str(tmp_path / "fresh_results")}
    os.makedirs(fresh["nnUNet_results"])
    _error_line(_train(fresh, "-pretrained_weights", evil), "evil_checkpoint.pth",
                "needs arbitrary pickled Python objects", "--trust_pickle")
    _with_code(fold / "checkpoint_final.pth", marker)
    _error_line(run_console("nnUNetv2_acnorm_fold", "-i", folder, env=env, check=False), "checkpoint_final.pth",
                "needs arbitrary pickled Python objects")
    _error_line(run_console("nnUNetv2_acnorm_predict_from_modelfolder", "-i", model["images"], "-o",
                            tmp_path / "pred", "-m", folder, "-f", 0, "-device", "cpu", env=env, check=False),
                "checkpoint_final.pth", "needs arbitrary pickled Python objects")
    assert not marker.exists()


# == issue 11: --c on a truncated checkpoint ======================================================
def test_continue_falls_back_from_truncated_latest(results_copy):
    """issue 11: --c on a truncated checkpoint_latest.pth (a kill during a save) names the file and
    continues from the next checkpoint in nnU-Net's order (checkpoint_best.pth)."""
    env, _, fold = results_copy
    data = (fold / "checkpoint_final.pth").read_bytes()
    (fold / "checkpoint_final.pth").unlink()
    (fold / "checkpoint_latest.pth").write_bytes(data[: len(data) // 2])
    proc = _train(env, "--c", ACNORM_TEST_EPOCHS="2", ACNORM_TEST_SKIP_VALIDATION="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warning = [line for line in proc.stdout.splitlines() if "Continuing from checkpoint_best.pth" in line]
    assert warning and "checkpoint_latest.pth" in warning[0] and "truncated" in warning[0]
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2  # epoch 1 of the best checkpoint, then one more
    assert not list(fold.glob("*.tmp")), "atomic writes leave no temporary file"


def test_continue_without_readable_checkpoint_is_one_line(results_copy):
    env, _, fold = results_copy
    data = (fold / "checkpoint_final.pth").read_bytes()
    (fold / "checkpoint_final.pth").write_bytes(data[:1000])
    (fold / "checkpoint_best.pth").write_bytes(b"")
    _error_line(_train(env, "--c"), "checkpoint_final.pth", "truncated", "start the training again")


# == issue 11: -pretrained_weights ================================================================
def test_refused_pretrained_weights_leaves_no_results_folder(model, tmp_path):
    """issue 11: a rejected -pretrained_weights left a results folder with a training log behind."""
    results = tmp_path / "results"
    results.mkdir()
    env = {**model["env"], "nnUNet_results": str(results)}
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    _error_line(_train(env, "-pretrained_weights", junk), "junk.pth", "cannot load checkpoint")
    assert list(results.iterdir()) == []
    # a results folder that exists keeps what it had; only the refused run's log goes
    existing = results / NAME / MODEL / "fold_0"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("mine")
    _error_line(_train(env, "-pretrained_weights", tmp_path / "missing.pth"), "not found")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_module_prefixed_pretrained_weights_name_the_prefix(model, tmp_path):
    """issue 11: a module.-prefixed state dict: -pretrained_weights said "missing key"."""
    checkpoint = _load(model["source"])
    checkpoint["network_weights"] = {"module." + k: v for k, v in checkpoint["network_weights"].items()}
    prefixed = tmp_path / "ddp_checkpoint.pth"
    torch.save(checkpoint, prefixed)
    env = {**model["env"], "nnUNet_results": str(tmp_path / "results")}
    _error_line(_train(env, "-pretrained_weights", prefixed), "ddp_checkpoint.pth", "prefix 'module.'",
                "nnUNetv2_acnorm_import")


def test_imported_checkpoint_without_its_plans_names_them(model, tmp_path):
    """issue 11: an imported checkpoint used without -p <plans> named nnUNetv2_move_plans_between_datasets;
    it now names the plans the checkpoint was made for."""
    genesis = cf.save_genesis_checkpoint(tmp_path / "Genesis_Chest_CT.pt", base_features=4)
    output = tmp_path / "imported.pth"
    run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", CONFIG, "-i", genesis, "-pl", "nnUNetPlans__badgen",
                "-o", output, "--no_preprocess", env=model["env_plan"])
    env = {**model["env"], "nnUNet_results": str(tmp_path / "results")}
    line = _error_line(_train(env, "-pretrained_weights", output), "imported.pth", "nnUNetPlans__badgen",
                       "-p nnUNetPlans__badgen")
    assert "move_plans_between_datasets" not in line


# == issue 11: the import, ranking and classification commands ====================================
def test_import_refuses_plans_identifier_with_a_path(model):
    """issue 11: nnUNetv2_acnorm_import -pl ../hacked wrote a plans file outside the dataset folder."""
    genesis = cf.save_genesis_checkpoint(model["base"] / "files" / "Genesis_pl.pt", base_features=4)
    before = sorted(p.name for p in model["pre"].parent.iterdir())
    for name in ("../hacked", "a/b", ".."):
        _error_line(run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", CONFIG, "-i", genesis, "-pl", name,
                                "--no_preprocess", env=model["env_plan"], check=False),
                    "not a valid identifier")
    assert sorted(p.name for p in model["pre"].parent.iterdir()) == before
    assert not (model["pre"].parent / "hacked.json").exists()


def test_import_and_rank_strip_module_prefix_and_rank_names_a_directory(model, tmp_path):
    """issue 11: a module.-prefixed nnU-Net checkpoint: import and rank said "no known family";
    rank -i DIR said "no such file" for a directory that exists."""
    checkpoint = _load(model["source"])
    checkpoint["network_weights"] = {"module." + k: v for k, v in checkpoint["network_weights"].items()}
    prefixed = tmp_path / "ddp" / "checkpoint_final.pth"
    prefixed.parent.mkdir()
    torch.save(checkpoint, prefixed)
    out = run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", CONFIG, "-i", prefixed, "-pl",
                      "nnUNetPlans__ddp", "-o", tmp_path / "ddp.pth", "--no_preprocess", env=model["env_plan"]).stdout
    assert "family nnunet_v2" in out and "'module.'" in out and "stripped" in out
    directory = tmp_path / "a_folder"
    directory.mkdir()
    proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", CONFIG, "-i", prefixed, directory, "-o",
                       tmp_path / "ranking", "-device", "cpu", "--no_progress", env=model["env"])
    result = json.loads((tmp_path / "ranking" / "ranking.json").read_text())
    status = {Path(c["path"]).name: c for c in result["candidates"]}
    assert status["checkpoint_final.pth"]["status"] == "ranked", status
    assert "stripped" in " ".join(status["checkpoint_final.pth"]["notes"])
    assert status["a_folder"]["status"] == "skipped" and "a directory" in status["a_folder"]["reason"]
    assert "no such file" not in proc.stdout


def test_family_label_says_resnet18_for_a_resnet18_file(model, tmp_path):
    """issue 11: the family label said ResNet-50 for a ResNet-18 file."""
    resnet18 = cf.save_torchvision_resnet_checkpoint(tmp_path / "resnet18-f37072fd.pth", arch="resnet18")
    line = _error_line(run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", CONFIG, "-i", resnet18,
                                   "--no_preprocess", env=model["env_plan"], check=False), "ResNet-18")
    assert "ResNet-50" not in line


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    from tests.factories.images import make_rgb_dataset

    base = tmp_path_factory.mktemp("cls_bad")
    make_rgb_dataset(base / "images", base / "labels.csv", n=10, size=32)
    resnet18 = cf.save_torchvision_resnet_checkpoint(base / "resnet18.pth", arch="resnet18")
    return {"base": base, "images": base / "images", "labels": base / "labels.csv", "pretrained": resnet18}


def _cls_train(fundus, out, *args):
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1"}
    return run_console("nnUNetv2_acnorm_cls_train", "-i", fundus["images"], "-l", fundus["labels"], "-o", out,
                       "-pretrained", fundus["pretrained"], "-device", "cpu", "-image_size", 32, "-batch_size", 4,
                       "-num_workers", 0, *args, env=env, check=False)


def test_cls_train_validates_arguments_before_writing(fundus, tmp_path):
    """issue 11: -tau 0 gave a traceback after the weights were loaded, leaving a splits file and a log."""
    out = tmp_path / "results"
    for args, fragment in ((("-f", 0, "-tau", 0), "-tau 0"), (("-f", 0, "-initial_lr", -1), "-initial_lr"),
                           (("-f", 0, "-batch_size", 0), "-batch_size 0")):
        proc = _cls_train(fundus, out, *args)
        _error_line(proc, fragment)
        assert not out.exists()


@pytest.fixture(scope="module")
def cls_trained(fundus):
    """Fold 0 of an AC-Norm classification training (2 classes, one epoch)."""
    out = fundus["base"] / "trained"
    proc = _cls_train(fundus, out, "-f", 0, "-num_epochs", 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_cls_train_refuses_inconsistent_folds(fundus, cls_trained, tmp_path):
    """issue 11: -num_classes 3 -f 2 into a results folder whose fold 0 has 2 classes rewrote
    dataset_classification.json; now refused before anything is written."""
    out = tmp_path / "results"
    shutil.copytree(cls_trained, out)
    before = _tree(out)
    _error_line(_cls_train(fundus, out, "-f", 2, "-num_classes", 3, "-num_epochs", 1), "2 classes", "3 classes",
                "dataset_classification.json")
    assert _tree(out) == before
    assert not (out / "fold_2").exists()


def test_cls_predict_refuses_stripped_acnorm_checkpoint(fundus, cls_trained, tmp_path):
    """Strict reload in the classification trainer too: a checkpoint without its source affines is
    refused by nnUNetv2_acnorm_cls_predict (and --c), not silently given source = target."""
    out = tmp_path / "results"
    shutil.copytree(cls_trained, out)
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        _strip_sources(out / "fold_0" / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _error_line(run_console("nnUNetv2_acnorm_cls_predict", "-i", fundus["images"], "-o", tmp_path / "p.csv", "-m",
                            out, "-device", "cpu", "-num_workers", 0, env=env, check=False),
                "source_weight/source_bias are missing")
    assert not (tmp_path / "p.csv").exists()


def test_checkpoint_writes_are_atomic(tmp_path):
    """A save that fails half-way (a kill, a full disk) leaves the previous checkpoint as it was
    and no temporary file: the trainers' save_checkpoint and the import's writes."""
    from nnunet_acnorm.checkpoints.io import atomic_torch_save
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    class Unpicklable:
        def __reduce__(self):
            raise OSError("disk full")

    path = tmp_path / "checkpoint_latest.pth"
    atomic_torch_save({"network_weights": {"w": torch.ones(2)}}, path)
    digest = _sha(path)
    with pytest.raises(OSError):
        atomic_torch_save({"network_weights": {"w": torch.zeros(2)}, "x": Unpicklable()}, path)
    assert _sha(path) == digest and [p.name for p in tmp_path.iterdir()] == [path.name]

    # the trainer: nnU-Net's save_checkpoint, through the temporary file
    trainer = nnUNetTrainerACNorm.__new__(nnUNetTrainerACNorm)
    network = torch.nn.Linear(2, 2)
    trainer.__dict__.update(local_rank=0, disable_checkpointing=False, is_ddp=False, network=network,
                            optimizer=torch.optim.SGD(network.parameters(), 0.1), grad_scaler=None, _best_ema=None,
                            current_epoch=0, my_init_kwargs={}, inference_allowed_mirroring_axes=None,
                            logger=type("Logger", (), {"get_checkpoint": lambda self: {"x": Unpicklable()}})())
    with pytest.raises(OSError):
        trainer.save_checkpoint(str(path))
    assert _sha(path) == digest and [p.name for p in tmp_path.iterdir()] == [path.name]
    trainer.logger = type("Logger", (), {"get_checkpoint": lambda self: {"mean_fg_dice": [0.5]}})()
    trainer.save_checkpoint(str(path))
    assert torch.load(path, weights_only=True)["current_epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# == issue 11: docs =================================================================================
def test_docs_install_from_a_clone():
    """issue 11: docs/trainers.md said `pip install nnunet-acnorm`, which is not on the index."""
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        assert "pip install nnunet-acnorm" not in doc.read_text(), doc


# == handled before: kept handled ===================================================================
#: pretrained norm affines edited to ints, infinity, or a magnitude beyond float16 (1e30: issue 31 weak)
_EDITED_AFFINES = {"int_affine": lambda w: w.round().to(torch.int32), "inf_affine": lambda w: w + float("inf"),
                   "huge_affine": lambda w: torch.full_like(w, 1e30)}


@pytest.mark.parametrize("case", ["missing", "junk", "nan", "other_architecture", *_EDITED_AFFINES])
def test_pretrained_weights_misfits_are_one_line(model, tmp_path, case):
    path = tmp_path / f"{case}.pth"
    if case == "junk":
        path.write_bytes(b"\x00" * 100)
    elif case == "nan":
        checkpoint = _load(model["source"])
        key = next(k for k in checkpoint["network_weights"] if k.endswith("conv.weight"))
        checkpoint["network_weights"][key] = torch.full_like(checkpoint["network_weights"][key], float("nan"))
        torch.save(checkpoint, path)
    elif case in _EDITED_AFFINES:
        checkpoint = _load(model["source"])
        key = next(k for k in checkpoint["network_weights"] if k.endswith("norm.bias"))
        checkpoint["network_weights"][key] = _EDITED_AFFINES[case](checkpoint["network_weights"][key])
        torch.save(checkpoint, path)
    elif case == "other_architecture":
        arch = json.loads(json.dumps(model["arch"]))
        arch["arch_kwargs"]["features_per_stage"] = [2 * f for f in arch["arch_kwargs"]["features_per_stage"]]
        cf.save_nnunet_v2_checkpoint(path, architecture=arch, num_classes=2)
    fragment = {"missing": "not found", "junk": "cannot load checkpoint", "nan": "NaN",
                "other_architecture": "first mismatching key", "int_affine": "norm.bias' holds int32 values",
                "inf_affine": "norm.bias' contains NaN or infinite", "huge_affine": "norm affine"}[case]
    results = tmp_path / "results"
    results.mkdir()
    _error_line(_train({**model["env"], "nnUNet_results": str(results)}, "-pretrained_weights", path), fragment)
    assert list(results.iterdir()) == []


@pytest.mark.parametrize("case", ["empty", "truncated", "unknown", "pickled", "directory"])
def test_import_bad_files_are_one_line(model, tmp_path, case):
    path = tmp_path / f"{case}.pth"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(Path(model["source"]).read_bytes()[:3000])
    elif case == "unknown":
        torch.save({"weights": {"w": torch.zeros(2)}}, path)
    elif case == "pickled":
        torch.save({"state_dict": {}, "x": _RunsCode(tmp_path / "pwned")}, path)
    elif case == "directory":
        path.mkdir()
    fragment = {"empty": "empty", "truncated": "corrupted or truncated", "unknown": "no known pretrained family",
                "pickled": "--trust_pickle", "directory": "a directory"}[case]
    _error_line(run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", CONFIG, "-i", path, "--no_preprocess",
                            env=model["env_plan"], check=False), fragment)
    assert not (tmp_path / "pwned").exists()


def test_fold_and_rank_option_errors_are_one_line(model, results_copy, tmp_path):
    env, folder, _ = results_copy
    _error_line(run_console("nnUNetv2_acnorm_fold", "-i", tmp_path / "nowhere", env=env, check=False),
                "model folder not found")
    (folder.parent / f"nnUNetTrainer__nnUNetPlans_foldedFrom_{TRAINER}__{CONFIG}").mkdir()
    _error_line(run_console("nnUNetv2_acnorm_fold", "-i", folder, env=env, check=False), "--overwrite")
    for args, fragment in ((("--steps", 0), "--steps"), (("--tau", 0), "--tau")):
        _error_line(run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", CONFIG, "-i", model["source"], *args,
                                "-o", tmp_path / "r", env=env, check=False), fragment)
    assert not (tmp_path / "r").exists()


def test_cls_commands_bad_paths_are_one_line(fundus, tmp_path):
    out = tmp_path / "results"
    _error_line(_cls_train(fundus, out, "-f", 0, "-pretrained", tmp_path), "is a directory")
    assert not out.exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _error_line(run_console("nnUNetv2_acnorm_cls_predict", "-i", fundus["images"], "-o", tmp_path / "p.csv", "-m",
                            tmp_path / "no_model", "-device", "cpu", env=env, check=False), "does not exist")
    _error_line(run_console("nnUNetv2_acnorm_cls_evaluate", "-p", tmp_path / "none.csv", "-l", fundus["labels"],
                            env=env, check=False), "does not exist")


# == issue 31: nothing lost, nothing run ==============================================================
FOLDED = f"nnUNetTrainer__nnUNetPlans_foldedFrom_{TRAINER}__{CONFIG}"
KILL_POINTS = REPO / "tests" / "kill_points.py"


@contextlib.contextmanager
def _read_only(path):
    """``path`` (a folder) cannot be written while the block runs, also by root (immutable flag)."""
    path = Path(path)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("running as root and chattr +i is not available: no read-only folder can be made")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(mode)


def _set_weights(path, value=float("nan"), trainer_name=None, strip=False) -> None:
    checkpoint = _load(path)
    weights = checkpoint["network_weights"]
    if value is not None:
        key = next(k for k in weights if k.endswith("conv.weight"))
        weights[key] = torch.full_like(weights[key], value)
    if strip:
        checkpoint["network_weights"] = type(weights)((k, v) for k, v in weights.items() if not k.endswith(SOURCE_KEYS))
    if trainer_name is not None:
        checkpoint["trainer_name"] = trainer_name
    torch.save(checkpoint, path)


def _logs(fold) -> list[str]:
    return sorted(p.name for p in Path(fold).glob("training_log_*.txt"))


def _fold(env, *args):
    return run_console("nnUNetv2_acnorm_fold", *args, env=env, check=False)


def _kill_points(env, target, script, *args, options=()) -> list[dict]:
    """tests/kill_points.py: the command killed before and after each change it makes (see there)."""
    proc = subprocess.run([sys.executable, str(KILL_POINTS), *options, str(target), console_script(script),
                           *[str(a) for a in args]], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _assert_old_or_new(lines: list[dict], old: dict, between_renames: bool = False) -> None:
    """What a kill at each point leaves is the old or the new output, whole (``between_renames``: or, on the
    two-rename path, nothing at the name and the old output beside it); real SIGKILLs leave the same; the next
    run removes what they left."""
    points = [line for line in lines if isinstance(line.get("point"), int)]
    end = next(line for line in lines if line.get("point") == "end")
    kills = [line for line in lines if "kill" in line]
    rerun = next((line for line in lines if line.get("point") == "rerun"), None)
    assert not end["killed"] and end["exit"] == 0, end["output"]
    new = end["tree"]
    assert new and new != old and len(points) >= 6
    states = []
    for line in points:
        if line["tree"] is None and between_renames and any(".acnorm-old-" in n for n in line["leftovers"]):
            states.append("between")
            continue
        assert line["tree"] in (old, new), (f"a kill at point {line['point']} ({line['what']}) leaves neither the "
                                            f"old nor the new output: {line['tree']} (beside it: {line['leftovers']})")
        states.append("old" if line["tree"] == old else "new")
    assert {"old", "new"} <= set(states), states
    by_point = {line["point"]: line for line in points}
    for kill in kills:
        assert kill["killed"] and kill["tree"] == by_point[kill["kill"]]["tree"], kill
    if rerun is not None:
        assert len(kills) == 2
        assert rerun["exit"] == 0 and rerun["tree"] == new and rerun["leftovers"] == [], rerun
        assert "left by a killed run" in rerun["output"], rerun["output"]


@pytest.fixture(scope="module")
def folded(model):
    """The model folded (every checkpoint) by nnUNetv2_acnorm_fold, in a results root of its own."""
    results = model["base"] / "folded_results"
    shutil.copytree(model["results"], results)
    proc = run_console("nnUNetv2_acnorm_fold", "-i", results / NAME / MODEL,
                       env={**model["env"], "nnUNet_results": str(results)})
    return Path(proc.stdout.split("Folded model written to ")[1].splitlines()[0].strip())


def test_fold_refuses_outputs_in_or_around_what_it_reads(results_copy, folded, tmp_path):
    """issue 31 (bad 1): `fold -o <model>/fold_0 --overwrite` deleted that fold, `-o $nnUNet_results/<dataset>
    --overwrite` every model of the dataset; another model folder or a folded model holding a file of the
    user's is not replaced either."""
    env, folder, fold = results_copy
    results = Path(env["nnUNet_results"])
    other = folder.parent / f"nnUNetTrainerOther__nnUNetPlans__{CONFIG}"
    shutil.copytree(folder, other)
    before = _tree(results)
    for output, fragment in ((fold, "lies inside the model folder"), (folder.parent, "contains the model folder"),
                             (folder, "is the model folder"), (results, "contains the model folder"),
                             (other, "not a folded model written by nnUNetv2_acnorm_fold")):
        _error_line(_fold(env, "-i", folder, "-o", output, "--overwrite"), str(output), fragment)
    assert _tree(results) == before
    # a folded model this command wrote is replaced (test_fold_overwrite_survives_a_kill_at_any_point); with a
    # file of the user's in it, it is not
    shutil.copytree(folded, folder.parent / FOLDED)
    (folder.parent / FOLDED / "fold_0" / "my_notes.txt").write_text("mine")
    _error_line(_fold(env, "-i", folder, "--overwrite"), "fold_0/my_notes.txt", "nothing was replaced")
    assert (folder.parent / FOLDED / "fold_0" / "my_notes.txt").read_text() == "mine"
    assert not [p for p in folder.parent.iterdir() if ".acnorm-" in p.name]


def test_fold_overwrite_survives_a_kill_at_any_point(results_copy, folded):
    """issue 31 (bad 2): fold removed the old output and then renamed the new one in; a kill between left a
    folded model without plans.json or none. Killed before and after every change it makes, the output is
    the old or the new folded model, whole; the next run removes what the killed ones left."""
    env, folder, _ = results_copy
    target = folder.parent / folded.name
    shutil.copytree(folded, target)  # old: every checkpoint folded; new: only checkpoint_final.pth
    old = _tree(target)
    lines = _kill_points(env, target, "nnUNetv2_acnorm_fold", "-i", folder, "-o", target, "-chk",
                         "checkpoint_final.pth", "--overwrite", options=("--staging-once",))
    _assert_old_or_new(lines, old)
    new = next(line for line in lines if line.get("point") == "end")["tree"]
    assert "fold_0/checkpoint_best.pth" not in new and {"plans.json", "fold_0/checkpoint_final.pth"} <= set(new)


def test_rank_overwrite_survives_a_kill_at_any_point(model, tmp_path):
    """rank --overwrite wrote its result files in place (issue 31 bad 2, left open): killed before and after
    every change it makes, -o holds the old or the new ranking, whole; a file of the user's in -o is never
    replaced."""
    env = model["env"]
    out = tmp_path / "ranking"
    args = ("-d", DATASET, "-c", CONFIG, "-i", model["source"], "-o", out, "-device", "cpu", "--no_progress",
            "--estimators", "ac_corr")
    run_console("nnUNetv2_acnorm_rank", *args, env=env)
    old = _tree(out)
    lines = _kill_points(env, out, "nnUNetv2_acnorm_rank", *args, "--seed", 1, "--overwrite",
                         options=("--staging-once", "--record-only"))
    _assert_old_or_new(lines, old)
    new = next(line for line in lines if line.get("point") == "end")["tree"]
    assert {"ranking.csv", "ranking.json"} <= set(new) and new["ranking.json"] != old["ranking.json"]
    (out / "my_notes.txt").write_text("mine")
    before = _tree(out)
    _error_line(run_console("nnUNetv2_acnorm_rank", *args, "--overwrite", env=env, check=False), "my_notes.txt",
                "nothing was replaced")
    assert _tree(out) == before and not [p for p in out.parent.iterdir() if ".acnorm-" in p.name]


@pytest.fixture(scope="module")
def predictions(model):
    """Two prediction folders of the raw labels (one with a voxel changed per case), the label folder."""
    import SimpleITK as sitk

    base = model["base"] / "compare_inputs"
    labels = Path(model["env"]["nnUNet_raw"]) / NAME / "labelsTr"
    a, b = base / "a", base / "b"
    shutil.copytree(labels, a)
    b.mkdir(parents=True)
    for path in sorted(labels.glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        array[array == 1] = 0 if path.name.endswith("0.nii.gz") else 1
        array[0, 0, :3] = 1
        changed = sitk.GetImageFromArray(array)
        changed.CopyInformation(image)
        sitk.WriteImage(changed, str(b / path.name))
    return {"labels": labels, "a": a, "b": b}


def _compare(env, predictions, out, *args):
    return run_console("nnUNetv2_acnorm_compare", "-ref", predictions["labels"], "-pred", predictions["a"],
                       predictions["b"], "-o", out, "-np", 1, "--no_progress", *args, env=env, check=False)


def test_compare_overwrite_survives_a_kill_at_any_point(model, predictions, tmp_path):
    """issue 31 (bad 2): compare wrote in place; a kill left comparison.json at 0 bytes. Killed before and
    after every change (every file it opens for writing, every rename and removal), -o holds the old or the
    new results, whole; also where renameat2 cannot swap (two renames, undone by the next run)."""
    env = model["env"]
    out = tmp_path / "out"
    proc = run_console("nnUNetv2_acnorm_compare", "-ref", predictions["labels"], "-pred", predictions["b"],
                       predictions["a"], "-o", out, "-np", 1, "--no_progress", env=env)
    old = _tree(out)
    args = ("-ref", predictions["labels"], "-pred", predictions["a"], predictions["b"], "-o", out, "-np", 1,
            "--no_progress", "--overwrite")
    _assert_old_or_new(_kill_points(env, out, "nnUNetv2_acnorm_compare", *args), old)
    # between the two renames the old output waits beside the missing target; the next run puts it back
    lines = _kill_points(env, out, "nnUNetv2_acnorm_compare", *args, options=("--no-exchange", "--record-only"))
    _assert_old_or_new(lines, old, between_renames=True)
    assert any(line.get("tree") is None for line in lines)  # the two-rename path was taken
    assert proc.returncode == 0


def test_clean_leftovers_restores_an_old_output_a_kill_left_beside(tmp_path):
    """The two-rename path: a kill between the renames leaves the old output beside a missing target;
    the next run puts it back (and removes a staging folder of a process that no longer runs)."""
    import socket

    from nnunet_acnorm.outputs import clean_leftovers

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    old = tmp_path / f".out.acnorm-old-{host}-{dead.pid}"
    old.mkdir()
    (old / "comparison.json").write_text("{}")
    staging = tmp_path / f".out.acnorm-new-{host}-{dead.pid}"
    staging.mkdir()
    alive = tmp_path / f".out.acnorm-new-{host}-{os.getpid()}"
    alive.mkdir()
    lines = []
    clean_leftovers(tmp_path / "out", lines.append)
    assert (tmp_path / "out" / "comparison.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"] and len(lines) == 2


def test_compare_refuses_links_and_outputs_around_its_inputs(model, predictions, tmp_path):
    """issue 31 (bad 3): `compare --overwrite` wrote through a symbolic link planted at <out>/comparison.csv;
    -o inside a prediction or label folder was accepted."""
    env = model["env"]
    out = tmp_path / "out"
    assert _compare(env, predictions, out).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    (out / "comparison.csv").unlink()
    (out / "comparison.csv").symlink_to(victim)
    _error_line(_compare(env, predictions, out, "--overwrite"), "comparison.csv", "symbolic link")
    assert victim.read_text() == "not yours" and (out / "comparison.csv").is_symlink()
    for output, fragment in ((predictions["a"] / "cmp", "lies inside the prediction folder"),
                             (predictions["labels"], "is the label folder")):
        _error_line(_compare(env, predictions, output, "--overwrite"), fragment)
    assert not (predictions["a"] / "cmp").exists()


def test_compare_refuses_a_label_dataset_json_does_not_define(model, predictions, tmp_path):
    """issue 31 (weak): a prediction holding a label dataset.json does not define was evaluated silently."""
    import SimpleITK as sitk

    env = model["env"]
    wrong = tmp_path / "wrong"
    shutil.copytree(predictions["b"], wrong)
    image = sitk.ReadImage(str(wrong / "case_002.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    array[1, 1, 1] = 7
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(wrong / "case_002.nii.gz"))
    proc = run_console("nnUNetv2_acnorm_compare", "-ref", predictions["labels"], "-pred", predictions["a"], wrong,
                       "-o", tmp_path / "out", "-np", 1, env=env, check=False)
    _error_line(proc, "case_002.nii.gz", "label(s) 7", "dataset.json does not define")
    assert not (tmp_path / "out").exists()


def test_renamed_or_misplaced_checkpoints_are_refused(model, results_copy, tmp_path):
    """issue 31 (bad 5): a stripped AC-Norm checkpoint with trainer_name set to the vanilla trainer (which is
    also what a vanilla checkpoint in an AC-Norm folder is) was predicted by nnUNetv2_acnorm_predict -tr
    <AC-Norm trainer> without a word; --val and fold refuse it too."""
    env, folder, fold = results_copy
    _set_weights(fold / "checkpoint_final.pth", value=None, trainer_name="nnUNetTrainerFinetune", strip=True)
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text('{"foreground_mean": {"Dice": 0.5}}')
    before, logs = _tree(fold), _logs(fold)
    safe = run_console("nnUNetv2_acnorm_predict", "-i", model["images"], "-o", tmp_path / "p1", "-d", DATASET, "-c",
                       CONFIG, "-f", 0, "-tr", TRAINER, "-device", "cpu", env=env, check=False)
    _error_line(safe, "checkpoint_final.pth", "written by trainer nnUNetTrainerFinetune", TRAINER)
    assert not list((tmp_path / "p1").glob("*.nii.gz"))  # (_from_modelfolder: the same check, see the NaN test)
    _error_line(_train(env, "--val"), "written by trainer nnUNetTrainerFinetune", f"-tr ({TRAINER})")
    _error_line(_fold(env, "-i", folder), "written by trainer nnUNetTrainerFinetune", "name of its model folder")
    assert _tree(fold) == before and _logs(fold) == logs


def test_non_finite_weights_are_refused_everywhere(model, results_copy, tmp_path):
    """issue 31 (bad 6): NaN/Inf in a trained checkpoint: --c finished with exit 0 and NaN weights, --val
    reported Dice 0.0 and overwrote validation/summary.json, the safe predict wrote all-background
    segmentations. Now --c, --val, the safe predict, fold and compare -m refuse it with one line, and
    leave everything as it was (also no training_log of the refused run)."""
    env, folder, fold = results_copy
    _set_weights(fold / "checkpoint_final.pth", value=float("inf"))
    (fold / "validation").mkdir()
    summary = {"metric_per_case": [{"reference_file": "/x/case_000.nii.gz", "prediction_file": "/y/case_000.nii.gz",
                                    "metrics": {"1": {"Dice": 0.5}}}]}
    (fold / "validation" / "summary.json").write_text(json.dumps(summary))
    before, logs = _tree(fold), _logs(fold)
    for flag in ("--c", "--val"):
        _error_line(_train(env, flag, ACNORM_TEST_EPOCHS="2"), "checkpoint_final.pth", "NaN or infinite values")
    _error_line(run_console("nnUNetv2_acnorm_predict_from_modelfolder", "-i", model["images"], "-o", tmp_path / "p",
                            "-m", folder, "-f", 0, "-device", "cpu", env=env, check=False),
                "checkpoint_final.pth", "NaN or infinite values")
    assert not list((tmp_path / "p").glob("*.nii.gz"))
    _error_line(_fold(env, "-i", folder), "NaN or infinite values")
    _error_line(run_console("nnUNetv2_acnorm_compare", "-m", folder, "-o", tmp_path / "cmp", env=env, check=False),
                "checkpoint_final.pth", "NaN or infinite values")
    assert _tree(fold) == before and _logs(fold) == logs
    assert not (tmp_path / "cmp").exists() and not (folder.parent / FOLDED).exists()


def test_training_stops_when_weights_become_non_finite(model, tmp_path):
    """issue 31 (item 4): a training whose loss and weights become NaN (NaN images in epoch 1) stops with
    one line and keeps the checkpoints of the finite epochs (no NaN checkpoint_final.pth)."""
    env = {**model["env"], "nnUNet_results": str(tmp_path / "results")}
    line = _error_line(_train(env, "-pretrained_weights", model["source"], ACNORM_TEST_EPOCHS="3",
                              ACNORM_TEST_NAN_EPOCH="1", ACNORM_TEST_SKIP_VALIDATION="1"),
                       "became nan", "epoch 1", "Lower the learning rate")
    assert "training loss" in line
    fold = tmp_path / "results" / NAME / MODEL / "fold_0"
    assert not (fold / "checkpoint_final.pth").exists() and not (fold / "acnorm_train.lock").exists()
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["current_epoch"] == 1 and all(torch.isfinite(v).all() for v in best["network_weights"].values()
                                              if v.is_floating_point())


def test_one_training_per_fold(model, tmp_path):
    """issue 31 (bad 7): two nnUNetv2_train of one fold at once both ran and mixed the fold. With two real
    processes: the second is refused with one line (and leaves no log) while the first holds the fold's
    lock; the first finishes; the lock of a process that died is taken over with a line."""
    env = {**model["env"], "nnUNet_results": str(tmp_path / "results"), "ACNORM_TEST_SKIP_VALIDATION": "1"}
    hold = tmp_path / "hold"
    hold.touch()
    first = subprocess.Popen([console_script("nnUNetv2_train"), str(DATASET), CONFIG, "0", "-tr", TRAINER, "-device",
                              "cpu", "-pretrained_weights", str(model["source"])],
                             env={**env, "ACNORM_TEST_HOLD": str(hold)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not Path(f"{hold}.ready").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert Path(f"{hold}.ready").exists(), first.communicate()[0][-3000:] if first.poll() is not None else ""
        fold = tmp_path / "results" / NAME / MODEL / "fold_0"
        logs = _logs(fold)
        _error_line(_train(env, "-pretrained_weights", model["source"]), "another nnUNetv2_train of fold_0 is running",
                    f"process {first.pid}", "acnorm_train.lock")
        assert _logs(fold) == logs and (fold / "acnorm_train.lock").exists()
    finally:
        hold.unlink()
        output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / "acnorm_train.lock").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (fold / "acnorm_train.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    proc = _train(env, "--c", ACNORM_TEST_EPOCHS="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"took over the lock of process {dead.pid}" in proc.stdout
    assert not (fold / "acnorm_train.lock").exists()


def test_a_refused_run_never_removes_another_runs_log(tmp_path):
    """nnU-Net names a run's log by the second it started. A second run of the fold started in that
    second, refused because the first holds the fold, removed the log it thought its own: the first
    run's. Each run now claims a log file of its own before writing (the name taken: the next free
    ``_<n>``), and removes only that one."""
    from nnunet_acnorm.nnunet.pretrained import claim_log_file, remove_run_output
    fold = tmp_path / "results" / "fold_0"
    fold.mkdir(parents=True)
    first = fold / "training_log_2026_12_7_14_13_13.txt"
    assert claim_log_file(str(first)) == str(first) and first.read_text() == ""  # free: the name itself
    first.write_text("the first run's log\n")
    mine = claim_log_file(str(first))
    assert mine == str(fold / "training_log_2026_12_7_14_13_13_1.txt")
    assert claim_log_file(str(first)) == str(fold / "training_log_2026_12_7_14_13_13_2.txt")
    remove_run_output(mine, str(fold), str(tmp_path / "results"))
    assert first.read_text() == "the first run's log\n" and not Path(mine).exists()


def test_stock_predict_of_a_folded_model_loads_weights_only(model, folded, tmp_path):
    """The safe paths the docs offer for untrusted models (issue 31 bad 8, item 6): the safe predict
    (nnUNetv2_acnorm_predict_from_modelfolder) predicts an intact AC-Norm model; the fold command writes
    checkpoints that torch.load(weights_only=True) reads without any allow-list, also torch < 2.4's (no
    torch.device); TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes stock nnUNetv2_predict load the folded model
    weights-only: it predicts, and a folded checkpoint whose pickle calls os.system is refused without
    running it."""
    args = ("-i", model["images"], "-f", 0, "-device", "cpu")
    run_console("nnUNetv2_acnorm_predict_from_modelfolder", *args, "-o", tmp_path / "safe", "-m",
                model["results"] / NAME / MODEL, env=model["env"])
    assert len(list((tmp_path / "safe").glob("*.nii.gz"))) == 1
    checkpoints = sorted(folded.rglob("checkpoint_*.pth"))
    assert [p.name for p in checkpoints] == ["checkpoint_best.pth", "checkpoint_final.pth"]
    for path in checkpoints:
        assert torch.load(path, map_location="cpu", weights_only=True)["trainer_name"] == "nnUNetTrainer"
        assert _refused_by_torch_2_1_weights_only(path) == [], path  # also under torch < 2.4's weights-only load
    folded_copy = tmp_path / folded.name
    shutil.copytree(folded, folded_copy)
    safe_env = {**model["env"], "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
    args = (*args, "-m", folded_copy, "-npp", 1, "-nps", 1)
    run_console("nnUNetv2_predict_from_modelfolder", *args, "-o", tmp_path / "pred", env=safe_env)
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1
    marker = tmp_path / "pwned"
    _with_code(folded_copy / "fold_0" / "checkpoint_final.pth", marker)
    proc = run_console("nnUNetv2_predict_from_modelfolder", *args, "-o", tmp_path / "pred2", env=safe_env, check=False)
    assert proc.returncode != 0 and "Weights only load failed" in proc.stderr and not marker.exists()


# == issue 31: weak cases: one line, nothing left behind ============================================
def test_read_only_outputs_are_one_line(model, results_copy, predictions, fundus, cls_trained, tmp_path):
    """issue 31 (weak): a read-only output folder gave an OSError traceback in compare, cls_predict, the safe
    predict, fold, train and rank."""
    env, folder, _ = results_copy
    locked = tmp_path / "locked"
    locked.mkdir()
    fresh = tmp_path / "fresh_results"
    fresh.mkdir()
    with _read_only(locked), _read_only(fresh):
        cases = [
            ("nnUNetv2_acnorm_compare", "-ref", predictions["labels"], "-pred", predictions["a"], "-o", locked / "c"),
            ("nnUNetv2_acnorm_cls_predict", "-i", fundus["images"], "-o", locked / "p.csv", "-m", cls_trained,
             "-device", "cpu", "-num_workers", 0),
            ("nnUNetv2_acnorm_predict_from_modelfolder", "-i", model["images"], "-o", locked / "pred", "-m", folder,
             "-f", 0, "-device", "cpu"),
            ("nnUNetv2_acnorm_fold", "-i", folder, "-o", locked / "folded"),
            ("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", CONFIG, "-i", model["source"], "-o", locked / "rank"),
        ]
        for script, *args in cases:
            _error_line(run_console(script, *args, env=env, check=False), str(locked), "cannot be written")
        _error_line(_train({**env, "nnUNet_results": str(fresh)}, "-pretrained_weights", model["source"]),
                    str(fresh), "cannot be written")
        assert list(locked.iterdir()) == [] and list(fresh.iterdir()) == []


def test_safe_predict_missing_model_folder_and_bare_state_dict(model, results_copy, tmp_path):
    """issue 31 (weak): the safe predict said FileNotFoundError for a missing model folder and
    KeyError: 'trainer_name' for a bare state dict."""
    env, folder, fold = results_copy
    args = ("-i", model["images"], "-o", tmp_path / "pred", "-f", 0, "-device", "cpu")
    _error_line(run_console("nnUNetv2_acnorm_predict_from_modelfolder", *args, "-m", tmp_path / "nowhere", env=env,
                            check=False), "nowhere", "does not exist")
    _error_line(run_console("nnUNetv2_acnorm_predict", *args, "-d", DATASET, "-c", CONFIG, "-tr", "NoSuchTrainer",
                            env=env, check=False), "NoSuchTrainer__nnUNetPlans", "does not exist")
    torch.save(_load(fold / "checkpoint_final.pth")["network_weights"], fold / "checkpoint_final.pth")
    _error_line(run_console("nnUNetv2_acnorm_predict_from_modelfolder", *args, "-m", folder, env=env, check=False),
                "checkpoint_final.pth", "not a checkpoint written by nnUNetv2_train")
    assert not (tmp_path / "pred").exists() or not list((tmp_path / "pred").glob("*.nii.gz"))


def test_train_command_line_mistakes_are_one_line(model, results_copy):
    """issue 31 (weak): -pretrained_weights with --c, --val without a final checkpoint (RuntimeError
    tracebacks), a directory named checkpoint_final.pth on --c (crashed after the training); none
    leaves a training log."""
    env, _, fold = results_copy
    logs = _logs(fold)
    _error_line(_train(env, "--c", "-pretrained_weights", model["source"]), "--c", "-pretrained_weights")
    (fold / "checkpoint_final.pth").rename(fold / "kept.pth")
    _error_line(_train(env, "--val"), "checkpoint_final.pth does not exist", "checkpoint_best.pth", "--c")
    (fold / "checkpoint_final.pth").mkdir()
    _error_line(_train(env, "--c", ACNORM_TEST_EPOCHS="2"), "checkpoint_final.pth is not a checkpoint file",
                "a directory", "move it away")
    assert _logs(fold) == logs and not (fold / "acnorm_train.lock").exists()
    # -p naming plans the dataset does not have: nnU-Net's FileNotFoundError traceback before (checked where
    # nnU-Net imports the plugin's trainer shims: -tr names the plugin's trainer, not a test trainer)
    results = Path(env["nnUNet_results"])
    before = _tree(results)
    from nnunet_acnorm.nnunet.discovery import trainer_shim_folder

    proc = run_console("nnUNetv2_train", DATASET, CONFIG, 0, "-p", "NoSuchPlans", "-tr", "nnUNetTrainerACNorm",
                       "-device", "cpu", env={**env, "nnUNet_extTrainer": trainer_shim_folder()}, check=False)
    _error_line(proc, "-p NoSuchPlans", str(model["pre"] / "NoSuchPlans.json"), "does not exist",
                "plans there: nnUNetPlans", "nnUNetv2_plan_and_preprocess")
    assert _tree(results) == before


def test_text_file_as_pretrained_weights_is_not_called_pickled(model, tmp_path):
    """issue 31 (weak): a 17-byte text file given to -pretrained_weights was called "needs arbitrary pickled
    Python objects" with the advice --trust_pickle."""
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint\n")
    env = {**model["env"], "nnUNet_results": str(tmp_path / "results")}
    line = _error_line(_train(env, "-pretrained_weights", text), "weights.pth", "corrupted or not a checkpoint")
    assert "pickled" not in line and "--trust_pickle" not in line


def test_rank_seed_and_layers_are_checked(model, tmp_path):
    """issue 31 (weak): rank --seed -5 and an unknown --layers were accepted (every candidate "skipped",
    files written)."""
    env = model["env"]
    for args, fragment in ((("--seed", -5), "--seed must be >= 0"),
                           (("--layers", "encoder.no_such_norm"), "encoder.no_such_norm is not a norm layer")):
        _error_line(run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", CONFIG, "-i", model["source"], *args,
                                "-o", tmp_path / "r", env=env, check=False), fragment)
    assert not (tmp_path / "r").exists()


def test_cls_train_names_a_nan_volume_and_bounds_epochs(tmp_path):
    """issue 31 (weak): a NaN volume was found only as "loss became nan" with no file named and a results
    folder left; -num_epochs 10^21 was accepted."""
    import SimpleITK as sitk

    from tests.factories.images import make_volume_dataset

    make_volume_dataset(tmp_path / "images", tmp_path / "labels.csv", 8, size=16)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "images" / "case003.nii.gz")))
    volume[2, 3, 4] = np.nan
    (tmp_path / "images" / "case003.nii.gz").unlink()  # SimpleITK reads NaN in NIfTI files as 0; not in MHA
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "images" / "case003.mha"))
    pretrained = cf.save_genesis_checkpoint(tmp_path / "Genesis_Chest_CT.pt", base_features=4)
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results"
    args = ("-i", tmp_path / "images", "-l", tmp_path / "labels.csv", "-o", out, "-f", 0, "-pretrained", pretrained,
            "-device", "cpu", "-batch_size", 2, "-num_workers", 0)
    _error_line(run_console("nnUNetv2_acnorm_cls_train", *args, "-num_epochs", 1, env=env, check=False),
                "case003.mha", "NaN")
    _error_line(run_console("nnUNetv2_acnorm_cls_train", *args, "-num_epochs", 10 ** 21, env=env, check=False),
                "-num_epochs 1000000000000000000000")
    assert not out.exists()


def test_pretrained_weights_are_read_once(model, tmp_path):
    """issue 31 (bad 4): the plugin checked -pretrained_weights with weights_only=True, then nnU-Net's loader
    reopened the path with weights_only=False: a file swapped in between ran its pickled code. Here the
    swap happens right after the first load of the path (tests/swap_after_load.py)."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    shutil.copy(model["source"], evil)
    _with_code(evil, marker)
    weights = tmp_path / "weights.pth"
    shutil.copy(model["source"], weights)
    env = {**model["env"], "nnUNet_results": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "swap_after_load.py"), str(weights), str(evil),
                           console_script("nnUNetv2_train"), str(DATASET), CONFIG, "0", "-tr", TRAINER, "-device",
                           "cpu", "-pretrained_weights", str(weights)],
                          env={**env, "ACNORM_TEST_SKIP_VALIDATION": "1"}, capture_output=True, text=True, timeout=600)
    assert "swapped" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not marker.exists(), "the swapped file's pickled code ran"


def test_demo_output_guard(model, tmp_path):
    """issue 31 (bad 1, the demo): --output equal to nnUNet_results, or holding a file the demo does not
    write, was removed whole by --overwrite (shutil.rmtree); now refused with one line, nothing touched."""
    env = model["env"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "logs").mkdir()
    (mine / "thesis.tex").write_text("mine")
    for output, fragment in ((env["nnUNet_results"], "is nnUNet_results"), (mine, "thesis.tex")):
        _error_line(run_console("nnUNetv2_acnorm_demo", "--output", output, "--overwrite", env=env, check=False),
                    str(output), fragment)
    assert (mine / "thesis.tex").read_text() == "mine" and (Path(env["nnUNet_results"]) / NAME / MODEL).is_dir()
