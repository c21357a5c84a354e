"""The classification trainer, in the manner of nnU-Net's ``nnUNetTrainer``.

One output folder per fold holding ``checkpoint_best.pth`` (best exponential moving average of the
selection metric on the validation cases, as nnU-Net does with its pseudo Dice),
``checkpoint_latest.pth`` (every epoch, removed at the end), ``checkpoint_final.pth``, a
``training_log_*.txt``, ``progress.png`` and ``validation/`` (predictions, ``summary.json``,
confusion matrix of the final network on the fold's validation cases).

From nnU-Net and this project it reuses: nnU-Net's logger and ``progress.png``
(:class:`~nnunet_acnorm.classification.logger.ClassificationLogger`), the poly schedule
(:class:`~nnunet_acnorm.finetuning.ScaledWarmupPolyLRScheduler` without warm-up, stepped per epoch),
the seeding of the segmentation trainers (``nnUNet_acnorm_seed``; unseeded by default) and the safe
checkpoint reading and atomic writing of :mod:`nnunet_acnorm.checkpoints.io`.

Variants, one idea each (nnU-Net style):

- :class:`ClassificationTrainer`: AC-Norm fine-tuning. The pretrained weights are loaded into the
  plain network first, then every BatchNorm becomes an AC-BatchNorm whose frozen source affines are
  the pretrained ones (``convert_to_acnorm``), as in the paper.
- :class:`ClassificationTrainer_vanilla`: plain fine-tuning of the same network (comparison).
- the fine-tuning baselines (``-method``; :mod:`nnunet_acnorm.finetuning`, docs/baselines.md):
  :class:`ClassificationTrainer_L2SP`, ``_ACNorm_L2SP``, ``_DELTA``, ``_BSS``, ``_StochNorm``,
  ``_LPFT``, ``_DiscriminativeLR``. Their state outside the network (L2-SP's anchor, DELTA's frozen
  copy) is the checkpoint entry ``finetuning_state``; prediction does not need it.

Checkpoints hold only tensors and plain Python values: they load with
``torch.load(weights_only=True)``; ``logging`` is the dict of nnU-Net's logger. Under AC-Norm the
network state holds ``source_weight`` / ``source_bias`` of every norm; the network for prediction or
continuation is rebuilt, converted with an unset source and loaded strictly, which restores the source.
"""
from __future__ import annotations

import csv
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from nnunet_acnorm.classification.data_loading import make_dataset
from nnunet_acnorm.classification.dataset import Case
from nnunet_acnorm.classification.errors import ClassificationInputError
from nnunet_acnorm.classification.metrics import (classification_metrics, format_metrics,
                                                  plot_confusion_matrix, save_summary)
from nnunet_acnorm.classification.pretrained import load_pretrained_weights
from nnunet_acnorm.networks.classifiers import build_network
from nnunet_acnorm.checkpoints.io import CheckpointReadError, atomic_torch_save, safe_torch_load
from nnunet_acnorm.classification.logger import ClassificationLogger
from nnunet_acnorm.finetuning import (BSS_ETA, BSS_K, DELTA_ALPHA, DELTA_BETA, ENCODER_LR_FACTOR, L2SP_ALPHA,
                                      L2SP_BETA, LPFT_FROZEN_FRACTION, STOCHNORM_P, DELTARegulariser,
                                      FeatureRecorder, L2SPRegulariser, ScaledWarmupPolyLRScheduler, bss_penalty,
                                      convert_to_stochnorm, discriminative_param_groups, frozen_epochs, set_frozen,
                                      new_weights_penalty, stage_modules)
from nnunet_acnorm.norms import convert_to_acnorm
from nnunet_acnorm.norms.torch_compat import grad_scaler
from nnunet_acnorm.nnunet.pretrained import set_strict_source
from nnunet_acnorm.nnunet.seeding import resolve_seed, seed_everything

