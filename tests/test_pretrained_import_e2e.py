"""nnUNetv2_acnorm_import through the real console scripts: for each 3D family a checkpoint in the
published format -> import -> nnUNetv2_train (AC-Norm, one tiny run, -pretrained_weights) ->
nnUNetv2_predict; the trained network's AC-Norm source affines equal the file's norm affines.
A TotalSegmentator results folder goes the same way with --encoder_only and
nnUNetTrainerACNorm_encoderOnly. Plus the command's refusals (bad files, 2D families, decoder-only
files, LayerNorm-only networks), stem adaptation, encoder-only imports of every family, and 2D
nnU-Net v2 checkpoints through the import and the ranking.

One tiny CT dataset is planned and preprocessed once for the module.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_acnorm.checkpoints import load_pretrained
from tests.factories import checkpoints as cf
from tests.factories.nnunet import acnorm_trainer_env, copy_test_images, make_tiny_dataset, run_console

pytestmark = pytest.mark.integration
DATASET = 561
TRAINER = "nnUNetTrainerACNorm_tinyTest"  # nnUNetTrainerACNorm with 2 iterations per epoch, 1 epoch


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import SimpleITK as sitk

    base = tmp_path_factory.mktemp("import_e2e")
    env_plan = acnorm_trainer_env(base, training=False)
    folder = make_tiny_dataset(Path(env_plan["nnUNet_raw"]), DATASET, n_cases=4, shape=(24, 24, 24),
                               name="TinyCT")
    # a CT dataset: intensities in Hounsfield-like units, channel named CT
    for image in (folder / "imagesTr").glob("*.nii.gz"):
        img = sitk.ReadImage(str(image))
        arr = sitk.GetArrayFromImage(img) * 120.0 - 300.0
        out = sitk.GetImageFromArray(arr.astype(np.float32))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(image))
    meta = json.loads((folder / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    run_console("nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "1",
                "--verify_dataset_integrity", env=env_plan)
    # fold 0: 3 training cases, 1 validation case (nnU-Net's default 5-fold split needs 5 cases)
    pre = Path(env_plan["nnUNet_preprocessed"]) / f"Dataset{DATASET:03d}_TinyCT"
    (pre / "splits_final.json").write_text(json.dumps(
        [{"train": ["case_001", "case_002", "case_003"], "val": ["case_000"]}]))
    test_images = copy_test_images(folder, base / "imagesTs", cases=(0,))
    return {"base": base, "env_plan": env_plan, "env_train": acnorm_trainer_env(base, training=True),
            "raw": folder, "images": test_images,
            "pre": Path(env_plan["nnUNet_preprocessed"]) / f"Dataset{DATASET:03d}_TinyCT"}


def _import(ws, file, *extra, check=True):
    return run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", "3d_fullres", "-i", file, *extra,
                       env=ws["env_plan"], check=check)


def _printed(stdout: str, label: str) -> str:
    return next(line.split(": ", 1)[1].strip() for line in stdout.splitlines() if line.startswith(label + ":"))


FACTORIES = {
    "genesis": lambda p: cf.save_genesis_checkpoint(p / "Genesis_Chest_CT.pt", base_features=4),
    "suprem": lambda p: cf.save_suprem_checkpoint(p / "supervised_suprem_unet_2100.pth", base_features=4),
    "nnunet_v2": lambda p: cf.save_nnunet_v2_checkpoint(p / "checkpoint_final.pth", num_classes=5),
    "nnunet_v1": lambda p: cf.save_nnunet_v1_checkpoint(p / "Genesis_Chest_CT_nnUNet.model"),
    "nnssl": lambda p: cf.save_nnssl_checkpoint(p / "nnssl_simclr.pth", encoder_only=True),
    "medicalnet": lambda p: cf.save_medicalnet_checkpoint(p / "resnet_10.pth", depth=10, base_features=8),
    "stunet": lambda p: cf.save_stunet_checkpoint(p / "small_ep4k.model", dims=(4, 8, 16, 16, 16, 16)),
}
#: the families run through the whole chain (kept cheap: nnU-Net v2 goes through it as the TotalSegmentator
#: folder test below; SuPreM shares Genesis' network, planning and training path, its import is tested in process)
CHAIN = [f for f in FACTORIES if f not in ("nnunet_v2", "suprem")]


@pytest.mark.parametrize("family", CHAIN)
def test_import_train_predict(workspace, tmp_path, family):
    ws = workspace
    source_plans = ws["pre"] / "nnUNetPlans.json"
    source_before = source_plans.read_text()
    file = FACTORIES[family](tmp_path)
    out = _import(ws, file).stdout
    assert f"family {family}" in out
    plans_name, checkpoint = _printed(out, "Plans identifier"), _printed(out, "Pretrained checkpoint")
    assert source_plans.read_text() == source_before  # the source plans stay untouched
    plans = json.loads((ws["pre"] / f"{plans_name}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    weights = load_pretrained(file)
    written = torch.load(checkpoint, weights_only=True)
    assert set(written["acnorm_import"]["loaded_keys"]) <= set(weights.state_dict)
    assert f"Loaded {len(written['acnorm_import']['loaded_keys'])} tensors from the file" in out

    # the checkpoint holds every key of the planned network (what -pretrained_weights demands)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = config["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, 2, deep_supervision=True)
    net.load_state_dict(written["network_weights"], strict=True)

    run_console("nnUNetv2_train", DATASET, "3d_fullres", "0", "-p", plans_name, "-tr", TRAINER,
                "-pretrained_weights", checkpoint, "-device", "cpu", env=ws["env_train"])
    model_dir = Path(ws["env_train"]["nnUNet_results"]) / f"Dataset{DATASET:03d}_TinyCT" / \
        f"{TRAINER}__{plans_name}__3d_fullres"
    trained = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    affines = weights.norm_affines()
    assert affines
    for module, (weight, bias) in affines.items():
        assert torch.equal(trained[module + ".source_weight"], weight), module
        assert torch.equal(trained[module + ".source_bias"], bias), module
    # the target affines trained away from the source (the run did update them)
    assert any(not torch.equal(trained[m + ".weight"], w) for m, (w, _) in affines.items())

    pred_dir = tmp_path / "pred"
    run_console("nnUNetv2_predict", "-i", ws["images"], "-o", pred_dir, "-d", DATASET, "-c", "3d_fullres",
                "-f", "0", "-p", plans_name, "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1",
                "-nps", "1", env=ws["env_train"])
    import SimpleITK as sitk
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "case_000.nii.gz")))
    assert seg.shape == (24, 24, 24) and set(np.unique(seg)) <= {0, 1}

    if family in ("genesis", "medicalnet"):  # network classes without a norm_op: fold keeps their own norms
        folded = tmp_path / "folded"
        out = run_console("nnUNetv2_acnorm_fold", "-i", model_dir, "-o", folded, env=ws["env_train"]).stdout
        assert "largest softmax difference" in out
        folded_arch = json.loads((folded / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
        assert folded_arch == arch  # the stock build of the same class holds the folded (plain) norms
        assert torch.load(folded / "fold_0" / "checkpoint_final.pth", weights_only=True)["trainer_name"] == \
            "nnUNetTrainer"


@pytest.mark.parametrize("family", list(FACTORIES))
def test_imported_checkpoint_sets_acnorm_sources(workspace, tmp_path, family, monkeypatch):
    """Every family: import (in-process, no preprocessing) -> nnUNetTrainerACNorm's network built from
    the new plans -> nnU-Net's own -pretrained_weights loader -> AC-Norm sources = the file's affines."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.nnunet.plans import import_pretrained
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunet_acnorm.nnunet.pretrained import set_strict_source

    file = FACTORIES[family](tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", workspace["env_plan"]["nnUNet_preprocessed"])
    result = import_pretrained(f"Dataset{DATASET:03d}_TinyCT", "3d_fullres", file,
                               plans_name=f"nnUNetPlans_check_{family}", output=str(tmp_path / "ckpt.pth"),
                               preprocess=False)
    plans = json.loads(Path(result.plans_file).read_text())
    pm = PlansManager(plans)
    net = nnUNetTrainerACNorm.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, True)
    set_strict_source(net, False)  # what nnUNetv2_train -pretrained_weights switches on
    load_pretrained_weights(net, result.checkpoint)
    layers = acnorm_modules(net)
    weights = load_pretrained(file)
    affines = weights.norm_affines()
    assert affines and set(affines) <= set(layers)
    for module, (weight, bias) in affines.items():
        assert layers[module].source_is_set
        assert torch.equal(layers[module].source_weight, weight) and torch.equal(layers[module].source_bias, bias)
    assert result.loaded and all(".seg_layers." in k or k.startswith(("out_tr.", "decoder.", "seg_outputs."))
                                 for k in result.fresh if not k.startswith(("decoder.stages", "decoder.transpconvs")))


