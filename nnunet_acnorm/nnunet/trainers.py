"""nnU-Net v2 trainers for fine-tuning: AC-Norm and the vanilla baseline, one small class per idea.

- :class:`nnUNetTrainerFinetune`: vanilla fine-tuning, nnU-Net's planned network with plain norms
  and the fine-tuning schedule (the fair baseline).
- :class:`nnUNetTrainerACNorm`: the same, with every affine norm of the planned network as AC-Norm
  (InstanceNorm in default plans, BatchNorm/GroupNorm where the plans say so).
- :class:`nnUNetTrainerFinetuneBN` / :class:`nnUNetTrainerACNormBN`: the same on a BatchNorm network
  (nnU-Net's ``nnUNetTrainerBN``), the paper's setting.
- ``..._1epoch``, ``..._5epochs``, ...: shorter or longer schedules of every fine-tuning trainer,
  derived in :mod:`~nnunet_acnorm.nnunet.schedule_trainers`.

Use with nnU-Net's pretraining workflow: ``nnUNetv2_train D C F -tr nnUNetTrainerACNorm
-pretrained_weights checkpoint_final.pth``. The AC-Norm network is built with its source affines
"not set", so its state dict has exactly the plain network's keys: nnU-Net's stock loader accepts
a plain checkpoint of the same architecture and its norm affines become source and target.
"""
from __future__ import annotations

import os
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch._dynamo import OptimizedModule

from nnunet_acnorm.networks.parts import encoder_prefixes, is_encoder_key
from nnunet_acnorm.norms import AUTO_TAU, acnorm_modules, acnorm_sync_batchnorm, convert_to_acnorm
from nnunet_acnorm.norms.conversion import is_feature_norm, not_applicable
from nnunet_acnorm.norms.modules import SOURCE_KEYS, describe_temperatures
from nnunet_acnorm.nnunet.pretrained import (NnunetCheckpointError, PretrainedWeightsError, claim_log_file,
                                                     continue_training_from_argv,
                                                     describe_missing_sources, load_nnunet_checkpoint,
                                                     missing_source_layers, pretrained_weights_from_argv,
                                                     read_pretrained_weights, remove_run_output,
                                                     route_pretrained_loading, set_strict_source)
from nnunet_acnorm.finetuning.schedules import WarmupPolyLRScheduler
from nnunet_acnorm.nnunet.trained_checkpoints import TrainedCheckpointError, check_trained_checkpoint
from nnunet_acnorm.nnunet.trainer_entry import install_entry_boundary
from nnunet_acnorm.nnunet.training_guards import (TrainingStartError, TrainingStoppedError, acquire_fold_lock,
                                                  check_command_line, check_results_writable, fold_folder,
                                                  non_finite_state)
from nnunet_acnorm.outputs import RunLockedError
from nnunet_acnorm.nnunet.seeding import (SEED_ENV, apply_cpu_thread_limit, ddp_rank, rank_seed, resolve_seed,
                                            seed_everything, seeded_augmenters)


#: default temperature of nnUNetTrainerACNorm / nnUNetTrainerACNormBN: calibrated per layer from the
#: pretrained affines (norms.functional.calibrated_tau). Chosen over the paper's fixed 1.0 on the
#: bundled CT -> MR transfer of the earlier (strip) datasets by experiments/finetune_experiment.py; docs/experiments.md ("The
#: temperature", "Results") has the numbers, including the second transfer that was not used for the
#: choice. The _tau1 / _tauAuto trainers fix it; other values: a subclass with
#: build_network_architecture = _acnorm_builder(..., tau)
ACNORM_TAU = AUTO_TAU


