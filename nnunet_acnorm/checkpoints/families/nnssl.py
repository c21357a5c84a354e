"""nnssl / OpenMind self-supervised checkpoints (ResEnc-L and other dynamic-network-architectures
U-Nets, InstanceNorm): ``network_weights`` plus the ``nnssl_adaptation_plan`` that says which
architecture it is, where encoder and stem sit in the state dict, and the pretraining
patch size / spacing / normalisation."""
from __future__ import annotations

from copy import deepcopy

from nnunet_acnorm.checkpoints.recognise import state_under
from nnunet_acnorm.checkpoints.family import (Intensity, PretrainedFamily, PretrainedLoadError, StateDict,
                                             plan_file_architecture)
from nnunet_acnorm.checkpoints.keys import drop_aliases
from nnunet_acnorm.norms.conversion import ACNORM_NEEDS

DNA = "dynamic_network_architectures.architectures.unet."
_IMPORT_KW = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def _resenc_l_kwargs() -> dict:
    """The ResEnc-L preset of nnssl / OpenMind (6 stages, 1x1x1 mm, InstanceNorm)."""
    return {
        "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
        "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


PRESETS = {"ResEncL": ("ResidualEncoderUNet", _resenc_l_kwargs)}
_CLASSES = {"ResidualEncoderUNet", "PlainConvUNet"}


def _recognise(checkpoint) -> bool:
    return state_under(checkpoint, "network_weights") is not None and isinstance(
        checkpoint.get("nnssl_adaptation_plan"), dict)


def architecture_from_plan(plan: dict) -> dict:
    """nnU-Net plans' ``architecture`` entry for the network an adaptation plan describes."""
    arch = plan.get("architecture_plans") or {}
    name = arch.get("arch_class_name")
    kwargs = arch.get("arch_kwargs")
    if name in PRESETS and not kwargs:
        name, make = PRESETS[name]
        kwargs = make()
    if isinstance(name, str) and name.lower().startswith("primus"):
        raise PretrainedLoadError(
            f"nnssl checkpoint: architecture {name!r} is a transformer whose norms are all LayerNorm, so AC-Norm cannot "
            f"apply to it: {ACNORM_NEEDS}; fine-tune it without AC-Norm (nnU-Net's PretrainedTrainer_Primus, on "
            "nnU-Net master, loads nnssl Primus checkpoints)")
    if name not in _CLASSES or not isinstance(kwargs, dict):
        raise PretrainedLoadError(
            f"nnssl checkpoint: architecture {name!r} is not supported here (supported: "
            f"{sorted(_CLASSES | set(PRESETS))})")
    kwargs = deepcopy(kwargs)
    for key in ("nonlin", "norm_op", "conv_op", "dropout_op"):  # class objects serialised by name
        if key in kwargs and kwargs[key] is not None and not isinstance(kwargs[key], str):
            value = kwargs[key]
            kwargs[key] = f"{value.__module__}.{value.__name__}"
    return {"network_class_name": DNA + name, "arch_kwargs": kwargs,
            "_kw_requires_import": [k for k in _IMPORT_KW if k in kwargs]}


def _read_info(checkpoint, state) -> dict:
    plan = checkpoint["nnssl_adaptation_plan"]
    info = {"adaptation_plan": plan, "architecture": architecture_from_plan(plan),
            "key_to_encoder": plan.get("key_to_encoder", "encoder.stages"),
            "key_to_stem": plan.get("key_to_stem", "encoder.stem")}
    info["input_channels"] = int(plan.get("pretrain_num_input_channels", 1))
    pretrain = plan.get("pretrain_plan") or {}
    configuration = pretrain.get("configurations") or {}
    if isinstance(configuration, dict) and "spacing" not in configuration and len(configuration) == 1:
        configuration = next(iter(configuration.values()))
    if isinstance(configuration, dict):
        info["spacing"] = configuration.get("spacing")
        info["normalization_schemes"] = configuration.get("normalization_schemes")
    info["patch_size"] = plan.get("recommended_downstream_patchsize")
    return info


def _filter(state: StateDict, info: dict) -> StateDict:
    encoder, stem = info["key_to_encoder"], info["key_to_stem"]
    # encoder-only files may hold the encoder's own state dict (stem.*, stages.*)
    if not any(k.startswith(("encoder.", "decoder.")) for k in state):
        state = {"encoder." + k: v for k, v in state.items()}
    state = {k: v for k, v in drop_aliases(state).items() if not k.startswith("decoder.seg_layers.")}
    stems = sorted(k for k in state if k.startswith(stem + ".") and k.endswith("conv.weight"))
    if stems:
        info["stem_key"] = stems[0]
    info["has_decoder"] = any(k.startswith("decoder.") for k in state)
    if not any(k.startswith(encoder) for k in state):
        raise PretrainedLoadError(f"nnssl checkpoint: no weights under its encoder key {encoder!r}")
    return state


def _plan(weights, config: dict, channel_names: dict, notes: list) -> None:
    info, n_channels = weights.info, len(channel_names)
    plan_file_architecture(weights, config, channel_names, notes)
    config["normalization_schemes"] = list(info.get("normalization_schemes") or ["ZScoreNormalization"])
    config["normalization_schemes"] = (config["normalization_schemes"] * n_channels)[:n_channels]
    if info.get("spacing"):
        spacing = [float(s) for s in info["spacing"]]
        if [float(s) for s in config["spacing"]] != spacing:
            notes.append(f"spacing: {config['spacing']} -> {spacing} (the pretraining spacing)")
        config["spacing"] = spacing
    if info.get("patch_size"):
        notes.append(f"patch size: nnssl recommends {list(info['patch_size'])} for fine-tuning; keeping "
                     "the dataset's (divisible by the network's strides); edit the plans to change it")


NNSSL = PretrainedFamily(
    name="nnssl",
    description="nnssl / OpenMind self-supervised ResEnc (MAE: encoder + decoder; contrastive: encoder)",
    members=("checkpoint_final.pth (nnssl)",),
    recognise=_recognise,
    network="(from the adaptation plan: dynamic-network-architectures ResidualEncoderUNet)",
    spatial_dims=3,
    input_channels=None,
    intensity=Intensity("zscore"),
    norm_type="InstanceNorm3d",
    loaded_parts="encoder (+ decoder for MAE-type files)",
    licence="code Apache-2.0; OpenMind weights: see the model card",
    state_dict_keys=("network_weights",),
    filter_state_dict=_filter,
    read_info=_read_info,
    encoder_prefixes=("encoder.",),
    plan_architecture=_plan,
)
