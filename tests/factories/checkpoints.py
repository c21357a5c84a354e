"""Small checkpoints in the exact published formats (top-level keys, prefixes, key names; reduced
widths where the architecture allows it), for tests. No weights can be downloaded here.

Every factory randomises the norm affines (weights around 1, biases around 0, all distinct), so a
test can tell the file's affines from a fresh initialisation.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_acnorm.networks.genesis_unet3d import GenesisUNet3D
from nnunet_acnorm.networks.medicalnet_resnet import MedicalNetResNet3D

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d, nn.GroupNorm)


@torch.no_grad()
def randomise_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct, non-default affines and running statistics in every norm layer."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None:
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(1000)
    return module


def _sgd_state(state_dict: dict) -> dict:
    n = sum(1 for v in state_dict.values() if v.is_floating_point())
    return {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0,
                                           "nesterov": False, "params": list(range(n))}]}


def _save(obj, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path)
    return path


# -- Models Genesis family ----------------------------------------------------------------------
def genesis_state_dict(base_features: int = 32, pretext_classes: int = 1, seed: int = 0) -> "OrderedDict":
    """The upstream UNet3D state dict (106 keys), upstream names, no prefix."""
    torch.manual_seed(seed)
    net = GenesisUNet3D(1, pretext_classes, base_features=base_features, deep_supervision_heads=False)
    return randomise_norms(net, seed).state_dict()


def save_genesis_checkpoint(path, variant: str = "models_genesis", base_features: int = 4,
                            module_prefix: bool = True, seed: int = 0) -> str:
    """``Genesis_Chest_CT.pt`` (models_genesis), ``semantic_genesis_chest_ct.pt`` (semantic_genesis)
    or ``TransVW_chest_ct.pt`` (transvw) layout."""
    state = genesis_state_dict(base_features, seed=seed)
    if variant in ("semantic_genesis", "transvw"):
        c = 16 * base_features
        g = torch.Generator().manual_seed(seed + 1)
        state.update({  # classification head of the Semantic Genesis / TransVW pretext tasks
            "clc_out.conv1.weight": torch.randn(c, c, 1, 1, 1, generator=g), "clc_out.conv1.bias": torch.zeros(c),
            "clc_out.bn1.weight": torch.ones(c), "clc_out.bn1.bias": torch.zeros(c),
            "clc_out.bn1.running_mean": torch.zeros(c), "clc_out.bn1.running_var": torch.ones(c),
            "clc_out.bn1.num_batches_tracked": torch.tensor(5),
            "clc_out.fc1.weight": torch.randn(44, c, generator=g), "clc_out.fc1.bias": torch.zeros(44),
        })
    elif variant != "models_genesis":
        raise ValueError(variant)
    if module_prefix:
        state = OrderedDict(("module." + k, v) for k, v in state.items())
    checkpoint = {"epoch": 42, "state_dict": state, "optimizer_state_dict": _sgd_state(state)}
    if variant != "models_genesis":
        checkpoint.update(num_epoch_no_improvement=3, best_loss=0.123, best_acc=0.9)
    return _save(checkpoint, path)


def save_suprem_checkpoint(path, base_features: int = 4, seed: int = 0) -> str:
    """SuPreM U-Net layout: ``net`` with ``module.backbone.`` keys (plus non-backbone heads)."""
    state = genesis_state_dict(base_features, pretext_classes=32, seed=seed)
    net = OrderedDict(("module.backbone." + k, v) for k, v in state.items())
    net["module.precls_conv.0.weight"] = torch.randn(8, 2 * base_features, 1, 1, 1)
    net["module.controller.weight"] = torch.randn(153, 256, 1, 1, 1)
    return _save({"net": net, "optimizer": _sgd_state(net), "scheduler": {"last_epoch": 10}, "epoch": 10}, path)


# -- nnU-Net v2 / nnssl --------------------------------------------------------------------------
def plain_unet_architecture(features=(4, 8, 16), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                            norm: str = "torch.nn.modules.instancenorm.InstanceNorm3d") -> dict:
    n = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": n, "features_per_stage": list(features),
                        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [list(s) for s in strides], "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True, "norm_op": norm,
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def build_from_architecture(architecture: dict, input_channels: int, num_classes: int) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], input_channels, num_classes,
                                  allow_init=True, deep_supervision=True)


def _source_plans(architecture: dict, input_channels: int, configuration: str = "3d_fullres") -> dict:
    dims = len(architecture["arch_kwargs"]["kernel_sizes"][0])
    config = {"data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [16] * dims, "median_image_size_in_voxels": [20] * dims,
              "spacing": [1.5, 1.0, 1.0][-dims:], "normalization_schemes": ["CTNormalization"] * input_channels,
              "use_mask_for_norm": [False] * input_channels, "architecture": architecture}
    return {"dataset_name": "Dataset900_Source", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.5, 1.0, 1.0], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {configuration: config}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}


def save_nnunet_v2_checkpoint(path, architecture: dict | None = None, input_channels: int = 1,
                              num_classes: int = 3, seed: int = 0, untrained_norms: bool = False,
                              plans: dict | None = None, dataset_json: dict | None = None,
                              configuration: str = "3d_fullres", trainer_name: str = "nnUNetTrainer") -> str:
    """``checkpoint_final.pth`` as ``nnUNetTrainer.save_checkpoint`` writes it (numpy scalars in the
    logging, plans inside ``init_args``). ``untrained_norms``: norm affines left at PyTorch's
    initial 1 / 0 (a network that was never trained). ``plans``: the plans to store (any nnU-Net v2
    format; the network is built from them), else plans made around ``architecture``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if plans is None:
        plans = _source_plans(architecture or plain_unet_architecture(), input_channels, configuration)
    with warnings.catch_warnings():  # nnU-Net's note on the old plans format of TotalSegmentator's plans
        warnings.simplefilter("ignore")
        architecture = PlansManager(json.loads(json.dumps(plans))).get_configuration(configuration).configuration[
            "architecture"]
    dataset_json = dataset_json or {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                                    "numTraining": 10, "file_ending": ".nii.gz"}
    torch.manual_seed(seed)
    net = build_from_architecture(architecture, input_channels, num_classes)
    if not untrained_norms:
        net = randomise_norms(net, seed)
    logging = {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
               "dice_per_class_or_region": [[np.float64(0.5)] * (num_classes - 1)],
               "train_losses": [np.float32(-0.3)], "val_losses": [np.float32(-0.2)], "lrs": [0.01],
               "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]}
    checkpoint = {
        "network_weights": net.state_dict(), "optimizer_state": _sgd_state(net.state_dict()),
        "grad_scaler_state": None, "logging": logging, "_best_ema": np.float64(0.5), "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    return _save(checkpoint, path)


def plain_unet_architecture_2d(features=(4, 8, 16)) -> dict:
    """A 2D PlainConvUNet (``-c 2d``): Conv2d, InstanceNorm2d."""
    arch = plain_unet_architecture(features, strides=[[1, 1]] + [[2, 2]] * (len(features) - 1),
                                   norm="torch.nn.modules.instancenorm.InstanceNorm2d")
    arch["arch_kwargs"].update(conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * len(features))
    return arch


#: a few of the 24 labels of TotalSegmentator's Dataset291 (part 1, organs)
TOTALSEG_PART1_LABELS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas")


def totalsegmentator_plans(features=(4, 8, 16), dataset: str = "Dataset291_TotalSegmentator_part1_organs_1559subj"
                           ) -> dict:
    """TotalSegmentator v2's plans.json, in the format of nnU-Net 2.1/2.2 that trained them (no
    ``architecture`` entry: ``UNet_class_name``, ``conv_kernel_sizes``, ``pool_op_kernel_sizes`` ...),
    at a reduced width."""
    n = len(features)
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [16, 16, 16], "median_image_size_in_voxels": [300, 300, 300],
              "spacing": [1.5, 1.5, 1.5], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": features[0],
              "n_conv_per_stage_encoder": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
              "num_pool_per_axis": [n - 1] * 3, "pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
              "conv_kernel_sizes": [[3, 3, 3]] * n, "unet_max_num_features": features[-1],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "batch_dice": True}
    return {"dataset_name": dataset, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.5] * 3,
            "original_median_shape_after_transp": [300, 300, 300], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 100.0, "std": 200.0, "percentile_00_5": -1000.0,
                                                                  "percentile_99_5": 1500.0}}}


