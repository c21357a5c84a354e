"""nnU-Net v2 trainers for the fine-tuning baselines of the AC-Norm paper's comparison, one small
class per idea, on the shared fine-tuning recipe of :class:`nnUNetTrainerFinetune` (schedule,
seeding, safe checkpoints). The methods themselves are :mod:`nnunet_acnorm.finetuning`; formulas,
defaults and the choices made for U-Nets are in docs/baselines.md.

==================================  ==============================================================
trainer                             method (class attributes = hyperparameters)
==================================  ==============================================================
``nnUNetTrainerL2SP``               L2-SP: ``l2sp_alpha`` = ``l2sp_beta`` = 0.01, weight decay 0
``nnUNetTrainerDELTA``              DELTA: ``delta_alpha`` = 0.01 on the encoder stage outputs,
                                    ``delta_beta`` = 0.01 on the new weights, weight decay 0
``nnUNetTrainerBSS``                BSS: ``bss_k`` = 1, ``bss_eta`` = 1e-3 on the pooled bottleneck
``nnUNetTrainerStochNormBN``        StochNorm on the BatchNorm network: ``stochnorm_p`` = 0.5
``nnUNetTrainerLPFT``               encoder frozen for ``lpft_frozen_fraction`` = 10 % of the epochs
``nnUNetTrainerDiscriminativeLR``   encoder lr = ``encoder_lr_factor`` (0.1) x decoder lr
``nnUNetTrainerSPD``                SPD: ``spd_lambda`` = 1 after each optimiser step, weight decay 0
``nnUNetTrainerPretrainedRecipe``   nnU-Net master's ``PretrainedTrainer`` recipe (lr 1e-3, 5 % warm-up,
                                    1000 epochs, batch 2, no deep supervision, encoder loaded);
                                    ``..._fromScratch``: the same at lr 1e-2 without pretrained weights
``nnUNetTrainerACNorm_<method>``    the same on top of AC-Norm (L2SP, SPD, BSS, LPFT, DiscriminativeLR)
``nnUNetTrainer<method>BN``         the same on the BatchNorm network (as ``nnUNetTrainerBN``)
==================================  ==============================================================

The penalties are added to nnU-Net's loss by a wrapper around ``self.loss`` that is active only
while the network is in training mode (train steps; nnU-Net's validation steps and prediction do
not see it), so nnU-Net's ``train_step`` (deep supervision, AMP on CUDA, gradient clipping) is
unchanged; the logged train loss includes the penalty.

State that is not in the network (L2-SP's anchor w0, DELTA's frozen copy of the pretrained
encoder) goes into one extra checkpoint entry, ``finetuning_state`` (tensors and numbers only, so
``torch.load(weights_only=True)`` reads it), is restored exactly by ``--c``, and is ignored by
``nnUNetv2_predict``, which loads ``network_weights`` only: the network's state dict has exactly
the keys of the plain (or AC-Norm) network.
"""
from __future__ import annotations

import copy
import re

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_acnorm.checkpoints.io import atomic_torch_save
from nnunet_acnorm.finetuning import (BSS_ETA, BSS_K, DELTA_ALPHA, DELTA_BETA, ENCODER_LR_FACTOR, L2SP_ALPHA,
                                      L2SP_BETA, LPFT_FROZEN_FRACTION, SPD_LAMBDA, STOCHNORM_P, DELTARegulariser,
                                      FeatureRecorder, L2SPRegulariser, PretrainedTrainerLRScheduler,
                                      ScaledWarmupPolyLRScheduler, SelectiveProjectionDecay, bss_penalty,
                                      convert_to_stochnorm, discriminative_param_groups, frozen_epochs, set_frozen,
                                      new_weights_penalty, stage_modules)
from nnunet_acnorm.finetuning.lpft import rewrap_ddp
from nnunet_acnorm.nnunet import trainers as _base
from nnunet_acnorm.nnunet.trainers import (_bn_builder, nnUNetTrainerACNorm, nnUNetTrainerFinetune)
from nnunet_acnorm.nnunet.pretrained import continue_training_from_argv, pretrained_weights_from_argv

#: the checkpoint entry that holds a method's state (absent for methods without state)
STATE_KEY = "finetuning_state"
#: parameters nnU-Net's -pretrained_weights loader does not transfer (run/load_pretrained_weights.py)
NEW_PARAMETER_MARKERS = (".seg_layers.",)


