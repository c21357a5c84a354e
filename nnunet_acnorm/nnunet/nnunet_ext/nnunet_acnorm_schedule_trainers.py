# Shim for nnU-Net's external trainer lookup (nnUNet_extTrainer): the schedule lengths of every
# fine-tuning trainer (nnUNetTrainerACNorm_1epoch, ..._5epochs, ...). The classes live in the package.
from nnunet_acnorm.nnunet.schedule_trainers import *  # noqa: F401,F403
from nnunet_acnorm.nnunet.schedule_trainers import SCHEDULE_TRAINERS

__all__ = list(SCHEDULE_TRAINERS)

# nnUNetv2_train imports this file before it reads the plans: a missing plans file (-p) is one line
from nnunet_acnorm.nnunet.trainer_entry import check_plans_at_import  # noqa: E402

check_plans_at_import()
