"""Training-step time and memory of nnUNetTrainerACNorm vs stock nnUNetTrainer, and inference time of a
folded AC-Norm model vs a stock one, on the same plans, in one run (ratios).

Each trainer's own ``build_network_architecture`` builds the network from the same plans; a training
step is nnU-Net's (deep-supervision Dice+CE loss as ``nnUNetTrainer._build_loss``, SGD with Nesterov
momentum, gradient clipping at 12, as ``nnUNetTrainer.train_step``). Repetitions are interleaved
(stock, AC-Norm, stock, ...) so that machine load hits both alike; the table shows medians.

Memory: "saved activations" is the total size of the tensors autograd keeps for the backward pass
of one step (device independent); on CUDA the peak allocated memory is shown too.

    python benchmarks/benchmark_trainer.py                       # small CPU default (~1 min)
    python benchmarks/benchmark_trainer.py --patch 128 128 128 --features 32 64 128 256 320 320 --batch 2 --device cuda
    python benchmarks/benchmark_trainer.py --plans nnUNetPlans.json --configuration 3d_fullres --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch


def default_plans(patch, features, dim: int, norm: str | None = None, configuration: str = "bench") -> dict:
    """nnU-Net plans of a PlainConvUNet (InstanceNorm unless ``norm`` names another norm class)
    with one configuration; also the tests' tiny network (tests/test_trainers_units.py)."""
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = norm or f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    n = len(features)
    return {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * dim, "original_median_shape_after_transp": list(patch),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dim)),
        "transpose_backward": list(range(dim)), "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
        "configurations": {configuration: {
            "data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": [1.0] * dim,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
            "batch_dice": False,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
                                "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
                                "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                                "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


class Setup:
    """A network, its loss and optimizer, as an nnU-Net trainer would have them."""

    def __init__(self, trainer_class, plans, configuration, n_classes, device, pretrained_state=None):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(copy.deepcopy(plans))
        self.cm = pm.get_configuration(configuration)
        self.network = trainer_class.build_network_architecture(pm, self.cm, 1, n_classes, True)
        if pretrained_state is not None:
            from nnunet_acnorm.nnunet.pretrained import set_strict_source

            set_strict_source(self.network, False)  # as -pretrained_weights: plain keys set the AC-Norm sources
            self.network.load_state_dict(pretrained_state, strict=False)
        self.network.to(device).train()
        loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
        strides = self.cm.network_arch_init_kwargs["strides"]
        scales = np.cumprod(np.vstack([[1] * len(strides[0])] + [list(s) for s in strides[1:]]), axis=0)
        weights = np.array([1 / (2 ** i) for i in range(len(strides))])
        weights[-1] = 0
        weights = weights / weights.sum()
        self.loss = DeepSupervisionWrapper(loss, weights)
        self.scales = scales
        self.optimizer = torch.optim.SGD(self.network.parameters(), 1e-3, weight_decay=3e-5, momentum=0.99,
                                         nesterov=True)

    def batch(self, batch_size, patch, n_classes, device, generator):
        x = torch.randn((batch_size, 1, *patch), generator=generator).to(device)
        seg = torch.randint(0, n_classes, (batch_size, 1, *patch), generator=generator)
        targets = []
        for s in self.scales:
            size = [p // int(f) for p, f in zip(patch, s)]
            targets.append(torch.nn.functional.interpolate(seg.float(), size=size, mode="nearest").to(device))
        return x, targets

    def step(self, x, targets):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.network(x), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_activation_bytes(setup: Setup, x, targets) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    setup.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = setup.loss(setup.network(x), targets)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, nargs="+", default=[24, 24, 24])
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--plans", help="an nnU-Net plans.json instead of the built-in PlainConvUNet")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of --plans")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per repetition")
    parser.add_argument("--repetitions", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--inference-batches", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_acnorm.norms import fold_acnorm
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.plans:
        plans = json.load(open(args.plans))
        configuration = args.configuration
        patch = plans["configurations"][configuration].get("patch_size") or args.patch
    else:
        plans, configuration, patch = default_plans(args.patch, args.features, len(args.patch)), "bench", args.patch
    torch.manual_seed(0)
    stock = Setup(nnUNetTrainer, plans, configuration, args.classes, device)
    pretrained = {k: v.detach().clone() for k, v in stock.network.state_dict().items()}
    acnorm = Setup(nnUNetTrainerACNorm, plans, configuration, args.classes, device, pretrained_state=pretrained)
    generator = torch.Generator().manual_seed(0)
    x, targets = stock.batch(args.batch, patch, args.classes, device, generator)
    setups = {"nnUNetTrainer": stock, "nnUNetTrainerACNorm": acnorm}

    for s in setups.values():  # warm-up
        s.step(x, targets)
    _sync(device)
    times = {k: [] for k in setups}
    for _ in range(args.repetitions):
        for name, s in setups.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                s.step(x, targets)
            _sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
    step = {k: statistics.median(v) for k, v in times.items()}
    saved = {k: saved_activation_bytes(s, x, targets) for k, s in setups.items()}
    peak = {k: cuda_peak(s, x, targets, device) for k, s in setups.items()}

    # inference: stock network vs the AC-Norm network folded back to plain norms
    acnorm.network.eval()
    folded = copy.deepcopy(acnorm.network)
    fold_acnorm(folded)
    stock.network.eval()
    infer = {"stock nnUNetTrainer network": stock.network, "AC-Norm, folded": folded,
             "AC-Norm, not folded": acnorm.network}
    xi = x[:1]
    with torch.no_grad():
        for net in infer.values():
            net(xi)
        itimes = {k: [] for k in infer}
        for _ in range(args.repetitions):
            for name, net in infer.items():
                _sync(device)
                t = time.perf_counter()
                for _ in range(args.inference_batches):
                    net(xi)
                _sync(device)
                itimes[name].append((time.perf_counter() - t) / args.inference_batches)
        max_diff = float((torch.softmax(acnorm.network(xi)[0], 1) - torch.softmax(folded(xi)[0], 1)).abs().max())
    inference = {k: statistics.median(v) for k, v in itimes.items()}
    # paired per repetition (both measured back to back): the unfolded AC-Norm network in eval mode
    # reuses its cached recalibrated affines, so it should cost what the stock network does
    unfolded_ratio = statistics.median(a / s for a, s in zip(itimes["AC-Norm, not folded"],
                                                              itimes["stock nnUNetTrainer network"]))

    desc = (f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
            f"torch threads {torch.get_num_threads()}, patch {list(patch)}, batch {args.batch}, "
            f"{'plans ' + args.plans if args.plans else 'PlainConvUNet features ' + str(args.features)}, "
            f"{args.repetitions} interleaved repetitions x {args.steps} steps")
    print(f"\n{desc}\n")
    print("| trainer | train step (median) | ratio | saved activations | ratio |"
          + (" CUDA peak | ratio |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|" + ("---|---|" if device.type == "cuda" else ""))
    for name in setups:
        row = (f"| {name} | {step[name] * 1000:.1f} ms | {step[name] / step['nnUNetTrainer']:.3f} | "
               f"{saved[name] / 2 ** 20:.1f} MiB | {saved[name] / saved['nnUNetTrainer']:.3f} |")
        if device.type == "cuda":
            row += f" {peak[name] / 2 ** 20:.0f} MiB | {peak[name] / peak['nnUNetTrainer']:.3f} |"
        print(row)
    print("\n| inference network (batch 1, no grad) | time (median) | ratio to stock |\n|---|---|---|")
    base = inference["stock nnUNetTrainer network"]
    for name, t in inference.items():
        print(f"| {name} | {t * 1000:.1f} ms | {t / base:.3f} |")
    print(f"\nunfolded AC-Norm / stock inference (median of per-repetition ratios): {unfolded_ratio:.3f}")
    print(f"largest softmax difference, AC-Norm vs folded: {max_diff:.2e}")
    result = {"setup": desc, "train_step_s": step, "train_step_ratio": step["nnUNetTrainerACNorm"] / step["nnUNetTrainer"],
              "saved_activation_bytes": saved, "cuda_peak_bytes": peak, "inference_s": inference,
              "inference_ratio_unfolded": unfolded_ratio,
              "max_softmax_difference_folded": max_diff}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
