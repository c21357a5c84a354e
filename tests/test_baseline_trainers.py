"""The fine-tuning baselines end to end through nnU-Net's console scripts, on tiny generated data.

One module-scoped pipeline: plan and preprocess two tiny datasets, pretrain an InstanceNorm and a
BatchNorm source model (stock nnU-Net trainers, 1 epoch), then for every baseline trainer (nnU-Net's
own recipe included) ``nnUNetv2_train -tr <trainer> -pretrained_weights`` (1 epoch of 2 iterations),
``--c`` (one more epoch) and ``nnUNetv2_predict``. The tests check what each method must keep: its state (anchor,
frozen copy) equal to the pretrained weights after ``--c``, plain network keys, and so on.
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nnunet_acnorm.checkpoints.io import safe_torch_load
from tests.factories.nnunet import acnorm_trainer_env, copy_test_images, make_tiny_dataset, run_console

pytestmark = pytest.mark.integration

SOURCE_ID, TARGET_ID = 931, 932
CONFIG = "3d_fullres"
SOURCES = {"IN": "nnUNetTrainer_acnormTinyTest", "BN": "nnUNetTrainerBN_acnormTinyTest"}
#: trainer -> network type of its source checkpoint
METHODS = {"nnUNetTrainerL2SP": "IN", "nnUNetTrainerACNorm_L2SP": "IN", "nnUNetTrainerDELTA": "IN",
           "nnUNetTrainerBSS": "IN", "nnUNetTrainerLPFT": "IN", "nnUNetTrainerDiscriminativeLR": "IN",
           "nnUNetTrainerStochNormBN": "BN", "nnUNetTrainerSPD": "IN", "nnUNetTrainerACNorm_SPD": "IN",
           "nnUNetTrainerPretrainedRecipe": "IN"}
#: the suite's time budget: --c for the methods with state to restore (the anchor, the frozen copy, the
#: phase, the parameter groups), nnUNetv2_predict for one method of each checkpoint kind (an extra
#: checkpoint entry; a network of other modules); BSS and StochNorm have nothing for --c to restore
CONTINUED = ("nnUNetTrainerL2SP", "nnUNetTrainerACNorm_L2SP", "nnUNetTrainerDELTA", "nnUNetTrainerLPFT",
             "nnUNetTrainerDiscriminativeLR", "nnUNetTrainerSPD", "nnUNetTrainerPretrainedRecipe")
PREDICTED = ("nnUNetTrainerL2SP", "nnUNetTrainerDELTA", "nnUNetTrainerStochNormBN", "nnUNetTrainerSPD",
             "nnUNetTrainerPretrainedRecipe")
#: trainers that load only the encoder and its stem (nnU-Net's PretrainedTrainer recipe)
ENCODER_ONLY = ("nnUNetTrainerPretrainedRecipe",)
#: run once, not as a chain: -pretrained_weights must be refused by the from-scratch twin
SCRATCH_TWIN = "nnUNetTrainerPretrainedRecipe_fromScratch"

# test-only subclasses: 2 iterations per epoch, epochs from ACNORM_TEST_EPOCHS, no final validation
TINY_TRAINERS = '''
import os
import torch
from nnunet_acnorm.nnunet.baseline_trainers import TRAINERS as _TRAINERS


class _Tiny:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("ACNORM_TEST_EPOCHS", "1"))
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    @property
    def lpft_frozen_epochs(self):  # LP-FT: the first epoch frozen, whatever the total
        return 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("validation skipped (test trainer)")


for _name in %r:
    globals()[_name + "_tinyTest"] = type(_name + "_tinyTest", (_Tiny, _TRAINERS[_name]), {})
''' % (list(METHODS) + [SCRATCH_TWIN],)


def _load(path) -> dict:
    return safe_torch_load(path)  # torch.load(weights_only=True), numpy log scalars allowed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    start = time.time()
    base = tmp_path_factory.mktemp("baselines")
    tiny = base / "tiny_trainers"
    tiny.mkdir()
    (tiny / "baseline_tiny_trainers.py").write_text(TINY_TRAINERS)
    env_plan = acnorm_trainer_env(base, training=False)
    make_tiny_dataset(env_plan["nnUNet_raw"], SOURCE_ID, n_cases=5, shape=(16, 16, 16), name="BaseSource", seed=0)
    target_raw = make_tiny_dataset(env_plan["nnUNet_raw"], TARGET_ID, n_cases=5, shape=(16, 16, 16),
                                   name="BaseTarget", seed=1, intensity_offset=2.0)
    run_console("nnUNetv2_plan_and_preprocess", "-d", SOURCE_ID, TARGET_ID, "-c", CONFIG, "-np", 1, "-npfp", 1,
                env=env_plan)
    env = acnorm_trainer_env(base)
    env["nnUNet_extTrainer"] = f"{tiny}:{env['nnUNet_extTrainer']}"
    results = Path(env["nnUNet_results"])
    sources = {}
    for net, trainer in SOURCES.items():
        run_console("nnUNetv2_train", SOURCE_ID, CONFIG, 0, "-tr", trainer, "-device", "cpu", env=env)
        sources[net] = (results / "Dataset931_BaseSource" / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
                        / "checkpoint_final.pth")
    images = copy_test_images(target_raw, base / "imagesTs", cases=(0,))

    def chain(method):
        net, trainer = METHODS[method], f"{method}_tinyTest"
        folder = results / "Dataset932_BaseTarget" / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
        first = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 0, "-tr", trainer, "-device", "cpu",
                            "-pretrained_weights", sources[net], env=env)
        epoch1 = base / f"{method}_epoch1.pth"
        shutil.copy(folder / "checkpoint_final.pth", epoch1)
        cont = pred = None
        if method in CONTINUED:
            cont = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 0, "-tr", trainer, "-device", "cpu", "--c",
                               env={**env, "ACNORM_TEST_EPOCHS": "2"})
        if method in PREDICTED:
            pred = base / f"pred_{method}"
            run_console("nnUNetv2_predict", "-i", images, "-o", pred, "-d", TARGET_ID, "-c", CONFIG, "-f", 0, "-tr",
                        trainer, "-device", "cpu", "-npp", 1, "-nps", 1, "--disable_tta", env=env)
        return method, {"first": first, "cont": cont, "epoch1": _load(epoch1),
                        "final": _load(folder / "checkpoint_final.pth"), "pred": pred}

    def refused_scratch_twin():
        trainer = f"{SCRATCH_TWIN}_tinyTest"
        proc = run_console("nnUNetv2_train", TARGET_ID, CONFIG, 0, "-tr", trainer, "-device", "cpu",
                           "-pretrained_weights", sources["IN"], env=env, check=False)
        folder = results / "Dataset932_BaseTarget" / f"{trainer}__nnUNetPlans__{CONFIG}"
        return SCRATCH_TWIN, {"refused": proc, "left_behind": folder.exists()}

    # two chains side by side, one thread each (as nnU-Net's own tests of this project do on 2 cores)
    with ThreadPoolExecutor(2) as pool:
        out = dict(pool.map(lambda job: job() if callable(job) else chain(job), [*METHODS, refused_scratch_twin]))
    print(f"baseline pipeline: {time.time() - start:.0f} s")
    return {"sources": {k: _load(v) for k, v in sources.items()}, "methods": out}


def _source_of(runs, method) -> dict:
    return runs["sources"][METHODS[method]]["network_weights"]


def _n_stages(weights: dict) -> int:
    return len({k.split(".")[2] for k in weights if k.startswith("encoder.stages.")})


@pytest.mark.parametrize("method", list(METHODS))
def test_train_continue_predict_and_plain_network_keys(runs, method):
    r = runs["methods"][method]
    parts = "encoder" if method in ENCODER_ONLY else "all"
    assert f"(read once, weights_only=True; parts: {parts})" in r["first"].stdout and r["epoch1"]["current_epoch"] == 1
    if method in CONTINUED:
        assert r["final"]["current_epoch"] == 2 and "Epoch 1" in r["cont"].stdout
    if method in PREDICTED:
        assert (r["pred"] / "case_000.nii.gz").is_file(), "nnUNetv2_predict wrote no segmentation"
    source = _source_of(runs, method)
    reference = r["epoch1"]["network_weights"] if method in CONTINUED else source
    keys = set(r["final"]["network_weights"])
    acnorm_keys = {k for k in keys if k.endswith((".source_weight", ".source_bias"))}
    assert bool(acnorm_keys) == ("ACNorm" in method)
    assert keys - acnorm_keys == set(source), "the network's state dict must be the plain network's"
    moved = [k for k in source if ".seg_layers." not in k and k.endswith(".weight")
             and not torch.equal(r["final"]["network_weights"][k], reference[k])]
    assert moved, "the (continued) run trained nothing"


@pytest.mark.parametrize("method", ["nnUNetTrainerL2SP", "nnUNetTrainerACNorm_L2SP"])
def test_l2sp_anchor_is_the_pretrained_weights_and_survives_continue(runs, method):
    r, source = runs["methods"][method], _source_of(runs, method)
    for ckpt in (r["epoch1"], r["final"]):
        state = ckpt["finetuning_state"]["l2sp"]
        anchor = state["anchor"]
        assert (state["alpha"], state["beta"]) == (0.01, 0.01)
        assert anchor and not any(".seg_layers." in k for k in anchor)
        for k, v in anchor.items():
            assert torch.equal(v, source[k]), k
        # every parameter except the segmentation layers is anchored (norm affines included)
        assert {k for k in anchor if k.startswith("encoder.")} == \
            {k for k in source if k.startswith("encoder.") and k.endswith((".weight", ".bias"))
             and ".all_modules." not in k}  # (nnU-Net's state dicts alias each conv and norm under all_modules)
        assert all(g["weight_decay"] == 0 for g in ckpt["optimizer_state"]["param_groups"])
    assert "L2-SP: alpha 0.01" in r["first"].stdout
    assert "state restored from the checkpoint" in r["cont"].stdout
    if "ACNorm" in method:
        w = r["final"]["network_weights"]
        prefix = "encoder.stages.0.0.convs.0.norm"
        assert torch.equal(w[f"{prefix}.source_weight"], source[f"{prefix}.weight"])


@pytest.mark.parametrize("method", ["nnUNetTrainerSPD", "nnUNetTrainerACNorm_SPD"])
def test_spd_anchor_is_the_start_of_finetuning_and_survives_continue(runs, method):
    r, source = runs["methods"][method], _source_of(runs, method)
    # the network's parameters: nnU-Net's state dicts alias each conv and norm under all_modules, and the
    # encoder under decoder.encoder
    parameters = {k for k in r["final"]["network_weights"] if k.endswith((".weight", ".bias"))
                  and ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    for ckpt in (r["epoch1"], r["final"]):
        state = ckpt["finetuning_state"]["spd"]
        anchor = state["anchor"]
        assert state["strength"] == 1.0
        assert set(anchor) == parameters, "every trainable parameter is anchored, the fresh seg layers included"
        for k, v in anchor.items():
            if ".seg_layers." not in k:
                assert torch.equal(v, source[k]), k
        assert all(g["weight_decay"] == 0 for g in ckpt["optimizer_state"]["param_groups"])
    for k, v in r["epoch1"]["finetuning_state"]["spd"]["anchor"].items():  # the fresh seg layers' anchor too
        assert torch.equal(v, r["final"]["finetuning_state"]["spd"]["anchor"][k]), k
    n_anchored = len(parameters)
    assert f"SPD: lambda 1.0 on {n_anchored} parameter tensors" in r["first"].stdout
    assert "SPD: projected " in r["first"].stdout and "parameter-tensor updates this epoch" in r["first"].stdout
    if method in CONTINUED:
        assert "state restored from the checkpoint" in r["cont"].stdout


def test_pretrained_recipe_schedule_batch_encoder_only_and_scratch_twin(runs):
    r, source = runs["methods"]["nnUNetTrainerPretrainedRecipe"], _source_of(runs, "nnUNetTrainerPretrainedRecipe")
    # 1 epoch (then 2 with --c): the 5 % warm-up rounds to 0 epochs; nnU-Net master's poly curve after it
    assert ("nnU-Net's PretrainedTrainer recipe: linear warm-up over 0 epoch(s) to lr 0.001, then poly decay over "
            "1 epochs; batch size 2, deep supervision off, pretrained parts: encoder") in r["first"].stdout
    assert r["epoch1"]["logging"]["lrs"] == pytest.approx([1e-3])
    assert r["final"]["logging"]["lrs"] == pytest.approx([1e-3, 1e-3 * 0.5 ** 0.9])
    assert all(g["weight_decay"] == 3e-5 for g in r["final"]["optimizer_state"]["param_groups"])
    assert r["epoch1"]["init_args"]["plans"]["configurations"][CONFIG]["batch_size"] == 2
    # encoder (with its stem) from the source, the decoder and the seg layers fresh (the seeded fresh decoder
    # draws the same values as the seeded source's initialisation did, so the log's counts tell them apart)
    keys = [k for k in source if ".all_modules." not in k and not k.startswith("decoder.encoder.")]
    n_encoder = sum(k.startswith("encoder.") for k in keys)
    assert 0 < n_encoder < len(keys)
    assert (f"{n_encoder} tensors from " in r["first"].stdout
            and f"(read once, weights_only=True; parts: encoder); {len(keys) - n_encoder} start fresh" in r["first"].stdout)
    twin = runs["methods"][SCRATCH_TWIN]
    assert twin["refused"].returncode != 0 and not twin["left_behind"]
    assert f"{SCRATCH_TWIN}_tinyTest: error: it trains from a random start (nnU-Net's --from_scratch): drop " \
           "-pretrained_weights" in twin["refused"].stdout + twin["refused"].stderr


def test_delta_frozen_copy_is_the_pretrained_encoder_after_continue(runs):
    r, source = runs["methods"]["nnUNetTrainerDELTA"], _source_of(runs, "nnUNetTrainerDELTA")
    for ckpt in (r["epoch1"], r["final"]):
        reference = ckpt["finetuning_state"]["delta"]["reference"]
        assert set(reference) == {k[len("encoder."):] for k in source if k.startswith("encoder.")}
        for k, v in reference.items():
            assert torch.equal(v, source[f"encoder.{k}"]), k
    assert f"DELTA: alpha 0.01 on {_n_stages(source)} encoder stage outputs" in r["first"].stdout
    assert "state restored from the checkpoint" in r["cont"].stdout


def test_bss_stochnorm_and_their_logs(runs):
    bottleneck = f"encoder.stages.{_n_stages(_source_of(runs, 'nnUNetTrainerBSS')) - 1}"
    assert f"BSS: eta 0.001, k 1 smallest singular values of the pooled {bottleneck}" in \
        runs["methods"]["nnUNetTrainerBSS"]["first"].stdout
    sn = runs["methods"]["nnUNetTrainerStochNormBN"]
    assert "StochNorm:" in sn["first"].stdout and "p 0.5" in sn["first"].stdout
    assert "finetuning_state" not in sn["final"]  # nothing to restore: the network holds it all
    w = sn["final"]["network_weights"]
    assert any(k.endswith("running_mean") for k in w)  # BatchNorm statistics in the usual keys


def test_lpft_encoder_frozen_in_first_epoch_then_released(runs):
    r, source = runs["methods"]["nnUNetTrainerLPFT"], _source_of(runs, "nnUNetTrainerLPFT")
    first, final = r["epoch1"]["network_weights"], r["final"]["network_weights"]
    encoder = [k for k in source if k.startswith("encoder.")]
    assert all(torch.equal(first[k], source[k]) for k in encoder), "epoch 0 changed the frozen encoder"
    assert any(not torch.equal(first[k], source[k]) for k in source if k.startswith("decoder.stages")), \
        "the decoder did not train while the encoder was frozen"
    assert any(not torch.equal(final[k], first[k]) for k in encoder), "the encoder was not released"
    assert "LP-FT: encoder frozen" in r["first"].stdout and "released" in r["cont"].stdout


def test_discriminative_lr_groups_survive_continue(runs):
    r = runs["methods"]["nnUNetTrainerDiscriminativeLR"]
    for ckpt in (r["epoch1"], r["final"]):
        groups = ckpt["optimizer_state"]["param_groups"]
        assert [g["name"] for g in groups] == ["decoder_and_head", "encoder"]
        assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
        assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"]) and groups[0]["lr"] > 0


# -- classification: nnUNetv2_acnorm_cls_train -method ------------------------------------------------
CLS_METHODS = ("l2sp", "acnorm_l2sp", "delta", "bss", "stochnorm", "lpft", "dlr")
CLS_STATEFUL = ("l2sp", "acnorm_l2sp", "delta")  # the methods with state in the checkpoint
CLS_CONTINUED = ("l2sp", "delta")  # its two kinds restored by --c (acnorm_l2sp's anchor is l2sp's)
CLS_PREDICTED = ("delta", "stochnorm")  # a checkpoint entry; a network of other modules


@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory):
    from tests.factories.checkpoints import save_genesis_checkpoint
    from tests.factories.images import make_volume_dataset

    # the smallest network of the classification trainer: Models Genesis encoder, 4 base features, 16^3
    root = tmp_path_factory.mktemp("cls_baselines")
    make_volume_dataset(root / "train", root / "train.csv", 16, seed=0)
    pretrained = save_genesis_checkpoint(root / "Genesis_Chest_CT.pt", base_features=4)
    env = acnorm_trainer_env(root, training=True)

    def one(method):
        out = root / method
        common = ("-i", root / "train", "-l", root / "train.csv", "-o", out, "-f", 0, "-batch_size", 4,
                  "-device", "cpu", "-method", method)
        first = run_console("nnUNetv2_acnorm_cls_train", *common, "-pretrained", pretrained, "-num_epochs",
                            2 if method == "lpft" else 1, env=env)
        result = {"first": first, "folder": out / "fold_0"}
        if method in CLS_CONTINUED:
            shutil.copy(out / "fold_0" / "checkpoint_final.pth", root / f"{method}_epoch1.pth")
            result["epoch1"] = _load(root / f"{method}_epoch1.pth")
            result["cont"] = run_console("nnUNetv2_acnorm_cls_train", *common, "--c", "-num_epochs", 2, env=env)
        if method in CLS_PREDICTED:
            run_console("nnUNetv2_acnorm_cls_predict", "-i", root / "train", "-m", out, "-o", root / f"{method}.csv",
                        "-device", "cpu", "-num_workers", 0, env=env)
            result["predictions"] = root / f"{method}.csv"
        result["final"] = _load(out / "fold_0" / "checkpoint_final.pth")
        return method, result

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, CLS_METHODS))
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    return {"methods": results, "pretrained": {k.removeprefix("module."): v for k, v in state.items()}}


@pytest.mark.parametrize("method", CLS_METHODS)
def test_cls_train_each_method(cls_runs, method):
    r = cls_runs["methods"][method]
    config = r["final"]["config"]
    from nnunet_acnorm.classification.trainer import METHODS
    assert config["trainer_name"] == METHODS[method].__name__
    assert (r["folder"] / "validation" / "summary.json").is_file()
    keys = set(r["final"]["network_weights"])
    assert any(k.endswith("source_weight") for k in keys) == method.startswith("acnorm")
    assert ("finetuning_state" in r["final"]) == (method in CLS_STATEFUL)
    if method == "lpft":
        assert "LP-FT: linear probe" in r["first"].stdout and "LP-FT: fine-tuning everything" in r["first"].stdout
    if method == "dlr":
        groups = r["final"]["optimizer_state"]["param_groups"]
        assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    if method == "stochnorm":
        assert "StochNorm: 8 BatchNorm layer(s), p 0.5" in r["first"].stdout  # the encoder's 8
    if method in CLS_PREDICTED:  # the network rebuilt from the checkpoint, loaded strictly
        assert len(r["predictions"].read_text().splitlines()) == 17


@pytest.mark.parametrize("method", CLS_CONTINUED)
def test_cls_method_state_restored_on_continue_and_predict(cls_runs, method):
    r, pretrained = cls_runs["methods"][method], cls_runs["pretrained"]
    assert "continuing from epoch 1" in r["cont"].stdout and r["final"]["current_epoch"] == 2
    for ckpt in (r["epoch1"], r["final"]):
        state = ckpt["finetuning_state"]
        if method == "delta":
            reference = state["delta"]["reference"]
            shared = [k for k in reference if not k.startswith("classifier.")]
            assert shared and all(torch.equal(reference[k], pretrained[k]) for k in shared)
        else:
            anchor = state["l2sp"]["anchor"]
            assert anchor and not any(k.startswith("classifier.") for k in anchor)
            assert all(torch.equal(v, pretrained[k]) for k, v in anchor.items())
            assert all(g["weight_decay"] == 0 for g in ckpt["optimizer_state"]["param_groups"])
