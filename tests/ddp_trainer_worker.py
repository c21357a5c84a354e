"""Run by torch.distributed.run in tests/test_distributed.py: the pieces of nnU-Net's DDP path
(``-num_gpus N``) with the plugin's trainers, on CPU processes with the gloo backend.

nnU-Net's ``initialize`` under DDP moves the network to ``cuda:<rank>``; here each rank builds what
it builds, on the CPU, in its order: ``_set_batch_size_and_oversample`` (the batch split over the
ranks), ``build_network_architecture``, ``configure_optimizers``, ``convert_sync_batchnorm``, the
DDP wrapper, ``_build_loss``; then the trainer's own methods run (``on_train_epoch_start``,
``train_step``, ``get_dataloaders``, ``save_checkpoint``, the method's penalty).

Usage: ``ddp_trainer_worker.py OUT_DIR SCENARIO [SCENARIO ...]``; each scenario runs on every rank
in lockstep and writes ``OUT_DIR/<scenario>.rank<r>.json`` ({"ok": ..., "error": ..., data}); a
failing scenario is recorded and the next one runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

TINY_PATCH = (16, 16, 16)


def make_trainer(cls, plans: dict, configuration: str, dataset_json: dict):
    """A trainer as ``nnUNetv2_train -num_gpus N`` constructs it on each rank, then on the CPU (nnU-Net
    sets ``cuda:<rank>``; a CPU trainer has no GradScaler)."""
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # GradScaler("cuda") without CUDA
        trainer = cls(plans, configuration, 0, dataset_json, torch.device("cpu"))
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None
    return trainer


def initialize_like_nnunet(trainer, seed: int = 0) -> None:
    """``nnUNetTrainer.initialize``'s DDP path on the CPU (same network weights on every rank, as
    DDP broadcasts them anyway)."""
    trainer._set_batch_size_and_oversample()
    trainer.num_input_channels = 1
    torch.manual_seed(seed)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads,
        trainer.enable_deep_supervision)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.network = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(trainer.network))
    trainer.loss = trainer._build_loss()
    trainer.was_initialized = True


def tiny_plans():
    from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json, default_plans

    return default_plans(TINY_PATCH, (4, 8, 16), 3), "bench", default_dataset_json(3)


def batch_for(trainer, rank: int, batch_size: int) -> dict:
    """Random data and deep-supervision targets of the trainer's plans, different on each rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    data = torch.randn((batch_size, 1, *TINY_PATCH), generator=generator)
    seg = torch.randint(0, 3, (batch_size, 1, *TINY_PATCH), generator=generator).float()
    targets = [nn.functional.interpolate(seg, size=[int(round(p * s)) for p, s in zip(TINY_PATCH, scale)])
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets}


def plain(trainer) -> nn.Module:
    return trainer._plain_network()


