"""Family detection, key mapping and safe loading on checkpoints in the published formats."""

import pytest
import torch
import torchvision

from nnunet_acnorm.networks import GenesisUNet3D, MedicalNetResNet3D
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
