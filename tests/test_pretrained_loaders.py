"""Family detection, key mapping and safe loading on checkpoints in the published formats."""

import json
import os

import pytest
import torch
import torchvision

from nnunet_acnorm.networks import GenesisUNet3D, MedicalNetResNet3D, STUNet
from nnunet_acnorm.nnunet.pretrained import set_strict_source
from nnunet_acnorm.checkpoints import FAMILIES, PretrainedLoadError, load_pretrained
from tests.factories import checkpoints as cf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {
        "genesis": cf.save_genesis_checkpoint(d / "Genesis_Chest_CT.pt"),
        "semantic": cf.save_genesis_checkpoint(d / "semantic_genesis_chest_ct.pt", "semantic_genesis",
                                               module_prefix=False),
        "transvw": cf.save_genesis_checkpoint(d / "TransVW_chest_ct.pt", "transvw"),
        "suprem": cf.save_suprem_checkpoint(d / "supervised_suprem_unet_2100.pth"),
        "nnunet_v2": cf.save_nnunet_v2_checkpoint(d / "checkpoint_final.pth"),
        "nnunet_v1": cf.save_nnunet_v1_checkpoint(d / "model_final_checkpoint.model"),
        "nnssl": cf.save_nnssl_checkpoint(d / "nnssl_mae.pth"),
        "nnssl_enc": cf.save_nnssl_checkpoint(d / "nnssl_simclr.pth", encoder_only=True),
        "medicalnet": cf.save_medicalnet_checkpoint(d / "resnet_18.pth", depth=18, base_features=8),
        "torchvision": cf.save_torchvision_resnet_checkpoint(d / "resnet50-0676ba61.pth"),
        "moco": cf.save_moco_v2_checkpoint(d / "moco_v2_800ep_pretrain.pth.tar", queue_size=256),
        "dir": d,
    }


def test_family_names():
    assert set(FAMILIES) == {"genesis", "suprem", "nnunet_v2", "nnunet_v1", "stunet", "nnssl", "medicalnet",
                             "torchvision_resnet", "moco_v2"}


@pytest.mark.parametrize("which,family", [
    ("genesis", "genesis"), ("semantic", "genesis"), ("transvw", "genesis"), ("suprem", "suprem"),
    ("nnunet_v2", "nnunet_v2"), ("nnunet_v1", "nnunet_v1"), ("nnssl", "nnssl"), ("nnssl_enc", "nnssl"),
    ("medicalnet", "medicalnet"), ("torchvision", "torchvision_resnet"), ("moco", "moco_v2")])
def test_detection_by_content(files, which, family):
    weights = load_pretrained(files[which])
    assert weights.family.name == family
    assert load_pretrained(files[which], family=family).state_dict.keys() == weights.state_dict.keys()


