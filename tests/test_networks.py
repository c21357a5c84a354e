"""Our networks for the pretrained families: upstream key names/shapes, forward shapes, options."""
import pytest
import torch
from torch import nn

from nnunet_acnorm.networks import (GenesisClassifier3D, GenesisEncoder3D, GenesisUNet3D, MedicalNetResNet3D,
                                    MedicalNetUNet3D)
from nnunet_acnorm.networks.genesis_unet3d import GENESIS_STRIDES

GENESIS_SHAPES = {  # from the published description of the upstream UNet3D
    "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3), "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
    "down_tr128.ops.0.conv1.weight": (64, 64, 3, 3, 3), "down_tr128.ops.1.conv1.weight": (128, 64, 3, 3, 3),
    "down_tr256.ops.1.conv1.weight": (256, 128, 3, 3, 3), "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
    "down_tr512.ops.1.bn1.weight": (512,), "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
    "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3), "up_tr128.up_conv.weight": (256, 256, 2, 2, 2),
    "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3), "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
    "up_tr64.ops.1.conv1.weight": (64, 64, 3, 3, 3), "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
}


def _upstream_like_state_dict():
    """106 keys with upstream names and full-width shapes, built independently of our class."""
    state = {}
    def unit(prefix, cin, cout):
        state[prefix + "conv1.weight"] = torch.randn(cout, cin, 3, 3, 3) * 0.01
        state[prefix + "conv1.bias"] = torch.randn(cout)
        for name, value in (("weight", torch.rand(cout) + 0.5), ("bias", torch.randn(cout)),
                            ("running_mean", torch.randn(cout)), ("running_var", torch.rand(cout) + 0.5)):
            state[prefix + "bn1." + name] = value
        state[prefix + "bn1.num_batches_tracked"] = torch.tensor(7)
    for name, (a, b, c) in {"down_tr64": (1, 32, 64), "down_tr128": (64, 64, 128), "down_tr256": (128, 128, 256),
                            "down_tr512": (256, 256, 512)}.items():
        unit(f"{name}.ops.0.", a, b)
        unit(f"{name}.ops.1.", b, c)
    for name, (cin, skip, cout) in {"up_tr256": (512, 256, 256), "up_tr128": (256, 128, 128),
                                    "up_tr64": (128, 64, 64)}.items():
        state[f"{name}.up_conv.weight"] = torch.randn(cin, cin, 2, 2, 2) * 0.01
        state[f"{name}.up_conv.bias"] = torch.randn(cin)
        unit(f"{name}.ops.0.", cin + skip, cout)
        unit(f"{name}.ops.1.", cout, cout)
    state["out_tr.final_conv.weight"] = torch.randn(1, 64, 1, 1, 1)
    state["out_tr.final_conv.bias"] = torch.randn(1)
    return state


def test_genesis_unet3d_loads_upstream_state_dict_strictly():
    upstream = _upstream_like_state_dict()
    assert len(upstream) == 106
    net = GenesisUNet3D(1, 1, deep_supervision_heads=False)
    net.load_state_dict(upstream, strict=True)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(19.07e6, rel=1e-3)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == 14
    for key, shape in GENESIS_SHAPES.items():
        assert tuple(net.state_dict()[key].shape) == shape, key
    assert torch.equal(net.down_tr512.ops[1].bn1.weight, upstream["down_tr512.ops.1.bn1.weight"])


def test_genesis_with_heads_differs_only_by_seg_layers():
    net = GenesisUNet3D(1, 3, deep_supervision=True)
    extra = set(net.state_dict()) - set(GenesisUNet3D(1, 3, deep_supervision_heads=False).state_dict())
    assert extra and all(".seg_layers." in "." + k for k in extra)


def test_genesis_forward_deep_supervision_and_window():
    net = GenesisUNet3D(2, 3, deep_supervision=True, base_features=2, input_window=(-1000, 1000),
                        strides=[list(s) for s in GENESIS_STRIDES]).eval()
    x = torch.randn(1, 2, 16, 8, 24) * 800
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 16, 8, 24), (1, 3, 8, 4, 12), (1, 3, 4, 2, 6)]
    net.decoder.deep_supervision = False  # what nnU-Net's trainer toggles
    assert tuple(net(x).shape) == (1, 3, 16, 8, 24)
    # the window maps HU to [0, 1]: -1000 and below -> 0, +1000 and above -> 1
    assert torch.equal(net.apply_window(torch.tensor([-3000., -1000., 0., 1000., 2500.])),
                       torch.tensor([0., 0., 0.5, 1., 1.]))


def test_genesis_rejects_bad_sizes_and_strides():
    net = GenesisUNet3D(1, 2, base_features=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.randn(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="fixed strides"):
        GenesisUNet3D(1, 2, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]])


def test_genesis_encoder_and_classifier_share_upstream_names():
    encoder = GenesisEncoder3D(1)
    assert encoder.out_channels == 512
    upstream = _upstream_like_state_dict()
    encoder_keys = {k: v for k, v in upstream.items() if k.startswith("down_tr")}
    encoder.load_state_dict(encoder_keys, strict=True)
    clf = GenesisClassifier3D(1, num_classes=4, base_features=2)
    assert tuple(clf(torch.randn(2, 1, 8, 8, 8)).shape) == (2, 4)
    assert [m.out_features for m in clf.classifier if isinstance(m, nn.Linear)] == [1024, 4]


@pytest.mark.parametrize("depth,keys,params_m,out_channels", [
    (10, 72, 14.36, 512), (18, 102, 32.99, 512), (34, 198, 63.30, 512), (50, 318, 46.16, 2048)])
def test_medicalnet_depths(depth, keys, params_m, out_channels):
    net = MedicalNetResNet3D(depth)
    assert len(net.state_dict()) == keys
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)
    assert net.out_channels == out_channels
    has_b = "layer2.0.downsample.0.weight" in net.state_dict()
    assert has_b == (depth not in (18, 34))  # shortcut A (no parameters) for 18/34
    assert net.layer3[0].conv1.dilation == (2, 2, 2) or net.layer3[0].conv2.dilation == (2, 2, 2)
    assert net.layer4[0].conv2.dilation == (4, 4, 4)


def test_medicalnet_forward_shapes():
    net = MedicalNetResNet3D(18, base_features=4)
    assert tuple(net(torch.randn(1, 1, 32, 16, 16)).shape) == (1, 32, 4, 2, 2)
    seg = MedicalNetUNet3D(2, 3, deep_supervision=True, depth=50, base_features=4)
    outs = seg(torch.randn(2, 2, 16, 16, 8))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 8), (2, 3, 8, 8, 4), (2, 3, 4, 4, 2)]
    with pytest.raises(ValueError, match="depth"):
        MedicalNetResNet3D(26)


@pytest.mark.parametrize("path", ["nnunet_acnorm.networks.genesis_unet3d.GenesisUNet3D",
                                  "nnunet_acnorm.networks.medicalnet_resnet.MedicalNetUNet3D"])
def test_plans_dotted_paths_resolve(path):
    """nnU-Net builds plans' networks with pydoc.locate (a package attribute shadowing a submodule breaks it)."""
    import pydoc
    assert pydoc.locate(path) is not None and pydoc.locate(path).__name__ == path.rsplit(".", 1)[1]
