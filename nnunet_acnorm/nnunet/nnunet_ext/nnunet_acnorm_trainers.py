# Shim for nnU-Net's external trainer lookup (nnUNet_extTrainer): nnU-Net imports this file as a
# top-level module and takes the class by name. The classes themselves live in the package.
from nnunet_acnorm.nnunet.trainers import *  # noqa: F401,F403
from nnunet_acnorm.nnunet.trainers import TRAINERS

__all__ = list(TRAINERS)

# nnUNetv2_train imports this file before it reads the plans: a missing plans file (-p) is one line
from nnunet_acnorm.nnunet.trainer_entry import check_plans_at_import  # noqa: E402

check_plans_at_import()
