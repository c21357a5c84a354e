# Shim for nnU-Net's external trainer lookup (nnUNet_extTrainer): the schedule lengths of every
# fine-tuning trainer (nnUNetTrainerACNorm_1epoch, ..._5epochs, ...). The classes live in the package.
from nnunet_acnorm.nnunet.schedule_trainers import *  # noqa: F401,F403
from nnunet_acnorm.nnunet.schedule_trainers import SCHEDULE_TRAINERS

__all__ = list(SCHEDULE_TRAINERS)
