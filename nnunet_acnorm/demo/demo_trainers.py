"""Short-schedule trainers for the demo and the experiments (found through the demo's own
nnUNet_extTrainer folder, ``nnunet_ext/``).

Epochs and iterations per epoch come from ``ACNORM_DEMO_EPOCHS`` / ``ACNORM_DEMO_ITERATIONS``
(set by ``nnUNetv2_acnorm_demo`` and ``experiments/finetune_experiment.py``), so their options
reach the trainers run by ``nnUNetv2_train``. Every trainer here is seeded by
``nnUNet_acnorm_seed`` (they derive from the fine-tuning trainers, see nnunet/seeding.py).
Everything else (recipe, temperature) is the full trainers' default, so that the demo measures
what a user gets.
"""
import os

import torch

from nnunet_acnorm.nnunet.trainers import (nnUNetTrainerACNorm, nnUNetTrainerACNorm_tau1,
                                                    nnUNetTrainerACNorm_tauAuto, nnUNetTrainerACNormBN,
                                                    nnUNetTrainerACNormBN_tau1, nnUNetTrainerACNormBN_tauAuto,
                                                    nnUNetTrainerFinetune, nnUNetTrainerFinetuneBN)


class _DemoSchedule:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("ACNORM_DEMO_EPOCHS", "10"))
        self.num_iterations_per_epoch = int(os.environ.get("ACNORM_DEMO_ITERATIONS", "20"))
        self.num_val_iterations_per_epoch = 2
        self.save_every = 10 ** 6  # the demo keeps only final (and best) checkpoints


class _FromScratch:
    """Training from scratch with nnU-Net's own schedule: peak lr 1e-2, no warm-up, poly decay."""

    finetune_initial_lr = 1e-2
    warmup_fraction = 0.0


class nnUNetTrainerScratch_acnormDemo(_DemoSchedule, _FromScratch, nnUNetTrainerFinetune):
    """nnU-Net's network, loss and schedule from a random start (the source models, and the
    from-scratch baseline), seeded."""


class nnUNetTrainerScratchBN_acnormDemo(_DemoSchedule, _FromScratch, nnUNetTrainerFinetuneBN):
    """The same for the BatchNorm network (nnU-Net's ``nnUNetTrainerBN``)."""


class nnUNetTrainerFinetune_acnormDemo(_DemoSchedule, nnUNetTrainerFinetune):
    """Vanilla fine-tuning, short."""


class nnUNetTrainerACNorm_acnormDemo(_DemoSchedule, nnUNetTrainerACNorm):
    """AC-Norm fine-tuning (the default temperature), short."""


class nnUNetTrainerACNorm_tau1_acnormDemo(_DemoSchedule, nnUNetTrainerACNorm_tau1):
    """AC-Norm with the paper's tau = 1, short."""


class nnUNetTrainerACNorm_tauAuto_acnormDemo(_DemoSchedule, nnUNetTrainerACNorm_tauAuto):
    """AC-Norm with calibrated per-layer temperatures, short."""


class nnUNetTrainerFinetuneBN_acnormDemo(_DemoSchedule, nnUNetTrainerFinetuneBN):
    """Vanilla fine-tuning of the BatchNorm network, short."""


class nnUNetTrainerACNormBN_acnormDemo(_DemoSchedule, nnUNetTrainerACNormBN):
    """AC-BatchNorm (the default temperature), short."""


class nnUNetTrainerACNormBN_tau1_acnormDemo(_DemoSchedule, nnUNetTrainerACNormBN_tau1):
    """AC-BatchNorm with the paper's tau = 1, short."""


class nnUNetTrainerACNormBN_tauAuto_acnormDemo(_DemoSchedule, nnUNetTrainerACNormBN_tauAuto):
    """AC-BatchNorm with calibrated per-layer temperatures, short."""


# -- the fine-tuning baselines (nnunet/baseline_trainers.py), short ------------------------------
from nnunet_acnorm.nnunet import baseline_trainers as _baselines  # noqa: E402

for _name in ("nnUNetTrainerL2SP", "nnUNetTrainerACNorm_L2SP", "nnUNetTrainerDELTA", "nnUNetTrainerBSS",
              "nnUNetTrainerLPFT", "nnUNetTrainerDiscriminativeLR", "nnUNetTrainerStochNormBN",
              "nnUNetTrainerSPD", "nnUNetTrainerACNorm_SPD", "nnUNetTrainerSPDBN", "nnUNetTrainerPretrainedRecipe",
              "nnUNetTrainerPretrainedRecipe_fromScratch", "nnUNetTrainerPretrainedRecipeBN",
              "nnUNetTrainerPretrainedRecipeBN_fromScratch"):
    globals()[f"{_name}_acnormDemo"] = type(f"{_name}_acnormDemo", (_DemoSchedule, _baselines.TRAINERS[_name]),
                                            {"__doc__": f"{_name}, short."})


DEMO_TRAINERS = {name: obj for name, obj in dict(globals()).items()
                 if isinstance(obj, type) and name.endswith("_acnormDemo")}
__all__ = list(DEMO_TRAINERS)
