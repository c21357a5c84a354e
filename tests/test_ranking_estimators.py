"""The ranking's estimators on small cases: AC-Corr after steps against hand-computed values,
LogME against a direct evaluation of its evidence formula, and feature sampling at labels."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_acnorm.norms import acnorm_modules, convert_to_acnorm
from nnunet_acnorm.ranking.estimators import ac_corr_after_steps, norm_features_at_labels
from nnunet_acnorm.ranking.logme import fit_evidence, logme


def hand_s_sum(ws, bs, wt, bt, tau=1.0, eps=1e-5):
    """method.md section 2 written out with plain Python floats."""
    ys = [b / (abs(w) + eps) for w, b in zip(ws, bs)]
    yt = [b / (abs(w) + eps) for w, b in zip(wt, bt)]
    total = 0.0
    for i in range(len(yt)):
        logits = [-abs(yt[i] - y) / tau for y in ys]
        z = sum(math.exp(v) for v in logits)
        a = [math.exp(v) / z for v in logits]
        total += sum(v for v in a if v >= a[i])
    return total


class OneNorm(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv3d(1, c, 1)
        self.norm = nn.InstanceNorm3d(c, affine=True)

    def forward(self, x):
        return self.norm(self.conv(x))


SOURCE_W, SOURCE_B = [1.0, 0.5, 2.0], [0.1, 0.4, -0.6]
TARGET_W, TARGET_B = [0.9, 0.7, 1.5], [0.3, 0.2, -0.1]


def test_ac_corr_after_steps_equals_hand_computed_values():
    model = OneNorm()
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor(SOURCE_W))
        model.norm.bias.copy_(torch.tensor(SOURCE_B))
    convert_to_acnorm(model)
    layer = acnorm_modules(model)["norm"]

    def step(batch):  # a "fine-tuning step" that moves the target affines to known values
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(TARGET_W))
            layer.bias.copy_(torch.tensor(TARGET_B))
        return 0.0

    measured = ac_corr_after_steps(model, step, [{}], steps=1)
    assert measured.per_layer_at_start["norm"] == pytest.approx(hand_s_sum(SOURCE_W, SOURCE_B, SOURCE_W, SOURCE_B),
                                                                rel=1e-6)
    expected = hand_s_sum(SOURCE_W, SOURCE_B, TARGET_W, TARGET_B)
    assert measured.score == pytest.approx(expected, rel=1e-6)
    assert measured.per_layer == {"norm": pytest.approx(expected, rel=1e-6)}
    # the source stays what was loaded; S returned is the layer's own S
    assert torch.equal(layer.source_weight, torch.tensor(SOURCE_W))
    np.testing.assert_allclose(measured.sparse_correlations["norm"], layer.sparse_correlation().double().numpy(),
                               rtol=1e-6)
    assert measured.sparse_correlations["norm"].sum() == pytest.approx(expected, rel=1e-6)


def test_ac_corr_after_a_real_sgd_step_matches_the_updated_affines():
    torch.manual_seed(0)
    model = OneNorm(4)
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor([1.0, 0.6, 1.4, 0.8]))
        model.norm.bias.copy_(torch.tensor([0.2, -0.3, 0.5, 0.0]))
    convert_to_acnorm(model)
    source = [t.clone() for t in acnorm_modules(model)["norm"]._source()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = {"data": torch.randn(2, 1, 4, 4, 4), "target": torch.randn(2, 4, 4, 4, 4)}

    def step(b):
        optimizer.zero_grad()
        loss = ((model(b["data"]) - b["target"]) ** 2).mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    measured = ac_corr_after_steps(model, step, [batch], steps=3)
    layer = acnorm_modules(model)["norm"]
    assert not torch.equal(layer.weight.detach(), source[0])  # the steps moved the target affines
    expected = hand_s_sum(source[0].tolist(), source[1].tolist(), layer.weight.tolist(), layer.bias.tolist())
    assert measured.score == pytest.approx(expected, rel=1e-5)
    assert len(measured.losses) == 3 and measured.steps == 3


def test_ac_corr_after_steps_refuses_models_without_acnorm():
    with pytest.raises(ValueError, match="no AC-Norm layer"):
        ac_corr_after_steps(OneNorm(), lambda b: 0.0, [{}], steps=1)
    model = OneNorm()
    convert_to_acnorm(model)
    with pytest.raises(ValueError, match="steps"):
        ac_corr_after_steps(model, lambda b: 0.0, [{}], steps=0)


# -- LogME --------------------------------------------------------------------------------------
def direct_evidence(features, y, alpha, beta):
    """L(alpha, beta) / n with explicit matrices (no SVD)."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    _, logdet = np.linalg.slogdet(a)
    value = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
             - beta / 2 * np.sum((features @ m - y) ** 2) - alpha / 2 * m @ m - logdet / 2)
    return value / n


