"""LogME (You, Liu, Wang, Long: "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021), written from the paper's equations.

For features F (n x D) and one target vector y (n,), LogME models y = F w + noise with a Gaussian
prior w ~ N(0, alpha^-1 I) and noise precision beta, and maximises the log marginal likelihood
(evidence) over alpha and beta::

    L(alpha, beta) = n/2 log beta + D/2 log alpha - n/2 log 2pi
                     - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log|A|
    A = alpha I + beta F^T F,   m = beta A^-1 F^T y

with the fixed-point updates (sigma_i^2: eigenvalues of F^T F, from the SVD of F)::

    gamma = sum_i beta sigma_i^2 / (alpha + beta sigma_i^2)
    alpha = gamma / m^T m,      beta = (n - gamma) / ||F m - y||^2

The score is the maximised evidence divided by n, averaged over the targets: for K classes, the
K one-hot indicator vectors. Higher LogME = features that explain the labels better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class EvidenceFit:
    alpha: float
    beta: float
    evidence: float  # L(alpha, beta) / n at the fixed point
    iterations: int


def _spectral(features: np.ndarray):
    """SVD of F: U (n x r), sigma (r,), with r = min(n, D)."""
    u, sigma, _ = np.linalg.svd(features, full_matrices=False)
    return u, sigma


def evidence_from_spectrum(alpha: float, beta: float, sigma: np.ndarray, z: np.ndarray, y_norm2: float,
                           n: int, dim: int) -> tuple[float, float, float, float]:
    """(L/n, gamma, m^T m, ||F m - y||^2) at (alpha, beta), with z = U^T y."""
    s2 = sigma ** 2
    denom = alpha + beta * s2
    m_norm2 = float(np.sum((beta * sigma * z / denom) ** 2))
    residual2 = float(np.sum((alpha * z / denom) ** 2) + max(y_norm2 - float(np.sum(z ** 2)), 0.0))
    log_det_a = float(np.sum(np.log(denom)) + (dim - len(sigma)) * math.log(alpha))
    gamma = float(np.sum(beta * s2 / denom))
    evidence = (n / 2 * math.log(beta) + dim / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * residual2 - alpha / 2 * m_norm2 - log_det_a / 2)
    return evidence / n, gamma, m_norm2, residual2


def fit_evidence(features: np.ndarray, target: np.ndarray, max_iterations: int = 100,
                 tol: float = 1e-5, _svd=None) -> EvidenceFit:
    """Maximise the evidence of ``target`` (n,) given ``features`` (n x D) by the fixed-point
    updates; returns alpha, beta and the evidence per sample."""
    features = np.asarray(features, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    n, dim = features.shape
    u, sigma = _svd if _svd is not None else _spectral(features)
    z = u.T @ target
    y_norm2 = float(target @ target)
    alpha, beta = 1.0, 1.0
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        _, gamma, m_norm2, residual2 = evidence_from_spectrum(alpha, beta, sigma, z, y_norm2, n, dim)
        new_alpha = gamma / max(m_norm2, 1e-12)
        new_beta = max(n - gamma, 1e-12) / max(residual2, 1e-12)
        done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    evidence, *_ = evidence_from_spectrum(alpha, beta, sigma, z, y_norm2, n, dim)
    return EvidenceFit(alpha=alpha, beta=beta, evidence=evidence, iterations=iterations)


def checked_features_and_labels(features, labels) -> tuple[np.ndarray, np.ndarray]:
    """``features`` as float64 (n x D) and ``labels`` as (n,), or ValueError naming what is wrong
    (shared by the feature-based estimators: LogME, H-score)."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be (n, D) with n = len(labels); got {features.shape} and {labels.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features, labels


def logme(features: np.ndarray, labels: np.ndarray, max_iterations: int = 100, tol: float = 1e-5) -> float:
    """LogME of integer class ``labels`` (n,) given ``features`` (n x D): the mean over classes
    of the maximised evidence per sample of each class's one-hot indicator."""
    features, labels = checked_features_and_labels(features, labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("LogME needs at least two classes among the sampled labels")
    svd = _spectral(features)
    scores = [fit_evidence(features, (labels == c).astype(np.float64), max_iterations, tol, _svd=svd).evidence
              for c in classes]
    return float(np.mean(scores))
