"""H-score (Bao, Li, Huang, Zheng, Sun, Tong: "An Information-Theoretic Approach to Transferability in
Task Transfer Learning", ICIP 2019), written from the paper's formula, with a shrinkage-regularised
feature covariance.

For features f (n x D) and class labels y::

    H(f) = tr( cov(f)^-1  cov(E[f | y]) )

where cov(E[f | y]) is the covariance of the class-conditional means: every sample's feature
vector replaced by the mean of its class (so classes weigh by their frequency). With the sample
covariance, H lies in [0, K - 1] for K classes: 0 when the class means coincide (features say
nothing about the label), K - 1 when the within-class scatter vanishes against the between-class
scatter (the shrunk covariance below moves eigenvalues, so then H is only close to those bounds).
Higher = features that separate the labels better.

The inverse of the sample covariance is unstable for the few hundred samples per class a ranking
draws and for correlated channels; as in the "regularised H-score" of Ibrahim, Ponomareva, Bao
and Gao (2022, "Newer is not always better: rethinking transferability metrics"), cov(f) is
replaced by the Ledoit-Wolf shrinkage estimate (scikit-learn's ``LedoitWolf``:
(1 - delta) S + delta tr(S)/D I, delta from Ledoit & Wolf 2004). Because that shrinks towards a
multiple of the identity, the channels are standardised first (zero mean, unit variance; constant
channels dropped), which makes the score independent of each channel's scale, as the plain
H-score is.
"""
from __future__ import annotations

import numpy as np

from nnunet_acnorm.ranking.logme import checked_features_and_labels


def standardise(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Zero mean, unit variance per channel; channels with (near-)zero variance are dropped."""
    features = np.asarray(features, dtype=np.float64)
    std = features.std(axis=0)
    keep = std > eps * (1.0 + np.abs(features).max(axis=0))
    return (features[:, keep] - features[:, keep].mean(axis=0)) / std[keep]


def class_mean_features(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row replaced by the mean feature vector of its class (E[f | y] per sample)."""
    out = np.empty_like(features)
    for c in np.unique(labels):
        where = labels == c
        out[where] = features[where].mean(axis=0)
    return out


def hscore(features: np.ndarray, labels: np.ndarray, shrinkage: bool = True) -> float:
    """H-score of integer class ``labels`` (n,) given ``features`` (n x D); ``shrinkage=False``
    uses the plain sample covariance (the paper's estimate, a pseudo-inverse where singular)."""
    features, labels = checked_features_and_labels(features, labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("H-score needs at least two classes among the sampled labels")
    f = standardise(features)
    if f.shape[1] == 0:
        return 0.0  # every channel constant: the features cannot tell any class apart
    g = class_mean_features(f, labels)
    g = g - g.mean(axis=0)
    cov_between = g.T @ g / len(g)
    if shrinkage:
        from sklearn.covariance import LedoitWolf

        cov_f = LedoitWolf(assume_centered=False).fit(f).covariance_
        return float(np.trace(np.linalg.solve(cov_f, cov_between)))
    cov_f = f.T @ f / len(f)  # f is centred
    return float(np.trace(np.linalg.pinv(cov_f, hermitian=True) @ cov_between))
