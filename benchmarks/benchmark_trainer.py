"""Training-step time and memory of nnUNetTrainerACNorm vs stock nnUNetTrainer, and inference time of an
AC-Norm model (folded and not) vs a stock one, on the same plans, in one run (ratios).

Each trainer's own ``build_network_architecture`` builds the network from the same plans; a training
step is nnU-Net's, from its own code (:mod:`nnunet_acnorm.nnunet.training_step`: the trainer's
``_build_loss``, ``nnUNetTrainer.configure_optimizers`` with the trainer's weight decay at lr 1e-3,
``nnUNetTrainer.train_step``) with what ``nnUNetv2_train`` uses on the device unless told otherwise
(``--amp``: autocast float16 + GradScaler, CUDA only; ``--compile``: torch.compile of the network and
of the Dice loss; both on for CUDA, off on the CPU, as nnU-Net). Repetitions are interleaved in alternating order
(stock, AC-Norm, AC-Norm, stock, ...) so that machine load hits both alike; the table shows medians.
Each timed variant runs in processes of its own (built from the same plans and seed; ``--processes``,
used in turn), one process at a time, so that no variant's allocations change the C heap of another
(``--same-process`` builds and times them all in this one; see ``_common.timed_builds``).

Memory: "saved activations" is the total size of the tensors autograd keeps for the backward pass
of one step of the eager network (device independent; half precision under --amp); on CUDA the
peak allocated memory of the step as run (compiled or not) is shown too. Inference runs as nnU-Net's
predictor runs it: eager, without gradients, autocast on CUDA.

    python benchmarks/benchmark_trainer.py                       # small CPU default (~1 min)
    python benchmarks/benchmark_trainer.py --patch 128 128 128 --features 32 64 128 256 320 320 --batch 2 --device cuda
    python benchmarks/benchmark_trainer.py --plans nnUNetPlans.json --configuration 3d_fullres --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MALLOC_SETTINGS, _environment, add_common_arguments, add_precision_arguments,  # noqa: E402
                     median_interval, repetition_clusters, resolve_precision, sync as _sync, timed_builds,
                     timing_mode)


class Setup:
    """A network, its loss and optimizer, as an nnU-Net trainer would have them: the trainer's own
    ``build_network_architecture``, ``_build_loss`` and optimizer (``nnUNetTrainer.configure_optimizers``
    with the trainer's weight decay, at lr 1e-3) and ``nnUNetTrainer.train_step`` (see
    :mod:`nnunet_acnorm.nnunet.training_step`), with nnU-Net's mixed precision (``amp``: autocast +
    GradScaler, CUDA) and torch.compile (``compile``: the network, and the Dice term of the loss as
    ``_build_loss`` compiles it) or without."""

    def __init__(self, trainer_class, plans, configuration, n_classes, device, pretrained_state=None,
                 amp: bool = False, compile: bool = False):
        from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json
        from nnunet_acnorm.nnunet.training_step import build_loss, build_optimizer, construct_trainer

        #: the trainer (constructed, not initialised) on the device: its loss and hyperparameters
        with _environment({"nnUNet_compile": "true" if compile else "false"}):
            self.trainer = construct_trainer(trainer_class, plans, configuration, default_dataset_json(n_classes),
                                             device if compile else torch.device("cpu"))
            self.loss = build_loss(self.trainer)
        self.cm = self.trainer.configuration_manager
        self.device, self.amp = device, amp
        #: the network as built (eager); ``network`` is what the steps run (compiled with ``compile``)
        self.plain_network = trainer_class.build_network_architecture(self.trainer.plans_manager, self.cm, 1,
                                                                      n_classes, True)
        if pretrained_state is not None:
            from nnunet_acnorm.nnunet.pretrained import set_strict_source

            set_strict_source(self.plain_network, False)  # as -pretrained_weights: plain keys set the AC-Norm sources
            self.plain_network.load_state_dict(pretrained_state, strict=False)
        self.plain_network.to(device).train()
        self.network = torch.compile(self.plain_network) if compile else self.plain_network
        strides = self.cm.network_arch_init_kwargs["strides"]
        self.scales = np.cumprod(np.vstack([[1] * len(strides[0])] + [list(s) for s in strides[1:]]), axis=0)
        self.optimizer = build_optimizer(self.trainer, self.plain_network, 1e-3)

    def batch(self, batch_size, patch, n_classes, device, generator):
        x = torch.randn((batch_size, 1, *patch), generator=generator).to(device)
        seg = torch.randint(0, n_classes, (batch_size, 1, *patch), generator=generator)
        targets = []
        for s in self.scales:
            size = [p // int(f) for p, f in zip(patch, s)]
            targets.append(torch.nn.functional.interpolate(seg.float(), size=size, mode="nearest").to(device))
        return x, targets

    def step(self, x, targets):
        """One ``nnUNetTrainer.train_step`` with the current loss and optimizer (a method may replace them)."""
        from nnunet_acnorm.nnunet.training_step import make_train_step

        make_train_step(self.network, self.loss, self.optimizer, self.device, mixed_precision=self.amp)(
            {"data": x, "target": targets})


def saved_activation_bytes(setup: Setup, x, targets) -> int:
    """Bytes autograd saves for the backward pass of one step, of the eager network (with autocast
    when the setup uses it: half-precision activations are saved in half precision)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    setup.optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(setup.device.type) if setup.amp else contextlib.nullcontext()   # nnU-Net's: float16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = setup.loss(setup.plain_network(x), targets)
    loss.backward()
    return total


