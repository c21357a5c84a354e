"""H-score against an independent numpy evaluation of its formula (Bao et al. 2019) with the
Ledoit-Wolf estimate written out from Ledoit & Wolf (2004), and on features with a known answer."""
import numpy as np
import pytest

from nnunet_acnorm.ranking.hscore import hscore


def ledoit_wolf_by_hand(x):
    """Ledoit & Wolf (2004), lemmas 3.2-3.4, with the normalised Frobenius norm ||A||^2 = tr(A A^T) / p."""
    n, p = x.shape
    x = x - x.mean(axis=0)
    s = x.T @ x / n
    norm2 = lambda a: float(np.sum(a * a)) / p  # noqa: E731
    m = np.trace(s) / p
    d2 = norm2(s - m * np.eye(p))
    b2_bar = sum(norm2(np.outer(row, row) - s) for row in x) / n ** 2
    b2 = min(b2_bar, d2)
    return b2 / d2 * m * np.eye(p) + (d2 - b2) / d2 * s


def hscore_by_hand(features, labels, shrinkage=True):
    f = (features - features.mean(axis=0)) / features.std(axis=0)
    classes = np.unique(labels)
    means = {c: f[labels == c].mean(axis=0) for c in classes}
    g = np.stack([means[c] for c in labels])  # E[f | y] for every sample
    g = g - g.mean(axis=0)
    cov_g = g.T @ g / len(g)
    cov_f = ledoit_wolf_by_hand(f) if shrinkage else f.T @ f / len(f)
    return float(np.trace(np.linalg.inv(cov_f) @ cov_g))


def features_with_signal(n=300, d=6, k=3, signal=1.0, seed=0):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, k, size=n)
    centres = rng.randn(k, d) * signal
    mixing = rng.randn(d, d)  # correlated channels of different scales
    return (centres[labels] + rng.randn(n, d)) @ mixing, labels


@pytest.mark.parametrize("shrinkage", [True, False])
@pytest.mark.parametrize("n,d", [(300, 6), (40, 12)])
def test_hscore_equals_its_formula_evaluated_by_hand(shrinkage, n, d):
    features, labels = features_with_signal(n, d)
    if not shrinkage and n < 3 * d:
        pytest.skip("the plain sample covariance is near-singular there")
    assert hscore(features, labels, shrinkage=shrinkage) == pytest.approx(
        hscore_by_hand(features, labels, shrinkage), rel=1e-8)


def test_plain_hscore_is_invariant_to_invertible_linear_maps_of_the_features():
    features, labels = features_with_signal(400, 5, seed=1)
    mixing = np.random.RandomState(2).randn(5, 5) + 3 * np.eye(5)
    assert hscore(features @ mixing + 7.0, labels, shrinkage=False) == pytest.approx(
        hscore(features, labels, shrinkage=False), rel=1e-8)


def test_separable_classes_score_near_k_minus_1_and_label_independent_features_near_0():
    rng = np.random.RandomState(3)
    k, n, d = 4, 2000, 8
    labels = rng.randint(0, k, size=n)
    separable = np.eye(k)[labels] @ rng.randn(k, d) * 10 + 0.01 * rng.randn(n, d)
    independent = rng.randn(n, d)
    # the plain estimate is at most the rank of the between-class covariance, K - 1; the shrunk
    # covariance moves eigenvalues, so only close to it
    assert k - 1 - 0.01 < hscore(separable, labels, shrinkage=False) <= k - 1 + 1e-9
    assert hscore(separable, labels) == pytest.approx(k - 1, rel=0.05)
    assert 0 <= hscore(independent, labels) < 0.02  # sampling noise only: about (k - 1) d / n
    # more signal, higher score
    weak, strong = (hscore(*features_with_signal(600, 6, signal=s, seed=4)) for s in (0.2, 2.0))
    assert weak < strong


def test_hscore_handles_constant_channels_and_rejects_bad_input():
    features, labels = features_with_signal(200, 4)
    with_constant = np.column_stack([features, np.full(len(features), 3.0)])
    assert hscore(with_constant, labels) == pytest.approx(hscore(features, labels), rel=1e-10)
    assert hscore(np.ones((10, 3)), np.arange(10) % 2) == 0.0
    with pytest.raises(ValueError, match="two classes"):
        hscore(features, np.zeros(len(features)))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        hscore(features, labels[:-1])
    bad = features.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hscore(bad, labels)