@pytest.mark.parametrize("which", ["genesis", "semantic", "transvw", "suprem"])
def test_genesis_family_maps_onto_our_unet(files, which):
    weights = load_pretrained(files[which])
    net = GenesisUNet3D(1, 2, base_features=4)
    missing, unexpected = net.load_state_dict(weights.state_dict, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(k for k in net.state_dict() if k.startswith(("out_tr.", "decoder.")))
    assert len(weights.state_dict) == 104  # 106 upstream keys minus the pretext head
    raw = torch.load(files[which], weights_only=True)
    raw = raw.get("state_dict", raw.get("net"))
    prefix = {"suprem": "module.backbone.", "semantic": ""}.get(which, "module.")
    assert torch.equal(weights.state_dict["down_tr512.ops.1.bn1.weight"], raw[prefix + "down_tr512.ops.1.bn1.weight"])
    assert weights.info["base_features"] == 4


def test_nnunet_v2_keeps_everything_but_aliases_and_head(files):
    weights = load_pretrained(files["nnunet_v2"])
    assert not any(".all_modules." in k or k.startswith("decoder.encoder.") or ".seg_layers." in k
                   for k in weights.state_dict)
    net = cf.build_from_architecture(weights.info["architecture"], 1, 5)
    missing, unexpected = net.load_state_dict(weights.state_dict, strict=False)
    assert not unexpected
    assert all(".all_modules." in k or "decoder.encoder." in k or ".seg_layers." in k for k in missing)
    assert weights.info["configuration"] == "3d_fullres"


def test_nnunet_v1_maps_onto_plain_conv_unet(files):
    weights = load_pretrained(files["nnunet_v1"])
    arch = weights.info["architecture"]
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16]
    assert arch["arch_kwargs"]["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    net = cf.build_from_architecture(arch, 1, 3)
    missing, unexpected = net.load_state_dict(weights.state_dict, strict=False)
    assert not unexpected
    # only the aliases, v1's missing transposed-conv biases and the heads are not in the file
    assert all(".all_modules." in k or "decoder.encoder." in k or ".seg_layers." in k
               or (k.startswith("decoder.transpconvs.") and k.endswith(".bias")) for k in missing)
    v1 = cf.nnunet_v1_state_dict()
    sd = net.state_dict()
    assert torch.equal(sd["encoder.stages.2.0.convs.1.norm.weight"], v1["conv_blocks_context.2.1.blocks.0.instnorm.weight"])
    assert torch.equal(sd["decoder.stages.0.convs.0.conv.weight"], v1["conv_blocks_localization.0.0.blocks.0.conv.weight"])
    assert torch.equal(sd["decoder.transpconvs.1.weight"], v1["tu.1.weight"])


@pytest.mark.parametrize("which", ["nnssl", "nnssl_enc"])
def test_nnssl_plan_and_keys(files, which):
    weights = load_pretrained(files[which])
    assert weights.info["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert weights.info["stem_key"] == "encoder.stem.convs.0.conv.weight"
    assert weights.info["has_decoder"] == (which == "nnssl")
    net = cf.build_from_architecture(weights.info["architecture"], 1, 2)
    _, unexpected = net.load_state_dict(weights.state_dict, strict=False)
    assert not unexpected


@pytest.mark.parametrize("depth", [10, 18, 50])
def test_medicalnet_depth_detected(tmp_path, depth):
    path = cf.save_medicalnet_checkpoint(tmp_path / f"resnet_{depth}.pth", depth=depth, base_features=4)
    weights = load_pretrained(path)
    assert weights.info["depth"] == depth
    assert weights.info["shortcut_type"] == ("A" if depth == 18 else "B")
    MedicalNetResNet3D(depth, base_features=4).load_state_dict(weights.state_dict, strict=True)


@pytest.mark.parametrize("which", ["torchvision", "moco"])
def test_2d_resnet50_families_load_into_torchvision(files, which):
    weights = load_pretrained(files[which])
    net = torchvision.models.resnet50(weights=None)
    missing, unexpected = net.load_state_dict(weights.state_dict, strict=False)
    assert not unexpected and sorted(missing) == ["fc.bias", "fc.weight"]
    assert weights.info["depth"] == 50
    if which == "moco":
        raw = torch.load(files["moco"], weights_only=True)["state_dict"]
        assert torch.equal(weights.state_dict["layer4.2.bn3.weight"], raw["module.encoder_q.layer4.2.bn3.weight"])
        assert not any("encoder_k" in k or "queue" in k for k in weights.state_dict)


def test_norm_affines_lists_every_norm(files):
    assert len(load_pretrained(files["genesis"]).norm_affines()) == 14
    assert len(load_pretrained(files["nnunet_v1"]).norm_affines()) == 3 * 2 + 2 * 2  # 3 encoder + 2 decoder stages, 2 convs each


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_file_lists_families_tried(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"backbone.layer.weight": torch.zeros(3)}}, path)
    with pytest.raises(PretrainedLoadError, match="no known pretrained family.*genesis.*moco_v2"):
        load_pretrained(path)


def test_truncated_file_is_named(files, tmp_path):
    data = open(files["genesis"], "rb").read()
    path = tmp_path / "Genesis_truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedLoadError, match="Genesis_truncated.pt.*corrupted or truncated"):
        load_pretrained(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(PretrainedLoadError, match="empty"):
        load_pretrained(tmp_path / "empty.pt")
    with pytest.raises(PretrainedLoadError, match="no such file"):
        load_pretrained(tmp_path / "missing.pt")


class Pickled:  # an arbitrary object: needs full unpickling
    def __init__(self):
        self.note = "arbitrary"


def test_pickled_objects_refused_unless_trusted(tmp_path):
    state = cf.genesis_state_dict(4)
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": state, "extra": Pickled()}, path)
    with pytest.raises(PretrainedLoadError, match="arbitrary pickled.*Pickled.*--trust_pickle"):
        load_pretrained(path)
    assert load_pretrained(path, trust_pickle=True).family.name == "genesis"


def test_numpy_scalars_of_nnunet_checkpoints_load_safely(files):
    # nnU-Net's logging holds numpy scalars: allowed without trust_pickle
    assert load_pretrained(files["nnunet_v2"]).family.name == "nnunet_v2"


def test_forced_family_must_match(files):
    with pytest.raises(PretrainedLoadError, match="does not look like a medicalnet.*detected: genesis"):
        load_pretrained(files["genesis"], family="medicalnet")
    with pytest.raises(PretrainedLoadError, match="unknown family 'foo'"):
        load_pretrained(files["genesis"], family="foo")


def test_nan_weights_refused(tmp_path):
    state = cf.genesis_state_dict(4)
    state["down_tr64.ops.0.bn1.weight"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"epoch": 1, "state_dict": state, "optimizer_state_dict": {}}, path)
    with pytest.raises(PretrainedLoadError, match="down_tr64.ops.0.bn1.weight contains NaN"):
        load_pretrained(path)


