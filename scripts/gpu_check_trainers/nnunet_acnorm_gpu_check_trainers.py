# Trainers of scripts/gpu_check.py (found by nnU-Net through nnUNet_extTrainer): the plugin's trainers
# as nnUNetv2_train runs them (AMP, torch.compile, DDP as nnU-Net decides), for 2 epochs of 20
# iterations, without the final validation; each rank writes gpu_check_rank<r>.json into the fold:
# the time of every training step (nnU-Net's train_step ends by reading the loss on the host, so it
# is synchronised), the peak CUDA memory, digests of the first batches, what nnU-Net decided.
import hashlib
import json
import os
import time

import numpy as np
import torch

from nnunet_acnorm.nnunet.baseline_trainers import nnUNetTrainerACNorm_LPFT
from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm, nnUNetTrainerACNormBN, nnUNetTrainerFinetune


class _GpuCheck:
    finetune_num_epochs = 2
    iterations_per_epoch = 20
    val_iterations_per_epoch = 2

    def on_train_start(self):
        super().on_train_start()
        self._gpu_check = {"steps": [], "first_batches": []}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def train_step(self, batch: dict) -> dict:
        if len(self._gpu_check["first_batches"]) < 3:
            data = batch["data"]
            self._gpu_check["first_batches"].append(hashlib.sha1(np.ascontiguousarray(
                data.numpy() if isinstance(data, torch.Tensor) else data).tobytes()).hexdigest())
        start = time.perf_counter()
        result = super().train_step(batch)
        self._gpu_check["steps"].append([self.current_epoch, time.perf_counter() - start])
        return result

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (scripts/gpu_check.py)")

    def on_train_end(self):
        super().on_train_end()
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        record = {**self._gpu_check, "rank": self.local_rank, "is_ddp": self.is_ddp, "batch_size": self.batch_size,
                  "amp": self.grad_scaler is not None, "compiled": bool(self._do_i_compile()),
                  "peak_cuda_bytes": peak, "device": str(self.device)}
        with open(os.path.join(self.output_folder, f"gpu_check_rank{self.local_rank}.json"), "w") as f:
            json.dump(record, f)


class nnUNetTrainerACNorm_gpuCheck(_GpuCheck, nnUNetTrainerACNorm):
    pass


class nnUNetTrainerFinetune_gpuCheck(_GpuCheck, nnUNetTrainerFinetune):
    pass


class nnUNetTrainerACNorm_LPFT_gpuCheck(_GpuCheck, nnUNetTrainerACNorm_LPFT):
    lpft_frozen_fraction = 0.5   # epoch 0 frozen, epoch 1 released (the DDP wrapper is rebuilt twice)


class nnUNetTrainerACNormBN_gpuCheck(_GpuCheck, nnUNetTrainerACNormBN):
    pass
