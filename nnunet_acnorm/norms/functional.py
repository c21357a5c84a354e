"""AC-Norm as functions of affine parameters (``shared/design/method.md``, section 1).

Everything here acts on per-channel vectors of length C; the normalization itself is left to
the norm type's own functional call (``F.batch_norm``, ``F.instance_norm``, ``F.group_norm``).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: eps of the domain indicator y = beta / (|gamma| + eps); fixed by the method, not the norm's eps.
INDICATOR_EPS = 1e-5


def domain_indicator(weight: Tensor, bias: Tensor, eps: float = INDICATOR_EPS) -> Tensor:
    """y = beta / (|gamma| + eps), per channel."""
    return bias / (weight.abs() + eps)


@torch.no_grad()
def sparse_correlation(source_weight: Tensor, source_bias: Tensor, target_weight: Tensor,
                       target_bias: Tensor, tau: float = 1.0) -> Tensor:
    """The sparse channel correlation S (rows: target channels, columns: source channels).

    A[i, j] = softmax_j(-|yt[i] - ys[j]| / tau); S keeps A[i, j] where A[i, j] >= A[i, i] (ties
    kept, no renormalisation). S carries no gradient. Computed in at least float32 (half-precision
    affines are upcast), so that precision cannot change which entries survive.
    """
    dtype = torch.promote_types(target_weight.dtype, torch.float32)
    ys = domain_indicator(source_weight.to(dtype), source_bias.to(dtype))
    yt = domain_indicator(target_weight.to(dtype), target_bias.to(dtype))
    a = torch.softmax(-(yt[:, None] - ys[None, :]).abs() / tau, dim=1)
    keep = a >= a.diagonal()[:, None]
    return torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))


def recalibrated_affine(source_weight: Tensor, source_bias: Tensor, target_weight: Tensor,
                        target_bias: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """The one affine that AC-Norm applies to x-hat: ((I + S) gamma_t, (I + S) beta_t).

    Gradients flow to the target affines through both the identity and the S term; S itself is
    a constant. Two fused matrix-vector products (``addmv``), with autocast switched off for them
    so that the affine stays in the parameters' precision.
    """
    s = sparse_correlation(source_weight, source_bias, target_weight, target_bias, tau)
    s = s.to(target_weight.dtype)
    with torch.autocast(target_weight.device.type, enabled=False):
        weight = torch.addmv(target_weight, s, target_weight)
        bias = torch.addmv(target_bias, s, target_bias)
    return weight, bias