IMBALANCE_SCHEMES = ("loss", "sampling", "none")
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class ClassificationTrainer:
    """AC-Norm fine-tuning of a pretrained classifier (the paper's setting: every BatchNorm)."""

    #: seed of the run (None: unseeded); the environment variable ``nnUNet_acnorm_seed`` wins, as for
    #: the segmentation trainers (:mod:`nnunet_acnorm.nnunet.seeding`)
    seed: int | None = None

    def __init__(self, config: dict, fold: int | str, output_folder: str, device: torch.device,
                 show_progress: bool = True):
        self.config = dict(config, trainer_name=type(self).__name__)
        self.fold = fold
        self.output_folder = output_folder
        self.device = device
        self.show_progress = show_progress
        self.num_epochs = int(config["num_epochs"])
        self.current_epoch = 0
        self.best_ema: float | None = None
        self.logger = ClassificationLogger(config.get("selection_metric", "kappa"))
        self.run_seed = resolve_seed(self.seed)
        if self.run_seed is not None:  # before the network is built: the same new head in every run
            seed_everything(self.run_seed)
        self.amp = device.type == "cuda"  # mixed precision on CUDA, float32 elsewhere
        self.network: nn.Module | None = None
        self.optimizer = self.lr_scheduler = self.grad_scaler = self.loss = None
        self.log_file: str | None = None

    # -- hooks of the fine-tuning methods (defaults: none) ----------------------------------------
    #: short name for -method
    method_name: str = "acnorm"
    #: optimizer weight decay instead of -weight_decay (None: keep it); 0 where a penalty replaces it
    method_weight_decay: float | None = None

    def setup_method(self, state: dict | None) -> None:
        """Build the method's pieces on ``self.network`` (pretrained weights loaded), from ``state``
        (a continued training) or from the current weights."""

    def method_penalty(self) -> torch.Tensor | None:
        return None

    def method_state(self) -> dict:
        return {}

    def method_param_groups(self) -> list[dict]:
        return [{"params": list(self.network.parameters())}]

    def on_epoch_start(self) -> None:
        """After ``network.train()``, before the epoch's steps."""

    @property
    def head_prefix(self) -> str:
        from nnunet_acnorm.networks.classifiers import ARCHITECTURES
        return ARCHITECTURES[self.config["architecture"]].head

    # -- one idea per variant --------------------------------------------------------------------
    def adapt_network(self, network: nn.Module, set_source: bool = True) -> None:
        """Turn every affine norm into AC-Norm. ``set_source=True`` after loading pretrained
        weights (source = pretrained affines); ``False`` before loading a checkpoint of ours."""
        report = convert_to_acnorm(network, tau=float(self.config["tau"]), set_source=set_source)
        if set_source:
            self.print_to_log_file(f"AC-Norm: {report}")

    # -- set-up ----------------------------------------------------------------------------------
    def initialize(self, pretrained_file: str | None, trust_pickle: bool = False) -> None:
        os.makedirs(self.output_folder, exist_ok=True)
        network = build_network(self.config)
        if pretrained_file is not None:
            message = load_pretrained_weights(network, self.config, pretrained_file, trust_pickle)
            self.print_to_log_file(message)
        self.adapt_network(network, set_source=True)
        self._finish_initialization(network)
        self.setup_method(None)

    def initialize_from_checkpoint(self, checkpoint: dict) -> None:
        os.makedirs(self.output_folder, exist_ok=True)
        self._finish_initialization(self.network_from_checkpoint(checkpoint, type(self)))
        state = checkpoint.get("finetuning_state")
        if type(self).method_state is not ClassificationTrainer.method_state and not state:
            raise ClassificationInputError(
                f"the checkpoint of {type(self).__name__} has no 'finetuning_state' entry: the method's reference "
                "(pretrained anchor / frozen copy) cannot be recovered, so --c cannot continue it exactly")
        self.setup_method(state or None)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.current_epoch = int(checkpoint["current_epoch"])
        self.best_ema = checkpoint["best_ema"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self.print_to_log_file(f"continuing from epoch {self.current_epoch}")

    @staticmethod
    def network_from_checkpoint(checkpoint: dict, trainer_class: type | None = None) -> nn.Module:
        """The trained network of ``checkpoint`` (AC-Norm layers included), loaded strictly."""
        config = checkpoint["config"]
        trainer_class = trainer_class or TRAINERS[config["trainer_name"]]
        network = build_network(config)
        helper = trainer_class.__new__(trainer_class)  # adapt_network(set_source=False) uses only config
        helper.config = config
        helper.adapt_network(network, set_source=False)
        set_strict_source(network, True)  # a checkpoint of ours holds every AC-Norm source: demand it
        try:
            network.load_state_dict(checkpoint["network_weights"], strict=True)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise ClassificationInputError(
                f"the checkpoint's network weights do not fit a {config['architecture']} network "
                f"({lines[1] if len(lines) > 1 else lines[0]}); the checkpoint is corrupted or was edited") from None
        return network

    def _finish_initialization(self, network: nn.Module) -> None:
        self.network = network.to(self.device)
        weight_decay = float(self.config["weight_decay"]) if self.method_weight_decay is None else \
            self.method_weight_decay
        self.optimizer = torch.optim.SGD(self.method_param_groups(), lr=float(self.config["initial_lr"]),
                                         momentum=0.9, nesterov=True, weight_decay=weight_decay)
        self.grad_scaler = grad_scaler() if self.amp else None
        # nnU-Net's poly decay (exponent 0.9, no warm-up), each group at its lr_scale, stepped per epoch
        self.lr_scheduler = ScaledWarmupPolyLRScheduler(self.optimizer, float(self.config["initial_lr"]),
                                                        self.num_epochs, warmup_epochs=0)

    def _class_weights(self, cases: list[Case]) -> np.ndarray:
        """'balanced' weights n / (K * n_c) of scikit-learn for the classes present (others: 1)."""
        from sklearn.utils.class_weight import compute_class_weight
        labels = np.array([c.label for c in cases])
        present = np.unique(labels)
        weights = np.ones(int(self.config["num_classes"]))
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return weights

    def _loaders(self, train_cases: list[Case], val_cases: list[Case]):
        cfg = self.config
        batch_size = min(int(cfg["batch_size"]), len(train_cases))
        weights = self._class_weights(train_cases)
        sampler = None
        if cfg["imbalance"] == "sampling":
            sampler = WeightedRandomSampler([float(weights[c.label]) for c in train_cases],
                                            num_samples=len(train_cases), replacement=True)
        loss_weights = torch.tensor(weights, dtype=torch.float32) if cfg["imbalance"] == "loss" else None
        self.loss = nn.CrossEntropyLoss(weight=loss_weights).to(self.device)
        self.print_to_log_file(f"class imbalance: {cfg['imbalance']}; class counts "
                               f"{np.bincount([c.label for c in train_cases], minlength=len(weights)).tolist()}"
                               f", class weights {np.round(weights, 3).tolist()}")
        workers = int(cfg["num_workers"])
        common = {"num_workers": workers, "pin_memory": self.device.type == "cuda",
                  "persistent_workers": workers > 0}
        train = DataLoader(make_dataset(train_cases, cfg, train=True), batch_size=batch_size,
                           shuffle=sampler is None, sampler=sampler,
                           drop_last=len(train_cases) > batch_size, **common)
        val = DataLoader(make_dataset(val_cases, cfg, train=False), batch_size=batch_size, shuffle=False,
                         **common)
        return train, val

    # -- logging ---------------------------------------------------------------------------------
    def print_to_log_file(self, *args, also_print_to_console: bool = True) -> None:
        if self.log_file is None:
            os.makedirs(self.output_folder, exist_ok=True)
            stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
            self.log_file = os.path.join(self.output_folder, f"training_log_{stamp}.txt")
        line = f"{datetime.now()}: " + " ".join(str(a) for a in args)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")
        if also_print_to_console:
            print(line, flush=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, file_name: str) -> None:
        checkpoint = {
            "network_weights": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": {k: list(v) for k, v in self.logger.get_checkpoint().items()},
            "current_epoch": self.current_epoch,
            "best_ema": self.best_ema,
            "fold": self.fold,
            "config": self.config,
        }
        state = self.method_state()
        if state:
            checkpoint["finetuning_state"] = state
        atomic_torch_save(checkpoint, os.path.join(self.output_folder, file_name))

    # -- training --------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One step; returns the loss as a detached tensor on the device. Nothing here waits for the
        GPU (no ``.item()``, no finiteness test on the host): the losses of an epoch are read once,
        at its end (:meth:`_epoch_loss`). A non-finite loss in mixed precision is skipped by the
        GradScaler; in float32 it is reported at the end of the epoch, before any checkpoint."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(images), labels)
            penalty = self.method_penalty()
            if penalty is not None:
                loss = loss + penalty
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return loss.detach()

    def _epoch_loss(self, losses: list[torch.Tensor]) -> float:
        """The mean training loss of an epoch (one host read per epoch); FloatingPointError if a
        step's loss was not finite."""
        if not losses:
            return float("nan")
        mean = float(torch.stack(losses).float().mean())
        if not np.isfinite(mean):
            raise FloatingPointError(
                f"the training loss became {mean} at epoch {self.current_epoch}: lower -initial_lr or check the "
                "images for NaNs")
        return mean

    @torch.no_grad()
    def predict_probabilities(self, loader: DataLoader, desc: str = "validation") -> tuple[np.ndarray, float]:
        """(softmax probabilities (N, K), mean loss over labelled cases) in eval mode."""
        return predict_with_network(self.network, loader, self.device, self.loss, self.amp,
                                    desc, self.show_progress)

    def run_training(self, train_cases: list[Case], val_cases: list[Case]) -> dict:
        train_loader, val_loader = self._loaders(train_cases, val_cases)
        self.print_to_log_file(f"fold {self.fold}: {len(train_cases)} training and {len(val_cases)} "
                               f"validation cases; {self.config['architecture']} on {self.device}, "
                               f"{'mixed precision' if self.amp else 'float32'}; trainer "
                               f"{type(self).__name__}; "
                               + ("unseeded" if self.run_seed is None else f"seed {self.run_seed}"))
        while self.current_epoch < self.num_epochs:
            epoch = self.current_epoch
            if self.run_seed is not None:  # per epoch: a continued (--c) run draws as an uninterrupted one
                seed_everything(self.run_seed + 1 + epoch)
            self.logger.log("epoch_start_timestamps", time.time(), epoch)
            self.lr_scheduler.step(epoch)
            lr = self.lr_scheduler.lr_at(epoch)
            self.logger.log("lrs", lr, epoch)
            self.network.train()
            self.on_epoch_start()
            losses = [self.train_step(x, y) for x, y in tqdm(
                train_loader, desc=f"epoch {epoch}", disable=not self.show_progress,
                leave=False, file=sys.stdout)]
            self.logger.log("train_losses", self._epoch_loss(losses), epoch)
            probabilities, val_loss = self.predict_probabilities(val_loader)
            self.logger.log("val_losses", val_loss, epoch)
            metrics = classification_metrics([c.label for c in val_cases], probabilities,
                                             int(self.config["num_classes"]))
            ema = self.logger.log_validation(metrics, epoch)
            self.logger.log("epoch_end_timestamps", time.time(), epoch)
            duration = self.logger.get_value("epoch_end_timestamps", epoch) - \
                self.logger.get_value("epoch_start_timestamps", epoch)
            self.print_to_log_file(f"epoch {epoch}: train loss {self.logger.get_value('train_losses', epoch):.4f}, "
                                   f"val loss {val_loss:.4f}, {format_metrics(metrics)}, lr {lr:.2e}, "
                                   f"{duration:.1f} s")
            self.current_epoch += 1
            if self.best_ema is None or ema > self.best_ema:
                self.best_ema = ema
                self.print_to_log_file(f"new best EMA {self.config['selection_metric']}: {ema:.4f}")
                self.save_checkpoint("checkpoint_best.pth")
            self.save_checkpoint("checkpoint_latest.pth")
            self.logger.plot_progress_png(self.output_folder)
        self.save_checkpoint("checkpoint_final.pth")
        latest = os.path.join(self.output_folder, "checkpoint_latest.pth")
        if os.path.isfile(latest):
            os.remove(latest)
        return self.validate(val_loader, val_cases)

    def validate(self, val_loader: DataLoader, val_cases: list[Case]) -> dict:
        """Final network on the fold's validation cases: predictions.csv, summary.json, plot."""
        probabilities, _ = self.predict_probabilities(val_loader, "final validation")
        metrics = classification_metrics([c.label for c in val_cases], probabilities,
                                         int(self.config["num_classes"]))
        folder = os.path.join(self.output_folder, "validation")
        os.makedirs(folder, exist_ok=True)
        write_predictions(os.path.join(folder, "predictions.csv"), [c.identifier for c in val_cases],
                          probabilities)
        save_summary(metrics, os.path.join(folder, "summary.json"),
                     {"fold": self.fold, "trainer": type(self).__name__, "checkpoint": "checkpoint_final.pth"})
        plot_confusion_matrix(metrics, os.path.join(folder, "confusion_matrix.png"),
                              f"fold {self.fold} validation ({type(self).__name__})")
        self.print_to_log_file(f"final validation: {format_metrics(metrics)}")
        return metrics


class ClassificationTrainer_vanilla(ClassificationTrainer):
    """Plain fine-tuning: the network keeps its BatchNorms (the comparison of the paper)."""

    method_name = "vanilla"

    def adapt_network(self, network: nn.Module, set_source: bool = True) -> None:
        if set_source:
            self.print_to_log_file("vanilla fine-tuning: norms left as they are")


class ClassificationTrainer_L2SP(ClassificationTrainer_vanilla):
    """L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 on the pretrained weights, beta/2 ||w||^2 on the
    new head; weight decay 0 (the penalty replaces it)."""

    method_name = "l2sp"
    method_weight_decay = 0.0
    l2sp_alpha: float = L2SP_ALPHA
    l2sp_beta: float = L2SP_BETA

    def setup_method(self, state):
        if state is not None:
            self.l2sp = L2SPRegulariser.from_state(self.network, state["l2sp"], alpha=self.l2sp_alpha,
                                                   beta=self.l2sp_beta)
        else:
            head = self.head_prefix
            self.l2sp = L2SPRegulariser.from_network(self.network, lambda n: n.startswith(head),
                                                     alpha=self.l2sp_alpha, beta=self.l2sp_beta)
            self.print_to_log_file(f"L2-SP: alpha {self.l2sp_alpha} on {len(self.l2sp.anchored_names)} pretrained "
                                   f"parameter tensors, beta {self.l2sp_beta} on {len(self.l2sp.new_names)} new ones")

    def method_penalty(self):
        return self.l2sp()

    def method_state(self):
        return {"l2sp": self.l2sp.state()}


class ClassificationTrainer_ACNorm_L2SP(ClassificationTrainer_L2SP):
    """AC-Norm on every BatchNorm and L2-SP (the anchor holds the pretrained target affines too)."""

    method_name = "acnorm_l2sp"
    adapt_network = ClassificationTrainer.adapt_network


class ClassificationTrainer_DELTA(ClassificationTrainer_vanilla):
    """DELTA (Li et al. 2019): alpha x the mean squared distance of the stage outputs (ResNet layer1-4,
    Genesis down_tr64-512) to a frozen copy of the pretrained network, uniform channel attention, plus
    beta/2 ||w||^2 on the new head; weight decay 0."""

    method_name = "delta"
    method_weight_decay = 0.0
    delta_alpha: float = DELTA_ALPHA
    delta_beta: float = DELTA_BETA

    def setup_method(self, state):
        reference = None if state is None else state["delta"]["reference"]
        self.delta = DELTARegulariser(self.network, "", stage_modules(self.network), alpha=self.delta_alpha,
                                      reference_state=reference)
        head = self.head_prefix
        self._new_params = [p for n, p in self.network.named_parameters() if n.startswith(head)]
        if state is None:
            self.print_to_log_file(f"DELTA: alpha {self.delta_alpha} on {', '.join(self.delta.stage_names)}, "
                                   f"beta {self.delta_beta} on the head")

    def method_penalty(self):
        return self.delta() + new_weights_penalty(self._new_params, self.delta_beta)

    def method_state(self):
        return {"delta": {"reference": self.delta.reference_state(), "alpha": self.delta_alpha}}


class ClassificationTrainer_BSS(ClassificationTrainer_vanilla):
    """BSS (Chen et al. 2019): eta x the k smallest squared singular values of the batch of features
    the head receives (pooled over positions)."""

    method_name = "bss"
    bss_k: int = BSS_K
    bss_eta: float = BSS_ETA

    def setup_method(self, state):
        head = self.head_prefix.rstrip(".")
        self._bss = FeatureRecorder({head: self.network.get_submodule(head)}, inputs=True)
        self._bss_name = head

    def method_penalty(self):
        return bss_penalty(self._bss.features.pop(self._bss_name), self.bss_k, self.bss_eta)


class ClassificationTrainer_StochNorm(ClassificationTrainer_vanilla):
    """StochNorm (Kou et al. 2020): every BatchNorm uses the moving statistics per channel with
    probability ``stochnorm_p`` = 0.5 in training (same state dict keys as BatchNorm)."""

    method_name = "stochnorm"
    stochnorm_p: float = STOCHNORM_P

    def adapt_network(self, network: nn.Module, set_source: bool = True) -> None:
        count = convert_to_stochnorm(network, self.stochnorm_p)
        if set_source:
            self.print_to_log_file(f"StochNorm: {count} BatchNorm layer(s), p {self.stochnorm_p}")


class ClassificationTrainer_LPFT(ClassificationTrainer_vanilla):
    """LP-FT (Kumar et al. 2022): only the new head trains (linear probe; the rest frozen, BatchNorm
    statistics included) for ``lpft_frozen_fraction`` of the epochs, then everything."""

    method_name = "lpft"
    lpft_frozen_fraction: float = LPFT_FROZEN_FRACTION

    def on_epoch_start(self):
        frozen = self.current_epoch < frozen_epochs(self.num_epochs, self.lpft_frozen_fraction)
        head = self.head_prefix.rstrip(".")
        for name, child in self.network.named_children():
            if name != head:
                set_frozen(child, frozen)
        self.print_to_log_file(f"LP-FT: {'linear probe, everything but the head frozen' if frozen else 'fine-tuning everything'}")


class ClassificationTrainer_DiscriminativeLR(ClassificationTrainer_vanilla):
    """Discriminative learning rate: the pretrained layers at ``encoder_lr_factor`` (0.1) x the learning
    rate of the new head."""

    method_name = "dlr"
    encoder_lr_factor: float = ENCODER_LR_FACTOR

    def method_param_groups(self):
        head = self.head_prefix
        return discriminative_param_groups(self.network, lambda n: not n.startswith(head), self.encoder_lr_factor)


TRAINERS = {cls.__name__: cls for cls in (ClassificationTrainer, ClassificationTrainer_vanilla,
                                          ClassificationTrainer_L2SP, ClassificationTrainer_ACNorm_L2SP,
                                          ClassificationTrainer_DELTA, ClassificationTrainer_BSS,
                                          ClassificationTrainer_StochNorm, ClassificationTrainer_LPFT,
                                          ClassificationTrainer_DiscriminativeLR)}
#: -method name -> trainer
METHODS = {cls.method_name: cls for cls in TRAINERS.values()}


@torch.no_grad()
def predict_with_network(network: nn.Module, loader: DataLoader, device: torch.device,
                         loss: nn.Module | None = None, amp: bool = False, desc: str = "predicting",
                         show_progress: bool = True) -> tuple[np.ndarray, float]:
    network.eval()
    probabilities, losses, counts = [], [], []
    for images, labels in tqdm(loader, desc=desc, disable=not show_progress, leave=False, file=sys.stdout):
        images = images.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext():
            logits = network(images)
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the network produced NaN or infinite outputs: the checkpoint is "
                                     "corrupted or the images hold NaNs")
        probabilities.append(torch.softmax(logits, 1).cpu().numpy())
        labelled = labels >= 0
        if loss is not None and labelled.any():
            losses.append(loss(logits[labelled.to(device)], labels[labelled].to(device)).item())
            counts.append(int(labelled.sum()))
    mean_loss = float(np.average(losses, weights=counts)) if losses else float("nan")
    return np.concatenate(probabilities), mean_loss


