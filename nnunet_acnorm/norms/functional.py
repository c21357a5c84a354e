"""AC-Norm as functions of affine parameters (``docs/method.md``, section 1).

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


#: indicators whose largest deviation from their median is below this (relative to 1 + |median|)
#: are taken as constant: untrained affines (gamma = 1, beta = 0 give y = 0 in every channel)
NEAR_CONSTANT_TOL = 1e-4


def indicators_near_constant(y: Tensor, tol: float = NEAR_CONSTANT_TOL) -> bool:
    """Whether the indicators y are (nearly) equal in every channel: no correlation to express."""
    y = y.double()
    median = y.median()
    return bool((y - median).abs().max() <= tol * (1.0 + median.abs()))


#: the mean diagonal of A at the source point that a calibrated temperature gives (see calibrated_tau)
DEFAULT_DIAGONAL = 0.5


@torch.no_grad()
def source_diagonal(source_weight: Tensor, source_bias: Tensor, tau: float) -> float:
    """Mean over channels of A[i, i] when the target equals the source (the step-0 diagonal)."""
    ys = domain_indicator(source_weight.double(), source_bias.double())
    return float(torch.softmax(-(ys[:, None] - ys[None, :]).abs() / tau, dim=1).diagonal().mean())


@torch.no_grad()
def calibrated_tau(source_weight: Tensor, source_bias: Tensor, diagonal: float = DEFAULT_DIAGONAL,
                   rel_tol: float = 1e-6) -> float | None:
    """The temperature at which the mean step-0 diagonal of A equals ``diagonal``.

    A layer's softmax row i spreads its mass over the source channels whose indicators lie within
    about tau of yt[i]; its own diagonal A[i, i] falls monotonically from (nearly) 1 at tau -> 0 to
    1/C at tau -> inf. A fixed tau therefore means different things on layers whose indicators
    spread over 0.01 or over 10. Calibrating tau so that the mean diagonal at the pretrained point
    is ``diagonal`` (default 0.5: the row's own channel holds half the mass, the other half sits on
    the channels nearest in y) gives every layer of every network the same sharpness.

    Solved by bisection in log tau, in float64, from the source affines alone (computed once when
    the source is set). Returns None when no temperature reaches ``diagonal``: a layer whose
    indicators are (nearly) all equal (untrained affines, C = 1) keeps a diagonal near 1/C for
    every tau, or near 1 only through ties; the caller decides what to do then.
    """
    if not 0.0 < diagonal < 1.0:
        raise ValueError(f"the calibration diagonal must be in (0, 1), got {diagonal}")
    ys = domain_indicator(source_weight.double(), source_bias.double())
    c = ys.numel()
    if c < 2 or diagonal <= 1.0 / c or indicators_near_constant(ys):
        return None
    spread = float((ys - ys.median()).abs().max())
    lo, hi = spread * 1e-9, spread * 1e6   # diagonal(lo) ~ 1 (up to ties), diagonal(hi) ~ 1/C
    if source_diagonal(source_weight, source_bias, lo) < diagonal or \
            source_diagonal(source_weight, source_bias, hi) > diagonal:
        return None
    while hi / lo > 1.0 + rel_tol:
        mid = (lo * hi) ** 0.5
        if source_diagonal(source_weight, source_bias, mid) > diagonal:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


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