def save_totalsegmentator_model(root, features=(4, 8, 16), labels=TOTALSEG_PART1_LABELS, seed: int = 0,
                                dataset: str = "Dataset291_TotalSegmentator_part1_organs_1559subj") -> Path:
    """A TotalSegmentator v2 results folder: ``<dataset>/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres``
    with ``plans.json``, ``dataset.json`` and ``fold_0/checkpoint_final.pth``. Returns the model folder."""
    folder = Path(root) / dataset / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    plans = totalsegmentator_plans(features, dataset)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(labels)}},
                    "numTraining": 1559, "file_ending": ".nii.gz"}
    save_nnunet_v2_checkpoint(folder / "fold_0" / "checkpoint_final.pth", num_classes=len(labels) + 1, seed=seed,
                              plans=plans, dataset_json=dataset_json, trainer_name="nnUNetTrainerNoMirroring")
    (folder / "plans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    return folder


def resenc_arch_kwargs(features=(4, 8, 16), blocks=(1, 2, 2)) -> dict:
    n = len(features)
    return {"n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_blocks_per_stage": list(blocks), "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def save_nnssl_checkpoint(path, encoder_only: bool = False, arch_kwargs: dict | None = None,
                          seed: int = 0) -> str:
    """An nnssl checkpoint: ``network_weights`` + serialised ``nnssl_adaptation_plan``. MAE-type
    files hold the whole ResEnc U-Net; contrastive ones (``encoder_only``) only ``encoder.*``."""
    arch_kwargs = arch_kwargs or resenc_arch_kwargs()
    architecture = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                    "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    torch.manual_seed(seed)
    net = randomise_norms(build_from_architecture(architecture, 1, 1), seed)
    weights = net.state_dict()
    if encoder_only:
        weights = OrderedDict((k, v) for k, v in weights.items() if k.startswith("encoder."))
    plan = {
        "architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch_kwargs,
                               "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                          "original_median_spacing_after_transp": [1, 1, 1],
                          "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
                          "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
                          "configurations": {"onemmiso": {
                              "data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
                              "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
                              "use_mask_for_norm": False, "spacing": [1, 1, 1], "patch_size": [160, 160, 160]}}},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": [160, 160, 160],
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
    }
    return _save({"network_weights": weights, "nnssl_adaptation_plan": plan, "current_epoch": 1000,
                  "trainer_name": "BaseMAETrainer" if not encoder_only else "SimCLRTrainer"}, path)


