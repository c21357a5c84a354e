"""progress.png in the manner of nnU-Net's: losses and validation metrics, epoch time, learning rate."""
from __future__ import annotations

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_progress(log: dict, png_file: str, selection_metric: str) -> None:
    epochs = list(range(len(log["train_losses"])))
    if not epochs:
        return
    fig, axes = plt.subplots(3, 1, figsize=(20, 30))
    ax = axes[0]
    ax.plot(epochs, log["train_losses"], color="b", ls="-", label="loss_tr", linewidth=3)
    ax.plot(epochs, log["val_losses"], color="r", ls="-", label="loss_val", linewidth=3)
    ax2 = ax.twinx()
    for key, colour, style in (("val_kappa", "g", "dotted"), ("val_accuracy", "c", "dotted"),
                               ("val_auc_macro", "m", "dotted"), ("ema_selection_metric", "g", "-")):
        values = [float("nan") if v is None else v for v in log[key]]
        label = f"ema {selection_metric}" if key == "ema_selection_metric" else key[4:]
        ax2.plot(epochs, values, color=colour, ls=style, label=label, linewidth=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("validation metric")
    ax.legend(loc=(0, 1))
    ax2.legend(loc=(0.2, 1))
    axes[1].plot(epochs, log["epoch_durations"], color="b", ls="-", label="epoch duration", linewidth=3)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("time [s]")
    axes[1].legend(loc=(0, 1))
    axes[2].plot(epochs, log["learning_rates"], color="b", ls="-", label="learning rate", linewidth=3)
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    axes[2].legend(loc=(0, 1))
    fig.tight_layout()
    fig.savefig(png_file)
    plt.close(fig)
