"""nnU-Net's loss, optimiser and one training step, from nnU-Net's own trainer code.

The ranking (:mod:`nnunet_acnorm.ranking.nnunet_target`), the benchmarks and the direction
experiments train networks the way ``nnUNetv2_train`` does without running a training. Instead of
a copy of each piece, this module calls ``nnUNetTrainer``'s methods:

- :func:`construct_trainer`: a real trainer of the given class, its constructor run in a throw-away
  ``nnUNet_results`` folder (the constructor creates the run's folder and log file), its log lines
  (``print_to_log_file``) dropped, and the global RNGs and torch's thread count as they were before (our
  fine-tuning trainers seed the RNGs and set the thread count in their constructors). It carries the
  trainer's hyperparameters (``initial_lr``, ``weight_decay``, deep supervision) and its managers;
- :func:`build_loss`: ``trainer._build_loss()`` (Dice + CE, or Dice + BCE for regions, with the
  deep-supervision weights);
- :func:`build_optimizer`: ``nnUNetTrainer.configure_optimizers`` (SGD, Nesterov, momentum 0.99,
  the trainer's weight decay) for a given network and learning rate;
- :func:`make_train_step`: ``nnUNetTrainer.train_step`` (forward, loss, backward, gradient clipping
  at 12, optimiser step) on a given network, loss and optimiser;
- :func:`nnunet_precision`: whether ``nnUNetv2_train`` uses mixed precision and torch.compile on a
  device (the benchmarks' defaults);
- :func:`deterministic_float32`: a block in which CUDA computes float32 without TF32 and with fixed
  cuDNN algorithms (the ranking's steps run in it), the previous settings restored after it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import random
import tempfile
from typing import Callable

import numpy as np
import torch
from torch import nn

from nnunet_acnorm.norms.torch_compat import grad_scaler

_CPU = torch.device("cpu")


@contextlib.contextmanager
def _trainer_sandbox():
    """Where a trainer constructor may run without leaving anything behind (folders, log file, RNG
    states, torch's thread count)."""
    threads = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    results = os.environ.get("nnUNet_results")
    try:
        with tempfile.TemporaryDirectory(prefix="acnorm_trainer_") as folder:
            os.environ["nnUNet_results"] = folder
            yield
    finally:
        if results is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = results
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.set_num_threads(threads)


def construct_trainer(trainer_class, plans: dict, configuration: str, dataset_json: dict,
                      device: torch.device = _CPU):
    """A ``trainer_class`` (an ``nnUNetTrainer``) for ``plans`` / ``configuration``, its constructor
    run as :func:`_trainer_sandbox` says; not initialised (no network, no data).

    ``device`` is the trainer's own: on CUDA nnU-Net compiles the Dice loss of :func:`build_loss`
    (unless ``nnUNet_compile`` says no); with the CPU default the loss is the eager one, which runs on
    any device. :func:`make_train_step` takes the device to train on separately."""
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds to the plans
    with _trainer_sandbox():
        trainer = _without_log(trainer_class)(plans, configuration, 0, dataset_json, device)
    trainer.log_file = os.devnull  # its folder is gone
    return trainer


@functools.lru_cache(maxsize=None)
def _without_log(trainer_class):
    """``trainer_class`` whose log lines (the constructor's banner, its settings) go nowhere: this
    trainer never trains, its log would only be noise in the output of the command that uses it."""

    class WithoutLog(trainer_class):
        def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
            pass

    WithoutLog.__name__ = WithoutLog.__qualname__ = trainer_class.__name__
    return WithoutLog


@functools.lru_cache(maxsize=None)
def reference_trainer(trainer_class):
    """A :func:`construct_trainer` of ``trainer_class`` on a tiny PlainConvUNet's plans: its
    hyperparameters (``weight_decay``, ``initial_lr``), where no plans are at hand. Shared (cached):
    read it, do not change it."""
    from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json, default_plans

    return construct_trainer(trainer_class, default_plans((8, 8, 8), (2, 4), 3), "bench", default_dataset_json(2))


def build_loss(trainer) -> nn.Module:
    """The trainer's training loss (``trainer._build_loss()``), deep-supervision weights included."""
    return trainer._build_loss()


def build_optimizer(trainer, network: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """``nnUNetTrainer.configure_optimizers`` for ``network`` at ``lr`` (default: the trainer's
    ``initial_lr``): SGD with Nesterov momentum 0.99 and the trainer's weight decay, at the peak
    learning rate (nnU-Net's poly schedule starts there; its scheduler is not returned). nnU-Net's
    method, not a subclass's: a warm-up schedule would start below the peak. ``trainer`` is not
    changed."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stand_in = copy.copy(trainer)
    stand_in.network = network
    if lr is not None:
        stand_in.initial_lr = lr
    optimizer, _ = nnUNetTrainer.configure_optimizers(stand_in)
    return optimizer


class _OutsideAutocast(nn.Module):
    """Runs ``module`` with autocast off: nnU-Net's step then computes in float32 on CUDA too."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        with torch.autocast("cuda", enabled=False):
            return self.module(*args)


def make_train_step(network: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device = _CPU, mixed_precision: bool = False,
                    deterministic: bool = False) -> Callable[[dict], float]:
    """``step(batch) -> loss value``: one ``nnUNetTrainer.train_step`` of ``network`` on a batch
    ``{"data", "target"}`` (moved to ``device``): forward, loss, backward, gradient norm clipped to 12,
    optimiser step. ``network``, ``loss`` and ``optimizer`` are used as given (an optimiser of the
    network's parameters, a loss on the device).

    On CUDA, ``mixed_precision`` is nnU-Net's autocast with a GradScaler; without it (the default,
    what the ranking and the benchmarks measure) the step runs without autocast, in float32 (cuDNN
    may still use TF32 convolutions on Ampere and newer GPUs, torch's default, unless
    ``deterministic``). The CPU is float32 either way, as in nnU-Net.

    ``deterministic``: each step runs inside :func:`deterministic_float32` (TF32 off, fixed cuDNN
    algorithms; the settings come back after the step): what the ranking uses, so that its scores
    do not change between runs or GPUs through kernel choices."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stand_in = nnUNetTrainer.__new__(nnUNetTrainer)  # only what train_step reads, no constructor
    stand_in.device = device
    stand_in.optimizer = optimizer
    if device.type == "cuda" and mixed_precision:
        stand_in.network, stand_in.loss, stand_in.grad_scaler = network, loss, grad_scaler()
    elif device.type == "cuda":
        stand_in.network, stand_in.loss, stand_in.grad_scaler = _OutsideAutocast(network), _OutsideAutocast(loss), None
    else:
        stand_in.network, stand_in.loss, stand_in.grad_scaler = network, loss, None

    def step(batch: dict) -> float:
        with deterministic_float32() if deterministic else contextlib.nullcontext():
            return float(nnUNetTrainer.train_step(stand_in, batch)["loss"])

    return step


def nnunet_precision(device: torch.device) -> tuple[bool, bool]:
    """(mixed precision, torch.compile) as ``nnUNetv2_train`` chooses them for ``device``: autocast
    + GradScaler on CUDA only (``nnUNetTrainer.train_step``), compile as ``nnUNetTrainer._do_i_compile``
    says (CUDA unless ``nnUNet_compile`` is false; never on CPU, mps or Windows)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stand_in = nnUNetTrainer.__new__(nnUNetTrainer)  # only what _do_i_compile reads
    stand_in.device = torch.device(device)
    stand_in.print_to_log_file = lambda *args, **kwargs: None
    return stand_in.device.type == "cuda", bool(nnUNetTrainer._do_i_compile(stand_in))


@contextlib.contextmanager
def deterministic_float32():
    """Inside the block, float32 is computed as float32 and with the same kernels in every run:
    TF32 off for matrix products (``torch.backends.cuda.matmul.allow_tf32``, the float32 matmul
    precision "highest") and cuDNN convolutions (``cudnn.allow_tf32``, on by default in torch),
    ``cudnn.benchmark`` off (nnU-Net switches it on: algorithms picked by timing differ between
    runs) and ``cudnn.deterministic`` on. The previous settings are restored on exit, also after an
    error. Ops without a deterministic CUDA kernel (atomics in some backward passes) stay as they
    are: ``torch.use_deterministic_algorithms`` would make them raise. On the CPU nothing changes."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark,
             cudnn.deterministic)
    try:
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = False
        cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = False, False, True
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_tf32 = saved[1]
        cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved[2:]