class nnUNetTrainerFinetune(nnUNetTrainer):
    """Vanilla fine-tuning: nnU-Net's network and training, with a fine-tuning recipe.

    Recipe (class attributes, override in a subclass; measured in docs/experiments.md):

    - SGD with Nesterov momentum 0.99 and weight decay as nnU-Net, peak learning rate
      ``finetune_initial_lr`` = 1e-2 (nnU-Net's), reached by a linear warm-up over
      ``warmup_fraction`` = 10 % of the epochs (the segmentation head starts random; its first,
      large gradients would otherwise flow into the pretrained layers at full rate), then nnU-Net's
      poly decay to 0 over ``finetune_num_epochs`` = 250 epochs;
    - ``finetune_oversample_foreground`` = 1.0: every patch of a batch is centred on a foreground
      voxel (nnU-Net: a third of them). From a checkpoint of another task the fresh head first
      predicts background everywhere; with few foreground patches the fine-tuning stays in that
      state for most of the schedule (with peak lr 1e-3 and nnU-Net's 0.33 oversampling, and the
      success counts of this recipe: docs/experiments.md, "The recipe").

    ``iterations_per_epoch`` / ``val_iterations_per_epoch`` (None: nnU-Net's 250 / 50) exist for
    short demos and tests.

    ``pretrained_parts`` says what ``-pretrained_weights`` loads: ``"all"`` (nnU-Net's rule: every
    key but the segmentation layers) or ``"encoder"`` (encoder and stem; decoder and heads fresh, as
    nnU-Net's ``PretrainedTrainer``): the ``_encoderOnly`` variants. The file is read once, with
    ``weights_only=True`` (see :mod:`nnunet_acnorm.nnunet.pretrained`).

    Bad input (a file, the command line, a fold another run holds, non-finite weights) raises an
    :class:`~nnunet_acnorm.errors.InputError`; the entry methods nnU-Net calls turn it into the
    one-line exit (:mod:`nnunet_acnorm.nnunet.trainer_entry`, installed on every subclass).
    """

    finetune_num_epochs: int = 250
    finetune_initial_lr: float = 1e-2
    warmup_fraction: float = 0.1
    finetune_oversample_foreground: float = 1.0
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    #: seed of torch/numpy/random and the augmentation workers (None: unseeded, as nnU-Net);
    #: the environment variable ``nnUNet_acnorm_seed`` overrides it (see nnunet/seeding.py)
    seed: int | None = None
    #: what -pretrained_weights loads: "all" or "encoder" (nnunet/pretrained.py: PRETRAINED_PARTS)
    pretrained_parts: str = "all"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        install_entry_boundary(cls)  # the subclass's own entry methods end in the one-line exit too

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # before nnU-Net creates the fold folder: a read-only nnUNet_results is one line
        check_results_writable(fold_folder(type(self).__name__, plans, configuration, fold))
        seed = resolve_seed(type(self).seed)
        if seed is not None:  # before anything is built: the fresh head is the same in every run
            seed_everything(rank_seed(seed, ddp_rank()))  # DDP: each rank draws its own patches
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seed = seed  # an instance attribute: nnU-Net's debug.json records it
        if self.device.type == "cpu":
            apply_cpu_thread_limit()
        self.num_epochs = self.finetune_num_epochs
        self.initial_lr = self.finetune_initial_lr
        self.oversample_foreground_percent = self.finetune_oversample_foreground
        if self.iterations_per_epoch is not None:
            self.num_iterations_per_epoch = self.iterations_per_epoch
        if self.val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = self.val_iterations_per_epoch
        self._fold_lock = None
        try:
            check_command_line(self.output_folder)
        except TrainingStartError as e:
            self._refuse(str(e))

    def print_to_log_file(self, *args, also_print_to_console: bool = True, add_timestamp: bool = True):
        if getattr(self, "local_rank", 0) == 0 and not getattr(self, "_log_file_claimed", False):
            self.log_file = claim_log_file(self.log_file)  # never another run's log of the same second
            self._log_file_claimed = True
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console, add_timestamp=add_timestamp)

    @property
    def warmup_epochs(self) -> int:
        return min(int(round(self.warmup_fraction * self.num_epochs)), self.num_epochs - 1)

    def initialize(self):
        super().initialize()
        network, load = self._plain_network(), None
        pretrained = pretrained_weights_from_argv()
        if pretrained is not None:
            # nnUNetv2_train -pretrained_weights: read and check the file once, here (weights_only=True)
            try:
                load = read_pretrained_weights(network, pretrained, self.plans_manager.plans_name,
                                               self.pretrained_parts)
            except PretrainedWeightsError:
                # nothing of the refused start stays behind: its log file and the folders it created
                remove_run_output(self.log_file, self.output_folder, os.environ.get("nnUNet_results"))
                raise
            # the only path that takes plain checkpoints: their norm affines become the AC-Norm source
            set_strict_source(network, False)
        # nnU-Net's run_training loads -pretrained_weights next: for this network it puts in what was read
        # here (or, called as a Python API, reads the file once, as safely), never torch.load(weights_only=False)
        route_pretrained_loading(network, load, self.print_to_log_file, self.pretrained_parts,
                                 self.plans_manager.plans_name)
        if load is not None and load.unpretrained_norms:
            self.print_to_log_file(
                f"WARNING: {len(load.unpretrained_norms)} AC-Norm layer(s) (first: {load.unpretrained_norms[0]}) "
                "have affines in this checkpoint that nnUNetv2_acnorm_import initialised fresh (not in the "
                "pretrained file): their source is that initialisation. The _encoderOnly trainers load only "
                "the encoder and keep the decoder's norms plain")
        self._lock_fold()

    # -- one run per fold, refusals that leave nothing behind, non-finite stop -------------------
    def _lock_fold(self) -> None:
        """One nnUNetv2_train of this fold at a time (rank 0 holds the lock for a DDP run)."""
        if self.local_rank != 0 or getattr(self, "_fold_lock", None) is not None:
            return
        try:
            self._fold_lock = acquire_fold_lock(self.output_folder, f"fold_{self.fold}", self.print_to_log_file)
        except RunLockedError as e:
            self._refuse(str(e))

    def _refuse(self, message: str) -> NoReturn:
        """Refuse the run (:class:`TrainingStartError`, one line at the entry boundary); what this
        run wrote (its log file, folders it created, its lock) goes first."""
        if getattr(self, "_fold_lock", None) is not None:
            self._fold_lock.release()
        if self.local_rank == 0:
            remove_run_output(self.log_file, self.output_folder, os.environ.get("nnUNet_results"))
        raise TrainingStartError(message) from None

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        problem = non_finite_state(self.logger.get_value("train_losses", step=self.current_epoch),
                                   self._plain_network().state_dict(), self.current_epoch)
        if problem is not None:
            self.print_to_log_file(f"ERROR: {problem}")
            self._stop_dataloaders()
            if getattr(self, "_fold_lock", None) is not None:
                self._fold_lock.release()
            raise TrainingStoppedError(problem)

    def _stop_dataloaders(self) -> None:
        for loader in (self.dataloader_train, self.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()

    def on_train_start(self):
        super().on_train_start()
        if self.seed is not None:
            ranks = (f"; DDP rank {self.local_rank} draws with seed {rank_seed(self.seed, self.local_rank)} (every "
                     "rank its own patches)") if self.is_ddp else ""
            self.print_to_log_file(f"Seed {self.seed} ({SEED_ENV} or the class attribute seed): torch, numpy, "
                                   f"random and the augmentation workers are seeded{ranks}")

    def get_dataloaders(self):
        if self.seed is None:
            return super().get_dataloaders()
        with seeded_augmenters(rank_seed(self.seed, self.local_rank)):
            return super().get_dataloaders()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        lr_scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
        self.print_to_log_file(f"Fine-tuning schedule: linear warm-up over {self.warmup_epochs} epoch(s) to "
                               f"lr {self.initial_lr}, then poly decay over {self.num_epochs} epochs")
        return optimizer, lr_scheduler

    def _plain_network(self) -> nn.Module:
        """The network without DDP / torch.compile wrappers."""
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    # -- checkpoints: safe loading, strict AC-Norm reload, fallback, atomic writes --------------
    #: the order in which nnUNetv2_train --c looks for a checkpoint (run_training.maybe_load_checkpoint)
    continue_order = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file in the same folder and renamed onto
        ``filename``: a kill during the save leaves the previous checkpoint, never a truncated one.
        Under DDP only rank 0 writes (as nnU-Net); the other ranks touch nothing, not even rank 0's
        temporary file in the shared folder."""
        if self.local_rank != 0:
            return
        tmp = f"{filename}.tmp"
        try:
            super().save_checkpoint(tmp)
            if os.path.isfile(tmp):
                os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """What nnU-Net's ``load_checkpoint`` does, but

        - the file is read with ``torch.load(weights_only=True)`` (plus the numpy scalars of the
          logs): a checkpoint whose pickle would run code is refused, not executed;
        - every AC-Norm layer must find its ``source_weight``/``source_bias`` (strict reload);
        - with ``--c``, a truncated or corrupted checkpoint is named in one line and the next one in
          nnU-Net's order (final -> latest -> best) is used, as a user would do by hand;
        - any other problem ends the command with one line naming the file.
        """
        if not self.was_initialized:
            self.initialize()
        name = type(self).__name__
        if isinstance(filename_or_checkpoint, str):
            filename, checkpoint = self._read_own_checkpoint(filename_or_checkpoint)
        else:
            filename, checkpoint = "the checkpoint", filename_or_checkpoint
        try:  # written by this trainer, finite weights: else refused before anything is loaded or run
            check_trained_checkpoint(filename, checkpoint, name, f"-tr ({name})")
        except TrainedCheckpointError as e:
            self._refuse(str(e))
        network = self._plain_network()
        own_keys = network.state_dict().keys()
        state_dict = {}
        for key, value in checkpoint["network_weights"].items():
            if key not in own_keys and key.startswith("module."):  # nnU-Net's DataParallel heuristic
                key = key[7:]
            state_dict[key] = value
        n_layers = set_strict_source(network, True)
        missing = missing_source_layers(network, state_dict)
        if n_layers and missing:
            self._refuse(describe_missing_sources(filename, missing, n_layers, name))
        try:
            init_args, current_epoch = checkpoint["init_args"], checkpoint["current_epoch"]
            logging, best_ema = checkpoint["logging"], checkpoint["_best_ema"]
            optimizer_state = checkpoint["optimizer_state"]
        except KeyError as e:
            self._refuse(f"{filename} has no entry {e}: not a training checkpoint written by "
                         "nnUNetv2_train (a pretrained file goes to -pretrained_weights)")
        try:
            network.load_state_dict(state_dict)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            self._refuse(f"{filename}: the weights do not fit the network of {name}: "
                         f"{lines[1] if len(lines) > 1 else lines[0] if lines else e}")
        self.my_init_kwargs = init_args
        self.current_epoch = current_epoch
        self.logger.load_checkpoint(logging)
        self._best_ema = best_ema
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as e:
            self._refuse(f"{filename}: its optimizer state does not fit this trainer's optimizer ({e})")
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def _read_own_checkpoint(self, filename: str) -> tuple[str, dict]:
        """(file actually read, checkpoint): ``filename``, or with --c the next readable one in
        nnU-Net's order when ``filename`` is truncated or corrupted."""
        name = type(self).__name__
        try:
            return filename, load_nnunet_checkpoint(filename, map_location=self.device)
        except NnunetCheckpointError as e:
            error = e
        base = os.path.basename(filename)
        unreadable = error.kind in ("corrupt", "empty", "format")
        if unreadable and continue_training_from_argv() and base in self.continue_order:
            for fallback in self.continue_order[self.continue_order.index(base) + 1:]:
                candidate = os.path.join(os.path.dirname(filename), fallback)
                if not os.path.isfile(candidate):
                    continue
                try:
                    checkpoint = load_nnunet_checkpoint(candidate, map_location=self.device)
                except NnunetCheckpointError as e:
                    self.print_to_log_file(f"WARNING: {candidate} cannot be used either: {e}")
                    continue
                self.print_to_log_file(f"WARNING: {error}. Continuing from {fallback} instead, the next checkpoint "
                                       f"in nnU-Net's order ({' -> '.join(self.continue_order)})")
                return candidate, checkpoint
            advice = "; no other checkpoint of this fold can be read: start the training again without --c"
        elif error.kind == "pickle":
            advice = (". Find out who wrote it; to continue from the previous checkpoint, move it away "
                      f"(nnU-Net's order: {' -> '.join(self.continue_order)})")
        elif unreadable and base == "checkpoint_final.pth":
            advice = "; --val needs a readable checkpoint_final.pth: continue the training with --c"
        else:
            advice = ""
        self._refuse(f"{error}{advice}")


install_entry_boundary(nnUNetTrainerFinetune)  # (__init_subclass__ wraps its subclasses)


class _ACNormMixin:
    """AC-Norm on top of a fine-tuning trainer; the network class comes from ``_base_builder``."""

    def initialize(self):
        super().initialize()
        network = self._plain_network()
        n_layers = len(acnorm_modules(network))
        if n_layers == 0:
            feature_norms = sum(is_feature_norm(m) for m in network.modules())
            remove_run_output(self.log_file, self.output_folder, os.environ.get("nnUNet_results"))
            raise TrainingStartError(not_applicable(feature_norms, f"the planned network ({type(network).__name__})"))
        if self.is_ddp:
            n_synced = acnorm_sync_batchnorm(network)
            if n_synced:
                self.print_to_log_file(f"AC-Norm: {n_synced} AC-BatchNorm layer(s) normalise with the batch statistics "
                                       f"of all {dist.get_world_size()} ranks (as nnU-Net's SyncBatchNorm)")
        self._check_optimizer_has_no_source_affines()
        self.print_to_log_file(f"AC-Norm: {n_layers} norm layer(s)" + (
            "; the encoder's only: the decoder's norms stay plain (its weights start fresh, so they have no pretrained "
            "source)" if self.pretrained_parts == "encoder" else ""))

    def _check_optimizer_has_no_source_affines(self) -> None:
        source_ids = {id(getattr(m, key)) for m in acnorm_modules(self._plain_network()).values()
                      for key in SOURCE_KEYS}
        held = [p for group in self.optimizer.param_groups for p in group["params"] if id(p) in source_ids]
        if held:
            raise RuntimeError("the optimizer holds AC-Norm source affines; they must stay frozen")

    def on_train_start(self):
        super().on_train_start()
        layers = acnorm_modules(self._plain_network())
        unset = [name for name, m in layers.items() if not m.source_is_set]
        if unset:
            banner = "#" * 100
            self.print_to_log_file(
                f"\n{banner}\nWARNING: {len(unset)} of {len(layers)} AC-Norm layers have no source affines: this "
                "training was started without -pretrained_weights.\nAC-Norm needs a pretrained source; the "
                "current (random-init) affines are frozen as the source now, which makes this run a plain\n"
                "training with an extra recalibration, not AC-Norm fine-tuning. Start it with\n"
                "  nnUNetv2_train ... -tr " + type(self).__name__ + " -pretrained_weights /path/checkpoint_final.pth"
                f"\n{banner}\n", add_timestamp=False)
            for name in unset:
                layers[name].set_source()
        else:
            self.print_to_log_file(f"AC-Norm: source affines of all {len(layers)} layers are set (frozen)")
        self.print_to_log_file(f"AC-Norm temperature: {describe_temperatures(layers.values())}")


def _acnorm_builder(base_builder, tau: float | str):
    """A ``build_network_architecture`` (callable on the class, as nnU-Net's predictor does) that
    builds ``base_builder``'s network and turns every affine norm into AC-Norm with temperature
    ``tau``, source not set; with the trainer's ``pretrained_parts = "encoder"`` only the encoder's
    norms (the decoder starts fresh: its norms have no pretrained source and stay plain)."""

    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = base_builder(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                               enable_deep_supervision)
        include = None
        if getattr(cls, "pretrained_parts", "all") == "encoder":
            prefixes = encoder_prefixes(network)
            include = lambda name: is_encoder_key(name, prefixes)  # noqa: E731
        convert_to_acnorm(network, tau=tau, set_source=False, include=include)
        set_strict_source(network, True)  # --c, --val, predict, fold: a checkpoint must hold the source affines
        return network

    return classmethod(build_network_architecture)


def _bn_builder(plans_manager: PlansManager, configuration_manager: ConfigurationManager, num_input_channels: int,
                num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
    return nnUNetTrainerBN.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                      num_output_channels, enable_deep_supervision)


class nnUNetTrainerACNorm(_ACNormMixin, nnUNetTrainerFinetune):
    """Fine-tuning with AC-Norm: the planned network with every affine norm as AC-Norm."""

    build_network_architecture = _acnorm_builder(nnUNetTrainer.build_network_architecture, ACNORM_TAU)


class nnUNetTrainerFinetuneBN(nnUNetTrainerFinetune):
    """Vanilla fine-tuning of a BatchNorm network (nnU-Net's ``nnUNetTrainerBN`` architecture)."""

    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerACNormBN(_ACNormMixin, nnUNetTrainerFinetune):
    """The paper's setting: a BatchNorm network (as ``nnUNetTrainerBN``) with AC-BatchNorm."""

    build_network_architecture = _acnorm_builder(_bn_builder, ACNORM_TAU)


# -- temperatures --------------------------------------------------------------------------------
class nnUNetTrainerACNorm_tau1(nnUNetTrainerACNorm):
    """AC-Norm with the paper's fixed temperature tau = 1 in every layer."""

    build_network_architecture = _acnorm_builder(nnUNetTrainer.build_network_architecture, 1.0)


class nnUNetTrainerACNorm_tauAuto(nnUNetTrainerACNorm):
    """AC-Norm with a temperature per layer, calibrated from its pretrained affines (``tau="auto"``)."""

    build_network_architecture = _acnorm_builder(nnUNetTrainer.build_network_architecture, AUTO_TAU)


class nnUNetTrainerACNormBN_tau1(nnUNetTrainerACNormBN):
    build_network_architecture = _acnorm_builder(_bn_builder, 1.0)


class nnUNetTrainerACNormBN_tauAuto(nnUNetTrainerACNormBN):
    build_network_architecture = _acnorm_builder(_bn_builder, AUTO_TAU)


# -- encoder-only loading (nnU-Net's PretrainedTrainer: encoder + stem loaded, decoder fresh) -------
class nnUNetTrainerFinetune_encoderOnly(nnUNetTrainerFinetune):
    """Vanilla fine-tuning from the pretrained encoder and stem; decoder and heads start fresh."""

    pretrained_parts = "encoder"


class nnUNetTrainerACNorm_encoderOnly(nnUNetTrainerACNorm):
    """AC-Norm on the pretrained encoder; the fresh decoder keeps plain norms (no pretrained source)."""

    pretrained_parts = "encoder"


class nnUNetTrainerFinetuneBN_encoderOnly(nnUNetTrainerFinetuneBN):
    pretrained_parts = "encoder"


class nnUNetTrainerACNormBN_encoderOnly(nnUNetTrainerACNormBN):
    pretrained_parts = "encoder"


#: every trainer of this module, by name (the shim folder exposes these to nnU-Net; the package's
#: registry of all trainers is :mod:`~nnunet_acnorm.nnunet.trainer_registry`)
TRAINERS = {name: obj for name, obj in dict(globals()).items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and name.startswith("nnUNetTrainer")
            and obj.__module__ == __name__}


__all__ = list(TRAINERS)
