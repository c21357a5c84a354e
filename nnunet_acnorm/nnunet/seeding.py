"""Seeded training for nnU-Net trainers (nnU-Net itself has no seed).

A seed comes from the environment variable ``nnUNet_acnorm_seed`` (an integer; it wins, so that a
seed reaches ``nnUNetv2_train`` without a new trainer class) or from the trainer's class attribute
``seed`` (None: unseeded, nnU-Net's behaviour). With a seed:

- ``random``, ``numpy`` and ``torch`` (CPU and every CUDA device) are seeded when the trainer is
  created, before the network is built: the fresh segmentation head and every other randomly
  initialised weight are the same in two runs;
- the data-augmentation workers get the seeds ``seed + 1 + i`` (worker i, validation workers
  continue the count) and nnU-Net's non-deterministic augmenter is replaced by batchgenerators'
  ``MultiThreadedAugmenter``, which hands out the workers' batches in a fixed round-robin order.
  With ``nnUNet_n_proc_DA=0`` the augmentation runs in the main process on the seeded global
  generators.

Under DDP (``-num_gpus N``) rank r uses ``rank_seed(seed, r)`` for all of the above (rank 0 the
seed itself): nnU-Net has no distributed sampler, so each rank must draw its own patches.

Two seeded runs that differ only in the method (AC-Norm or vanilla, which draw no random numbers
of their own) then see the same initial head, the same patches and the same augmentations.
What stays nondeterministic: CUDA kernels (cuDNN convolution algorithms, atomics in backward
passes; nnU-Net sets ``cudnn.benchmark = True``) and multi-threaded CPU reductions, whose
floating-point sums can differ in the last bits between runs; these differences grow over a
training run. The measured spread is in docs/trainers.md.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

SEED_ENV = "nnUNet_acnorm_seed"


def resolve_seed(class_seed: int | None) -> int | None:
    """The seed of a run: ``nnUNet_acnorm_seed`` if set (and not empty), else ``class_seed``."""
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        return class_seed
    try:
        seed = int(value)
    except ValueError:
        raise SystemExit(f"error: {SEED_ENV}={value!r} is not an integer; set it to a seed such as 0, "
                         "or unset it for an unseeded run") from None
    if not 0 <= seed < 2 ** 31 - 64:
        raise SystemExit(f"error: {SEED_ENV}={seed} is out of range; use a seed in [0, 2**31 - 64)")
    return seed


def apply_cpu_thread_limit() -> int | None:
    """Honour ``OMP_NUM_THREADS`` on CPU: ``nnUNetv2_train -device cpu`` sets torch's thread count
    to every core, overriding it. Two trainings on two cores then run 2 threads each and spin in
    OpenMP (measured: docs/trainers.md, "CPU threads"; benchmarks/benchmark_cpu_threads.py). Returns
    the thread count set, or None when the variable is unset."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value.isdigit() or int(value) < 1:
        return None
    torch.set_num_threads(int(value))
    return int(value)


def ddp_rank() -> int:
    """This process's rank in a torch.distributed run (nnU-Net's ``-num_gpus``), else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed DDP rank ``rank`` of a run seeded with ``seed`` draws with: ``seed`` on rank 0 (so
    that a one-GPU run and rank 0 start alike), on the other ranks a seed derived from (seed, rank)
    by NumPy's ``SeedSequence``, in [0, 2**31 - 64) like every seed (room for the workers' seed + 1 + i).
    nnU-Net has no distributed sampler: every rank draws its patches from its own generators, so
    equal seeds would give every GPU the same patches (an effective batch of one GPU's)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] % (2 ** 31 - 64))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def seeded_augmenters(seed: int):
    """Inside the block, nnU-Net's trainer module builds seeded, ordered augmenters.

    nnU-Net's ``get_dataloaders`` builds ``NonDetMultiThreadedAugmenter(..., seeds=None)``. This
    swaps that name in nnU-Net's trainer module, for the duration of the block, for a factory of
    ``MultiThreadedAugmenter`` with per-worker seeds, so that nnU-Net's own method builds the
    data pipeline unchanged otherwise.
    """
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    next_seed = [seed + 1]

    def factory(data_loader, transform, num_processes, num_cached=2, seeds=None, pin_memory=False,
                wait_time=0.02):
        seeds = list(range(next_seed[0], next_seed[0] + num_processes))
        next_seed[0] += num_processes
        per_queue = max(2, -(-num_cached // max(1, num_processes)))
        return MultiThreadedAugmenter(data_loader, transform, num_processes, per_queue, seeds=seeds,
                                      pin_memory=pin_memory, wait_time=wait_time)

    original = trainer_module.NonDetMultiThreadedAugmenter
    trainer_module.NonDetMultiThreadedAugmenter = factory
    try:
        yield
    finally:
        trainer_module.NonDetMultiThreadedAugmenter = original
