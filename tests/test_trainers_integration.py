"""nnU-Net trainers end to end through the real console scripts, on tiny generated datasets.

One module-scoped pipeline (plan_and_preprocess, stock source training, AC-Norm fine-tuning with
-pretrained_weights, --c), then tests on its outputs: checkpoints, prediction, folding, stock
prediction without the plugin, bad input.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.factories.nnunet import (acnorm_trainer_env, copy_test_images, make_tiny_dataset, nnunet_env,
                                    run_console)

pytestmark = pytest.mark.integration

SOURCE_ID, TARGET_ID = 911, 912
SOURCE_TRAINER = "nnUNetTrainer_acnormTinyTest"
ACNORM_TRAINER = "nnUNetTrainerACNorm_tinyTest"
CONFIG = "3d_fullres"


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _norm_prefixes(state: dict) -> list[str]:
    return sorted(k[: -len(".source_weight")] for k in state if k.endswith(".source_weight"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("nnunet")
    env_plan = acnorm_trainer_env(base, training=False)
    source_raw = make_tiny_dataset(env_plan["nnUNet_raw"], SOURCE_ID, n_cases=5, name="TinySource", seed=0)
    target_raw = make_tiny_dataset(env_plan["nnUNet_raw"], TARGET_ID, n_cases=5, name="TinyTarget", seed=1,
                                   intensity_offset=2.0)
    # both datasets have the same grid, so the default planner gives the same architecture
    run_console("nnUNetv2_plan_and_preprocess", "-d", SOURCE_ID, TARGET_ID, "-c", CONFIG, "-np", 1, "-npfp", 1,
                env=env_plan)
    env = acnorm_trainer_env(base)
    run_console("nnUNetv2_train", SOURCE_ID, CONFIG, 0, "-tr", SOURCE_TRAINER, "-device", "cpu", env=env)
    results = Path(env["nnUNet_results"])
    source_ckpt = (results / "Dataset911_TinySource" / f"{SOURCE_TRAINER}__nnUNetPlans__{CONFIG}" / "fold_0"
                   / "checkpoint_final.pth")
    assert source_ckpt.is_file()

    first = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 0, "-tr", ACNORM_TRAINER, "-device", "cpu",
                        "-pretrained_weights", source_ckpt, env={**env, "ACNORM_TEST_SKIP_VALIDATION": "1"})
    model_folder = results / "Dataset912_TinyTarget" / f"{ACNORM_TRAINER}__nnUNetPlans__{CONFIG}"
    epoch1 = base / "acnorm_epoch1.pth"
    shutil.copy(model_folder / "fold_0" / "checkpoint_final.pth", epoch1)
    # continue for one more epoch
    cont = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 0, "-tr", ACNORM_TRAINER, "-device", "cpu", "--c",
                       env={**env, "ACNORM_TEST_EPOCHS": "2"})
    return {"base": base, "env": env, "env_plan": env_plan, "source_ckpt": source_ckpt, "epoch1": epoch1,
            "model_folder": model_folder, "first": first, "cont": cont, "target_raw": target_raw,
            "source_raw": source_raw, "results": results}


def test_pretrained_norm_affines_become_frozen_source(pipeline):
    source = _load(pipeline["source_ckpt"])["network_weights"]
    for ckpt_path in (pipeline["epoch1"], pipeline["model_folder"] / "fold_0" / "checkpoint_final.pth"):
        tuned = _load(ckpt_path)["network_weights"]
        prefixes = _norm_prefixes(tuned)
        assert len(prefixes) >= 10, "every InstanceNorm of the planned network must be an AC-Norm"
        moved = 0
        for prefix in prefixes:
            assert torch.equal(tuned[prefix + ".source_weight"], source[prefix + ".weight"]), prefix
            assert torch.equal(tuned[prefix + ".source_bias"], source[prefix + ".bias"]), prefix
            moved += not torch.equal(tuned[prefix + ".weight"], source[prefix + ".weight"])
        assert moved == len(prefixes), f"only {moved}/{len(prefixes)} target affines were trained"
        # apart from the source affines the fine-tuned network has exactly the plain keys
        assert set(tuned) - {p + s for p in prefixes for s in (".source_weight", ".source_bias")} == set(source)


def test_loud_warning_absent_with_pretrained_weights_and_schedule_is_finetuning(pipeline):
    log = pipeline["first"].stdout
    assert "Pretrained weights: " in log and "(read once, weights_only=True; parts: all)" in log  # our loader
    assert "Loading pretrained weights from file" not in log  # not nnU-Net's, which reopens the file
    assert "have no source affines" not in log
    assert "AC-Norm: source affines of all" in log
    assert "Fine-tuning schedule: linear warm-up" in log
    # the calibrated temperatures of the sorted path (layers batched): no overflow in exp (issue 30)
    assert "RuntimeWarning" not in pipeline["first"].stderr


def test_schedule_variant_by_name_through_nnunetv2_train(pipeline):
    """``-tr nnUNetTrainerACNorm_1epoch``, nnU-Net's naming, with no trainer file written: nnU-Net
    finds it, and it has one epoch. A full epoch is 250 iterations (minutes on CPU), so the run
    continues (--c) from a checkpoint after epoch 1 (the pipeline's first AC-Norm run): with one
    epoch it only saves and validates; with the base schedule it would train 249 more epochs."""
    variant = "nnUNetTrainerACNorm_1epoch"
    folder = pipeline["results"] / "Dataset912_TinyTarget" / f"{variant}__nnUNetPlans__{CONFIG}" / "fold_0"
    folder.mkdir(parents=True)
    checkpoint = _load(pipeline["epoch1"])
    checkpoint["trainer_name"] = variant  # as if the variant had written it (a renamed checkpoint is refused)
    torch.save(checkpoint, folder / "checkpoint_latest.pth")
    proc = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 0, "-tr", variant, "-device", "cpu", "--c",
                       env=pipeline["env"], timeout=300)
    assert "poly decay over 1 epochs" in proc.stdout and "Mean Validation Dice" in proc.stdout
    assert json.loads((folder / "debug.json").read_text())["num_epochs"] == "1"
    assert _load(folder / "checkpoint_final.pth")["current_epoch"] == 1


def test_continue_training_restores_acnorm_state(pipeline):
    final = _load(pipeline["model_folder"] / "fold_0" / "checkpoint_final.pth")
    first = _load(pipeline["epoch1"])
    assert first["current_epoch"] == 1 and final["current_epoch"] == 2
    assert "Epoch 1" in pipeline["cont"].stdout
    assert "Mean Validation Dice" in pipeline["cont"].stdout  # validation of the restored AC-Norm network
    # the continued run trained from the epoch-1 state: sources unchanged, targets moved on
    prefixes = _norm_prefixes(final["network_weights"])
    for prefix in prefixes:
        for key in (".source_weight", ".source_bias"):
            assert torch.equal(final["network_weights"][prefix + key], first["network_weights"][prefix + key])
    assert any(not torch.equal(final["network_weights"][p + ".weight"], first["network_weights"][p + ".weight"])
               for p in prefixes)


def test_optimizer_never_holds_source_affines(pipeline):
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    final = _load(pipeline["model_folder"] / "fold_0" / "checkpoint_final.pth")
    plans = json.loads((pipeline["model_folder"] / "plans.json").read_text())
    pm = PlansManager(plans)
    network = nnUNetTrainerACNorm.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2)
    network.load_state_dict(final["network_weights"], strict=True)
    n_params = sum(len(g["params"]) for g in final["optimizer_state"]["param_groups"])
    assert n_params == len(list(network.parameters()))
    source_ids = {id(b) for n, b in network.named_buffers() if n.endswith(("source_weight", "source_bias"))}
    assert source_ids and not source_ids & {id(p) for p in network.parameters()}


def _stock_predict_without_plugin(args: list, env: dict) -> subprocess.CompletedProcess:
    """nnUNetv2_predict_from_modelfolder in a subprocess where nnunet_acnorm cannot be imported."""
    env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}
    code = ("import sys; sys.modules['nnunet_acnorm'] = None  # any import of the plugin fails\n"
            "from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder\n"
            f"sys.argv = ['nnUNetv2_predict_from_modelfolder'] + {[str(a) for a in args]!r}\n"
            "predict_entry_point_modelfolder()\n"
            "assert not any(m.startswith('nnunet_acnorm') for m in sys.modules if sys.modules[m] is not None)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_predict_fold_and_stock_predict_agree(pipeline):
    base, env = pipeline["base"], pipeline["env"]
    images = copy_test_images(pipeline["target_raw"], base / "imagesTs", cases=(0,))
    pred_acnorm, pred_stock = base / "pred_acnorm", base / "pred_stock"
    run_console("nnUNetv2_predict", "-i", images, "-o", pred_acnorm, "-d", TARGET_ID, "-c", CONFIG, "-f", 0,
                "-tr", ACNORM_TRAINER, "-device", "cpu", "--save_probabilities", "-npp", 1, "-nps", 1, env=env)
    fold = run_console("nnUNetv2_acnorm_fold", "-d", TARGET_ID, "-c", CONFIG, "-tr", ACNORM_TRAINER, env=env)
    # issue 30 item 10: the folded folder's name says which AC-Norm trainer it came from
    folded = pipeline["results"] / "Dataset912_TinyTarget" / f"nnUNetTrainer__nnUNetPlans_foldedFrom_{ACNORM_TRAINER}__{CONFIG}"
    assert "Folded model written to" in fold.stdout and folded.is_dir()
    plans = json.loads((folded / "plans.json").read_text())
    assert plans["plans_name"] == f"nnUNetPlans_foldedFrom_{ACNORM_TRAINER}"
    ckpt = _load(folded / "fold_0" / "checkpoint_final.pth")
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert not any("source_" in k for k in ckpt["network_weights"])

    _stock_predict_without_plugin(["-i", images, "-o", pred_stock, "-m", folded, "-f", "0", "-device", "cpu",
                                   "--save_probabilities", "-npp", "1", "-nps", "1"], env)
    import SimpleITK as sitk

    name = "case_000"
    seg_a = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_acnorm / f"{name}.nii.gz")))
    seg_s = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_stock / f"{name}.nii.gz")))
    prob_a = np.load(pred_acnorm / f"{name}.npz")["probabilities"]
    prob_s = np.load(pred_stock / f"{name}.npz")["probabilities"]
    diff = float(np.abs(prob_a - prob_s).max())
    print(f"largest probability difference AC-Norm vs folded stock prediction: {diff:.2e}")
    # measured: 0.0 when the runs agree; the same model predicted twice on this CPU differed by 8e-4
    # (run-to-run variation of CPU kernels), hence the tolerance; the segmentations must be equal
    assert diff < 5e-3
    assert np.array_equal(seg_a, seg_s)

    # the folded folder is never overwritten without --overwrite
    again = run_console("nnUNetv2_acnorm_fold", "-d", TARGET_ID, "-c", CONFIG, "-tr", ACNORM_TRAINER, env=env,
                        check=False)
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    run_console("nnUNetv2_acnorm_fold", "-d", TARGET_ID, "-c", CONFIG, "-tr", ACNORM_TRAINER, "--overwrite",
                env=env)


def test_find_best_configuration_and_export_to_zip(pipeline):
    """nnU-Net's own model selection and sharing work on AC-Norm model folders (they do not import
    the trainer class: they read the validation results and copy the checkpoints)."""
    env, results = pipeline["env"], pipeline["results"]
    run_console("nnUNetv2_find_best_configuration", TARGET_ID, "-c", CONFIG, "-tr", ACNORM_TRAINER, "-f", 0,
                "-np", 1, env=env)
    info = json.loads((results / "Dataset912_TinyTarget" / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == ACNORM_TRAINER
    archive = pipeline["base"] / "acnorm_model.zip"
    run_console("nnUNetv2_export_model_to_zip", "-d", TARGET_ID, "-o", archive, "-c", CONFIG, "-tr",
                ACNORM_TRAINER, "-f", 0, env=env)
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        checkpoint = next(n for n in names if n.endswith("fold_0/checkpoint_final.pth"))
        assert any(n.endswith("plans.json") for n in names)
        with z.open(checkpoint) as f:
            state = torch.load(f, map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.endswith(".source_weight") for k in state), "the AC-Norm source travels with the model"


def _train_expect_error(pipeline, *extra) -> subprocess.CompletedProcess:
    env = nnunet_env(pipeline["base"], extra_trainer_folders=())
    env["nnUNet_extTrainer"] = pipeline["env"]["nnUNet_extTrainer"]
    env["nnUNet_results"] = str(pipeline["base"] / "results_bad")  # never touch real results
    proc = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 1, "-tr", ACNORM_TRAINER, "-device", "cpu", *extra,
                       env=env, check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    return proc


def test_checkpoint_of_another_architecture_names_key_and_shapes(pipeline):
    bad = _load(pipeline["source_ckpt"])
    key = "encoder.stages.0.0.convs.0.conv.weight"
    bad["network_weights"][key] = torch.zeros(32, 2, 3, 3, 3)  # two input channels
    path = pipeline["base"] / "other_architecture.pth"
    torch.save(bad, path)
    proc = _train_expect_error(pipeline, "-pretrained_weights", path)
    assert f"'{key}'" in proc.stderr
    assert "(32, 2, 3, 3, 3)" in proc.stderr and "(32, 1, 3, 3, 3)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_pretrained_file(pipeline):
    proc = _train_expect_error(pipeline, "-pretrained_weights", pipeline["base"] / "nope.pth")
    assert "not found" in proc.stderr and "nope.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_fold_bad_input(pipeline, tmp_path, capsys):
    from nnunet_acnorm.commands.fold import fold_entry

    env = pipeline["env"]
    with pytest.raises(SystemExit) as exit_info:
        fold_entry(["-i", str(tmp_path / "missing")])
    assert exit_info.value.code != 0 and "model folder not found" in capsys.readouterr().err
    stock = pipeline["source_ckpt"].parent.parent
    proc = run_console("nnUNetv2_acnorm_fold", "-i", stock, "-o", tmp_path / "out", env=env, check=False)
    assert proc.returncode != 0 and "no AC-Norm layers" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_training_without_pretrained_weights_warns_loudly(pipeline, monkeypatch):
    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    pre = Path(pipeline["env"]["nnUNet_preprocessed"]) / "Dataset912_TinyTarget"
    monkeypatch.setenv("nnUNet_preprocessed", str(pre.parent))  # nnU-Net reads these at use time
    monkeypatch.setenv("nnUNet_results", str(pipeline["base"] / "results_nowarm"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train"])
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = nnUNetTrainerACNorm(plans, CONFIG, 0, json.loads((pre / "dataset.json").read_text()),
                                  torch.device("cpu"))
    trainer.initialize()
    layers = acnorm_modules(trainer.network)
    assert layers and not any(m.source_is_set for m in layers.values())
    trainer.on_train_start()
    log = Path(trainer.log_file).read_text()
    assert "WARNING" in log and "without -pretrained_weights" in log
    assert all(m.source_is_set for m in layers.values())
    for m in layers.values():
        assert torch.equal(m.source_weight, m.weight.detach())


def test_demo_progress_reads_nnunet_training_output(pipeline):
    """The demo's one line per epoch (demo/pipeline.py: EpochProgress), on the output of a real
    nnUNetv2_train run: epoch, train loss and pseudo Dice as nnU-Net's own logger holds them."""
    from nnunet_acnorm.demo.pipeline import EpochProgress

    progress = EpochProgress("AC-Norm", epochs=2)
    lines = [s for s in map(progress.feed, pipeline["cont"].stdout.splitlines()) if s is not None]
    logging = _load(pipeline["model_folder"] / "fold_0" / "checkpoint_final.pth")["logging"]
    assert len(lines) == 1 and lines[0].startswith("AC-Norm: epoch 2/2, train loss "), lines
    loss, dice = lines[0].split("train loss ")[1].split(", pseudo Dice ")
    dice = dice.rsplit(" (", 1)[0].split()
    # nnU-Net prints 4 decimals, the line 3: equal to within their rounding
    assert float(loss) == pytest.approx(logging["train_losses"][1], abs=6e-4)
    assert [float(d) for d in dice] == pytest.approx(logging["dice_per_class_or_region"][1], abs=6e-4)
