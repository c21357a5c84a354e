"""nnU-Net's logger and ``progress.png`` for the classification trainer.

:class:`ClassificationLogger` is nnU-Net's own local logger (``LocalLogger``; ``nnUNetLogger`` before
nnU-Net 2.8) with three keys added, ``val_kappa``, ``val_accuracy`` and ``val_auc_macro``, and
without ``dice_per_class_or_region``. The selection metric of each epoch goes where nnU-Net puts its
pseudo Dice (``mean_fg_dice``) and its moving average where nnU-Net keeps the pseudo Dice's
(``ema_fg_dice``): the same role, picking ``checkpoint_best.pth``. ``progress.png`` keeps nnU-Net's
layout (losses, the selection metric and its moving average, epoch duration, learning rate), its
metric axis named after the selection metric and the other validation metrics added; it is drawn
on a figure of its own (nnU-Net's plot would say "pseudo dice" and set seaborn's style globally).
"""
from __future__ import annotations

import os

import matplotlib
from matplotlib.figure import Figure
from nnunetv2.training.logging import nnunet_logger

#: nnU-Net's local logger (``LocalLogger`` since 2.8, the same class was ``nnUNetLogger`` before)
NnunetLocalLogger = getattr(nnunet_logger, "LocalLogger", None) or nnunet_logger.nnUNetLogger

#: the validation metrics logged per epoch besides nnU-Net's keys: log key -> metrics key
METRIC_KEYS = {"val_kappa": "quadratic_weighted_kappa", "val_accuracy": "accuracy", "val_auc_macro": "auc_macro"}
#: -selection_metric -> its log key
SELECTION_KEYS = {"kappa": "val_kappa", "auc": "val_auc_macro", "accuracy": "val_accuracy"}
#: the figure's font size, about nnU-Net's (seaborn font_scale 2.5), for this figure only
_STYLE = {"font.size": 25}
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

    def progress_figure(self) -> Figure:
        """``progress.png``'s figure in nnU-Net's layout (losses with the validation metrics on a twin
        axis, epoch duration, learning rate), the metric axis named after the selection metric. A
        :class:`matplotlib.figure.Figure` of its own: no pyplot state, no global style changed."""
        with matplotlib.rc_context(_STYLE):
            log = self.my_fantastic_logging
            epochs = list(range(min(len(v) for v in log.values())))
            figure = Figure(figsize=(30, 54))
            losses, durations, lrs = figure.subplots(3, 1)
            metrics = losses.twinx()
            losses.plot(epochs, log["train_losses"][:len(epochs)], color="b", ls="-", label="loss_tr", linewidth=4)
            losses.plot(epochs, log["val_losses"][:len(epochs)], color="r", ls="-", label="loss_val", linewidth=4)
            name = self.selection_metric
            metrics.plot(epochs, log["mean_fg_dice"][:len(epochs)], color="g", ls="dotted", label=name, linewidth=3)
            metrics.plot(epochs, log["ema_fg_dice"][:len(epochs)], color="g", ls="-", label=f"{name} (mov. avg.)",
                         linewidth=4)
            for key in METRIC_KEYS:
                if key != SELECTION_KEYS[name]:
                    values = [float("nan") if v is None else v for v in log[key][:len(epochs)]]
                    metrics.plot(epochs, values, color=_COLOURS[key], ls="dotted", label=key[4:], linewidth=3)
            losses.set_ylabel("loss")
            metrics.set_ylabel("validation metric")
            losses.legend(loc=(0, 1))
            metrics.legend(loc=(0.2, 1), ncol=2)
            start, end = log["epoch_start_timestamps"], log["epoch_end_timestamps"]
            durations.plot(epochs, [end[e] - start[e] for e in epochs], color="b", ls="-", label="epoch duration",
                           linewidth=4)
            durations.set_ylim(bottom=0)
            durations.set_ylabel("time [s]")
            lrs.plot(epochs, log["lrs"][:len(epochs)], color="b", ls="-", label="learning rate", linewidth=4)
            lrs.set_ylabel("learning rate")
            for axis in (losses, durations, lrs):
                axis.set_xlabel("epoch")
            for axis in (durations, lrs):
                axis.legend(loc=(0, 1))
            figure.tight_layout()
        return figure

    def plot_progress_png(self, output_folder: str) -> None:
        """Write ``progress.png`` (:meth:`progress_figure`) into ``output_folder``."""
        if self.my_fantastic_logging["train_losses"]:
            with matplotlib.rc_context(_STYLE):
                self.progress_figure().savefig(os.path.join(output_folder, "progress.png"))
