"""Short-schedule trainers for the demo (found through the demo's own nnUNet_extTrainer folder).

Epochs and iterations per epoch come from ``ACNORM_DEMO_EPOCHS`` / ``ACNORM_DEMO_ITERATIONS``
(set by ``nnUNetv2_acnorm_demo``), so the demo's options reach the trainers run by nnUNetv2_train.
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_acnorm.trainers.acnorm_trainers import nnUNetTrainerACNorm, nnUNetTrainerFinetune


class _DemoSchedule:
    #: the demo fine-tunes for a few hundred iterations only: at the recipe's peak lr of 1e-3 the MR
    #: organs were still not segmented after 240 iterations, so the demo uses nnU-Net's 1e-2
    finetune_initial_lr = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("ACNORM_DEMO_EPOCHS", "10"))
        self.num_iterations_per_epoch = int(os.environ.get("ACNORM_DEMO_ITERATIONS", "20"))
        self.num_val_iterations_per_epoch = 2
        self.save_every = 10 ** 6  # the demo keeps only final (and best) checkpoints


class nnUNetTrainer_acnormDemoPretrain(_DemoSchedule, nnUNetTrainer):
    """Stock nnU-Net training (the source model), short."""


class nnUNetTrainerACNorm_acnormDemo(_DemoSchedule, nnUNetTrainerACNorm):
    """AC-Norm fine-tuning, short; warm-up 10 % of the epochs as the full trainer."""


class nnUNetTrainerFinetune_acnormDemo(_DemoSchedule, nnUNetTrainerFinetune):
    """Vanilla fine-tuning, short, same schedule."""