# -- STU-Net ---------------------------------------------------------------------------------------
#: parameters of the released sizes (1 input channel, 105 outputs), from the STU-Net README
STUNET_PARAMETERS_M = {"S": 14.60, "B": 58.26, "L": 440.30, "H": 1457.33}


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_stunet_every_released_size_has_the_published_keys_shapes_and_parameters(size):
    """Our STU-Net of each released size has exactly the state dict of the release (keys, order and
    shapes written from its structure in the factory), its parameter count, and is recognised as that
    size from the tensors alone. Built on the meta device: no memory for the 1.4 B parameters of H."""
    from nnunet_acnorm.checkpoints.families.stunet import stunet_architecture, stunet_size
    from nnunet_acnorm.networks import STUNET_SIZES, STUNet

    dims, blocks = cf.STUNET_RELEASED[size]
    assert STUNET_SIZES[size] == (dims, (blocks,) * 6)
    with torch.device("meta"):
        net = STUNet(1, 105, features_per_stage=dims, blocks_per_stage=[blocks] * 6)
    released = cf.stunet_shapes(dims, blocks)
    own = net.state_dict()
    assert list(own) == list(released)
    assert {k: tuple(v.shape) for k, v in own.items()} == dict(released)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == STUNET_PARAMETERS_M[size]
    assert stunet_size(stunet_architecture(own)) == size


def test_stunet_s_full_width_file_loads_into_the_network(tmp_path):
    """A full-width STU-Net-S ``small_ep4k.model`` (130 keys, 14.6 M parameters) with its ``.model.pkl``:
    detected, size S, every tensor but the 105-class heads in our network's names; the released
    state dict loads strictly into ``STUNet``."""
    from nnunet_acnorm.networks import STUNet

    path = cf.save_stunet_checkpoint(tmp_path / "small_ep4k.model", dims=cf.STUNET_RELEASED["S"][0], blocks=1)
    weights = load_pretrained(path)
    assert weights.family.name == "stunet" and weights.info["size"] == "S"
    assert weights.info["trainer_name"] == "STUNetTrainer_small" and weights.info["pretrained_outputs"] == 105
    assert weights.info["pretrain"] == {"spacing": [1.5, 1.5, 1.5], "patch_size": [128, 128, 128],
                                        "normalization": ["ZScoreNormalization"], "num_classes": 104,
                                        "modalities": {0: "nonCT"}}
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert len(raw) == 130 and len(weights.state_dict) == 120  # the 5 seg_outputs heads dropped
    net = STUNet(1, 105, features_per_stage=cf.STUNET_RELEASED["S"][0], blocks_per_stage=[1] * 6)
    net.load_state_dict(raw, strict=True)
    missing, unexpected = STUNet(1, 4, features_per_stage=cf.STUNET_RELEASED["S"][0],
                                 blocks_per_stage=[1] * 6).load_state_dict(weights.state_dict, strict=False)
    assert not unexpected and sorted(missing) == sorted(k for k in raw if k.startswith("seg_outputs."))
    key = "conv_blocks_localization.4.0.conv3.weight"
    assert net.state_dict()[key].shape == (16, 32, 1, 1, 1) and torch.equal(weights.state_dict[key], raw[key])


