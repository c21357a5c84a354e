"""Classification metrics (scikit-learn) and the JSON summary / confusion-matrix plot they go to."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np


def classification_metrics(labels, probabilities, num_classes: int) -> dict:
    """Accuracy, quadratic weighted kappa, per-class one-vs-rest AUC and their macro mean, the
    confusion matrix, from integer ``labels`` (N,) and class ``probabilities`` (N, num_classes).

    An AUC is null where it is undefined (a class with no positive or no negative case); the macro
    AUC averages the defined ones and is null if none is.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score,
                                 confusion_matrix, roc_auc_score)
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(labels), num_classes):
        raise ValueError(f"probabilities have shape {probabilities.shape}, expected "
                         f"({len(labels)}, {num_classes})")
    predictions = probabilities.argmax(1)
    classes = list(range(num_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa of a constant prediction: nan, reported as null
        kappa = cohen_kappa_score(labels, predictions, labels=classes, weights="quadratic")
        balanced = balanced_accuracy_score(labels, predictions)
    per_class_auc = {}
    for c in classes:
        positives = labels == c
        if positives.all() or not positives.any():
            per_class_auc[str(c)] = None
        else:
            per_class_auc[str(c)] = float(roc_auc_score(positives, probabilities[:, c]))
    defined = [v for v in per_class_auc.values() if v is not None]
    return {
        "num_cases": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": _finite_or_none(balanced),
        "quadratic_weighted_kappa": _finite_or_none(kappa),
        "auc_per_class": per_class_auc,
        "auc_macro": float(np.mean(defined)) if defined else None,
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "cases_per_class": np.bincount(labels, minlength=num_classes).tolist(),
    }


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def save_summary(metrics: dict, json_file: str, extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(json_file)), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump({**(extra or {}), **metrics}, f, indent=2)


def format_metrics(metrics: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"
    return (f"accuracy {fmt(metrics['accuracy'])}, quadratic weighted kappa "
            f"{fmt(metrics['quadratic_weighted_kappa'])}, macro AUC {fmt(metrics['auc_macro'])} "
            f"({metrics['num_cases']} cases)")


def plot_confusion_matrix(metrics: dict, png_file: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay
    matrix = np.asarray(metrics["confusion_matrix"])
    size = max(4.0, 0.8 * len(matrix) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=list(range(len(matrix)))).plot(ax=ax, colorbar=False)
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(png_file)
    plt.close(fig)
