"""Training-step time and memory of each fine-tuning baseline relative to vanilla fine-tuning, in
one interleaved run on the same plans and batch (ratios).

Each method is set up as its nnU-Net trainer does it (nnunet_acnorm.nnunet.baseline_trainers): the
trainer's own ``build_network_architecture``, the pieces of :mod:`nnunet_acnorm.finetuning`, the
penalty added through the trainers' loss wrapper, SPD's projection hooked to the optimizer's step;
the step is nnU-Net's (deep-supervision Dice+CE, SGD with Nesterov momentum, gradient clipping at
12; see benchmark_trainer.py). LP-FT is measured
in its frozen phase (afterwards it is vanilla); StochNorm against vanilla fine-tuning of the same
BatchNorm network. Repetitions are interleaved (vanilla, L2-SP, ..., vanilla, ...) so that machine
load hits every method alike; medians.

Memory: "step peak" is the peak allocated during one training step above what was allocated before
it (CPU: from the profiler's allocation events; CUDA: max_memory_allocated); "state" is what the
method keeps besides the network and the optimizer (L2-SP's and SPD's anchor, DELTA's frozen copy of the
encoder), in MiB and relative to the network's parameters.

    python benchmarks/benchmark_finetuning_methods.py                     # small CPU default
    python benchmarks/benchmark_finetuning_methods.py --patch 128 128 128 --features 32 64 128 256 320 320 --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, cpu_peak_bytes, interleaved_times, sync as _sync  # noqa: E402
from benchmark_trainer import Setup  # noqa: E402


def step_peak_bytes(setup, x, targets, device) -> int:
    setup.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        setup.step(x, targets)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(lambda: setup.step(x, targets))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(name: str, plans, configuration, classes, device, pretrained_in: dict, pretrained_bn: dict):
    """(setup, state bytes) of method ``name``, set up as its trainer does."""
    from nnunet_acnorm.finetuning import (DELTARegulariser, FeatureRecorder, L2SPRegulariser, SelectiveProjectionDecay,
                                          bss_penalty, discriminative_param_groups, set_frozen, stage_modules)
    from nnunet_acnorm.nnunet import baseline_trainers as bt
    from nnunet_acnorm.nnunet.trainers import (nnUNetTrainerACNorm, nnUNetTrainerFinetune,
                                                        nnUNetTrainerFinetuneBN)

    trainer = {"vanilla": nnUNetTrainerFinetune, "AC-Norm": nnUNetTrainerACNorm,
               "AC-Norm + L2-SP": bt.nnUNetTrainerACNorm_L2SP, "L2-SP": bt.nnUNetTrainerL2SP,
               "DELTA": bt.nnUNetTrainerDELTA, "BSS": bt.nnUNetTrainerBSS, "LP-FT (frozen phase)": bt.nnUNetTrainerLPFT,
               "discriminative lr": bt.nnUNetTrainerDiscriminativeLR, "vanilla (BN)": nnUNetTrainerFinetuneBN,
               "StochNorm (BN)": bt.nnUNetTrainerStochNormBN, "SPD": bt.nnUNetTrainerSPD}[name]
    pretrained = pretrained_bn if "BN" in name else pretrained_in
    setup = Setup(trainer, plans, configuration, classes, device, pretrained_state=pretrained)
    net, state = setup.network, 0  # the optimizer has the trainer's weight decay (0 where a penalty replaces it)
    penalty = None
    if "L2-SP" in name:
        reg = L2SPRegulariser.from_network(net, bt.is_new_parameter)
        penalty, state = reg, _bytes(reg.anchor.values())
    elif name == "DELTA":
        reg = DELTARegulariser(net, "encoder", stage_modules(net))
        new = [p for n, p in net.named_parameters() if bt.is_new_parameter(n)]
        penalty = lambda: reg() + 0.5 * 0.01 * sum(p.pow(2).sum() for p in new)  # noqa: E731
        state = reg.reference_bytes()
    elif name == "BSS":
        stage = stage_modules(net)[-1]
        rec = FeatureRecorder({stage: net.get_submodule(stage)})
        penalty = lambda: bss_penalty(rec.features.pop(stage))  # noqa: E731
    elif name.startswith("LP-FT"):
        set_frozen(net.encoder, True)
    elif name == "SPD":  # after each optimizer step, as the trainer hooks it
        spd = SelectiveProjectionDecay.from_network(net)
        spd.attach(setup.optimizer)
        state = _bytes(spd.anchor.values())
    elif name == "discriminative lr":
        groups = discriminative_param_groups(net, bt.is_encoder_parameter)
        setup.optimizer = torch.optim.SGD(groups, 1e-3, weight_decay=setup.trainer.weight_decay, momentum=0.99,
                                          nesterov=True)
    if penalty is not None:
        setup.loss = bt.PenalisedLoss(setup.loss, penalty, lambda: net.training)
    return setup, state


METHODS = ("vanilla", "L2-SP", "SPD", "DELTA", "BSS", "LP-FT (frozen phase)", "discriminative lr", "AC-Norm",
           "AC-Norm + L2-SP", "vanilla (BN)", "StochNorm (BN)")


def main(argv=None):
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dim = len(args.patch)
    from nnunet_acnorm.nnunet.plain_unet_plans import default_plans

    plans = default_plans(args.patch, args.features, dim)
    plans_bn = default_plans(args.patch, args.features, dim, norm=f"torch.nn.modules.batchnorm.BatchNorm{dim}d")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerFinetune, nnUNetTrainerFinetuneBN

    torch.manual_seed(0)
    pm = {"in": Setup(nnUNetTrainerFinetune, plans, "bench", args.classes, device),
          "bn": Setup(nnUNetTrainerFinetuneBN, plans_bn, "bench", args.classes, device)}
    pretrained_in = {k: v.detach().clone() for k, v in pm["in"].network.state_dict().items()}
    pretrained_bn = {k: v.detach().clone() for k, v in pm["bn"].network.state_dict().items()}
    del pm
    setups, state = {}, {}
    for name in methods:
        torch.manual_seed(0)
        setups[name], state[name] = build(name, plans_bn if "BN" in name else plans, "bench", args.classes, device,
                                          pretrained_in, pretrained_bn)
    generator = torch.Generator().manual_seed(0)
    x, targets = next(iter(setups.values())).batch(args.batch, args.patch, args.classes, device, generator)
    for s in setups.values():  # warm-up
        s.step(x, targets)
    _sync(device)
    times = interleaved_times({name: (lambda s=s: s.step(x, targets)) for name, s in setups.items()},
                              args.repetitions, args.steps, device,
                              before=lambda: torch.manual_seed(0))  # StochNorm's draws
    step = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: step_peak_bytes(s, x, targets, device) for k, s in setups.items()}
    params = {k: _bytes(s.network.parameters()) for k, s in setups.items()}

    def baseline(name):
        return "vanilla (BN)" if "BN" in name and "vanilla (BN)" in setups else "vanilla"

    mib = 2 ** 20
    print(f"\n{args.device}, batch {args.batch}, patch {args.patch}, features {args.features}, "
          f"{torch.get_num_threads()} thread(s), {args.repetitions} interleaved repetitions x {args.steps} steps\n")
    print("| method | step time / vanilla | step peak memory / vanilla | method state, MiB (x network parameters) "
          "| step: ms, peak MiB |")
    print("|---|---|---|---|---|")
    rows = {}
    for name in setups:
        b = baseline(name)
        rows[name] = {"step_s": step[name], "step_ratio": step[name] / step[b] if b in step else None,
                      "peak_bytes": peak[name], "peak_ratio": peak[name] / peak[b] if b in peak else None,
                      "state_bytes": state[name], "parameter_bytes": params[name], "baseline": b,
                      "step_range_s": [min(times[name]), max(times[name])]}
        r = rows[name]
        ratio = f"{r['step_ratio']:.3f}" if r["step_ratio"] is not None else "-"
        pratio = f"{r['peak_ratio']:.3f}" if r["peak_ratio"] is not None else "-"
        st = f"{state[name] / mib:.2f} ({state[name] / params[name]:.2f})" if state[name] else "0"
        print(f"| {name} | {ratio} | {pratio} | {st} | {1000 * step[name]:.0f}, {peak[name] / mib:.0f} |")
    print("\nBN rows are relative to vanilla fine-tuning of the BatchNorm network.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