def test_stunet_model_pkl_with_code_is_refused_without_running_it(tmp_path):
    """The ``.model.pkl`` is read by a data-only unpickler: a pickle that would run code is named and
    refused; the code did not run (and does run when the file is unpickled the usual way)."""
    import pickle

    path = cf.save_stunet_checkpoint(tmp_path / "base_ep4k.model", trainer="STUNetTrainer_base")
    marker = tmp_path / "pickled_code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    info = cf.stunet_model_pkl("STUNetTrainer_base")
    info["plans"]["plans_per_stage"][0]["patch_size"] = Payload()
    with open(path + ".pkl", "wb") as f:
        pickle.dump(info, f)
    with pytest.raises(PretrainedLoadError, match=r"base_ep4k.model.pkl: the pickle names posix\.mkdir, which is not "
                                                  r"plain data .* it was not loaded\. The \.model alone is enough"):
        load_pretrained(path)
    assert not marker.exists()
    with open(path + ".pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()  # the payload was live


def test_stunet_without_pkl_and_depth_two(tmp_path):
    path = cf.save_stunet_checkpoint(tmp_path / "custom.model", dims=(4, 8, 8, 8, 8, 8), blocks=2, with_pkl=False)
    weights = load_pretrained(path)
    assert weights.info["companion"] is None and weights.info["size"] is None
    assert weights.info["stunet"]["blocks_per_stage"] == [2] * 6
    assert weights.stem_weight_keys == ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")


# -- nnU-Net v2 results folders (TotalSegmentator) ------------------------------------------------
def test_results_folder_model_fold_or_checkpoint(tmp_path):
    """TotalSegmentator's model folder, its fold folder and the checkpoint inside: the same weights,
    the architecture of the folder's (nnU-Net 2.1-format) plans.json, its dataset.json."""
    folder = cf.save_totalsegmentator_model(tmp_path)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    results = [load_pretrained(p) for p in (folder, folder / "fold_0", checkpoint)]
    for weights in results:
        assert weights.family.name == "nnunet_v2" and weights.path == str(checkpoint)
        assert weights.info["results_folder"] == str(folder) and weights.info["configuration"] == "3d_fullres"
        assert weights.info["trainer_name"] == "nnUNetTrainerNoMirroring"
        assert list(weights.info["dataset_json"]["labels"])[1:3] == ["spleen", "kidney_right"]
        arch = weights.info["architecture"]
        assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16] and arch["arch_kwargs"]["n_conv_per_stage"] == [2] * 3
    net = cf.build_from_architecture(results[0].info["architecture"], 1, 8)
    _, unexpected = net.load_state_dict(results[0].state_dict, strict=False)
    assert not unexpected


def test_results_folder_with_several_or_no_folds(tmp_path):
    folder = cf.save_totalsegmentator_model(tmp_path)
    (folder / "fold_1").mkdir()
    (folder / "fold_1" / "checkpoint_final.pth").write_bytes((folder / "fold_0" / "checkpoint_final.pth").read_bytes())
    with pytest.raises(PretrainedLoadError, match=r"holds 2 trained folds \(fold_0, fold_1\); give the checkpoint of "
                                                  r"one, e\.g\. -i .*fold_0/checkpoint_final\.pth"):
        load_pretrained(folder)
    for fold in ("fold_0", "fold_1"):
        (folder / fold / "checkpoint_final.pth").unlink()
    with pytest.raises(PretrainedLoadError, match="results folder without a trained fold"):
        load_pretrained(folder)


def test_2d_nnunet_v2_checkpoint_is_2d(tmp_path):
    path = cf.save_nnunet_v2_checkpoint(tmp_path / "checkpoint_final.pth", architecture=cf.plain_unet_architecture_2d(),
                                        configuration="2d")
    weights = load_pretrained(path)
    assert weights.spatial_dims == 2 and weights.info["architecture"]["arch_kwargs"]["conv_op"].endswith("Conv2d")


# -- where AC-Norm cannot apply --------------------------------------------------------------------
def test_layernorm_only_file_says_acnorm_cannot_apply(tmp_path):
    path = cf.save_sam_med3d_like_checkpoint(tmp_path / "sam_med3d_turbo.pth")
    with pytest.raises(PretrainedLoadError) as e:
        load_pretrained(path)
    message = str(e.value)
    assert "no known pretrained family recognises this file" in message and "\n" not in message
    assert "a transformer (attention weights such as 'image_encoder.blocks.0.attn.rel_pos_d') whose 7 norm layer(s) " \
           "are of LayerNorm type, with no BatchNorm" in message
    assert "AC-Norm cannot apply to it: AC-Norm needs affine BatchNorm/InstanceNorm/GroupNorm" in message
    assert "nnUNetTrainerFinetune (vanilla" in message


def test_nnssl_primus_says_acnorm_cannot_apply(tmp_path):
    path = tmp_path / "primus.pth"
    plan = {"architecture_plans": {"arch_class_name": "PrimusM", "arch_kwargs": None},
            "pretrain_num_input_channels": 1}
    torch.save({"network_weights": {"eva.blocks.0.norm1.weight": torch.ones(4)}, "nnssl_adaptation_plan": plan}, path)
    with pytest.raises(PretrainedLoadError, match="'PrimusM' is a transformer whose norms are all LayerNorm, so AC-Norm "
                                                  "cannot apply to it.*PretrainedTrainer_Primus"):
        load_pretrained(path)