@pytest.mark.parametrize("n,d", [(60, 5), (8, 20)])  # more samples than features, and fewer
def test_logme_evidence_equals_the_direct_formula_at_its_maximum(n, d):
    rng = np.random.RandomState(0)
    features = rng.normal(size=(n, d))
    y = (features[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
    fit = fit_evidence(features, y)
    assert fit.evidence == pytest.approx(direct_evidence(features, y, fit.alpha, fit.beta), rel=1e-8)
    # the fixed point maximises the evidence: moving alpha or beta lowers it
    for da, db in ((1.3, 1.0), (0.7, 1.0), (1.0, 1.3), (1.0, 0.7)):
        assert direct_evidence(features, y, fit.alpha * da, fit.beta * db) < fit.evidence


def test_logme_is_the_mean_over_classes_of_one_hot_evidences():
    rng = np.random.RandomState(1)
    features = rng.normal(size=(40, 6))
    labels = rng.randint(0, 3, size=40)
    expected = np.mean([fit_evidence(features, (labels == c).astype(float)).evidence for c in range(3)])
    assert logme(features, labels) == pytest.approx(expected)


def test_logme_prefers_features_that_determine_the_labels():
    rng = np.random.RandomState(2)
    labels = rng.randint(0, 3, size=300)
    informative = np.eye(3)[labels] * 2.0 + 0.3 * rng.normal(size=(300, 3))
    informative = np.hstack([informative, rng.normal(size=(300, 5))])
    random_features = rng.normal(size=(300, 8))
    assert logme(informative, labels) > logme(random_features, labels) + 0.1


def test_logme_rejects_bad_input():
    with pytest.raises(ValueError, match="two classes"):
        logme(np.ones((5, 2)), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        logme(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="n = len"):
        logme(np.ones((4, 2)), np.array([0, 1, 0]))


# -- features at labelled voxels ----------------------------------------------------------------
def test_norm_features_at_labels_uses_the_source_affines_and_caps_per_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 3, stride=2, padding=1), nn.InstanceNorm3d(3, affine=True))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
        model[1].bias.copy_(torch.tensor([1.0, -1.0, 0.0]))
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = model(x)  # (2, 3, 4, 4, 4), plain pretrained output
    convert_to_acnorm(model)
    with torch.no_grad():  # move the targets: features must still be the source's (pretrained) ones
        model[1].weight.add_(0.5)
    seg = torch.zeros(2, 1, 8, 8, 8)
    seg[:, :, 4:, :, :] = 1
    seg[0, 0, 0, 0, 0] = -1  # outside-image marks are dropped
    features, labels = norm_features_at_labels(model, "1", [{"data": x, "target": [seg]}], per_class=10)
    assert features.shape == (20, 3) and sorted(set(labels.tolist())) == [0, 1]
    all_features = expected.movedim(1, -1).reshape(-1, 3).double().numpy()
    for row in features:  # every sampled row is one of the plain layer's feature vectors
        assert np.abs(all_features - row).sum(axis=1).min() < 1e-5


def test_untrained_affines_are_flagged_because_s_is_full_by_construction():
    model = OneNorm(4)  # weight 1, bias 0: every domain indicator is 0, every entry ties with the diagonal
    convert_to_acnorm(model)
    measured = ac_corr_after_steps(model, lambda b: 0.0, [{}], steps=1)
    assert measured.score == pytest.approx(4.0) and measured.degenerate_layers == ["norm"]
    trained = OneNorm(4)
    with torch.no_grad():
        trained.norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    convert_to_acnorm(trained)
    assert ac_corr_after_steps(trained, lambda b: 0.0, [{}], steps=1).degenerate_layers == []


def test_a_2d_nnunet_checkpoint_is_2d_by_its_stem_not_the_family_default():
    """The direction experiment's 2d sources were skipped as '3D nnunet_v2 network does not fit 2d'."""
    from types import SimpleNamespace

    from nnunet_acnorm.checkpoints import FAMILIES
    from nnunet_acnorm.ranking.nnunet_target import _spatial_dims

    family = FAMILIES["nnunet_v2"]
    stem = "encoder.stages.0.0.convs.0.conv.weight"
    for shape, dims in (((8, 1, 3, 3), 2), ((8, 1, 3, 3, 3), 3)):
        weights = SimpleNamespace(stem_weight_key=stem, state_dict={stem: torch.zeros(shape)})
        assert _spatial_dims(family, weights) == dims
    assert _spatial_dims(family, SimpleNamespace(stem_weight_key=None, state_dict={})) == family.spatial_dims
