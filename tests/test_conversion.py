"""convert_to_acnorm / fold_acnorm on real architectures (nnU-Net's and torchvision's)."""
import pytest
import torch
import torchvision
from torch import nn

from nnunet_acnorm import acnorm_modules, convert_to_acnorm, fold_acnorm
from nnunet_acnorm.norms.modules import _ACNorm
from tests.factories.networks import plain_conv_unet, residual_encoder_unet


ARCHITECTURES = {
    "PlainConvUNet": (plain_conv_unet, (2, 1, 16, 16, 16)),
    "PlainConvUNet-BN": (lambda: plain_conv_unet(nn.BatchNorm3d), (2, 1, 16, 16, 16)),
    "ResidualEncoderUNet": (residual_encoder_unet, (2, 1, 16, 16, 16)),
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(num_classes=5), (2, 3, 32, 32)),
}


def _randomise_norms(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(generator=gen)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.normal_(0, 0.1, generator=gen)
                    m.running_var.uniform_(0.5, 1.5, generator=gen)


def _norms_run_by_forward(model, x):
    ran = []
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.append(mod)) for m in model.modules()
             if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, _ACNorm))]
    model(x)
    for h in hooks:
        h.remove()
    return ran


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_convert_then_fold(name):
    build, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build()
    _randomise_norms(model)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(shape)

    n_norms_run = len(_norms_run_by_forward(model.eval(), x))
    report = convert_to_acnorm(model)
    ran = _norms_run_by_forward(model, x)
    assert len(ran) == n_norms_run > 0
    assert all(isinstance(m, _ACNorm) for m in ran), "forward() still runs a plain norm"
    assert len(report.converted) == len(acnorm_modules(model)) == len({id(m) for m in ran})
    assert not report.left
    # every source equals the affine the model held before
    for name_, module in acnorm_modules(model).items():
        assert torch.equal(module.source_weight, original_state[name_ + ".weight"])

    # train a little so the targets move away from the source, then fold. The step is clipped: with the
    # randomised affines an unclipped SGD step on out**2 diverges on resnet18 (with and without AC-Norm),
    # and a NaN comparison says nothing about folding.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        out = model(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        out.square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    model.eval()
    assert any(not torch.equal(m.weight, m.source_weight) for m in acnorm_modules(model).values()), \
        "training did not move any target affine away from its source"
    with torch.no_grad():
        expected = model(x)
        folded_names = fold_acnorm(model)
        folded_out = model(x)
    assert len(folded_names) == len(report.converted)
    assert not acnorm_modules(model)
    for a, b in zip(expected if isinstance(expected, (list, tuple)) else [expected],
                    folded_out if isinstance(folded_out, (list, tuple)) else [folded_out]):
        assert torch.isfinite(a).all(), "the trained AC-Norm model's output is not finite"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # the folded state dict loads strictly into the original, unmodified architecture
    pristine = build()
    pristine.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        again = pristine.eval()(x)
    for a, b in zip(again if isinstance(again, (list, tuple)) else [again],
                    folded_out if isinstance(folded_out, (list, tuple)) else [folded_out]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_aliases_share_one_acnorm_module():
    model = plain_conv_unet()
    convert_to_acnorm(model)
    block = model.encoder.stages[0][0].convs[0]
    assert block.norm is block.all_modules[1]
    assert model.decoder.encoder.stages[0][0].convs[0].norm is block.norm


def test_report_names_what_was_left_and_why():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.InstanceNorm2d(4),  # InstanceNorm2d: affine=False
        nn.GroupNorm(2, 4), nn.LayerNorm([4, 6, 6]), torchvision.ops.FrozenBatchNorm2d(4),
        nn.SyncBatchNorm(4),
    )
    report = convert_to_acnorm(model)
    assert report.converted == ["1", "3"]
    assert "affine=False" in report.left["2"]
    assert "LayerNorm" in report.left["4"]
    assert "unknown norm type" in report.left["5"] and "FrozenBatchNorm2d" in report.left["5"]
    assert "SyncBatchNorm" in report.left["6"]
    assert "2 norm layer(s) converted" in str(report)
    again = convert_to_acnorm(model)
    assert again.left["1"] == "already AC-Norm"


def test_converting_a_bare_norm_points_to_from_norm():
    with pytest.raises(TypeError, match="from_norm"):
        convert_to_acnorm(nn.BatchNorm2d(3))


def test_convert_with_unset_source_keeps_plain_state_dict_keys():
    model = plain_conv_unet()
    keys = set(model.state_dict())
    convert_to_acnorm(model, set_source=False)
    assert set(model.state_dict()) == keys


def test_nnunet_stock_pretrained_loader_sets_source(tmp_path):
    """nnU-Net's -pretrained_weights loader demands every network key in the file: an AC-Norm
    network with unset source accepts a plain checkpoint and takes its affines as the source."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    torch.manual_seed(0)
    pretrained = plain_conv_unet()
    _randomise_norms(pretrained)
    torch.save({"network_weights": pretrained.state_dict()}, tmp_path / "checkpoint_final.pth")
    network = plain_conv_unet()
    convert_to_acnorm(network, set_source=False)
    load_pretrained_weights(network, str(tmp_path / "checkpoint_final.pth"))
    for name, module in acnorm_modules(network).items():
        assert module.source_is_set
        assert torch.equal(module.source_weight, pretrained.state_dict()[name + ".weight"])
        assert torch.equal(module.weight, pretrained.state_dict()[name + ".weight"])
    assert any(".source_weight" in k for k in network.state_dict())


def test_sync_batchnorm_conversion_does_not_drop_acnorm():
    model = plain_conv_unet(nn.BatchNorm3d)
    convert_to_acnorm(model)
    n = len(acnorm_modules(model))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert len(acnorm_modules(model)) == n
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
