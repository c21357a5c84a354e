"""BSS, batch spectral shrinkage (Chen, Wang, Fu, Long, Wang, NeurIPS 2019, "Catastrophic
forgetting meets negative transfer"): penalise the smallest singular values of the batch's feature
matrix, whose directions carry the pretrained knowledge that does not transfer.

    Omega(F) = eta * sum_{i=1..k} sigma_{-i}(F)^2

``F`` (B x C) holds one feature vector per sample; ``sigma_{-i}`` are its k smallest singular
values. Defaults k = 1, eta = 1e-3 (the paper's). Features: the input of the classifier for
classification; for a U-Net the bottleneck (the last encoder stage) averaged over its positions,
one row per sample (docs/baselines.md). With batch size B there are min(B, C) singular values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nnunet_acnorm.finetuning.features import pooled

BSS_K = 1
BSS_ETA = 1e-3


def bss_penalty(features: Tensor, k: int = BSS_K, eta: float = BSS_ETA) -> Tensor:
    """eta * (sum of the k smallest squared singular values) of ``pooled(features)`` (at least
    float32: half-precision features of an autocast step are cast up)."""
    matrix = pooled(features)
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.float()
    with torch.autocast(matrix.device.type, enabled=False):
        sigma = torch.linalg.svdvals(matrix)  # descending
    k = min(int(k), sigma.numel())
    return eta * sigma[sigma.numel() - k:].pow(2).sum()