def is_new_parameter(name: str) -> bool:
    """Whether parameter ``name`` of an nnU-Net network has no pretrained value (the seg layers)."""
    return any(marker in f".{name}" for marker in NEW_PARAMETER_MARKERS)


def is_encoder_parameter(name: str) -> bool:
    return name.startswith("encoder.")


class PenalisedLoss(nn.Module):
    """``loss(...) + penalty()`` while ``active()`` (the network in training mode), else ``loss(...)``."""

    def __init__(self, loss: nn.Module, penalty, active):
        super().__init__()
        self.loss = loss
        self._penalty, self._active = penalty, active

    def forward(self, *args, **kwargs):
        value = self.loss(*args, **kwargs)
        if self._active():
            value = value + self._penalty()
        return value


class _FinetuningMethodMixin:
    """What every baseline trainer shares: the penalty hook, and the method's state in the
    checkpoint entry ``finetuning_state`` (saved with every checkpoint, restored by ``--c``)."""

    #: the method keeps state that --c must restore (anchor, frozen copy)
    method_has_state: bool = False
    #: the optimizer's weight decay (None: nnU-Net's 3e-5); 0 where a penalty replaces it
    method_weight_decay: float | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.method_weight_decay is not None:
            self.weight_decay = self.method_weight_decay
        self._restored_method_state: dict | None = None

    # -- what a method defines -------------------------------------------------------------------
    def setup_method(self, state: dict | None) -> None:
        """Build the method's pieces on the network, from ``state`` (--c) or from the current,
        pretrained weights (``state`` None). Called at the start of training."""

    def method_penalty(self) -> torch.Tensor | None:
        """The penalty added to the loss of a training step (None: no penalty)."""
        return None

    def method_state(self) -> dict:
        return {}

    def describe_method(self) -> str:
        return ""

    # -- shared machinery ------------------------------------------------------------------------
    @property
    def started_from_pretrained(self) -> bool:
        return pretrained_weights_from_argv() is not None

    def on_train_start(self):
        super().on_train_start()
        restored = self._restored_method_state
        if restored is None and self.method_has_state and not self.started_from_pretrained:
            banner = "#" * 100
            self.print_to_log_file(
                f"\n{banner}\nWARNING: {type(self).__name__} was started without -pretrained_weights: its reference "
                "(the pretrained weights) is the network's random initialisation now.\n"
                f"{banner}\n", add_timestamp=False)
        self.setup_method(restored)
        if type(self).method_penalty is not _FinetuningMethodMixin.method_penalty:
            network = self._plain_network()
            self.loss = PenalisedLoss(self.loss, self.method_penalty, lambda: network.training)
        what = self.describe_method()
        if what:
            self.print_to_log_file(f"{what}{' (state restored from the checkpoint)' if restored else ''}")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint dict plus ``finetuning_state``, written atomically as
        :meth:`nnUNetTrainerFinetune.save_checkpoint` does."""
        state = self.method_state() if self.method_has_state else {}
        if not state or self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        mod = self._plain_network()
        checkpoint = {
            "network_weights": mod.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            STATE_KEY: state,
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            filename, checkpoint = self._read_own_checkpoint(filename_or_checkpoint)
        else:
            filename, checkpoint = "the checkpoint", filename_or_checkpoint
        super().load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if self.method_has_state and continue_training_from_argv() and not state:
            raise SystemExit(f"{type(self).__name__}: error: {filename} has no '{STATE_KEY}' entry: the method's "
                             "reference (pretrained anchor / frozen copy) cannot be recovered, so --c cannot continue "
                             "this training exactly; a checkpoint written by this trainer always holds it")
        self._restored_method_state = state or None


# -- L2-SP ------------------------------------------------------------------------------------------
class _L2SPMixin(_FinetuningMethodMixin):
    """L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 on the pretrained weights, beta/2 ||w||^2 on the
    new ones (the segmentation layers); the optimizer's weight decay is 0 (the penalty replaces it)."""

    l2sp_alpha: float = L2SP_ALPHA
    l2sp_beta: float = L2SP_BETA
    method_has_state = True
    method_weight_decay = 0.0

    def setup_method(self, state):
        network = self._plain_network()
        if state is not None:
            self.l2sp = L2SPRegulariser.from_state(network, state["l2sp"], alpha=self.l2sp_alpha,
                                                   beta=self.l2sp_beta)
        else:
            self.l2sp = L2SPRegulariser.from_network(network, is_new_parameter, alpha=self.l2sp_alpha,
                                                     beta=self.l2sp_beta)

    def method_penalty(self):
        return self.l2sp()

    def method_state(self):
        return {"l2sp": self.l2sp.state()}

    def describe_method(self):
        return (f"L2-SP: alpha {self.l2sp_alpha} on {len(self.l2sp.anchored_names)} pretrained parameter tensors, "
                f"beta {self.l2sp_beta} on {len(self.l2sp.new_names)} new ones; weight decay {self.weight_decay}")