# -- nnU-Net v1 Generic_UNet -------------------------------------------------------------------
def nnunet_v1_state_dict(features=(4, 8, 16), strides=((2, 2, 2), (2, 2, 2)), convs_per_stage: int = 2,
                         num_classes: int = 3, input_channels: int = 1, seed: int = 0) -> "OrderedDict":
    """Generic_UNet's keys and shapes (v1 names), written from its structure: stacked conv layers
    ``blocks.j.{conv,instnorm}``, the bottleneck as two stacks, localization stacks fed by the
    concatenation, bias-free ``tu`` and ``seg_outputs`` (deep supervision)."""
    g = torch.Generator().manual_seed(seed)
    state: OrderedDict = OrderedDict()

    def block(prefix: str, cin: int, cout: int) -> None:
        state[prefix + "conv.weight"] = 0.1 * torch.randn(cout, cin, 3, 3, 3, generator=g)
        state[prefix + "conv.bias"] = 0.01 * torch.randn(cout, generator=g)
        state[prefix + "instnorm.weight"] = 1 + 0.3 * torch.randn(cout, generator=g)
        state[prefix + "instnorm.bias"] = 0.2 * torch.randn(cout, generator=g)

    n = len(features)
    cin = input_channels
    for d in range(n - 1):
        for j in range(convs_per_stage):
            block(f"conv_blocks_context.{d}.blocks.{j}.", cin if j == 0 else features[d], features[d])
        cin = features[d]
    for j in range(convs_per_stage - 1):  # bottleneck: Sequential(stack of n-1, stack of 1)
        block(f"conv_blocks_context.{n - 1}.0.blocks.{j}.", cin if j == 0 else features[-1], features[-1])
    block(f"conv_blocks_context.{n - 1}.1.blocks.0.", features[-1], features[-1])
    for u in range(n - 1):
        deep, skip = features[n - 1 - u], features[n - 2 - u]
        stride = strides[n - 2 - u]
        state[f"tu.{u}.weight"] = 0.1 * torch.randn(deep, skip, *stride, generator=g)
        for j in range(convs_per_stage - 1):
            block(f"conv_blocks_localization.{u}.0.blocks.{j}.", 2 * skip if j == 0 else skip, skip)
        block(f"conv_blocks_localization.{u}.1.blocks.0.", skip, skip)
        state[f"seg_outputs.{u}.weight"] = 0.1 * torch.randn(num_classes, skip, 1, 1, 1, generator=g)
    return state


