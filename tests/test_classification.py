"""Classification commands end to end (real console scripts in subprocesses) on tiny generated data:
2D RGB images with a torchvision ResNet checkpoint, 3D NIfTI volumes with a Models Genesis and a
MedicalNet checkpoint (all in their published formats, from tests/factories/checkpoints.py);
AC-Norm source affines against the pretrained file; bad input; metrics by hand.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_acnorm.checkpoints.io import safe_torch_load
from tests.factories.checkpoints import (save_genesis_checkpoint, save_medicalnet_checkpoint,
                                         save_moco_v2_checkpoint, save_torchvision_resnet_checkpoint)
from tests import console_server
from tests.factories.images import make_rgb_dataset, make_volume_dataset

BIN = os.path.dirname(sys.executable)
# 1 thread: far faster on a shared CPU (and one summation order); seeded trainings: every accuracy
# threshold below is checked on the same network in every run
ENV = {**os.environ, "nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1", "nnUNet_acnorm_seed": "0"}


def run(script: str, *args, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = console_server.run([os.path.join(BIN, script), *map(str, args)], env=ENV, timeout=600)
    if expect_ok:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def train(*args, expect_ok: bool = True):
    return run("nnUNetv2_acnorm_cls_train", *args, "-device", "cpu", expect_ok=expect_ok)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    prog = os.path.basename(str(result.args[0]))  # every command: "<command>: error: <message>"
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- data -----------------------------------------------------------------------------------------

@torch.no_grad()
def calibrate_running_stats(path, network, batches, prefix: str = "") -> None:
    """Set the BatchNorm running statistics stored in the checkpoint file ``path`` to those of
    ``network`` (loaded from the file) over ``batches``, keeping the file's layout.

    The factories' checkpoints hold random running statistics; a real pretrained file's statistics
    match its pretraining data. Without this, a test of a few iterations would measure how fast the
    running statistics forget random values rather than whether fine-tuning learns."""
    checkpoint = safe_torch_load(path)
    state = checkpoint.get("state_dict", checkpoint)
    own = network.state_dict()
    network.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                             if k.startswith(prefix) and k[len(prefix):] in own}, strict=True)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches
    network.train()
    for batch in batches:
        network(batch)
    for key, value in network.state_dict().items():
        if "running_" in key:
            state[prefix + key] = value.clone()
    torch.save(checkpoint, path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bn_affines_of_file(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from nnunet_acnorm.checkpoints import load_pretrained
    return load_pretrained(path).norm_affines()


@pytest.fixture(scope="module")
def data2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls2d")
    make_rgb_dataset(root / "train", root / "train.csv", 40, seed=0)
    make_rgb_dataset(root / "test", root / "test.csv", 20, seed=1)
    make_rgb_dataset(root / "pretraining", root / "pretraining.csv", 16, seed=2)
    checkpoint = save_torchvision_resnet_checkpoint(root / "resnet18-f37072fd.pth", arch="resnet18")
    import torchvision
    from nnunet_acnorm.classification.data_loading import read_rgb, transforms_2d
    transform = transforms_2d(32, train=False)
    images = torch.stack([transform(read_rgb(p)) for p in sorted((root / "pretraining").glob("*.png"))])
    calibrate_running_stats(checkpoint, torchvision.models.resnet18(), images.split(8))
    return root, checkpoint


@pytest.fixture(scope="module")
def trained2d(data2d):
    """Fold 0: two epochs, then continued (--c) to five.

    Batch 8 and five epochs, because the first epochs of a tiny run are at the mercy of BatchNorm's
    running statistics: measured over 16 runs each, stopping after two epochs at batch 4 left the
    network predicting one class in eval mode (running statistics still far from the batch
    statistics; train-mode accuracy 1.0) in 4 runs with AC-Norm and 1 without; after four epochs
    at batch 8, in none."""
    root, checkpoint = data2d
    results = root / "results"
    common = ("-i", root / "train", "-l", root / "train.csv", "-o", results, "-f", 0, "-image_size", 32,
              "-batch_size", 8)
    first = train(*common, "-pretrained", checkpoint, "-num_epochs", 2)
    second = train(*common, "--c", "-num_epochs", 5)
    return root, results, first, second


# -- 2D -------------------------------------------------------------------------------------------

def test_2d_train_continue_outputs(trained2d):
    root, results, first, second = trained2d
    fold = results / "fold_0"
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "validation/summary.json",
                 "validation/predictions.csv", "validation/confusion_matrix.png"):
        assert (fold / name).is_file(), name
    assert not (fold / "checkpoint_latest.pth").exists()
    splits = json.loads((results / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(splits[0]["train"] + splits[0]["val"]) == [f"img{i:03d}" for i in range(40)]
    assert "continuing from epoch 2" in second.stdout and "epoch 4:" in second.stdout
    assert "epoch 1:" not in second.stdout
    checkpoint = safe_torch_load(fold / "checkpoint_final.pth")
    assert checkpoint["current_epoch"] == 5 and len(checkpoint["logging"]["train_losses"]) == 5
    assert checkpoint["config"]["trainer_name"] == "ClassificationTrainer"
    summary = json.loads((fold / "validation/summary.json").read_text())
    for key in ("accuracy", "quadratic_weighted_kappa", "auc_per_class", "auc_macro", "confusion_matrix"):
        assert key in summary
    assert summary["num_cases"] == 8 and np.sum(summary["confusion_matrix"]) == 8
    logs = list(fold.glob("training_log_*.txt"))
    assert logs and any("AC-Norm: 20 norm layer(s) converted" in p.read_text() for p in logs)


def test_2d_predict_evaluate_beats_chance(trained2d):
    root, results, _, _ = trained2d
    predictions = root / "predictions" / "test.csv"
    run("nnUNetv2_acnorm_cls_predict", "-i", root / "test", "-m", results, "-o", predictions, "-device", "cpu")
    rows = read_csv(predictions)
    assert [r["image"] for r in rows] == [f"img{i:03d}" for i in range(20)]
    probabilities = np.array([[float(r["probability_0"]), float(r["probability_1"])] for r in rows])
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-4)
    result = run("nnUNetv2_acnorm_cls_evaluate", "-p", predictions, "-l", root / "test.csv")
    summary = json.loads((root / "predictions" / "test_summary.json").read_text())
    assert (root / "predictions" / "test_summary_confusion_matrix.png").is_file()
    assert "quadratic weighted kappa" in result.stdout
    # the colour signal is trivial: far above chance (0.5) after five short epochs
    assert summary["accuracy"] >= 0.7, summary
    assert summary["auc_macro"] >= 0.9, summary


def test_2d_acnorm_source_equals_pretrained(trained2d, data2d):
    _, results, _, _ = trained2d
    _, pretrained = data2d
    state = safe_torch_load(results / "fold_0" / "checkpoint_final.pth")["network_weights"]
    affines = bn_affines_of_file(pretrained)
    assert len(affines) == 20
    moved = 0
    for name, (weight, bias) in affines.items():
        torch.testing.assert_close(state[f"{name}.source_weight"], weight, rtol=0, atol=0)
        torch.testing.assert_close(state[f"{name}.source_bias"], bias, rtol=0, atol=0)
        moved += not torch.equal(state[f"{name}.weight"], weight)
    assert moved > 0  # the target affines were trained


def test_2d_refuses_to_overwrite_and_needs_pretrained(trained2d):
    root, results, _, _ = trained2d
    before = (results / "fold_0" / "checkpoint_final.pth").stat().st_mtime
    result = train("-i", root / "train", "-l", root / "train.csv", "-o", results, "-f", 0, "-pretrained",
                   root / "resnet18-f37072fd.pth", expect_ok=False)
    assert_clean_error(result, "already holds", "--c")
    assert (results / "fold_0" / "checkpoint_final.pth").stat().st_mtime == before
    result = train("-i", root / "train", "-l", root / "train.csv", "-o", root / "other", "-f", 0,
                   expect_ok=False)
    assert_clean_error(result, "-pretrained")


# -- bad input ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, data2d):
    root = tmp_path_factory.mktemp("bad")
    _, checkpoint = data2d
    return root, checkpoint


def _copy_dataset(src_root, dst, n_rows=None):
    import shutil
    shutil.copytree(src_root / "train", dst / "images")
    rows = (src_root / "train.csv").read_text().splitlines()
    (dst / "labels.csv").write_text("\n".join(rows[: (n_rows or len(rows))]) + "\n")


def test_bad_input_missing_image(bad_inputs, data2d):
    root, checkpoint = bad_inputs
    case = root / "missing"
    _copy_dataset(data2d[0], case)
    os.remove(case / "images" / "img007.png")
    result = train("-i", case / "images", "-l", case / "labels.csv", "-o", case / "res", "-f", 0,
                   "-pretrained", checkpoint, expect_ok=False)
    assert_clean_error(result, "img007", "not found", "line 9")
    assert not (case / "res").exists()


def test_bad_input_unreadable_image_and_label_outside_classes(bad_inputs, data2d):
    """Checked in-process (the command path of the same errors is covered above/below)."""
    from nnunet_acnorm.classification.dataset import collect_cases
    from nnunet_acnorm.classification.errors import ClassificationInputError
    root, _ = bad_inputs
    case = root / "unreadable"
    _copy_dataset(data2d[0], case)
    (case / "images" / "img003.png").write_bytes(b"this is not a png")
    with pytest.raises(ClassificationInputError, match=r"cannot read image .*img003\.png"):
        collect_cases(str(case / "images"), str(case / "labels.csv"), 2, None, require_rgb=True)
    case = root / "label"
    _copy_dataset(data2d[0], case)
    (case / "labels.csv").write_text((case / "labels.csv").read_text().replace("img004,0", "img004,7"))
    with pytest.raises(ClassificationInputError, match=r"line 6: label 7 is outside the declared classes 0\.\.1"):
        collect_cases(str(case / "images"), str(case / "labels.csv"), 2, 2, require_rgb=True)
    (case / "labels.csv").write_text((case / "labels.csv").read_text().replace("img004,7", "img004,1.5"))
    with pytest.raises(ClassificationInputError, match=r"line 6: label '1.5' is not an integer"):
        collect_cases(str(case / "images"), str(case / "labels.csv"), 2, 2, require_rgb=True)


def test_bad_input_label_outside_declared_classes_command(bad_inputs, data2d):
    root, checkpoint = bad_inputs
    case = root / "label_cmd"
    _copy_dataset(data2d[0], case)
    text = (case / "labels.csv").read_text().replace("img004,0", "img004,7")
    (case / "labels.csv").write_text(text)
    result = train("-i", case / "images", "-l", case / "labels.csv", "-o", case / "res", "-f", 0,
                   "-pretrained", checkpoint, "-num_classes", 2, expect_ok=False)
    assert_clean_error(result, "label 7", "outside the declared classes 0..1", "line 6")


def test_bad_input_grayscale_for_rgb_stem(bad_inputs, data2d):
    from PIL import Image
    root, checkpoint = bad_inputs
    case = root / "gray"
    _copy_dataset(data2d[0], case)
    Image.open(case / "images" / "img002.png").convert("L").save(case / "images" / "img002.png")
    result = train("-i", case / "images", "-l", case / "labels.csv", "-o", case / "res", "-f", 0,
                   "-pretrained", checkpoint, expect_ok=False)
    assert_clean_error(result, "img002.png", "grayscale", "RGB")


def test_bad_input_evaluate_missing_prediction(bad_inputs, data2d, tmp_path):
    (tmp_path / "p.csv").write_text("image,prediction,probability_0,probability_1\nimg000,0,0.9,0.1\n")
    result = run("nnUNetv2_acnorm_cls_evaluate", "-p", tmp_path / "p.csv", "-l", data2d[0] / "test.csv",
                 expect_ok=False)
    assert_clean_error(result, "no prediction for 'img001'")


# -- 3D -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls3d")
    make_volume_dataset(root / "train", root / "train.csv", 40, seed=0)
    make_volume_dataset(root / "test", root / "test.csv", 16, seed=1)
    return root


def test_3d_genesis_train_continue_predict_evaluate(data3d):
    root = data3d
    from nnunet_acnorm.classification.data_loading import normalize_intensities, read_volume
    from nnunet_acnorm.networks import GenesisEncoder3D
    pretrained = save_genesis_checkpoint(root / "Genesis_Chest_CT.pt", base_features=4)
    make_volume_dataset(root / "pretraining", root / "pretraining.csv", 16, seed=2)
    volumes = torch.stack([torch.from_numpy(normalize_intensities(read_volume(str(p)), "ct"))[None]
                           for p in sorted((root / "pretraining").glob("*.nii.gz"))])
    calibrate_running_stats(pretrained, GenesisEncoder3D(base_features=4), volumes.split(4), prefix="module.")
    results = root / "genesis"
    common = ("-i", root / "train", "-l", root / "train.csv", "-o", results, "-f", 1, "-batch_size", 4)
    train(*common, "-pretrained", pretrained, "-num_epochs", 3)
    second = train(*common, "--c", "-num_epochs", 6)
    assert "continuing from epoch 3" in second.stdout and "epoch 5:" in second.stdout
    checkpoint = safe_torch_load(results / "fold_1" / "checkpoint_final.pth")
    assert checkpoint["config"]["architecture"] == "genesis" and checkpoint["config"]["patch_size"] == [16] * 3
    assert checkpoint["config"]["intensity"] == "ct"
    state = checkpoint["network_weights"]
    assert state["classifier.2.weight"].shape == (1024, 64) and state["classifier.4.weight"].shape == (2, 1024)
    affines = bn_affines_of_file(pretrained)
    encoder = {k: v for k, v in affines.items() if k.startswith("down_tr")}
    assert len(encoder) == 8
    for name, (weight, bias) in encoder.items():
        assert torch.equal(state[f"{name}.source_weight"], weight) and torch.equal(state[f"{name}.source_bias"], bias)

    predictions = root / "genesis_test.csv"
    run("nnUNetv2_acnorm_cls_predict", "-i", root / "test", "-m", results, "-o", predictions, "-device", "cpu")
    run("nnUNetv2_acnorm_cls_evaluate", "-p", predictions, "-l", root / "test.csv", "-o", root / "g.json")
    summary = json.loads((root / "g.json").read_text())
    assert summary["num_cases"] == 16
    # a dense blob vs none: far above chance (0.5)
    assert summary["auc_macro"] >= 0.9 and summary["accuracy"] >= 0.7, summary


def test_3d_medicalnet_vanilla_two_folds_ensemble(data3d):
    """MedicalNet ResNet-10, plain fine-tuning; prediction ensembles the two folds found."""
    root = data3d
    pretrained = save_medicalnet_checkpoint(root / "resnet_10.pth", depth=10, base_features=8)
    results = root / "medicalnet"
    for fold in (0, 2):
        train("-i", root / "train", "-l", root / "train.csv", "-o", results, "-f", fold, "-batch_size", 8,
              "-pretrained", pretrained, "--vanilla", "-num_epochs", 1)
    checkpoint = safe_torch_load(results / "fold_0" / "checkpoint_final.pth")
    assert checkpoint["config"]["trainer_name"] == "ClassificationTrainer_vanilla"
    assert checkpoint["config"]["depth"] == 10 and checkpoint["config"]["intensity"] == "zscore"
    assert not any(k.endswith("source_weight") for k in checkpoint["network_weights"])
    result = run("nnUNetv2_acnorm_cls_predict", "-i", root / "test", "-m", results, "-o",
                 root / "mn_test.csv", "-device", "cpu")
    assert "2 fold(s) (fold_0, fold_2)" in result.stdout
    assert len(read_csv(root / "mn_test.csv")) == 16


# -- in-process: pretrained files and metrics -------------------------------------------------------

def test_moco_v2_resnet50_loads_and_converts(tmp_path):
    """Full-width ResNet-50 in the MoCo v2 layout (the torchvision layout is used end to end above)."""
    from nnunet_acnorm.classification.pretrained import describe_pretrained, load_pretrained_weights
    from nnunet_acnorm.networks.classifiers import build_network
    from nnunet_acnorm.norms import acnorm_modules, convert_to_acnorm
    family = "moco_v2"
    path = save_moco_v2_checkpoint(tmp_path / "moco_v2_800ep_pretrain.pth.tar", queue_size=16)
    config = {**describe_pretrained(path, None, False), "num_classes": 5}
    assert config["architecture"] == "resnet" and config["depth"] == 50 and config["pretrained_family"] == family
    network = build_network(config)
    load_pretrained_weights(network, config, path, False)
    assert network.fc.out_features == 5
    convert_to_acnorm(network)
    modules = acnorm_modules(network)
    affines = bn_affines_of_file(path)
    assert len(modules) == len(affines) == 53
    for name, (weight, bias) in affines.items():
        assert torch.equal(modules[name].source_weight, weight) and torch.equal(modules[name].source_bias, bias)
    network.eval()
    with torch.no_grad():
        assert network(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))).shape == (1, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_train_step(tmp_path, data2d, monkeypatch):
    from nnunet_acnorm.classification.trainer import ClassificationTrainer
    monkeypatch.setenv("nnUNet_acnorm_seed", "0")
    _, checkpoint = data2d
    config = {"architecture": "resnet", "dim": 2, "depth": 18, "num_classes": 2, "tau": 1.0,
              "initial_lr": 0.01, "weight_decay": 3e-5, "num_epochs": 1, "pretrained_family": None}
    trainer = ClassificationTrainer(config, 0, str(tmp_path), torch.device("cuda"), show_progress=False)
    trainer.initialize(str(checkpoint))
    trainer.loss = torch.nn.CrossEntropyLoss().cuda()
    assert trainer.amp and trainer.grad_scaler is not None
    trainer.network.train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    assert all(bool(torch.isfinite(trainer.train_step(images, labels))) for _ in range(3))
    trainer.save_checkpoint("checkpoint_latest.pth")
    saved = safe_torch_load(tmp_path / "checkpoint_latest.pth")
    assert saved["grad_scaler_state"] and saved["network_weights"]["bn1.source_weight"].device.type == "cpu"


def test_metrics_against_hand_computed_values():
    from nnunet_acnorm.classification.metrics import classification_metrics
    labels = [0, 1, 2, 2]
    probabilities = np.array([[0.8, 0.1, 0.1, 0], [0.1, 0.5, 0.4, 0], [0.1, 0.6, 0.3, 0], [0.0, 0.1, 0.9, 0]])
    m = classification_metrics(labels, probabilities, 4)
    assert m["accuracy"] == 0.75
    # quadratic weighted kappa by hand: O = confusion, E = outer(row, col)/n, w_ij = (i-j)^2/(K-1)^2
    observed = np.zeros((4, 4))
    for t, p in zip(labels, probabilities.argmax(1)):
        observed[t, p] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / 4
    weights = np.subtract.outer(np.arange(4), np.arange(4)) ** 2 / 9
    assert m["quadratic_weighted_kappa"] == pytest.approx(1 - (weights * observed).sum() / (weights * expected).sum())
    assert m["auc_per_class"]["0"] == 1.0 and m["auc_per_class"]["3"] is None  # class 3: no case
    assert m["auc_per_class"]["1"] == pytest.approx(2 / 3)  # positive 0.5 vs negatives 0.1, 0.6, 0.1
    assert m["auc_per_class"]["2"] == pytest.approx(0.75)  # positives 0.3, 0.9 vs negatives 0.1, 0.4
    assert m["auc_macro"] == pytest.approx(np.mean([1.0, 2 / 3, 0.75]))
    assert m["confusion_matrix"][2] == [0, 1, 1, 0]


def test_splits_crop_and_logger_in_process(tmp_path):
    """nnU-Net's split per class (stratified), acvl_utils' centre crop / pad, nnU-Net's logger."""
    from nnunet_acnorm.classification.data_loading import center_crop_or_pad
    from nnunet_acnorm.classification.dataset import Case, make_splits
    from nnunet_acnorm.classification.logger import ClassificationLogger
    cases = [Case(f"img{i:03d}", "", int(i % 4 == 0)) for i in range(40)]  # 10 of class 1, 30 of class 0
    splits = make_splits(cases)
    assert splits == make_splits(cases)  # seed 12345
    for split in splits:
        assert sorted(split["train"] + split["val"]) == [c.identifier for c in cases]
        assert sum(int(i[3:]) % 4 == 0 for i in split["val"]) == 2 and len(split["val"]) == 8
    volume = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3) + 10
    out = center_crop_or_pad(volume, (3, 6, 6))
    assert out.shape == (3, 6, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :, 1:4], volume[1:4])  # z cropped from 1, x padded 1 before, 2 after
    assert (out[:, :, [0, 4, 5]] == volume[1:4].min()).all()  # padding: the crop's lowest value
    logger = ClassificationLogger("accuracy")
    for epoch, accuracy in enumerate((0.5, 1.0)):
        for key, value in (("epoch_start_timestamps", 0.0), ("lrs", 0.01), ("train_losses", 1.0), ("val_losses", 1.0),
                           ("epoch_end_timestamps", 1.0)):
            logger.log(key, value, epoch)
        ema = logger.log_validation({"quadratic_weighted_kappa": None, "accuracy": accuracy, "auc_macro": 0.5}, epoch)
    assert ema == pytest.approx(0.9 * 0.5 + 0.1 * 1.0) and logger.get_value("mean_fg_dice", None) == [0.5, 1.0]
    import matplotlib
    style = dict(matplotlib.rcParams)
    figure = logger.progress_figure()
    metric_axis = figure.axes[3]  # the loss axis's twin
    assert metric_axis.get_ylabel() == "validation metric"
    assert [line.get_label() for line in metric_axis.get_lines()] == ["accuracy", "accuracy (mov. avg.)", "kappa",
                                                                       "auc_macro"]
    np.testing.assert_allclose(metric_axis.get_lines()[1].get_ydata(), [0.5, 0.55])
    logger.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dict(matplotlib.rcParams) == style  # no global style left behind