# -- DELTA ------------------------------------------------------------------------------------------
class _DELTAMixin(_FinetuningMethodMixin):
    """DELTA (Li et al. 2019): alpha x the mean squared distance of the encoder stage outputs to
    those of a frozen copy of the pretrained encoder (uniform channel attention), plus beta/2 ||w||^2
    on the new weights; weight decay 0."""

    delta_alpha: float = DELTA_ALPHA
    delta_beta: float = DELTA_BETA
    method_has_state = True
    method_weight_decay = 0.0

    def setup_method(self, state):
        network = self._plain_network()
        stages = stage_modules(network)
        if not stages[0].startswith("encoder."):
            raise RuntimeError(f"{type(self).__name__}: the network has no nnU-Net encoder")
        reference = None if state is None else state["delta"]["reference"]
        self.delta = DELTARegulariser(network, "encoder", stages, alpha=self.delta_alpha,
                                      reference_state=reference)
        self._new_params = [p for n, p in network.named_parameters() if is_new_parameter(n)]

    def method_penalty(self):
        return self.delta() + new_weights_penalty(self._new_params, self.delta_beta)

    def method_state(self):
        return {"delta": {"reference": self.delta.reference_state(), "alpha": self.delta_alpha}}

    def describe_method(self):
        mib = self.delta.reference_bytes() / 2 ** 20
        return (f"DELTA: alpha {self.delta_alpha} on {len(self.delta.stage_names)} encoder stage outputs (uniform "
                f"channel attention), beta {self.delta_beta} on the new weights; frozen copy of the encoder "
                f"{mib:.1f} MiB; weight decay {self.weight_decay}")


# -- BSS --------------------------------------------------------------------------------------------
class _BSSMixin(_FinetuningMethodMixin):
    """BSS (Chen et al. 2019): eta x the k smallest squared singular values of the batch's bottleneck
    features (the last encoder stage, averaged over its positions: one row per sample)."""

    bss_k: int = BSS_K
    bss_eta: float = BSS_ETA

    def setup_method(self, state):
        network = self._plain_network()
        self._bss_stage = stage_modules(network)[-1]
        self.bss_features = FeatureRecorder({self._bss_stage: network.get_submodule(self._bss_stage)})
        #: DDP: every rank's batch size (nnU-Net splits the batch over the ranks); the penalty is that
        #: of the global batch, gathered from all ranks (finetuning/bss.py)
        self._bss_rows = None
        if self.is_ddp:
            self._bss_rows = [None] * dist.get_world_size()
            dist.all_gather_object(self._bss_rows, int(self.batch_size))
        if sum(self._bss_rows or [self.batch_size]) < 2:
            self.print_to_log_file("WARNING: BSS needs at least 2 samples per batch (all GPUs together); with 1 the "
                                   "smallest singular value is the feature norm, and BSS a feature-norm penalty")

    def method_penalty(self):
        features = self.bss_features.features.pop(self._bss_stage)
        return bss_penalty(features, self.bss_k, self.bss_eta, rows_per_rank=self._bss_rows)

    def describe_method(self):
        where = f", on the batches of all {len(self._bss_rows)} ranks together" if self._bss_rows else ""
        return (f"BSS: eta {self.bss_eta}, k {self.bss_k} smallest singular values of the pooled "
                f"{self._bss_stage}{where}")


# -- StochNorm --------------------------------------------------------------------------------------
def _stochnorm_builder(base_builder, p: float):
    """A ``build_network_architecture`` that turns every BatchNorm of ``base_builder``'s network into
    a StochNorm with probability ``p`` (same state dict keys; plain BatchNorm in eval mode)."""

    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        network = base_builder(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                               enable_deep_supervision)
        if convert_to_stochnorm(network, p) == 0:
            raise RuntimeError("StochNorm: the network has no BatchNorm; use nnUNetTrainerStochNormBN (a BatchNorm "
                               "network) or plans with BatchNorm")
        return network

    return staticmethod(build_network_architecture)