def state_digest(module: nn.Module) -> str:
    digest = hashlib.sha1()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gathered(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# -- scenarios -----------------------------------------------------------------------------------
def scenario_lpft(out: Path, rank: int) -> dict:
    """LP-FT under DDP: the encoder frozen after nnU-Net wrapped the network, two steps, released,
    two steps (nnUNetTrainerLPFT.on_train_epoch_start, nnUNetTrainer.train_step)."""
    from nnunet_acnorm.nnunet.baseline_trainers import nnUNetTrainerLPFT

    plans, configuration, dataset_json = tiny_plans()
    trainer = make_trainer(nnUNetTrainerLPFT, plans, configuration, dataset_json)
    trainer.num_epochs = 4   # frozen for the first epoch (10 %, at least 1)
    initialize_like_nnunet(trainer)
    encoder = plain(trainer).encoder
    result = {"frozen_epochs": trainer.lpft_frozen_epochs}
    start = state_digest(encoder)
    for epoch in (0, 1):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        for step in range(2):
            trainer.train_step(batch_for(trainer, rank, trainer.batch_size))
        result[f"encoder_changed_after_epoch{epoch}"] = state_digest(encoder) != start
    result["ranks_identical"] = len(set(gathered(state_digest(plain(trainer))))) == 1
    return result


def scenario_bss(out: Path, rank: int) -> dict:
    """BSS with nnU-Net's batch 2 split over 2 ranks (1 sample each): the penalty and its gradients
    against one process holding both samples."""
    from nnunet_acnorm.finetuning import FeatureRecorder, bss_penalty
    from nnunet_acnorm.nnunet.baseline_trainers import nnUNetTrainerBSS

    plans, configuration, dataset_json = tiny_plans()
    trainer = make_trainer(nnUNetTrainerBSS, plans, configuration, dataset_json)
    initialize_like_nnunet(trainer)
    reference = copy.deepcopy(plain(trainer))
    trainer.setup_method(None)
    trainer.network.train()
    samples = [batch_for(trainer, r, 1)["data"] for r in range(dist.get_world_size())]
    output = trainer.network(samples[rank])
    penalty = trainer.method_penalty()
    (penalty + 0.0 * sum(o.sum() for o in output)).backward()   # every parameter takes part (DDP's reducer)
    stage = trainer._bss_stage
    recorder = FeatureRecorder({stage: reference.get_submodule(stage)})
    reference.train()
    reference(torch.cat(samples))
    expected = bss_penalty(recorder.features.pop(stage), trainer.bss_k, trainer.bss_eta)
    expected.backward()
    pairs = [(p.grad, q.grad) for p, q in zip(plain(trainer).parameters(), reference.parameters())
             if q.grad is not None]
    scale = max(float(q.abs().max()) for _, q in pairs)   # relative to the largest gradient entry
    worst = max(float((p - q).abs().max()) for p, q in pairs) / scale
    return {"batch_size": trainer.batch_size, "penalty": float(penalty), "expected": float(expected),
            "worst_relative_gradient_error": worst, "described": trainer.describe_method()}


def scenario_save(out: Path, rank: int) -> dict:
    """save_checkpoint on every rank (nnU-Net calls it so) while rank 0 is writing its temporary file."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerFinetune

    plans, configuration, dataset_json = tiny_plans()
    trainer = make_trainer(nnUNetTrainerFinetune, plans, configuration, dataset_json)
    target = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    partial = b"rank 0 is still writing this checkpoint"
    if rank == 0:
        with open(f"{target}.tmp", "wb") as f:
            f.write(partial)
    dist.barrier()
    if rank != 0:
        trainer.save_checkpoint(target)
    dist.barrier()
    tmp_intact = os.path.isfile(f"{target}.tmp") and Path(f"{target}.tmp").read_bytes() == partial
    return {"tmp_intact": tmp_intact, "target_written": os.path.exists(target)}


def scenario_loaders(out: Path, rank: int) -> dict:
    """A seeded run's data loaders (nnU-Net's get_dataloaders with the plugin's seeding) on each rank:
    digests of the first training batches, with augmentation in the main process and in a worker."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerFinetune

    folder = Path(os.environ["nnUNet_preprocessed"]) / os.environ["ACNORM_DDP_DATASET"]
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    result = {}
    for n_proc in ("0", "1"):
        os.environ["nnUNet_n_proc_DA"] = n_proc
        trainer = make_trainer(nnUNetTrainerFinetune, plans, "3d_fullres", dataset_json)
        trainer._set_batch_size_and_oversample()
        train, val = trainer.get_dataloaders()
        digests = [hashlib.sha1(next(train)["data"].numpy().tobytes()).hexdigest() for _ in range(2)]
        for loader in (train, val):
            if hasattr(loader, "_finish"):
                loader._finish()
        result[f"n_proc_DA={n_proc}"] = gathered(digests)
    return result


SCENARIOS = {"lpft": scenario_lpft, "bss": scenario_bss, "save": scenario_save, "loaders": scenario_loaders}


def main(out_dir: str, names: list[str]) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    out = Path(out_dir)
    for name in names:
        try:
            result = {"ok": True, **SCENARIOS[name](out, rank)}
        except Exception as e:  # noqa: BLE001 - recorded for the test, which names it
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