@pytest.mark.parametrize("family", list(FACTORIES))
def test_encoder_only_import_for_every_family(workspace, tmp_path, family, monkeypatch):
    """--encoder_only (in-process): only the family's encoder comes from the file; the checkpoint says
    so; nnUNetTrainerACNorm_encoderOnly's network has AC-Norm in the encoder only, and its -pretrained_weights
    loading (our read-once loader) sets those sources to the file's affines."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_acnorm.networks import encoder_prefixes, is_encoder_key
    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.nnunet.plans import import_pretrained
    from nnunet_acnorm.nnunet.pretrained import put_pretrained_weights, read_pretrained_weights, set_strict_source
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm_encoderOnly

    file = FACTORIES[family](tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", workspace["env_plan"]["nnUNet_preprocessed"])
    lines = []
    result = import_pretrained(f"Dataset{DATASET:03d}_TinyCT", "3d_fullres", file, plans_name=f"nnUNetPlans_enc_{family}",
                               output=str(tmp_path / "ckpt.pth"), preprocess=False, encoder_only=True, echo=lines.append)
    weights = load_pretrained(file)
    prefixes = weights.family.encoder_prefixes
    assert result.parts == "encoder" and result.loaded and all(is_encoder_key(k, prefixes) for k in result.loaded)
    assert torch.load(result.checkpoint, weights_only=True)["acnorm_import"]["parts"] == "encoder"
    assert any("-tr nnUNetTrainerACNorm_encoderOnly -pretrained_weights" in line for line in lines)
    pm = PlansManager(json.loads(Path(result.plans_file).read_text()))
    net = nnUNetTrainerACNorm_encoderOnly.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, True)
    layers = acnorm_modules(net)
    assert layers and all(is_encoder_key(name, encoder_prefixes(net)) for name in layers)
    set_strict_source(net, False)
    put_pretrained_weights(net, read_pretrained_weights(net, result.checkpoint, parts="encoder"))
    affines = weights.norm_affines()
    for name, layer in layers.items():
        assert torch.equal(layer.source_weight, affines[name][0]), name


def test_stunet_plans_for_the_target_dataset(workspace, tmp_path, monkeypatch):
    """STU-Net's plans for this dataset: the network by dotted path, widths/blocks/kernels from the
    file, the dataset's first five downsamplings padded with [1, 1, 1], the dataset's spacing and
    normalisation (the authors fine-tuned with the target's own plans), the pretraining's noted."""
    from nnunet_acnorm.nnunet.plans import import_pretrained

    file = cf.save_stunet_checkpoint(tmp_path / "small_ep4k.model", dims=(4, 8, 16, 16, 16, 16), blocks=2,
                                     input_channels=1)
    monkeypatch.setenv("nnUNet_preprocessed", workspace["env_plan"]["nnUNet_preprocessed"])
    lines = []
    result = import_pretrained(f"Dataset{DATASET:03d}_TinyCT", "3d_fullres", file, plans_name="nnUNetPlans_stu",
                               output=str(tmp_path / "ckpt.pth"), preprocess=False, echo=lines.append)
    source = json.loads((workspace["pre"] / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    config = json.loads(Path(result.plans_file).read_text())["configurations"]["3d_fullres"]
    arch = config["architecture"]
    assert arch["network_class_name"] == "nnunet_acnorm.networks.stunet.STUNet" and arch["_kw_requires_import"] == []
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 16, 16, 16]
    assert arch["arch_kwargs"]["blocks_per_stage"] == [2] * 6 and arch["arch_kwargs"]["kernel_sizes"] == [[3, 3, 3]] * 6
    downsamplings = source["architecture"]["arch_kwargs"]["strides"][1:6]
    assert arch["arch_kwargs"]["strides"] == [[1, 1, 1]] + downsamplings + [[1, 1, 1]] * (5 - len(downsamplings))
    assert config["spacing"] == source["spacing"] and config["normalization_schemes"] == source["normalization_schemes"]
    text = "\n".join(lines)
    assert "STU-Net of a custom width" in text and "pretraining (STUNetTrainer_small, small_ep4k.model.pkl): spacing " \
        "[1.5, 1.5, 1.5], patch [128, 128, 128], normalisation ['ZScoreNormalization']" in text
    assert {k.split(".")[0] for k in result.fresh} == {"seg_outputs"}  # the heads; all else from the file


def test_totalsegmentator_folder_encoder_only_train_predict(workspace, tmp_path):
    """A TotalSegmentator results folder (nnU-Net 2.1 plans format, 7 organs) -> import --encoder_only
    (its plans.json and dataset.json build the network; the report says what starts fresh) ->
    nnUNetv2_train -tr nnUNetTrainerACNorm_encoderOnly -> nnUNetv2_predict."""
    ws, trainer = workspace, "nnUNetTrainerACNorm_encoderOnly_tinyTest"
    folder = cf.save_totalsegmentator_model(tmp_path / "totalseg", features=(4, 8, 16))
    out = _import(ws, folder, "--encoder_only", "-pl", "nnUNetPlans_totalseg").stdout
    assert "family nnunet_v2" in out and "licence of the weights: that of the data it was trained on" in out
    assert (f"nnU-Net results folder {folder}: its plans.json (configuration 3d_fullres, trainer "
            "nnUNetTrainerNoMirroring) and dataset.json (7 labels: spleen, kidney_right, kidney_left, gallbladder "
            "...) define the network") in out
    assert "--encoder_only: only the encoder (stem included) comes from the file; the decoder starts fresh" in out
    assert "the segmentation head starts fresh (2 outputs for this dataset's labels)" in out
    assert "-tr nnUNetTrainerACNorm_encoderOnly -pretrained_weights" in out
    checkpoint = _printed(out, "Pretrained checkpoint")
    written = torch.load(checkpoint, weights_only=True)
    assert written["acnorm_import"]["parts"] == "encoder"
    assert all(k.startswith("encoder.") for k in written["acnorm_import"]["loaded_keys"])
    arch = json.loads((ws["pre"] / "nnUNetPlans_totalseg.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16]  # from the folder's old-format plans

    run_console("nnUNetv2_train", DATASET, "3d_fullres", "0", "-p", "nnUNetPlans_totalseg", "-tr", trainer,
                "-pretrained_weights", checkpoint, "-device", "cpu", env=ws["env_train"])
    model_dir = Path(ws["env_train"]["nnUNet_results"]) / f"Dataset{DATASET:03d}_TinyCT" / \
        f"{trainer}__nnUNetPlans_totalseg__3d_fullres"
    trained = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    file = load_pretrained(folder).norm_affines()
    encoder = [m for m in file if m.startswith("encoder.")]
    assert encoder and all(torch.equal(trained[m + ".source_weight"], file[m][0]) for m in encoder)
    assert not any(k.endswith("source_weight") for k in trained if k.startswith("decoder.stages."))  # plain norms
    assert "the encoder's only: the decoder's norms stay plain" in next(model_dir.glob("fold_0/training_log_*")).read_text()

    pred_dir = tmp_path / "pred"
    run_console("nnUNetv2_predict", "-i", ws["images"], "-o", pred_dir, "-d", DATASET, "-c", "3d_fullres",
                "-f", "0", "-p", "nnUNetPlans_totalseg", "-tr", trainer, "-device", "cpu", "--disable_tta",
                "-npp", "1", "-nps", "1", env=ws["env_train"])
    assert (pred_dir / "case_000.nii.gz").is_file()


def test_2d_nnunet_v2_checkpoint_through_import_and_rank(workspace, tmp_path):
    """issue 30 item 3: a Conv2d nnU-Net v2 checkpoint with -c 2d was refused by both commands ("the
    nnunet_v2 network is 3D but configuration has a 2D patch")."""
    ws = workspace
    file = cf.save_nnunet_v2_checkpoint(tmp_path / "source2d" / "checkpoint_final.pth",
                                        architecture=cf.plain_unet_architecture_2d(), configuration="2d")
    out = run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", "2d", "-i", file, "-pl", "nnUNetPlans_2dsource",
                      "--no_preprocess", env=ws["env_plan"]).stdout
    config = json.loads((ws["pre"] / "nnUNetPlans_2dsource.json").read_text())["configurations"]["2d"]
    assert config["architecture"]["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv2d"
    written = torch.load(_printed(out, "Pretrained checkpoint"), weights_only=True)["network_weights"]
    assert written["encoder.stages.0.0.convs.0.conv.weight"].dim() == 4
    run_console("nnUNetv2_preprocess", "-d", DATASET, "-c", "2d", "-np", "1", env=ws["env_plan"])
    rank = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "2d", "-i", file, "--steps", "1",
                       "-o", tmp_path / "ranking", "-device", "cpu", "--no_progress", env=ws["env_train"])
    candidates = json.loads((tmp_path / "ranking" / "ranking.json").read_text())["candidates"]
    assert [c["status"] for c in candidates] == ["ranked"], rank.stdout
    # a 3D configuration is refused with the right reason
    from nnunet_acnorm.nnunet.plans import ImportPlanError, plan_configuration

    source = json.loads((ws["pre"] / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    with pytest.raises(ImportPlanError, match=r"network of this file is 2D but the configuration is 3D; use a 2D "
                                              r"configuration \(-c 2d\)"):
        plan_configuration(load_pretrained(file), source, {"0": "CT"})


def test_genesis_plans_window_and_preprocessing(workspace, tmp_path):
    ws = workspace
    file = cf.save_genesis_checkpoint(tmp_path / "TransVW_chest_ct.pt", "transvw", base_features=4)
    out = _import(ws, file, "-pl", "nnUNetPlans_transvw", "--no_preprocess").stdout
    config = json.loads((ws["pre"] / "nnUNetPlans_transvw.json").read_text())["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == ["NoNormalization"]
    assert config["architecture"]["arch_kwargs"]["input_window"] == [-1000.0, 1000.0]
    assert all(p % 8 == 0 for p in config["patch_size"])
    # normalisation changed: own data identifier, preprocessing (run by the full chain test) is printed
    assert config["data_identifier"] == "nnUNetPlans_transvw_3d_fullres"
    assert "nnUNetv2_preprocess -d 561 -plans_name nnUNetPlans_transvw -c 3d_fullres" in out
    assert "out_tr (2), decoder.seg_layers (4)" in out  # what starts fresh, by part
    # a second import to the same plans name refuses to overwrite
    again = _import(ws, file, "-pl", "nnUNetPlans_transvw", "--no_preprocess", check=False)
    assert again.returncode == 1 and "exists; pass --overwrite" in again.stderr


def test_stem_adapted_for_two_channel_dataset(workspace, tmp_path):
    """A 2-channel dataset: the 1-channel stem is repeated and divided by 2 (documented)."""
    ws = workspace
    pre = Path(ws["env_plan"]["nnUNet_preprocessed"]) / "Dataset562_TwoChannel"
    pre.mkdir()
    plans = json.loads((ws["pre"] / "nnUNetPlans.json").read_text())
    plans["dataset_name"] = "Dataset562_TwoChannel"
    cfg = plans["configurations"]["3d_fullres"]
    cfg["normalization_schemes"], cfg["use_mask_for_norm"] = ["ZScoreNormalization"] * 2, [False, False]
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    meta = json.loads((ws["pre"] / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (pre / "dataset.json").write_text(json.dumps(meta))
    file = cf.save_nnunet_v1_checkpoint(tmp_path / "v1.model")
    proc = run_console("nnUNetv2_acnorm_import", "-d", "562", "-c", "3d_fullres", "-i", file,
                       env=ws["env_plan"])
    assert "1 -> 2 input channels" in proc.stdout and "Preprocessing: not needed" in proc.stdout
    written = torch.load(_printed(proc.stdout, "Pretrained checkpoint"), weights_only=True)["network_weights"]
    v1 = cf.nnunet_v1_state_dict()["conv_blocks_context.0.blocks.0.conv.weight"]
    stem = written["encoder.stages.0.0.convs.0.conv.weight"]
    assert stem.shape[1] == 2
    assert torch.allclose(stem, v1.repeat(1, 2, 1, 1, 1) / 2)


def _bad(ws, file, *extra):
    proc = _import(ws, file, *extra, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip()


def test_import_refusals(workspace, tmp_path):
    ws = workspace
    # (unknown, truncated, empty and NaN files: tests/test_pretrained_loaders.py, in-process)
    unknown = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, unknown)
    message = _bad(ws, unknown)
    assert "no known pretrained family" in message and "tried genesis, suprem" in message
    pickled = tmp_path / "pickled.pt"
    torch.save({"epoch": 1, "state_dict": cf.genesis_state_dict(4), "optimizer_state_dict": {},
                "config": Path("/some/path")}, pickled)
    assert "--trust_pickle" in _bad(ws, pickled)

    decoder_only = tmp_path / "decoder_only.pt"
    state = {k: v for k, v in cf.genesis_state_dict(4).items() if k.startswith("up_tr")}
    torch.save({"epoch": 1, "state_dict": state, "optimizer_state_dict": {}}, decoder_only)
    message = _bad(ws, decoder_only, "-pl", "nnUNetPlans_decoder_only")
    assert "not even the encoder matched" in message and "56 of 56 encoder tensors" in message  # 8 LUConvs x 7 tensors

    moco = cf.save_moco_v2_checkpoint(tmp_path / "moco.pth.tar", arch="resnet18", queue_size=16)
    message = _bad(ws, moco)
    assert "2D moco_v2" in message and "nnUNetv2_acnorm_cls_train" in message
    # a LayerNorm-only network (SAM-Med3D-like): what was found, what AC-Norm needs, the vanilla trainer
    message = _bad(ws, cf.save_sam_med3d_like_checkpoint(tmp_path / "sam_med3d_turbo.pth"))
    assert "a transformer (attention weights such as" in message and "of LayerNorm type" in message
    assert "AC-Norm cannot apply to it: AC-Norm needs affine BatchNorm/InstanceNorm/GroupNorm" in message
    assert "nnUNetTrainerFinetune (vanilla" in message
    # nothing was written by the refused imports
    assert not list(ws["pre"].glob("nnUNetPlans__moco*.json"))


def test_import_onto_a_dataset_prepared_by_the_pretraining_workflow(workspace, tmp_path):
    """nnU-Net's pretraining workflow prepares a dataset with nnUNetv2_extract_fingerprint and
    nnUNetv2_move_plans_between_datasets, which leave dataset.json out of its preprocessed folder
    (nnU-Net 2.8.1's preprocessing needs it there). The import copies it from nnUNet_raw, then plans
    and preprocesses (Genesis changes the normalisation) as on a planned dataset."""
    ws = workspace
    raw = make_tiny_dataset(Path(ws["env_plan"]["nnUNet_raw"]), 563, n_cases=2, shape=(24, 24, 24),
                            name="TinyPretrainSource", seed=5)
    meta = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "CT"}}))  # Genesis: raw HU
    run_console("nnUNetv2_extract_fingerprint", "-d", 563, "-np", 1, env=ws["env_plan"])
    run_console("nnUNetv2_move_plans_between_datasets", "-s", DATASET, "-t", 563, "-sp", "nnUNetPlans", "-tp",
                "TinyCTPlans", env=ws["env_plan"])
    pre = Path(ws["env_plan"]["nnUNet_preprocessed"]) / "Dataset563_TinyPretrainSource"
    assert (pre / "TinyCTPlans.json").is_file() and not (pre / "dataset.json").exists()
    file = cf.save_genesis_checkpoint(tmp_path / "Genesis_Chest_CT.pt", base_features=4)
    out = run_console("nnUNetv2_acnorm_import", "-d", 563, "-c", "3d_fullres", "-p", "TinyCTPlans", "-i", file,
                      env=ws["env_plan"]).stdout
    assert "Copied the raw dataset.json" in out and "Preprocessing Dataset563_TinyPretrainSource" in out
    assert json.loads((pre / "dataset.json").read_text()) == json.loads((raw / "dataset.json").read_text())
    assert len(list((pre / "TinyCTPlans__genesis_3d_fullres").glob("case_*"))) >= 2  # preprocessed by the import