class nnUNetTrainerStochNormBN(_FinetuningMethodMixin, nnUNetTrainerFinetune):
    """StochNorm (Kou et al. 2020) on the BatchNorm network (as ``nnUNetTrainerBN``): in training each
    channel uses the moving statistics with probability ``stochnorm_p`` = 0.5. A subclass with another
    p sets ``build_network_architecture = _stochnorm_builder(_bn_builder, p)``."""

    stochnorm_p: float = STOCHNORM_P
    build_network_architecture = _stochnorm_builder(_bn_builder, STOCHNORM_P)

    def initialize(self):
        super().initialize()
        if self.is_ddp:  # nnU-Net's SyncBatchNorm conversion would silently replace the StochNorms
            raise RuntimeError(f"{type(self).__name__}: StochNorm is not available with DDP (-num_gpus > 1)")

    def describe_method(self):
        from nnunet_acnorm.finetuning.stochnorm import _StochNormMixin
        layers = [m for m in self._plain_network().modules() if isinstance(m, _StochNormMixin)]
        return f"StochNorm: {len(layers)} BatchNorm layer(s), p {layers[0].p if layers else '-'}"


# -- LP-FT and discriminative learning rates ---------------------------------------------------------
class _LPFTMixin(_FinetuningMethodMixin):
    """LP-FT (Kumar et al. 2022): the encoder is frozen (parameters and BatchNorm statistics) for the
    first ``lpft_frozen_fraction`` of the epochs, the decoder and head train; then everything."""

    lpft_frozen_fraction: float = LPFT_FROZEN_FRACTION

    @property
    def lpft_frozen_epochs(self) -> int:
        return frozen_epochs(self.num_epochs, self.lpft_frozen_fraction)

    #: under DDP: whether the current wrapper was built with the encoder frozen (nnU-Net builds it
    #: with every parameter trainable)
    _lpft_ddp_frozen: bool = False

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # network.train(), learning rate
        frozen = self.current_epoch < self.lpft_frozen_epochs
        set_frozen(self._plain_network().encoder, frozen)
        if self.is_ddp and frozen != self._lpft_ddp_frozen:
            self.network = rewrap_ddp(self.network)  # DDP waits for the gradients of what it was built with
            self._lpft_ddp_frozen = frozen
        if frozen or self.current_epoch == self.lpft_frozen_epochs:
            self.print_to_log_file(f"LP-FT: encoder {'frozen' if frozen else 'released: fine-tuning everything'}")

    def on_train_end(self):
        set_frozen(self._plain_network().encoder, False)
        super().on_train_end()

    def describe_method(self):
        return f"LP-FT: encoder frozen for the first {self.lpft_frozen_epochs} of {self.num_epochs} epochs"


class _DiscriminativeLRMixin(_FinetuningMethodMixin):
    """Discriminative learning rate: the encoder at ``encoder_lr_factor`` x the learning rate of the
    decoder and head, through the whole schedule (warm-up and poly decay scale both)."""

    encoder_lr_factor: float = ENCODER_LR_FACTOR

    def configure_optimizers(self):
        network = self.network  # nnU-Net calls this before the DDP wrap, possibly after torch.compile
        network = network.module if isinstance(network, DDP) else network
        network = network._orig_mod if isinstance(network, OptimizedModule) else network
        groups = discriminative_param_groups(network, is_encoder_parameter, self.encoder_lr_factor)
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        lr_scheduler = ScaledWarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
        self.print_to_log_file(f"Fine-tuning schedule: linear warm-up over {self.warmup_epochs} epoch(s) to lr "
                               f"{self.initial_lr} (encoder x {self.encoder_lr_factor}), then poly decay over "
                               f"{self.num_epochs} epochs")
        return optimizer, lr_scheduler

    def describe_method(self):
        return f"discriminative learning rate: encoder lr = {self.encoder_lr_factor} x decoder lr"


# -- the trainers (InstanceNorm networks as planned, BatchNorm networks, AC-Norm) --------------------
class nnUNetTrainerL2SP(_L2SPMixin, nnUNetTrainerFinetune):
    """L2-SP fine-tuning of the planned network."""


class nnUNetTrainerDELTA(_DELTAMixin, nnUNetTrainerFinetune):
    """DELTA fine-tuning of the planned network."""


class nnUNetTrainerBSS(_BSSMixin, nnUNetTrainerFinetune):
    """BSS fine-tuning of the planned network."""


class nnUNetTrainerLPFT(_LPFTMixin, nnUNetTrainerFinetune):
    """LP-FT: decoder-only warm-up with the encoder frozen, then full fine-tuning."""


