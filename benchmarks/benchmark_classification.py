"""Training throughput of the classification trainer: AC-Norm vs vanilla fine-tuning.

Both variants run the trainer's real ``train_step`` (forward, class-weighted cross-entropy,
backward, gradient clipping, SGD step; autocast + GradScaler on CUDA) on the same random batches,
interleaved in alternating order (vanilla, AC-Norm, AC-Norm, vanilla, ...) so that machine load
affects both alike and neither always runs first; ``--steps 1`` with many ``--repeats`` pairs single
steps, the least noisy on a shared machine. Each variant runs in processes of its own (``--processes``,
used in turn), one process at a time: in one shared process each variant's allocations change how
often the other's memory is returned to the system and faulted back in (``--same-process`` shows
it; the table gives the page faults), and each process has a speed of its own. ``--paired`` (best
with ``--malloc no-trim``, under which the heaps no longer interact): each process times both
variants back to back instead, so that a ratio is free of its process's speed. Data loading is
left out: it is the same for both. Prints a Markdown table of training images per second (median
over repeats) and the ratio AC-Norm / vanilla (median of the per-repeat ratios, with a cluster
bootstrap interval over the worker processes, and each process's median ratio).

    python benchmarks/benchmark_classification.py                       # small CPU defaults
    python benchmarks/benchmark_classification.py --arch resnet --depth 50 --size 224 --batch_size 32 --device cuda
    python benchmarks/benchmark_classification.py --arch genesis --size 64 --base_features 32 --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import MALLOC_SETTINGS, median_interval, repetition_clusters, timed_builds, timing_mode  # noqa: E402

from nnunet_acnorm.classification.trainer import (ClassificationTrainer,  # noqa: E402
                                                  ClassificationTrainer_vanilla)


def make_trainer(cls, args, folder: str, device: torch.device):
    dim = 2 if args.arch == "resnet" else 3
    config = {"architecture": args.arch, "dim": dim, "depth": args.depth, "base_features": args.base_features,
              "shortcut_type": None, "num_classes": args.num_classes, "num_epochs": 1, "initial_lr": 1e-3,
              "weight_decay": 3e-5, "tau": 1.0, "batch_size": args.batch_size, "imbalance": "loss",
              "selection_metric": "kappa", "num_workers": 0}
    trainer = cls(config, 0, os.path.join(folder, cls.__name__), device, show_progress=False)
    trainer.print_to_log_file = lambda *a, **k: None
    torch.manual_seed(0)
    trainer.initialize(pretrained_file=None)  # random weights: the speed does not depend on them
    trainer.loss = torch.nn.CrossEntropyLoss(weight=torch.ones(args.num_classes)).to(device)
    trainer.network.train()
    return trainer


def build_step(cls, args, shape, device: torch.device):
    """One training step of a freshly initialised ``cls`` trainer on fixed random images (the same
    for every variant: seeded), as a function; its trainer folder lives as long as the function."""
    folder = tempfile.TemporaryDirectory()
    trainer = make_trainer(cls, args, folder.name, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=generator)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)

    def step(folder=folder):
        trainer.train_step(images, labels)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["resnet", "genesis", "medicalnet"], default="resnet")
    p.add_argument("--depth", type=int, default=None, help="ResNet depth (default 18 for a quick CPU run; "
                                                           "50 is the paper's 2D network) / MedicalNet depth (10)")
    p.add_argument("--base_features", type=int, default=None, help="3D width (Genesis 32, MedicalNet 64 "
                                                                   "published; default 8 for CPU)")
    p.add_argument("--size", type=int, default=None, help="image side (2D, default 64) / cube side (3D, default 32)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_classes", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per repeat and variant")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--processes", type=int, default=4,
                   help="worker processes per variant, used in turn (a process has its own speed)")
    p.add_argument("--same-process", action="store_true",
                   help="run both variants in this process (the default runs each in a process of its own, "
                        "so that neither changes the other's heap; see _common.isolated_interleaved_times)")
    p.add_argument("--paired", action="store_true",
                   help="each of the --processes workers times both variants back to back, so that a ratio is "
                        "free of the process's own speed (with --malloc no-trim the heaps no longer interact)")
    p.add_argument("--malloc", choices=tuple(MALLOC_SETTINGS), default="default",
                   help="glibc malloc settings of the worker processes (no-trim: no page faults after warm-up)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.depth is None:
        args.depth = {"resnet": 18, "medicalnet": 10}.get(args.arch)
    if args.base_features is None and args.arch != "resnet":
        args.base_features = 8
    size = args.size or (64 if args.arch == "resnet" else 32)
    shape = (args.batch_size, 3, size, size) if args.arch == "resnet" else (args.batch_size, 1, size, size, size)
    variants = {"vanilla": ClassificationTrainer_vanilla, "AC-Norm": ClassificationTrainer}
    times, faults = timed_builds({name: (build_step, (cls, args, shape, device)) for name, cls in variants.items()},
                                 args.repeats, args.steps, args.device, args.threads, args.processes,
                                 args.same_process, paired=args.paired, malloc=args.malloc)
    rates = {name: [args.batch_size / t for t in ts] for name, ts in times.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratios = [a / v for a, v in zip(rates["AC-Norm"], rates["vanilla"])]
    net = f"{args.arch}{args.depth or ''}" + (f" (width {args.base_features})" if args.base_features else "")
    print(f"\nTraining throughput, {net}, input {tuple(shape[1:])}, batch {args.batch_size}, "
          f"{args.device}{' (mixed precision)' if device.type == 'cuda' else ' (float32)'}, "
          f"{args.repeats} interleaved repeats x {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"{timing_mode(args.same_process, args.processes, args.paired, args.malloc)}\n")
    print("| fine-tuning | images/s (median) | min | max | minor page faults per step (median) |")
    print("|---|---|---|---|---|")
    for name in ("vanilla", "AC-Norm"):
        print(f"| {name} | {median[name]:.2f} | {min(rates[name]):.2f} | {max(rates[name]):.2f} | "
              f"{statistics.median(faults[name]):.0f} |")
    clusters = repetition_clusters(args.repeats, args.processes, args.same_process)
    ratio, low, high = median_interval(ratios, clusters=clusters)
    print(f"\nAC-Norm / vanilla throughput: {ratio:.3f} (median of per-repeat ratios; 95 % "
          f"{'cluster bootstrap interval over the worker processes' if clusters else 'bootstrap interval'} "
          f"{low:.3f}-{high:.3f}; range {min(ratios):.3f}-{max(ratios):.3f})")
    if clusters:
        per_process = [statistics.median(r for r, c in zip(ratios, clusters) if c == k) for k in sorted(set(clusters))]
        print(f"median ratio of each worker process: {', '.join(f'{r:.3f}' for r in per_process)}")


if __name__ == "__main__":
    main()
