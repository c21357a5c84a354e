# Shim for nnU-Net's external trainer lookup: the demo's and the experiments' short-schedule trainers.
from nnunet_acnorm.demo.demo_trainers import *  # noqa: F401,F403
from nnunet_acnorm.demo.demo_trainers import DEMO_TRAINERS

__all__ = list(DEMO_TRAINERS)