def cuda_peak(setup: Setup, x, targets, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    setup.step(x, targets)
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


def build(args):
    """The two setups from the same plans and seed (the AC-Norm network's sources are the stock
    network's initial weights, loaded as -pretrained_weights would) and one batch: deterministic, so
    that every benchmark process builds the same."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_acnorm.nnunet.plain_unet_plans import default_plans
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    device = torch.device(args.device)
    if args.plans:
        plans = json.load(open(args.plans))
        configuration = args.configuration
        patch = plans["configurations"][configuration].get("patch_size") or args.patch
    else:
        plans, configuration, patch = default_plans(args.patch, args.features, len(args.patch)), "bench", args.patch
    torch.manual_seed(0)
    precision = {"amp": args.amp, "compile": args.compile}
    stock = Setup(nnUNetTrainer, plans, configuration, args.classes, device, **precision)
    pretrained = {k: v.detach().clone() for k, v in stock.plain_network.state_dict().items()}
    acnorm = Setup(nnUNetTrainerACNorm, plans, configuration, args.classes, device, pretrained_state=pretrained,
                   **precision)
    generator = torch.Generator().manual_seed(0)
    x, targets = stock.batch(args.batch, patch, args.classes, device, generator)
    return {"nnUNetTrainer": stock, "nnUNetTrainerACNorm": acnorm}, x, targets, patch


def inference_networks(setups: dict) -> dict:
    """The networks timed at inference, in eval mode: stock, the AC-Norm network folded back to plain
    norms, and the AC-Norm network as trained (unfolded: each layer reuses its cached affine)."""
    from nnunet_acnorm.norms import fold_acnorm

    acnorm = setups["nnUNetTrainerACNorm"].plain_network.eval()
    folded = copy.deepcopy(acnorm)
    fold_acnorm(folded)
    return {"stock nnUNetTrainer network": setups["nnUNetTrainer"].plain_network.eval(), "AC-Norm, folded": folded,
            "AC-Norm, not folded": acnorm}


@contextlib.contextmanager
def inference_context(args):
    """What nnU-Net's predictor runs a forward in: no gradients, autocast on CUDA (float16)."""
    with torch.no_grad(), torch.autocast("cuda") if args.amp else contextlib.nullcontext():
        yield


def training_run(name: str, args):
    """A benchmark process's run: one training step of the ``name`` setup."""
    setups, x, targets, _ = build(args)
    setup = setups[name]
    return lambda: setup.step(x, targets)


def inference_run(name: str, args):
    """A benchmark process's run: one batch-1 forward without gradients of the ``name`` network."""
    setups, x, _, _ = build(args)
    # a fresh copy, made at the same point in every process: no network is timed in memory allocated
    # earlier than another's (the stock network is built first, the folded one is a later copy)
    network, xi = copy.deepcopy(inference_networks(setups)[name]), x[:1]

    def run():
        with inference_context(args):
            network(xi)
    return run


def main(argv=None):
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--plans", help="an nnU-Net plans.json instead of the built-in PlainConvUNet")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of --plans")
    parser.add_argument("--inference-batches", type=int, default=5)
    parser.add_argument("--processes", type=int, default=4,
                        help="worker processes per variant, used in turn (a process has its own speed)")
    parser.add_argument("--same-process", action="store_true",
                        help="time all variants in this process (the default gives each its own process; "
                             "see _common.isolated_interleaved_times)")
    parser.add_argument("--inference-timing", choices=("paired", "isolated"), default="paired",
                        help="paired (default): each worker process times all inference networks back to back; "
                             "isolated: each network in processes of its own, as the training steps")
    parser.add_argument("--malloc", choices=tuple(MALLOC_SETTINGS), default="default",
                        help="glibc malloc settings of the worker processes (no-trim: no page faults after warm-up)")
    add_precision_arguments(parser)
    args = parser.parse_args(argv)
    precision = resolve_precision(parser, args, torch.device(args.device))

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setups, x, targets, patch = build(args)
    for s in setups.values():  # one step first: the memory measures below see a network that has trained
        s.step(x, targets)
    _sync(device)
    timing = dict(device=args.device, threads=args.threads, processes=args.processes, same_process=args.same_process,
                  malloc=args.malloc)
    times, faults = timed_builds({name: (training_run, (name, args)) for name in setups}, args.repetitions,
                                 args.steps, **timing)
    step = {k: statistics.median(v) for k, v in times.items()}
    saved = {k: saved_activation_bytes(s, x, targets) for k, s in setups.items()}
    peak = {k: cuda_peak(s, x, targets, device) for k, s in setups.items()}

    # inference: stock network vs the AC-Norm network, folded back to plain norms and not
    infer = inference_networks(setups)
    xi = x[:1]
    with inference_context(args):
        max_diff = float((torch.softmax(infer["AC-Norm, not folded"](xi)[0].float(), 1)
                          - torch.softmax(infer["AC-Norm, folded"](xi)[0].float(), 1)).abs().max())
    paired = args.inference_timing == "paired"
    itimes, ifaults = timed_builds({name: (inference_run, (name, args)) for name in infer}, args.repetitions,
                                   args.inference_batches, paired=paired, **timing)
    inference = {k: statistics.median(v) for k, v in itimes.items()}
    # paired per repetition (both measured back to back): the unfolded AC-Norm network in eval mode
    # reuses its cached recalibrated affines, so it should cost what the stock network does
    # (the interval resamples whole worker processes: a process has its own speed)
    stock_times = itimes["stock nnUNetTrainer network"]
    clusters = repetition_clusters(args.repetitions, args.processes, args.same_process)
    unfolded_ratio, unfolded_low, unfolded_high = median_interval(
        [a / s for a, s in zip(itimes["AC-Norm, not folded"], stock_times)], clusters=clusters)
    folded_ratio, folded_low, folded_high = median_interval(
        [a / s for a, s in zip(itimes["AC-Norm, folded"], stock_times)], clusters=clusters)

    desc = (f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
            f"{precision}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, patch {list(patch)}, batch {args.batch}, "
            f"{'plans ' + args.plans if args.plans else 'PlainConvUNet features ' + str(args.features)}, "
            f"{args.repetitions} interleaved repetitions x {args.steps} steps, "
            f"training: {timing_mode(args.same_process, args.processes, malloc=args.malloc)}; "
            f"inference: {args.inference_batches} call{'s' if args.inference_batches > 1 else ''} per repetition, "
            f"{timing_mode(args.same_process, args.processes, paired, args.malloc)}")
    print(f"\n{desc}\n")
    print("| trainer | train step (median) | ratio | page faults / step | saved activations | ratio |"
          + (" CUDA peak | ratio |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if device.type == "cuda" else ""))
    for name in setups:
        row = (f"| {name} | {step[name] * 1000:.1f} ms | {step[name] / step['nnUNetTrainer']:.3f} | "
               f"{statistics.median(faults[name]):.0f} | "
               f"{saved[name] / 2 ** 20:.1f} MiB | {saved[name] / saved['nnUNetTrainer']:.3f} |")
        if device.type == "cuda":
            row += f" {peak[name] / 2 ** 20:.0f} MiB | {peak[name] / peak['nnUNetTrainer']:.3f} |"
        print(row)
    print("\n| inference network (batch 1, no grad) | time (median) | ratio to stock | page faults / call |\n"
          "|---|---|---|---|")
    base = inference["stock nnUNetTrainer network"]
    for name, t in inference.items():
        print(f"| {name} | {t * 1000:.1f} ms | {t / base:.3f} | {statistics.median(ifaults[name]):.0f} |")
    print(f"\nunfolded AC-Norm / stock inference (median of per-repetition ratios): {unfolded_ratio:.3f} "
          f"(95 % {'cluster ' if clusters else ''}bootstrap interval "
          f"{unfolded_low:.3f}-{unfolded_high:.3f}); "
          f"folded / stock (the same architecture: this run's noise): {folded_ratio:.3f} "
          f"({folded_low:.3f}-{folded_high:.3f})")
    print(f"largest softmax difference, AC-Norm vs folded: {max_diff:.2e}")
    result = {"setup": desc, "amp": args.amp, "compile": args.compile, "train_step_s": step,
              "train_step_ratio": step["nnUNetTrainerACNorm"] / step["nnUNetTrainer"],
              "train_page_faults_per_step": {k: statistics.median(v) for k, v in faults.items()},
              "inference_page_faults_per_call": {k: statistics.median(v) for k, v in ifaults.items()},
              "saved_activation_bytes": saved, "cuda_peak_bytes": peak, "inference_s": inference,
              "inference_ratio_unfolded": unfolded_ratio,
              "inference_ratio_unfolded_interval": [unfolded_low, unfolded_high],
              "inference_ratio_folded": folded_ratio,
              "inference_ratio_folded_interval": [folded_low, folded_high], "max_softmax_difference_folded": max_diff}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
