"""nnU-Net v1 ``Generic_UNet`` checkpoints (e.g. Models Genesis' nnU-Net v1 model), mapped onto
dynamic-network-architectures' ``PlainConvUNet`` (nnU-Net v2 names).

v1 -> v2 key map (``d`` encoder stage, ``u`` decoder stage, deepest first in both):

- ``conv_blocks_context.d.blocks.j.{conv,instnorm}`` -> ``encoder.stages.d.0.convs.j.{conv,norm}``
- bottleneck ``conv_blocks_context.N.0.blocks.j`` -> ``encoder.stages.N.0.convs.j`` and
  ``conv_blocks_context.N.1.blocks.0`` -> ``encoder.stages.N.0.convs.<len of .0>``
- ``conv_blocks_localization.u.0.blocks.j`` / ``.u.1.blocks.0`` -> ``decoder.stages.u.convs.*``
- ``tu.u.weight`` -> ``decoder.transpconvs.u.weight`` (v1 has no transposed-conv bias: fresh zeros)
- ``seg_outputs.*``: dropped (the head starts fresh)

The architecture (features, kernel sizes, strides, convs per stage, norm type) is read from the
tensor shapes: the transposed convolutions' kernels are the pooling strides.
"""
from __future__ import annotations

import re

from nnunet_acnorm.checkpoints.recognise import has_tensor, state_under
from nnunet_acnorm.checkpoints.family import (Intensity, PretrainedFamily, PretrainedLoadError, StateDict,
                                             plan_file_architecture)

_ENC = re.compile(r"^conv_blocks_context\.(\d+)\.blocks\.(\d+)\.(conv|instnorm)\.(.+)$")
_BOTTLENECK = re.compile(r"^conv_blocks_context\.(\d+)\.([01])\.blocks\.(\d+)\.(conv|instnorm)\.(.+)$")
_LOC = re.compile(r"^conv_blocks_localization\.(\d+)\.([01])\.blocks\.(\d+)\.(conv|instnorm)\.(.+)$")
_TU = re.compile(r"^tu\.(\d+)\.(weight|bias)$")


def _recognise(checkpoint) -> bool:
    state = state_under(checkpoint, "state_dict")
    return any(has_tensor(state, p + "conv_blocks_context.0.blocks.0.conv.weight") for p in ("", "module."))


def _layer(kind: str) -> str:
    return "conv" if kind == "conv" else "norm"


def _filter(state: StateDict, info: dict) -> StateDict:
    first_len: dict[tuple[str, int], int] = {}
    for key in state:
        for pattern, tag in ((_BOTTLENECK, "enc"), (_LOC, "dec")):
            m = pattern.match(key)
            if m and m.group(2) == "0":
                stage = (tag, int(m.group(1)))
                first_len[stage] = max(first_len.get(stage, 0), int(m.group(3)) + 1)
    out: StateDict = {}
    for key, value in state.items():
        if m := _ENC.match(key):
            out[f"encoder.stages.{m[1]}.0.convs.{m[2]}.{_layer(m[3])}.{m[4]}"] = value
        elif m := _BOTTLENECK.match(key):
            j = int(m[3]) + (first_len[("enc", int(m[1]))] if m[2] == "1" else 0)
            out[f"encoder.stages.{m[1]}.0.convs.{j}.{_layer(m[4])}.{m[5]}"] = value
        elif m := _LOC.match(key):
            j = int(m[3]) + (first_len[("dec", int(m[1]))] if m[2] == "1" else 0)
            out[f"decoder.stages.{m[1]}.convs.{j}.{_layer(m[4])}.{m[5]}"] = value
        elif m := _TU.match(key):
            out[f"decoder.transpconvs.{m[1]}.{m[2]}"] = value
        # seg_outputs and anything else: dropped
    return out


def _read_info(checkpoint, state) -> dict:
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    mapped = _filter(state, {})
    stages = sorted({int(k.split(".")[2]) for k in mapped if k.startswith("encoder.stages.")})
    if not stages or stages != list(range(len(stages))):
        raise PretrainedLoadError("nnU-Net v1 checkpoint: encoder stages missing or not contiguous")
    features, kernels, n_convs = [], [], []
    for s in stages:
        convs = sorted({int(k.split(".")[5]) for k in mapped
                        if k.startswith(f"encoder.stages.{s}.0.convs.") and k.endswith(".conv.weight")})
        first = mapped[f"encoder.stages.{s}.0.convs.0.conv.weight"]
        features.append(int(mapped[f"encoder.stages.{s}.0.convs.{convs[-1]}.conv.weight"].shape[0]))
        kernels.append([int(k) for k in first.shape[2:]])
        n_convs.append(len(convs))
    n_up = len(stages) - 1
    strides = [[1] * len(kernels[0])]
    for u in range(n_up - 1, -1, -1):  # tu.0 is the deepest upsampling
        tu = mapped.get(f"decoder.transpconvs.{u}.weight")
        if tu is None:
            raise PretrainedLoadError(f"nnU-Net v1 checkpoint: tu.{u}.weight missing")
        strides.append([int(k) for k in tu.shape[2:]])
    dec_convs = []
    for u in range(n_up):
        convs = {int(k.split(".")[4]) for k in mapped
                 if k.startswith(f"decoder.stages.{u}.convs.") and k.endswith(".conv.weight")}
        dec_convs.append(len(convs))
    batch_norm = any(k.endswith("norm.running_mean") for k in mapped)
    dim = len(kernels[0])
    norm = f"torch.nn.modules.{'batchnorm.BatchNorm' if batch_norm else 'instancenorm.InstanceNorm'}{dim}d"
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": len(stages), "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": kernels, "strides": strides,
            "n_conv_per_stage": n_convs, "n_conv_per_stage_decoder": dec_convs,
            "conv_bias": any(k.endswith(".conv.bias") for k in mapped),
            "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    stem = mapped["encoder.stages.0.0.convs.0.conv.weight"]
    return {"architecture": arch, "input_channels": int(stem.shape[1]), "spatial_dims": dim}


NNUNET_V1 = PretrainedFamily(
    name="nnunet_v1",
    description="nnU-Net v1 Generic_UNet (e.g. Models Genesis' nnU-Net v1 model), mapped to PlainConvUNet",
    members=("model_final_checkpoint.model", "Genesis_Chest_CT_nnUNet.model"),
    recognise=_recognise,
    network="dynamic_network_architectures.architectures.unet.PlainConvUNet",
    spatial_dims=3,
    input_channels=None,
    intensity=Intensity("dataset_plans"),
    norm_type="InstanceNorm3d",
    loaded_parts="encoder + decoder (transposed-conv biases fresh)",
    licence="that of the model's provider (Models Genesis: code MIT, weights on request)",
    state_dict_keys=("state_dict",),
    strip_prefixes=("module.",),
    filter_state_dict=_filter,
    read_info=_read_info,
    stem_weight_key="encoder.stages.0.0.convs.0.conv.weight",
    encoder_prefixes=("encoder.",),
    plan_architecture=plan_file_architecture,
)
