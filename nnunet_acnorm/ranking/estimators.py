"""Transferability estimators on one candidate network: AC-Corr after a few fine-tuning steps
(``docs/method.md`` section 2) and LogME on the features of a norm layer.

Both work on any network (nnU-Net's, ours, plain torch) given batches and a training-step
function, so that the ranking command and the direction experiment share them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_acnorm.norms.ac_corr import ACCorr, LayerSelection, select_layers
from nnunet_acnorm.norms import acnorm_modules
from nnunet_acnorm.norms.functional import domain_indicator
from nnunet_acnorm.nnunet.training_step import deterministic_float32
from nnunet_acnorm.ranking.logme import logme


@dataclass
class ACCorrMeasurement:
    """AC-Corr after ``steps`` fine-tuning steps, and at step 0 (before any update: then S only
    reflects how the source's own domain indicators are spread)."""

    score: float
    per_layer: dict[str, float]
    score_at_start: float
    per_layer_at_start: dict[str, float]
    steps: int
    losses: list[float] = field(default_factory=list)
    #: S of each chosen layer after the steps (C x C, numpy)
    sparse_correlations: dict[str, np.ndarray] = field(default_factory=dict)
    #: chosen layers whose source domain indicators are (nearly) all equal (e.g. untrained affines 1, 0;
    #: norms.functional.indicators_near_constant): every entry of a row ties with the diagonal, so S is
    #: full and the sum is C by construction
    degenerate_layers: list[str] = field(default_factory=list)
    #: per chosen layer, its channels in the order of their source domain indicators (for plots of S)
    source_orders: dict[str, np.ndarray] = field(default_factory=dict)


def ac_corr_after_steps(model: nn.Module, train_step: Callable[[dict], float], batches: Sequence[dict],
                        steps: int = 1, layers: LayerSelection = "deepest",
                        tau: float | None = 1.0) -> ACCorrMeasurement:
    """Fine-tune ``model`` (an AC-Norm network whose source affines are the pretrained ones) for
    ``steps`` calls of ``train_step`` on ``batches`` (cycled, in order), then compute AC-Corr over
    the chosen layers at temperature ``tau`` (None: each layer's own, e.g. its calibrated one).
    The model is changed in place."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not batches:
        raise ValueError("no batches to fine-tune on")
    modules = acnorm_modules(model)
    if not modules:
        raise ValueError("the model has no AC-Norm layer: convert it with convert_to_acnorm first")
    for module in modules.values():
        if not module.source_is_set:
            module.set_source()  # the affines it holds now (the pretrained ones) are the source
    chosen = select_layers(list(modules), layers)
    start = ac_corr_in_float64(modules, chosen, tau)
    degenerate = [name for name in chosen if _near_constant_source(modules[name])]
    model.train()
    losses = [train_step(batches[i % len(batches)]) for i in range(steps)]
    after = ac_corr_in_float64(modules, chosen, tau)
    with torch.no_grad():
        matrices = {name: _sparse_correlation(modules[name], tau) for name in chosen}
        orders = {name: np.argsort(domain_indicator(*(t.double() for t in modules[name]._source())).cpu().numpy(),
                                   kind="stable") for name in chosen}
    return ACCorrMeasurement(after.score, after.per_layer, start.score, start.per_layer, steps, losses, matrices,
                             degenerate, orders)


@torch.no_grad()
def _near_constant_source(module) -> bool:
    from nnunet_acnorm.norms.functional import domain_indicator, indicators_near_constant

    return indicators_near_constant(domain_indicator(*(t.double() for t in module._source())))


@torch.no_grad()
def ac_corr_in_float64(modules: dict, chosen: Sequence[str], tau: float | None = 1.0) -> ACCorr:
    """AC-Corr of AC-Norm ``modules`` (name -> module) over ``chosen``, computed in float64 so
    that the small change after one step is not lost in float32 rounding; ``tau`` None: each
    layer's own temperature."""
    per_layer = {n: float(_sparse_correlation(modules[n], tau).sum()) for n in chosen}
    return ACCorr(score=sum(per_layer.values()) / len(per_layer), per_layer=per_layer)


@torch.no_grad()
def _sparse_correlation(module, tau: float | None) -> np.ndarray:
    """S of one AC-Norm layer in float64 at ``tau`` (None: the layer's own temperature)."""
    from nnunet_acnorm.norms.functional import sparse_correlation

    source_weight, source_bias = (t.double() for t in module._source())
    return sparse_correlation(source_weight, source_bias, module.weight.double(), module.bias.double(),
                              module.tau if tau is None else tau).cpu().numpy()


def _segmentation(batch: dict) -> torch.Tensor:
    target = batch["target"]
    return target[0] if isinstance(target, (list, tuple)) else target


@torch.no_grad()
def norm_features_at_labels(model: nn.Module, layer: str, batches: Sequence[dict], per_class: int = 256,
                            seed: int = 0, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Features of norm layer ``layer`` of the pretrained model, sampled at labelled voxels.

    The model runs in eval mode; an AC-Norm layer's output is recomputed with its *source*
    affines (the plain pretrained layer's output). Each feature-map position is matched to the
    voxel at its centre (nearest, by the ratio of the shapes); up to ``per_class`` positions per
    class are drawn (seeded) over all batches. Returns (features n x C, labels n).
    """
    module = dict(model.named_modules())[layer]
    captured: list[torch.Tensor] = []

    def hook(mod, inputs, output):
        if hasattr(mod, "_normalize") and hasattr(mod, "_source"):
            output = mod._normalize(inputs[0], *mod._source())
        captured.append(output.detach().float().cpu())

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for batch in batches:
            captured.clear()
            with deterministic_float32():  # the same float32 settings as the ranking's steps (no TF32)
                model(batch["data"].to(device))
            fmap = captured[0]  # (B, C, *spatial)
            seg = _segmentation(batch)[:, 0].long().cpu()  # (B, *spatial)
            index = [torch.clamp(((torch.arange(f) + 0.5) * s / f).long(), max=s - 1)
                     for f, s in zip(fmap.shape[2:], seg.shape[1:])]
            seg_at = seg[(slice(None), *np.ix_(*[i.numpy() for i in index]))]
            feats.append(fmap.movedim(1, -1).reshape(-1, fmap.shape[1]))
            labels.append(seg_at.reshape(-1))
    finally:
        handle.remove()
        model.train(was_training)
    features, label = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    keep = label >= 0  # nnU-Net's ignore/outside-image marks are negative
    features, label = features[keep], label[keep]
    rng = np.random.RandomState(seed)
    chosen = []
    for cls in np.unique(label):
        where = np.flatnonzero(label == cls)
        chosen.append(rng.choice(where, size=min(per_class, len(where)), replace=False))
    order = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=int)
    return features[order].astype(np.float64), label[order]


def logme_of_layer(model: nn.Module, layer: str, batches: Sequence[dict], per_class: int = 256, seed: int = 0,
                   device: torch.device | str = "cpu") -> float:
    """LogME of the labels given the features of ``layer`` (sampled at labelled voxels)."""
    features, labels = norm_features_at_labels(model, layer, batches, per_class, seed, device)
    return logme(features, labels)
