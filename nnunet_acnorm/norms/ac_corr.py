"""AC-Corr: transferability of a pretrained model from its AC-Norm correlation after a short
fine-tuning (``docs/method.md``, section 2).

For each chosen norm layer, S is computed from the source (pretrained) affines and the target
affines after fine-tuning, with tau = 1, and summed; AC-Corr is the mean of those sums. Layers
are chosen by name; the default is the deepest encoder norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from nnunet_acnorm.norms.conversion import acnorm_modules
from nnunet_acnorm.norms.functional import sparse_correlation

#: name parts that mark a layer as outside the encoder (decoders and heads of the supported families)
NON_ENCODER_PARTS = ("decoder", "up_tr", "out_tr", "seg_layers", "clc_out", "head", "classifier", "fc")

Affines = Mapping[str, tuple[Tensor, Tensor]]
LayerSelection = Union[str, Sequence[str]]


@dataclass
class ACCorr:
    """The score and the per-layer sums it averages."""

    score: float
    per_layer: dict[str, float]


def ac_corr_of_layer(source_weight: Tensor, source_bias: Tensor, target_weight: Tensor,
                     target_bias: Tensor, tau: float = 1.0) -> float:
    """Sum of all entries of S for one layer: in (0, C]."""
    return float(sparse_correlation(source_weight, source_bias, target_weight, target_bias, tau).sum())


def norm_affines(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The per-channel affines of a state dict, by layer name: every ``X.weight``/``X.bias`` pair of
    equal 1-D shape (norm layers; conv biases have no 1-D weight). A layer registered under several
    names (nnU-Net's ``all_modules`` and ``decoder.encoder`` aliases) is kept under its first."""
    layers: dict[str, tuple[Tensor, Tensor]] = {}
    seen: set[int] = set()
    for key, weight in state_dict.items():
        if not key.endswith(".weight") or weight.dim() != 1:
            continue
        name = key[: -len(".weight")]
        bias = state_dict.get(name + ".bias")
        if bias is None or bias.shape != weight.shape:
            continue
        if weight.data_ptr() in seen:
            continue
        seen.add(weight.data_ptr())
        layers[name] = (weight, bias)
    return layers


def deepest_encoder_layer(names: Iterable[str]) -> str:
    """The last norm layer (in registration order) that is not part of a decoder or a head."""
    encoder = [n for n in names
               if not any(part.startswith(NON_ENCODER_PARTS) for part in n.split("."))]
    if not encoder:
        raise ValueError("no encoder norm layer found; name the layers to use (--layers)")
    return encoder[-1]


def select_layers(names: Sequence[str], layers: LayerSelection = "deepest") -> list[str]:
    """``"deepest"`` (default), ``"all"``, or a list of layer names (each must exist)."""
    if layers == "deepest":
        return [deepest_encoder_layer(names)]
    if layers == "all":
        return list(names)
    if isinstance(layers, str):
        layers = [layers]
    unknown = [n for n in layers if n not in names]
    if unknown:
        close = [n for n in names if unknown[0].split(".")[0] in n][:5]
        raise KeyError(f"norm layer(s) not found: {', '.join(unknown)}. "
                       f"Available, for example: {', '.join(close or list(names)[:5])}")
    return list(layers)


def ac_corr_from_affines(source: Affines, target: Affines, layers: LayerSelection = "deepest",
                         tau: float = 1.0) -> ACCorr:
    """AC-Corr from source and target affines by layer name."""
    names = [n for n in source if n in target]
    per_layer = {}
    for name in select_layers(names, layers):
        (sw, sb), (tw, tb) = source[name], target[name]
        if sw.shape != tw.shape:
            raise ValueError(f"layer {name}: source has {sw.numel()} channels, target {tw.numel()}")
        per_layer[name] = ac_corr_of_layer(sw, sb, tw, tb, tau)
    return ACCorr(score=sum(per_layer.values()) / len(per_layer), per_layer=per_layer)


def ac_corr_from_state_dicts(pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                             layers: LayerSelection = "deepest", tau: float = 1.0) -> ACCorr:
    """AC-Corr from the pretrained state dict (source) and the state dict after fine-tuning
    (target), both with plain norm keys."""
    return ac_corr_from_affines(norm_affines(pretrained), norm_affines(finetuned), layers, tau)


def ac_corr_from_model(model: nn.Module, layers: LayerSelection = "deepest", tau: float = 1.0) -> ACCorr:
    """AC-Corr of an AC-Norm model after fine-tuning: its source buffers against its targets."""
    modules = acnorm_modules(model)
    if not modules:
        raise ValueError("the model has no AC-Norm layer: convert it with convert_to_acnorm first")
    with torch.no_grad():
        source = {n: m._source() for n, m in modules.items()}
        target = {n: (m.weight, m.bias) for n, m in modules.items()}
    return ac_corr_from_affines(source, target, layers, tau)