def save_nnunet_v1_checkpoint(path, **kwargs) -> str:
    """nnU-Net v1 ``.model`` layout (as Models Genesis' nnU-Net v1 checkpoint): ``epoch``,
    ``state_dict``, ``optimizer_state_dict``, no prefix."""
    state = nnunet_v1_state_dict(**kwargs)
    return _save({"epoch": 1000, "state_dict": state, "optimizer_state_dict": _sgd_state(state),
                  "plot_stuff": ([0.5], [0.4], [0.3], [0.6]), "amp_grad_scaler": None}, path)


# -- MedicalNet ----------------------------------------------------------------------------------
def medicalnet_state_dict(depth: int = 10, base_features: int = 64, seed: int = 0) -> "OrderedDict":
    torch.manual_seed(seed)
    return randomise_norms(MedicalNetResNet3D(depth, 1, base_features=base_features), seed).state_dict()


def save_medicalnet_checkpoint(path, depth: int = 10, base_features: int = 64, seed: int = 0) -> str:
    """``resnet_<depth>.pth``: ``{"state_dict": {"module.<key>": ...}}``, encoder only."""
    state = medicalnet_state_dict(depth, base_features, seed)
    return _save({"state_dict": OrderedDict(("module." + k, v) for k, v in state.items())}, path)


# -- 2D: torchvision ResNet, MoCo v2 --------------------------------------------------------------
def torchvision_resnet_state_dict(arch: str = "resnet50", seed: int = 0) -> "OrderedDict":
    import torchvision
    torch.manual_seed(seed)
    return randomise_norms(getattr(torchvision.models, arch)(weights=None), seed).state_dict()


def save_torchvision_resnet_checkpoint(path, arch: str = "resnet50", seed: int = 0) -> str:
    """``resnet50-0676ba61.pth``: a bare state dict in torchvision names (with ``fc``)."""
    return _save(torchvision_resnet_state_dict(arch, seed), path)


def save_moco_v2_checkpoint(path, arch: str = "resnet50", queue_size: int = 65536, dim: int = 128,
                            seed: int = 0) -> str:
    """``moco_v2_800ep_pretrain.pth.tar``: ``epoch``, ``arch``, ``state_dict``, ``optimizer``;
    ``module.encoder_q.*`` (torchvision names, MLP projection head ``fc.0``/``fc.2``),
    ``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr``."""
    backbone = torchvision_resnet_state_dict(arch, seed)
    width = backbone["fc.weight"].shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    encoder = OrderedDict((k, v) for k, v in backbone.items() if not k.startswith("fc."))
    encoder["fc.0.weight"] = 0.01 * torch.randn(width, width, generator=g)
    encoder["fc.0.bias"] = torch.zeros(width)
    encoder["fc.2.weight"] = 0.01 * torch.randn(dim, width, generator=g)
    encoder["fc.2.bias"] = torch.zeros(dim)
    state = OrderedDict()
    for which in ("encoder_q", "encoder_k"):
        state.update((f"module.{which}.{k}", v.clone()) for k, v in encoder.items())
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(dim, queue_size, generator=g), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return _save({"epoch": 800, "arch": arch, "state_dict": state, "optimizer": _sgd_state(state)}, path)


# -- STU-Net (nnU-Net v1 format) -------------------------------------------------------------------
#: the released sizes: features per stage, residual blocks per stage (STU-Net README / trainers)
STUNET_RELEASED = {"S": ((16, 32, 64, 128, 256, 256), 1), "B": ((32, 64, 128, 256, 512, 512), 1),
                   "L": ((64, 128, 256, 512, 1024, 1024), 2), "H": ((96, 192, 384, 768, 1536, 1536), 3)}


