"""Plots of a ranking: a bar chart of the scores and heatmaps of the sparse correlation matrices."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: at most this many layers per candidate get a heatmap (all are in sparse_correlations.npz)
MAX_HEATMAP_LAYERS = 4


def _short(name: str, size: int = 34) -> str:
    """A candidate name for a tick label: its start and end where it is long (full names in the CSV)."""
    return name if len(name) <= size else f"{name[:size - 14]}...{name[-11:]}"


def plot_scores(ranking, path: str) -> str:
    """One panel per estimator: its score per measured candidate, in the ranking's order (the
    ranked candidates, then the excluded ones: degenerate source layers, hatched and labelled as
    not ranked). The AC-Corr panel shows its value at step 0 beside it."""
    from nnunet_acnorm.ranking.rank import ESTIMATORS

    shown = ranking.measured
    estimators = list(ranking.estimators)
    width = max(4.0, 0.9 * len(shown) + 2)
    fig, axes = plt.subplots(1, len(estimators), figsize=(width * len(estimators), 4.6), squeeze=False)
    x = np.arange(len(shown))
    hatch = ["//" if c.status == "excluded" else "" for c in shown]
    labels = [f"{c.rank}. {_short(c.name)}" if c.rank else f"(not ranked) {_short(c.name)}" for c in shown]

    def values(get):
        return [np.nan if get(c) is None else get(c) for c in shown]

    for ax, est in zip(axes[0], estimators):
        label = ESTIMATORS[est][0]
        if est == "ac_corr":
            ax.bar(x - 0.2, values(lambda c: c.scores.get(est)), width=0.4, label=f"after {ranking.steps} step(s)",
                   hatch=hatch)
            ax.bar(x + 0.2, values(lambda c: c.ac_corr_at_start), width=0.4, label="at step 0", alpha=0.6,
                   hatch=hatch)
            ax.legend(fontsize=7)
        else:
            ax.bar(x, values(lambda c: c.scores.get(est)), width=0.6, hatch=hatch,
                   color="tab:green" if est in ("logme", "hscore") else "tab:blue")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        order = " (the order)" if est == ranking.rank_by else ""
        ax.set_title(f"{label}{order}", fontsize=9)
    caveat = "" if ranking.reliable else " - not a reliable ranking (see the direction note)"
    fig.suptitle(f"{ranking.dataset} {ranking.configuration}: estimators per candidate, ordered by "
                 f"{ranking.order_word} {ranking.rank_by}{caveat}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sparse_correlations(ranking, path: str) -> str:
    """Heatmaps of S (rows: target channels, columns: source channels) of the chosen layers,
    one row per measured candidate (at most :data:`MAX_HEATMAP_LAYERS` layers each)."""
    ranked = ranking.measured
    layers = []
    for c in ranked:
        for name in c.sparse_correlations:
            if name not in layers:
                layers.append(name)
    layers = layers[:MAX_HEATMAP_LAYERS]
    rows, cols = max(1, len(ranked)), max(1, len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols + 0.8, 2.6 * rows), squeeze=False)
    image = None
    for i, c in enumerate(ranked):
        for j, name in enumerate(layers):
            ax = axes[i][j]
            s = c.sparse_correlations.get(name)
            if s is None:
                ax.axis("off")
                continue
            image = ax.imshow(s, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_title(f"{c.name[:24]}\n{name[-28:]}: sum {s.sum():.2f}", fontsize=7)
            ax.set_xlabel("source channel", fontsize=6)
            ax.set_ylabel("target channel", fontsize=6)
            ax.tick_params(labelsize=5)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="S")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
