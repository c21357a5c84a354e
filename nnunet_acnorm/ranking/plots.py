"""Plots of a ranking: a bar chart of the scores and heatmaps of the sparse correlation matrices."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: at most this many layers per candidate get a heatmap (all are in sparse_correlations.npz)
MAX_HEATMAP_LAYERS = 4


def plot_scores(ranking, path: str) -> str:
    """Bar chart of AC-Corr (and its value at step 0) per ranked candidate, best first; excluded
    candidates (degenerate source layers) after them, hatched and labelled as not ranked."""
    shown = ranking.measured
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(shown) + 2), 3.6))
    x = np.arange(len(shown))
    hatch = ["//" if c.status == "excluded" else "" for c in shown]
    ax.bar(x - 0.2, [c.ac_corr for c in shown], width=0.4, label=f"after {ranking.steps} step(s)", hatch=hatch)
    ax.bar(x + 0.2, [c.ac_corr_at_start for c in shown], width=0.4, label="at step 0", alpha=0.6, hatch=hatch)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c.rank}. {c.name}" if c.rank else f"(not ranked) {c.name}" for c in shown],
                       rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AC-Corr (mean sum of S)")
    arrow = "higher" if ranking.higher_is_better else "lower"
    ax.set_title(f"{ranking.dataset} {ranking.configuration}: AC-Corr ({arrow} ranked first)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
