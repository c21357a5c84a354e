# Test-only trainers for nnUNet_extTrainer: the real trainers with a few iterations per epoch.
# Epochs come from ACNORM_TEST_EPOCHS (default 1) so that a test can continue a run with --c.
# ACNORM_TEST_FAIL_FILE: while that file exists and lists "<trainer class>:<fold>", that training raises at its
# start (a failed run for the benchmark runner's tests; remove the file and the retry succeeds).
# Faults for tests/test_bad_inputs.py: ACNORM_TEST_HOLD=<file> waits at the start of training while
# <file> exists (after writing <file>.ready); ACNORM_TEST_NAN_EPOCH=<k> feeds NaN images in epoch k.
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN

from nnunet_acnorm.nnunet.seeding import resolve_seed, seed_everything
from nnunet_acnorm.nnunet.trainers import (nnUNetTrainerACNorm, nnUNetTrainerACNorm_encoderOnly,
                                                    nnUNetTrainerACNormBN, nnUNetTrainerFinetune)


def _epochs():
    return int(os.environ.get("ACNORM_TEST_EPOCHS", "1"))


class _Tiny:
    # the full signature: nnU-Net records the init arguments by name
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        seed = resolve_seed(None)
        if seed is not None and not isinstance(self, nnUNetTrainerFinetune):
            seed_everything(seed)  # stock nnU-Net trainers have no seed; the plugin's seed themselves
            self.seed = seed  # recorded in debug.json, as the plugin's trainers record theirs
        self.num_epochs = _epochs()
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        fail_file = os.environ.get("ACNORM_TEST_FAIL_FILE")
        if fail_file and os.path.isfile(fail_file):
            with open(fail_file) as f:
                if f"{type(self).__name__}:{self.fold}" in f.read().split():
                    raise RuntimeError(f"{type(self).__name__} fold {self.fold} fails on purpose ({fail_file} lists it)")
        super().on_train_start()
        hold = os.environ.get("ACNORM_TEST_HOLD")
        if hold:
            open(hold + ".ready", "w").close()
            deadline = time.time() + 300
            while os.path.exists(hold) and time.time() < deadline:
                time.sleep(0.1)

    def train_step(self, batch: dict) -> dict:
        if os.environ.get("ACNORM_TEST_NAN_EPOCH") == str(self.current_epoch):
            batch = {**batch, "data": batch["data"] * float("nan")}
        return super().train_step(batch)


class nnUNetTrainer_acnormTinyTest(_Tiny, nnUNetTrainer):
    """The source model: its validation is not needed."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("validation skipped (test trainer)")


class nnUNetTrainer_acnormTinyValTest(_Tiny, nnUNetTrainer):
    """nnU-Net's stock trainer with its validation: a method that is not the plugin's."""


class nnUNetTrainerBN_acnormTinyTest(_Tiny, nnUNetTrainerBN):
    pass


class nnUNetTrainerACNorm_tinyTest(_Tiny, nnUNetTrainerACNorm):
    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("ACNORM_TEST_SKIP_VALIDATION") == "1":
            self.print_to_log_file("validation skipped (test trainer)")
            return
        super().perform_actual_validation(save_probabilities)


class nnUNetTrainerACNormBN_tinyTest(_Tiny, nnUNetTrainerACNormBN):
    pass


class nnUNetTrainerFinetune_tinyTest(_Tiny, nnUNetTrainerFinetune):
    pass


class nnUNetTrainerACNorm_encoderOnly_tinyTest(_Tiny, nnUNetTrainerACNorm_encoderOnly):
    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("validation skipped (test trainer)")
