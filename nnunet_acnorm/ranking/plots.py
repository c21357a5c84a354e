"""Plots of a ranking: a bar chart of the scores and heatmaps of the sparse correlation matrices."""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: at most this many layers per candidate get a heatmap (all are in sparse_correlations.npz)
MAX_HEATMAP_LAYERS = 4


def _wrap(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` characters, broken after '.', '/' or '_' where possible."""
    lines, line = [], ""
    for piece in re.findall(r"[^./_]*[./_]?", text):
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    return "\n".join(lines + [line] if line else lines)


def _short(name: str, size: int = 34) -> str:
    """A candidate name for a tick label: its start and end where it is long (full names in the CSV)."""
    return name if len(name) <= size else f"{name[:size - 14]}...{name[-11:]}"


def plot_scores(ranking, path: str, estimator_labels: dict[str, str]) -> str:
    """One panel per estimator: its score per measured candidate, in the ranking's order (the
    ranked candidates, then the excluded ones: degenerate source layers, hatched and labelled as
    not ranked). The AC-Corr panel shows its value at step 0 beside it. ``estimator_labels``:
    each estimator's axis label."""
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
        label = estimator_labels[est]
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
    """Heatmaps of S, one row per measured candidate, one panel per chosen layer of its network (at
    most :data:`MAX_HEATMAP_LAYERS`; every S is in sparse_correlations.npz).

    S is sparse and most kept entries are small (a softmax over C channels), so the colour scale is
    logarithmic from the smallest kept entry shown to 1, and the entries S drops (0) are white.
    Rows and columns are in the order of the source domain indicators (the same channel order on
    both axes): S then lies in a band along the diagonal, whose width shows how far each target
    channel's kept correlations reach."""
    from matplotlib.colors import LogNorm

    measured = [c for c in ranking.measured if c.sparse_correlations]
    layers = {c.name: list(c.sparse_correlations)[:MAX_HEATMAP_LAYERS] for c in measured}  # each network its own
    rows, cols = max(1, len(measured)), max([1, *map(len, layers.values())])
    kept = [s[s > 0] for c in measured for s in c.sparse_correlations.values() if (s > 0).any()]
    low = max(min((float(k.min()) for k in kept), default=1e-4), 1e-6)
    norm = LogNorm(vmin=min(low, 0.5), vmax=1.0)
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("white")
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.6, 3.2 * rows + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for i, c in enumerate(measured):
        for ax in axes[i][len(layers[c.name]):]:
            ax.axis("off")
        for j, name in enumerate(layers[c.name]):
            ax, s = axes[i][j], c.sparse_correlations[name]
            order = c.source_orders.get(name, np.arange(s.shape[0]))
            shown = np.ma.masked_less_equal(s[np.ix_(order, order)], 0.0)
            image = ax.imshow(shown, norm=norm, cmap=cmap, interpolation="nearest")
            ax.set_title(f"{_wrap(name, 36)}\nsum {s.sum():.2f} of C = {s.shape[0]}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("source channel (by indicator)", fontsize=7)
            who = f"{c.rank}. {c.name}" if c.rank else f"(not ranked) {c.name}"
            ax.set_ylabel(f"{_wrap(who, 30)}\ntarget channel" if j == 0 else "target channel", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.7, label="S (log scale; white: dropped, 0)")
    fig.suptitle(f"{ranking.dataset} {ranking.configuration}: sparse correlation S after {ranking.steps} step(s)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
