"""nnU-Net's logger and ``progress.png`` for the classification trainer.

:class:`ClassificationLogger` is nnU-Net's own local logger (``LocalLogger``; ``nnUNetLogger`` before
nnU-Net 2.8) with three keys added, ``val_kappa``, ``val_accuracy`` and ``val_auc_macro``, and
without ``dice_per_class_or_region``. The selection metric of each epoch goes where nnU-Net puts its
pseudo Dice (``mean_fg_dice``) and its moving average where nnU-Net keeps the pseudo Dice's
(``ema_fg_dice``): the same role, picking ``checkpoint_best.pth``. nnU-Net draws ``progress.png``
(losses, the selection metric and its moving average, epoch duration, learning rate);
:meth:`ClassificationLogger.plot_progress_png` then names the metric on that figure instead of
"pseudo dice" and adds the other validation metrics to it.
"""
from __future__ import annotations

import os
from unittest import mock

import matplotlib
import matplotlib.pyplot  # noqa: F401  (nnU-Net's logger imports it too)

from nnunetv2.training.logging import nnunet_logger

#: nnU-Net's local logger (``LocalLogger`` since 2.8, the same class was ``nnUNetLogger`` before)
NnunetLocalLogger = getattr(nnunet_logger, "LocalLogger", None) or nnunet_logger.nnUNetLogger

#: the validation metrics logged per epoch besides nnU-Net's keys: log key -> metrics key
METRIC_KEYS = {"val_kappa": "quadratic_weighted_kappa", "val_accuracy": "accuracy", "val_auc_macro": "auc_macro"}
#: -selection_metric -> its log key
SELECTION_KEYS = {"kappa": "val_kappa", "auc": "val_auc_macro", "accuracy": "val_accuracy"}
_COLOURS = {"val_kappa": "g", "val_accuracy": "c", "val_auc_macro": "m"}
#: the log keys of checkpoints written before this logger (the trainer's own dict) -> nnU-Net's
_FORMER_KEYS = {"learning_rates": "lrs", "ema_selection_metric": "ema_fg_dice"}


class ClassificationLogger(NnunetLocalLogger):
    """nnU-Net's logger (one value per key and epoch) plus the classification metrics."""

    def __init__(self, selection_metric: str, verbose: bool = False):
        super().__init__(verbose)
        self.selection_metric = selection_metric
        del self.my_fantastic_logging["dice_per_class_or_region"]
        self.my_fantastic_logging.update({k: [] for k in METRIC_KEYS})

    def log_validation(self, metrics: dict, epoch: int) -> float:
        """Log the epoch's validation metrics, the selection metric (None counts 0) and its moving
        average (0.9 x the previous one + 0.1 x the new value, as nnU-Net's pseudo Dice); return it."""
        for key, name in METRIC_KEYS.items():
            self.log(key, metrics[name], epoch)
        value = self.get_value(SELECTION_KEYS[self.selection_metric], epoch)
        value = 0.0 if value is None else value
        self.log("mean_fg_dice", value, epoch)
        previous = self.get_value("ema_fg_dice", None)
        self.log("ema_fg_dice", 0.9 * previous[-1] + 0.1 * value if previous else value, epoch)
        return self.get_value("ema_fg_dice", epoch)

    def load_checkpoint(self, checkpoint: dict) -> None:
        logging = {k: list(v) for k, v in checkpoint.items()}
        if "epoch_durations" in logging:  # written by the trainer's former own logging
            durations = logging.pop("epoch_durations")
            for old, new in _FORMER_KEYS.items():
                logging[new] = logging.pop(old)
            logging["epoch_start_timestamps"] = [0.0] * len(durations)
            logging["epoch_end_timestamps"] = list(durations)
            metric = SELECTION_KEYS[self.selection_metric]
            logging["mean_fg_dice"] = [0.0 if v is None else v for v in logging[metric]]
        missing = set(self.my_fantastic_logging) - set(logging)
        if missing:
            raise KeyError(f"the checkpoint's log lacks {sorted(missing)}")
        super().load_checkpoint({k: logging[k] for k in self.my_fantastic_logging})

    def plot_progress_png(self, output_folder: str) -> None:
        """nnU-Net's ``progress.png``, its metric axis relabelled and the other metrics added."""
        if not self.my_fantastic_logging["train_losses"]:
            return
        # nnU-Net's plot sets seaborn's style globally: keep it to this figure; keep the figure open
        with matplotlib.rc_context():
            with mock.patch.object(nnunet_logger.plt, "close"):
                super().plot_progress_png(output_folder)
            figure = nnunet_logger.plt.gcf()
            try:
                metric_axis = figure.axes[3]  # the twin of the loss axis (nnU-Net's ax2)
                name = self.selection_metric
                for line, label in zip(metric_axis.get_lines(), (name, f"{name} (mov. avg.)")):
                    line.set_label(label)
                epochs = range(len(self.my_fantastic_logging["train_losses"]))
                for key in METRIC_KEYS:
                    if key != SELECTION_KEYS[name]:
                        values = [float("nan") if v is None else v for v in self.my_fantastic_logging[key]]
                        metric_axis.plot(epochs, values, color=_COLOURS[key], ls="dotted", label=key[4:],
                                         linewidth=3)
                metric_axis.set_ylabel("validation metric")
                metric_axis.legend(loc=(0.2, 1), ncol=2)  # two rows, as nnU-Net's legend
                figure.savefig(os.path.join(output_folder, "progress.png"))
            finally:
                nnunet_logger.plt.close(figure)