def write_predictions(csv_file: str, identifiers: list[str], probabilities: np.ndarray) -> None:
    """CSV of image, predicted class, and one probability column per class (written atomically)."""
    tmp = csv_file + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prediction"] + [f"probability_{k}" for k in range(probabilities.shape[1])])
        for identifier, p in zip(identifiers, probabilities):
            writer.writerow([identifier, int(p.argmax())] + [f"{v:.6f}" for v in p])
    os.replace(tmp, csv_file)


def load_checkpoint(path: str) -> dict:
    """One of our checkpoints, read by :func:`~nnunet_acnorm.checkpoints.io.safe_torch_load`
    (``weights_only=True``); clear errors for anything else."""
    if not os.path.isfile(path):
        raise ClassificationInputError(f"checkpoint {path} does not exist")
    try:
        checkpoint = safe_torch_load(path)
    except CheckpointReadError as e:
        raise ClassificationInputError(f"cannot load {path} as a classification checkpoint ({e.detail or e.kind}); "
                                       "it is corrupted or not ours") from None
    if not isinstance(checkpoint, dict) or not {"network_weights", "config"} <= set(checkpoint):
        raise ClassificationInputError(f"{path} is not a checkpoint of nnUNetv2_acnorm_cls_train "
                                       "(no 'network_weights'/'config')")
    if checkpoint["config"].get("trainer_name") not in TRAINERS:
        raise ClassificationInputError(f"{path} names an unknown trainer "
                                       f"{checkpoint['config'].get('trainer_name')!r}")
    return checkpoint
