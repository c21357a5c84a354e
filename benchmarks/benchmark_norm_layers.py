"""Fused AC-Norm vs the two-pass formula vs the plain norm: forward+backward time and peak memory.

All variants run interleaved in one process, on the same inputs, and are reported as ratios to
the plain norm (this machine is shared and noisy: absolute times mean little, ratios measured
side by side do). Each time is the best of the repeats: load from other processes only ever adds
time, so the minimum is the least noisy estimate of what a step costs. Two measurements per shape:

- block: Conv + norm, the unit nnU-Net stacks (what a training step pays);
- norm: the normalization layer alone (the overhead at its most visible).

The two-pass variant is written from the paper's formula as the public reference does: two
normalization calls (target affines, recalibrated affines) added; for BatchNorm it also updates the
running statistics twice.

    python benchmarks/benchmark_norm_layers.py            # nnU-Net 3D and fundus 2D shapes
    python benchmarks/benchmark_norm_layers.py --quick    # small shapes, a smoke run
    python benchmarks/benchmark_norm_layers.py --affine   # also: the recalibrated affine alone, dense vs sorted, C = 32..4096

``--amp`` / ``--compile`` (defaults: what ``nnUNetv2_train`` does on the device: both on CUDA, neither
on the CPU) run every variant under autocast (``--amp-dtype`` float16, nnU-Net's, or bfloat16) and
compiled with torch.compile (compiled: plain vs fused; the two-pass columns show "-"); ``--shapes``
and ``--measured`` pick fewer rows (each compiled variant compiles once).

``--affine`` times forward+backward of ``recalibrated_affine`` by its two methods (the dense C x C
path and the sorted O(C log C) one, the latter also with its source layout kept between calls as
a layer keeps it) per channel count, interleaved, best of the repeats: the measurement behind
``functional.SORTED_MIN_CHANNELS``; then all the affines of one ResNet-50 step (53 layers), one call
per layer vs the single call of ``norms.batched`` (CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's per-run log lines

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_acnorm.norms import ACNORM_FOR_PLAIN
from nnunet_acnorm.norms.functional import recalibrated_affine, sparse_correlation, use_sorted_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_precision_arguments, cpu_peak_bytes, resolve_precision  # noqa: E402


class TwoPassACNorm(nn.Module):
    """The formula computed as published: norm(x; gt, bt) + norm(x; S gt, S bt)."""

    def __init__(self, plain: nn.Module):
        super().__init__()
        self.plain = plain
        self.register_buffer("source_weight", plain.weight.detach().clone())
        self.register_buffer("source_bias", plain.bias.detach().clone())

    def forward(self, x):
        p = self.plain
        s = sparse_correlation(self.source_weight, self.source_bias, p.weight, p.bias)
        w2, b2 = s @ p.weight, s @ p.bias
        if isinstance(p, nn.modules.batchnorm._BatchNorm):
            bn = lambda w, b: F.batch_norm(x, p.running_mean, p.running_var, w, b, p.training,  # noqa: E731
                                           p.momentum, p.eps)
            return bn(p.weight, p.bias) + bn(w2, b2)
        return (F.instance_norm(x, None, None, p.weight, p.bias, True, 0.1, p.eps)
                + F.instance_norm(x, None, None, w2, b2, True, 0.1, p.eps))


def make_variants(norm_cls, channels, dim, with_conv):
    conv_cls = nn.Conv3d if dim == 3 else nn.Conv2d

    def norm():
        torch.manual_seed(0)
        m = norm_cls(channels, affine=True)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        return m

    def wrap(layer):
        if not with_conv:
            return layer
        torch.manual_seed(1)
        return nn.Sequential(conv_cls(channels, channels, 3, padding=1, bias=True), layer)

    plain = wrap(norm())
    fused = wrap(ACNORM_FOR_PLAIN[norm_cls].from_norm(norm()))
    two_pass = wrap(TwoPassACNorm(norm()))
    return {"plain": plain, "AC-Norm fused": fused, "AC-Norm two-pass": two_pass}


#: the autocast dtype of the steps (None: float32); set by main from --amp / --amp-dtype
AUTOCAST_DTYPE: torch.dtype | None = None


def step(module, x):
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPE) if AUTOCAST_DTYPE else contextlib.nullcontext():
        y = module(x)
    y.float().sum().backward()


def peak_memory_bytes(module, x, device):
    """Peak memory allocated during one forward+backward, above what was allocated before."""
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(lambda: step(module, x))


def measure(variants, x, device, repeats, compile: bool = False):
    if compile:   # compiled: plain vs fused (the two-pass formula is the eager reference)
        variants = {name: m for name, m in variants.items() if name != "AC-Norm two-pass"}
    times = {name: [] for name in variants}
    for name, module in variants.items():
        module.to(device).train()
        if compile:
            variants[name] = module = torch.compile(module)
        step(module, x)  # warm-up (and compilation)
    for _ in range(repeats):
        for name, module in variants.items():  # interleaved: noise hits all variants alike
            module.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(module, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    memory = {name: peak_memory_bytes(m, x, device) for name, m in variants.items()}
    return {name: min(t) for name, t in times.items()}, memory


SHAPES = {
    "3D nnU-Net (2x32x64^3)": (3, (2, 32, 64, 64, 64)),
    "2D fundus (2x64x256^2)": (2, (2, 64, 256, 256)),
}
QUICK_SHAPES = {
    "3D small (2x16x24^3)": (3, (2, 16, 24, 24, 24)),
    "2D small (2x16x64^2)": (2, (2, 16, 64, 64)),
}


AFFINE_CHANNELS = (32, 64, 128, 256, 384, 512, 768, 1024, 2048, 4096)


def _affine_inputs(c, device, seed):
    gen = torch.Generator().manual_seed(seed)
    sw = torch.empty(c).uniform_(0.5, 1.5, generator=gen).to(device)
    sb = torch.randn(c, generator=gen).to(device)
    tw = (sw + 0.05 * torch.randn(c, generator=gen).to(device)).requires_grad_(True)
    tb = (sb + 0.05 * torch.randn(c, generator=gen).to(device)).requires_grad_(True)
    return sw, sb, tw, tb


def affine_table(device, repeats, channels=AFFINE_CHANNELS):
    """Forward+backward of the recalibrated affine alone: dense vs sorted, per channel count; the
    sorted path also as a layer runs it (its source layout kept between calls)."""
    print(f"\nrecalibrated affine alone (forward+backward, fine-tuned-like affines, tau 1), best of "
          f"{repeats} interleaved repeats x 20 calls\n")
    print("| C | dense: ms | sorted: ms | sorted, layout kept: ms | sorted / dense | auto takes |")
    print("|---|---|---|---|---|---|")
    for c in channels:
        sw, sb, tw, tb = _affine_inputs(c, device, c)
        cache = {}
        variants = {"dense": ("dense", None), "sorted": ("sorted", None), "kept": ("sorted", cache)}
        times = {name: [] for name in variants}
        calls = 20 if c <= 1024 else 3
        for _ in range(repeats + 1):  # the first round is a warm-up
            for name, (method, layout_cache) in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls):
                    w, b = recalibrated_affine(sw, sb, tw, tb, 1.0, method=method, layout_cache=layout_cache)
                    torch.autograd.grad((w.sum(), b.sum()), (tw, tb))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / calls)
        dense, fast, kept = (min(times[name][1:]) for name in ("dense", "sorted", "kept"))
        print(f"| {c} | {dense * 1e3:.3f} | {fast * 1e3:.3f} | {kept * 1e3:.3f} | {fast / dense:.3f} | "
              f"{'sorted' if use_sorted_path(c, device) else 'dense'} |", flush=True)


#: the channel counts of ResNet-50's 53 norm layers (torchvision), in order of registration
RESNET50_CHANNELS = ([64] + [64, 64, 256, 256] + [64, 64, 256] * 2 + [128, 128, 512, 512] + [128, 128, 512] * 3
                     + [256, 256, 1024, 1024] + [256, 256, 1024] * 5 + [512, 512, 2048, 2048] + [512, 512, 2048] * 2)


def network_affine_table(device, repeats, channels=RESNET50_CHANNELS):
    """Forward+backward of all the recalibrated affines of one network step: one call per layer
    (``method="auto"``, each layer's source layout kept, as layers run it) vs the one call that
    ``norms.batched`` makes for all layers of a CPU network forward."""
    from nnunet_acnorm.norms.functional import _SortedRecalibratedAffines

    layers = [_affine_inputs(c, device, k) for k, c in enumerate(channels)]
    caches = [{} for _ in layers]
    batched_cache = {}
    n = len(layers)
    params = [layer[2] for layer in layers] + [layer[3] for layer in layers]
    tensors = [layer[k] for k in range(4) for layer in layers]

    def per_layer():
        out = [recalibrated_affine(*layer, 1.0, layout_cache=cache) for layer, cache in zip(layers, caches)]
        torch.autograd.grad([w.sum() + b.sum() for w, b in out], params)

    def batched():
        out = _SortedRecalibratedAffines.apply((1.0,) * n, batched_cache, *tensors)
        torch.autograd.grad([o.sum() for o in out], params)

    variants = {"one call per layer": per_layer, "one call per network (norms.batched)": batched}
    if device.type != "cpu":
        variants.pop("one call per network (norms.batched)")   # a CPU path
    times = {name: [] for name in variants}
    for _ in range(repeats + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / 5)
    print(f"\nall recalibrated affines of one step, {n} layers of {min(channels)}-{max(channels)} channels "
          f"(ResNet-50), forward+backward, best of {repeats} interleaved repeats x 5 steps\n")
    print("| affine calls | ms per step | ratio |\n|---|---|---|")
    base = min(times["one call per layer"][1:])
    for name, t in times.items():
        print(f"| {name} | {min(t[1:]) * 1e3:.2f} | {min(t[1:]) / base:.3f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--affine", action="store_true", help="also time the recalibrated affine alone, "
                                                               "dense vs sorted, C = 32..4096")
    parser.add_argument("--affine-only", action="store_true", help="only the affine table")
    parser.add_argument("--shapes", choices=("all", "3d", "2d"), default="all", help="which shapes to time")
    parser.add_argument("--measured", choices=("both", "block", "norm"), default="both",
                        help="conv+norm blocks, the norm alone, or both")
    add_precision_arguments(parser, dtype=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precision = resolve_precision(parser, args, device)
    global AUTOCAST_DTYPE
    AUTOCAST_DTYPE = getattr(torch, args.amp_dtype) if args.amp else None
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = {name: shape for name, shape in (QUICK_SHAPES if args.quick else SHAPES).items()
              if args.shapes == "all" or f"{shape[0]}d" == args.shapes}
    blocks = {"both": (True, False), "block": (True,), "norm": (False,)}[args.measured]

    print(f"device: {device}, {precision}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"best of {repeats} interleaved repeats\n")
    if args.affine_only:
        affine_table(device, repeats)
        network_affine_table(device, repeats)
        return
    print("| shape | norm | measured | time: fused / plain | time: fused / two-pass | "
          "memory: fused / plain | memory: fused / two-pass | plain: ms, MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name, (dim, shape) in shapes.items():
        for norm_name, norm_cls in (("BN", nn.BatchNorm3d if dim == 3 else nn.BatchNorm2d),
                                    ("IN", nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d)):
            for with_conv in blocks:
                torch.manual_seed(0)
                x = torch.randn(shape, device=device)
                variants = make_variants(norm_cls, shape[1], dim, with_conv)
                t, m = measure(variants, x, device, repeats, compile=args.compile)
                fused, plain, two = "AC-Norm fused", "plain", "AC-Norm two-pass"
                versus = (lambda d: f"{d[fused] / d[two]:.3f}") if two in t else (lambda d: "-")
                print(f"| {shape_name} | {norm_name} | {'conv+norm' if with_conv else 'norm only'} | "
                      f"{t[fused] / t[plain]:.3f} | {versus(t)} | "
                      f"{m[fused] / m[plain]:.3f} | {versus(m)} | "
                      f"{t[plain] * 1e3:.0f}, {m[plain] / 2**20:.0f} |", flush=True)
    if args.affine:
        affine_table(device, repeats)
        network_affine_table(device, repeats)


if __name__ == "__main__":
    main()