def test_conversion_report_says_when_acnorm_cannot_apply():
    from dynamic_network_architectures.architectures.primus import Primus

    from nnunet_acnorm.norms import convert_to_acnorm

    report = convert_to_acnorm(Primus(1, 48, (8, 8, 8), 3, eva_depth=1, eva_numheads=2, input_shape=(16, 16, 16)))
    assert not report.applicable and report.feature_norms == 6
    assert str(report).splitlines()[-1].startswith("AC-Norm cannot apply: the model has 6 LayerNorm/RMSNorm layer(s)")
    assert "nnUNetTrainerFinetune" in str(report)
    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU())
    assert "AC-Norm cannot apply: the model has no affine" in str(convert_to_acnorm(plain))
    encoder_only = torch.nn.Sequential(torch.nn.InstanceNorm3d(2, affine=True), torch.nn.InstanceNorm3d(2, affine=True))
    report = convert_to_acnorm(encoder_only, include=lambda name: name == "0")
    assert report.converted == ["0"] and "outside the part" in report.left["1"] and report.applicable


# -- kernel bridging -----------------------------------------------------------------------------
def test_bridge_kernel_keeps_the_function_where_it_can():
    from nnunet_acnorm.checkpoints.adapt import bridge_kernel, fit_tensor

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, 3, 3, 3, generator=g)
    thick = torch.randn(1, 3, 1, 8, 8, generator=g).expand(1, 3, 5, 8, 8)  # constant along the first axis
    reduced = bridge_kernel(weight, (1, 3, 3))
    full = torch.nn.functional.conv3d(thick, weight, padding=(1, 1, 1))[:, :, 2]
    assert torch.allclose(torch.nn.functional.conv3d(thick, reduced, padding=(0, 1, 1))[:, :, 2], full, atol=1e-5)
    grown = bridge_kernel(weight, (5, 3, 3))
    x = torch.randn(1, 3, 6, 6, 6, generator=g)
    assert torch.allclose(torch.nn.functional.conv3d(x, grown, padding=(2, 1, 1)),
                          torch.nn.functional.conv3d(x, weight, padding=1), atol=1e-5)
    assert bridge_kernel(torch.randn(2, 3, 5, 5, 5, generator=g), (3, 3, 3)).shape == (2, 3, 3, 3, 3)
    assert fit_tensor(weight, (2, 3, 2, 3, 3), False, 3) is None  # even: no centre to align
    assert fit_tensor(torch.zeros(4, 2, 2, 2, 2), (4, 2, 4, 4, 4), False, 2) is None  # a transposed conv's stride
    assert fit_tensor(weight, (4, 3, 3, 3, 3), False, 3) is None  # another width
    stem, done = fit_tensor(weight, (2, 1, 1, 3, 3), True, 1)
    assert stem.shape == (2, 1, 1, 3, 3) and done == "3 -> 1 input channels, kernel [3, 3, 3] -> [1, 3, 3]"


def test_stunet_acnorm_model_folds_for_stock_nnunet(tmp_path):
    """An AC-Norm STU-Net model folder (as nnUNetv2_train writes it after an STU-Net import) folds into
    plans that stock nnU-Net rebuilds: the fold writes norm_op into STUNet's kwargs, which it takes."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_acnorm.nnunet.fold import fold_model_folder
    from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json, default_plans
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    plans = default_plans((32, 32, 32), (4, 8, 16), 3, configuration="3d_fullres")
    plans["configurations"]["3d_fullres"]["architecture"] = {
        "network_class_name": "nnunet_acnorm.networks.stunet.STUNet", "_kw_requires_import": [], "arch_kwargs": {
            "features_per_stage": [4, 8, 8, 8, 8, 8], "blocks_per_stage": [1] * 6, "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]}}
    folder = tmp_path / "Dataset999_Bench" / "nnUNetTrainerACNorm__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(default_dataset_json(3)))
    pm = PlansManager(plans)
    net = nnUNetTrainerACNorm.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, False)
    set_strict_source(net, False)
    net.load_state_dict(cf.randomise_norms(STUNet(1, 3, **plans["configurations"]["3d_fullres"]["architecture"][
        "arch_kwargs"])).state_dict())
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerACNorm",
                "init_args": {"configuration": "3d_fullres"}, "current_epoch": 1}, folder / "fold_0" / "checkpoint_final.pth")
    report = fold_model_folder(folder, tmp_path / "folded", log=lambda line: None)
    folded = json.loads((tmp_path / "folded" / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert folded["architecture"]["arch_kwargs"]["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm3d"
    assert report.max_probability_difference < 1e-4
