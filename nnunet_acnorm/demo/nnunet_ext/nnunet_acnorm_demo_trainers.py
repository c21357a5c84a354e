# Shim for nnU-Net's external trainer lookup: the demo's short-schedule trainers.
from nnunet_acnorm.demo.demo_trainers import (nnUNetTrainer_acnormDemoPretrain,  # noqa: F401
                                              nnUNetTrainerACNorm_acnormDemo, nnUNetTrainerFinetune_acnormDemo)