class nnUNetTrainerDiscriminativeLR(_DiscriminativeLRMixin, nnUNetTrainerFinetune):
    """Fine-tuning with the encoder at a tenth of the decoder's learning rate."""


class nnUNetTrainerL2SPBN(_L2SPMixin, nnUNetTrainerFinetune):
    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerDELTABN(_DELTAMixin, nnUNetTrainerFinetune):
    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerBSSBN(_BSSMixin, nnUNetTrainerFinetune):
    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerLPFTBN(_LPFTMixin, nnUNetTrainerFinetune):
    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerDiscriminativeLRBN(_DiscriminativeLRMixin, nnUNetTrainerFinetune):
    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerACNorm_L2SP(_L2SPMixin, nnUNetTrainerACNorm):
    """AC-Norm and L2-SP: the anchor holds the pretrained target affines too (the source affines are
    buffers, frozen anyway)."""


class nnUNetTrainerACNorm_BSS(_BSSMixin, nnUNetTrainerACNorm):
    """AC-Norm and BSS."""


class nnUNetTrainerACNorm_LPFT(_LPFTMixin, nnUNetTrainerACNorm):
    """AC-Norm and LP-FT (the encoder's AC-Norm affines are frozen with it in the first phase)."""


class nnUNetTrainerACNorm_DiscriminativeLR(_DiscriminativeLRMixin, nnUNetTrainerACNorm):
    """AC-Norm with the encoder at a tenth of the decoder's learning rate."""


# -- SPD ----------------------------------------------------------------------------------------------
class _SPDMixin(_FinetuningMethodMixin):
    """SPD (Tian et al. 2024): after each optimiser step, the parameter tensors whose gradient points
    along their displacement from the pretrained weights are pulled back toward them
    (finetuning/spd.py); strength ``spd_lambda`` = 1, weight decay 0 (SPD replaces it)."""

    spd_lambda: float = SPD_LAMBDA
    method_has_state = True
    method_weight_decay = 0.0

    def setup_method(self, state):
        network = self._plain_network()
        if state is not None:
            self.spd = SelectiveProjectionDecay.from_state(network, state["spd"], strength=self.spd_lambda)
        else:
            self.spd = SelectiveProjectionDecay.from_network(network, strength=self.spd_lambda)
        self.spd.attach(self.optimizer)

    def method_state(self):
        return {"spd": self.spd.state()}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        projected, seen = self.spd.take_counts()
        self.print_to_log_file(f"SPD: projected {projected} of {seen} parameter-tensor updates this epoch")
        super().on_train_epoch_end(train_outputs)

    def describe_method(self):
        return (f"SPD: lambda {self.spd_lambda} on {len(self.spd.anchored_names)} parameter tensors (anchored at "
                f"the start of fine-tuning); weight decay {self.weight_decay}")


class nnUNetTrainerSPD(_SPDMixin, nnUNetTrainerFinetune):
    """SPD fine-tuning of the planned network."""


class nnUNetTrainerSPDBN(_SPDMixin, nnUNetTrainerFinetune):
    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerACNorm_SPD(_SPDMixin, nnUNetTrainerACNorm):
    """AC-Norm and SPD: the anchor holds the pretrained target affines too (the source affines are
    buffers, frozen anyway)."""