def stunet_shapes(dims, blocks: int, input_channels: int = 1, num_classes: int = 105) -> "OrderedDict":
    """Key -> shape of a released STU-Net state dict, written from its structure (not from our
    network): six encoder stages of residual blocks (conv1, norm1, conv2, norm2; conv3, the 1x1x1
    shortcut, in each stage's first block), five nearest-upsampling 1x1x1 convs, five decoder stages
    fed by the concatenation, five 1x1x1 heads; 3x3x3 kernels, affine InstanceNorm3d, biases."""
    shapes: OrderedDict = OrderedDict()

    def block(prefix: str, cin: int, cout: int, first: bool) -> None:
        shapes[prefix + "conv1.weight"], shapes[prefix + "conv1.bias"] = (cout, cin, 3, 3, 3), (cout,)
        shapes[prefix + "norm1.weight"], shapes[prefix + "norm1.bias"] = (cout,), (cout,)
        shapes[prefix + "conv2.weight"], shapes[prefix + "conv2.bias"] = (cout, cout, 3, 3, 3), (cout,)
        shapes[prefix + "norm2.weight"], shapes[prefix + "norm2.bias"] = (cout,), (cout,)
        if first:
            shapes[prefix + "conv3.weight"], shapes[prefix + "conv3.bias"] = (cout, cin, 1, 1, 1), (cout,)

    for s, width in enumerate(dims):
        for b in range(blocks):
            block(f"conv_blocks_context.{s}.{b}.", (input_channels if s == 0 else dims[s - 1]) if b == 0 else width,
                  width, b == 0)
    for u in range(len(dims) - 1):
        shapes[f"upsample_layers.{u}.conv.weight"] = (dims[-2 - u], dims[-1 - u], 1, 1, 1)
        shapes[f"upsample_layers.{u}.conv.bias"] = (dims[-2 - u],)
    for u in range(len(dims) - 1):
        for b in range(blocks):
            block(f"conv_blocks_localization.{u}.{b}.", 2 * dims[-2 - u] if b == 0 else dims[-2 - u], dims[-2 - u],
                  b == 0)
    for u in range(len(dims) - 1):
        shapes[f"seg_outputs.{u}.weight"] = (num_classes, dims[-2 - u], 1, 1, 1)
        shapes[f"seg_outputs.{u}.bias"] = (num_classes,)
    return shapes


