# Shim for nnU-Net's external trainer lookup (nnUNet_extTrainer): nnU-Net imports this file as a
# top-level module and takes the class by name. The classes themselves live in the package.
from nnunet_acnorm.nnunet.trainers import *  # noqa: F401,F403
from nnunet_acnorm.nnunet.trainers import TRAINERS

__all__ = list(TRAINERS)