# -- nnU-Net's own fine-tuning recipe (nnU-Net master's PretrainedTrainer) ------------------------------
class _PretrainedRecipeMixin:
    """The numbers of ``PretrainedTrainer`` (nnU-Net master, ``nnunetv2/training/nnUNetTrainer/
    pretraining/pretrainedTrainer.py``; not in a release up to 2.8.1) on our fine-tuning trainer:
    SGD (Nesterov, momentum 0.99, nnU-Net's weight decay 3e-5), peak lr 1e-3 (1e-2 for the
    from-scratch twin), linear warm-up of the whole network over ``warmup_fraction`` = 5 % of the
    epochs (nnU-Net's 50 of 1000) then poly decay, 1000 epochs, batch size 2, no deep supervision,
    nnU-Net's one-third foreground oversampling, encoder and stem loaded, decoder and heads fresh.
    docs/baselines.md says where ours differs from nnU-Net's code."""

    finetune_num_epochs = 1000
    finetune_initial_lr = 1e-3
    warmup_fraction = 0.05
    finetune_oversample_foreground = 0.33
    pretrained_parts = "encoder"
    #: the configuration's batch size for this trainer (PretrainedTrainer: 2; None: the plans')
    recipe_batch_size: int | None = 2
    #: PretrainedTrainer trains without deep supervision
    recipe_deep_supervision: bool = False
    #: nnU-Net's --from_scratch: the same recipe from a random start; -pretrained_weights is refused
    from_scratch: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.recipe_batch_size is not None:  # as PretrainedTrainer, in the plans the trainer is built from
            plans = copy.deepcopy(plans)
            plans["configurations"][configuration]["batch_size"] = self.recipe_batch_size
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = self.recipe_deep_supervision

    def initialize(self):
        if self.from_scratch and pretrained_weights_from_argv() is not None:
            self._refuse(f"it trains from a random start (nnU-Net's --from_scratch): drop -pretrained_weights, "
                         f"or fine-tune with {type(self).__name__.replace('_fromScratch', '')}")
        super().initialize()

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net turns deep supervision back on after the final validation; this recipe has none
        super().set_deep_supervision_enabled(enabled and self.enable_deep_supervision)

    def on_train_start(self):
        super().on_train_start()
        if not self.from_scratch and pretrained_weights_from_argv() is None and not continue_training_from_argv():
            twin = re.sub(r"(PretrainedRecipe(BN)?)", r"\1_fromScratch", type(self).__name__, count=1)
            self.print_to_log_file(f"WARNING: {type(self).__name__} was started without -pretrained_weights: it trains "
                                   f"from a random start at the fine-tuning lr {self.initial_lr}; nnU-Net's recipe from "
                                   f"scratch is {twin} (lr 1e-2)")

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        lr_scheduler = PretrainedTrainerLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
        self.print_to_log_file(f"nnU-Net's PretrainedTrainer recipe: linear warm-up over {self.warmup_epochs} "
                               f"epoch(s) to lr {self.initial_lr}, then poly decay over {self.num_epochs} epochs; "
                               f"batch size {self.configuration_manager.batch_size}, deep supervision "
                               f"{'on' if self.enable_deep_supervision else 'off'}, pretrained parts: "
                               f"{'none (from scratch)' if self.from_scratch else self.pretrained_parts}")
        return optimizer, lr_scheduler


class nnUNetTrainerPretrainedRecipe(_PretrainedRecipeMixin, nnUNetTrainerFinetune):
    """nnU-Net's PretrainedTrainer recipe on the planned network (fine-tuning: lr 1e-3)."""


class nnUNetTrainerPretrainedRecipe_fromScratch(_PretrainedRecipeMixin, nnUNetTrainerFinetune):
    """nnU-Net's PretrainedTrainer recipe from a random start (``--from_scratch``: lr 1e-2)."""

    finetune_initial_lr = 1e-2
    from_scratch = True


class nnUNetTrainerPretrainedRecipeBN(_PretrainedRecipeMixin, nnUNetTrainerFinetune):
    """The same on the BatchNorm network (as ``nnUNetTrainerBN``)."""

    build_network_architecture = staticmethod(_bn_builder)


class nnUNetTrainerPretrainedRecipeBN_fromScratch(nnUNetTrainerPretrainedRecipeBN):
    finetune_initial_lr = 1e-2
    from_scratch = True


# PretrainedTrainer_150ep: 150 epochs with a 15-epoch warm-up (10 %; the schedule variants of
# schedule_trainers.py keep the 5 % of the 1000-epoch recipe)
class nnUNetTrainerPretrainedRecipe_150epochs(nnUNetTrainerPretrainedRecipe):
    finetune_num_epochs = 150
    warmup_fraction = 0.1


class nnUNetTrainerPretrainedRecipe_fromScratch_150epochs(nnUNetTrainerPretrainedRecipe_fromScratch):
    finetune_num_epochs = 150
    warmup_fraction = 0.1


class nnUNetTrainerPretrainedRecipeBN_150epochs(nnUNetTrainerPretrainedRecipeBN):
    finetune_num_epochs = 150
    warmup_fraction = 0.1


class nnUNetTrainerPretrainedRecipeBN_fromScratch_150epochs(nnUNetTrainerPretrainedRecipeBN_fromScratch):
    finetune_num_epochs = 150
    warmup_fraction = 0.1


#: every trainer of this module, by name; also added to ``trainers.TRAINERS`` (fold, discovery)
TRAINERS = {name: obj for name, obj in dict(globals()).items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and name.startswith("nnUNetTrainer")
            and obj.__module__ == __name__}
_base.TRAINERS.update(TRAINERS)

__all__ = list(TRAINERS)