def stunet_state_dict(dims=(4, 8, 16, 32, 32, 32), blocks: int = 1, input_channels: int = 1, num_classes: int = 105,
                      seed: int = 0) -> "OrderedDict":
    """Random tensors with the shapes of :func:`stunet_shapes`; norm weights around 1, biases around 0."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in stunet_shapes(dims, blocks, input_channels, num_classes).items():
        if ".norm" in key:
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.2 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def stunet_model_pkl(trainer: str = "STUNetTrainer_small", num_classes: int = 104) -> "OrderedDict":
    """The ``.model.pkl`` nnU-Net v1's trainer writes beside a checkpoint (init, name, class, plans), as
    in the STU-Net release (TotalSegmentator: 1.5 mm, 128^3 patches, 'nonCT' normalisation)."""
    stage = {"batch_size": 2, "num_pool_per_axis": [4, 4, 5], "patch_size": np.array([128, 128, 128]),
             "median_patient_size_in_voxels": np.array([228, 228, 240]), "current_spacing": np.array([1.5, 1.5, 1.5]),
             "original_spacing": np.array([1.5, 1.5, 1.5]), "do_dummy_2D_data_aug": np.False_,
             "pool_op_kernel_sizes": [[2, 2, 2]] * 4 + [[1, 1, 2]], "conv_kernel_sizes": [[3, 3, 3]] * 6}
    plans = {"num_stages": 1, "num_modalities": 1, "modalities": {0: "nonCT"},
             "normalization_schemes": OrderedDict([(0, "nonCT")]), "num_classes": num_classes,
             "all_classes": list(range(1, num_classes + 1)), "base_num_features": 32,
             "use_mask_for_norm": OrderedDict([(0, False)]), "keep_only_largest_region": None,
             "min_region_size_per_class": None, "min_size_per_class": None,
             "transpose_forward": [np.int64(0), 1, 2], "transpose_backward": [np.int64(0), np.int64(1), np.int64(2)],
             "data_identifier": "nnUNetData_plans_v2.1", "plans_per_stage": {0: stage},
             "preprocessor_name": "GenericPreprocessor", "conv_per_stage": 2,
             "dataset_properties": {"intensityproperties": None}}
    return OrderedDict([("init", ("", 0, "", "", False, 0, True, False, True)), ("name", trainer),
                        ("class", f"<class 'nnunet.training.network_training.STUNetTrainer.{trainer}'>"),
                        ("plans", plans)])


def save_stunet_checkpoint(path, dims=(4, 8, 16, 32, 32, 32), blocks: int = 1, input_channels: int = 1,
                           num_classes: int = 105, trainer: str = "STUNetTrainer_small", with_pkl: bool = True,
                           seed: int = 0) -> str:
    """``<name>.model`` (nnU-Net v1's ``save_checkpoint``: epoch, state_dict, optimizer_state_dict,
    lr_scheduler_state_dict, plot_stuff, best_stuff) and, with ``with_pkl``, ``<name>.model.pkl``."""
    state = stunet_state_dict(dims, blocks, input_channels, num_classes, seed)
    path = _save({"epoch": 4000, "state_dict": state, "optimizer_state_dict": _sgd_state(state),
                  "lr_scheduler_state_dict": None, "plot_stuff": ([0.5], [0.4], [0.3], [0.6]),
                  "best_stuff": (3999, 0.1, 0.9)}, path)
    if with_pkl:
        with open(path + ".pkl", "wb") as f:
            pickle.dump(stunet_model_pkl(trainer, num_classes - 1), f)
    return path


# -- a LayerNorm-only network (SAM-Med3D-like ViT) -------------------------------------------------
def save_sam_med3d_like_checkpoint(path, embed: int = 8, depth: int = 2, seed: int = 0) -> str:
    """SAM-Med3D's layout at a tiny width: ``model_state_dict`` with ``image_encoder`` (patch embedding,
    position embedding, ViT blocks with LayerNorm ``norm1``/``norm2``, attention ``qkv``/``proj`` and
    relative positions, MLP; a conv neck with 3D LayerNorms), ``prompt_encoder`` and ``mask_decoder``
    (transformer with LayerNorms). No BatchNorm/InstanceNorm/GroupNorm anywhere. (The published files
    also pickle the training ``args``, which ``weights_only`` refuses first.)"""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.02 * torch.randn(shape, generator=g)  # noqa: E731
    s: OrderedDict = OrderedDict()
    s["image_encoder.pos_embed"] = r(1, 2, 2, 2, embed)
    s["image_encoder.patch_embed.proj.weight"], s["image_encoder.patch_embed.proj.bias"] = r(embed, 1, 16, 16, 16), r(embed)
    for i in range(depth):
        p = f"image_encoder.blocks.{i}."
        s[p + "norm1.weight"], s[p + "norm1.bias"] = 1 + r(embed), r(embed)
        s[p + "attn.rel_pos_d"], s[p + "attn.rel_pos_h"], s[p + "attn.rel_pos_w"] = r(3, 4), r(3, 4), r(3, 4)
        s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = r(3 * embed, embed), r(3 * embed)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = r(embed, embed), r(embed)
        s[p + "norm2.weight"], s[p + "norm2.bias"] = 1 + r(embed), r(embed)
        s[p + "mlp.lin1.weight"], s[p + "mlp.lin1.bias"] = r(4 * embed, embed), r(4 * embed)
        s[p + "mlp.lin2.weight"], s[p + "mlp.lin2.bias"] = r(embed, 4 * embed), r(embed)
    s["image_encoder.neck.0.weight"] = r(embed, embed, 1, 1, 1)
    s["image_encoder.neck.1.weight"], s["image_encoder.neck.1.bias"] = 1 + r(embed), r(embed)
    s["image_encoder.neck.2.weight"] = r(embed, embed, 3, 3, 3)
    s["image_encoder.neck.3.weight"], s["image_encoder.neck.3.bias"] = 1 + r(embed), r(embed)
    s["prompt_encoder.point_embeddings.0.weight"] = r(1, embed)
    s["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"] = r(embed, embed)
    s["mask_decoder.transformer.layers.0.norm1.weight"] = 1 + r(embed)
    s["mask_decoder.transformer.layers.0.norm1.bias"] = r(embed)
    return _save({"model_state_dict": s, "epoch": 200}, path)
