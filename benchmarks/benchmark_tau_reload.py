"""Reloading an AC-Norm network's weights with the calibrated temperature (tau = "auto", the trainers'
default) vs the fixed tau = 1: the cost of ``load_state_dict``, in one run (ratio).

nnU-Net's predictor loads the weights into the network once per case and fold. With ``tau="auto"``
each AC-Norm layer calibrates its temperature from the source affines it loads
(``norms.functional.calibrated_tau``: a bisection); the temperature is a function of the source
values and is computed once per distinct source, so a reload of weights seen before costs a lookup.
The table shows the first load (nothing calibrated yet: the calibration cache is cleared before it)
and the reloads, interleaved (tau1, auto, auto, tau1, ...), with the median ratio auto / tau1 and
its bootstrap interval, and how many bisections each reload ran.

The network: nnU-Net's PlainConvUNet of a 6-stage 3d_fullres plan (features 32 .. 320, two
convolutions per stage, deep supervision on: the decoder holds the encoder, so every encoder layer
is loaded under two names) built by ``nnUNetTrainerACNorm`` (auto) and ``nnUNetTrainerACNorm_tau1``;
its weights: an AC-Norm checkpoint (source and target affines) with trained-looking, seeded random
affines.

    python benchmarks/benchmark_tau_reload.py                  # ~1 min on a CPU
    python benchmarks/benchmark_tau_reload.py --quick          # a smaller network, for the tests
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_interval  # noqa: E402

FULL = {"features": [32, 64, 128, 256, 320, 320], "patch": [128, 128, 128]}
QUICK = {"features": [8, 16, 32, 64], "patch": [32, 32, 32]}


def build_networks(features, patch, seed: int = 0) -> tuple[dict, dict]:
    """The two networks (auto, tau1) and one AC-Norm state dict both load strictly."""
    from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json, default_plans
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm, nnUNetTrainerACNorm_tau1
    from nnunet_acnorm.nnunet.training_step import construct_trainer
    from nnunet_acnorm.norms import acnorm_modules

    plans = default_plans(patch, features, 3)
    networks = {}
    for name, cls in (("tau1", nnUNetTrainerACNorm_tau1), ("auto", nnUNetTrainerACNorm)):
        trainer = construct_trainer(cls, plans, "bench", default_dataset_json(3))
        torch.manual_seed(seed)
        networks[name] = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                        True)
    generator = torch.Generator().manual_seed(seed)
    for layer in acnorm_modules(networks["tau1"]).values():   # trained-looking affines, then frozen as the source
        with torch.no_grad():
            layer.weight.copy_(1 + 0.3 * torch.randn(layer.num_features, generator=generator))
            layer.bias.copy_(0.5 * torch.randn(layer.num_features, generator=generator))
        layer.set_source()
    state = {k: v.clone() for k, v in networks["tau1"].state_dict().items()}
    return networks, state


def run(features, patch, repetitions: int) -> dict:
    from nnunet_acnorm.norms import acnorm_modules, functional

    networks, state = build_networks(features, patch)
    functional._CALIBRATED.clear()
    first = {}
    for name in ("tau1", "auto"):
        start = time.perf_counter()
        networks[name].load_state_dict(state)
        first[name] = time.perf_counter() - start
    times = {"tau1": [], "auto": []}
    bisections = []
    for repetition in range(repetitions):
        for name in (("tau1", "auto") if repetition % 2 == 0 else ("auto", "tau1")):
            cached = len(functional._CALIBRATED)
            start = time.perf_counter()
            networks[name].load_state_dict(state)
            times[name].append(time.perf_counter() - start)
            if name == "auto":
                bisections.append(len(functional._CALIBRATED) - cached)
    ratios = [a / t for a, t in zip(times["auto"], times["tau1"])]
    median, low, high = median_interval(ratios)
    layers = acnorm_modules(networks["auto"])
    return {"features": list(features), "layers": len(layers),
            "layer_loads": _layer_loads(networks["auto"]),
            "calibrated_layers": sum(m.tau_calibrated for m in layers.values()),
            "first_load_s": first, "reload_s": {k: statistics.median(v) for k, v in times.items()},
            "reload_ratio_auto_over_tau1": median, "reload_ratio_interval": [low, high],
            "new_calibrations_per_reload": max(bisections), "repetitions": repetitions}


def _layer_loads(network) -> int:
    """How many times ``load_state_dict`` reaches an AC-Norm layer (a layer under two names: twice)."""
    from nnunet_acnorm.norms.modules import _ACNorm

    return sum(isinstance(m, _ACNorm) for _, m in network.named_modules(remove_duplicate=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-stage network with 8 .. 64 features")
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = QUICK if args.quick else FULL
    result = run(config["features"], config["patch"], args.repetitions)
    low, high = result["reload_ratio_interval"]
    print(f"## Reloading AC-Norm weights: tau = auto vs tau = 1 (PlainConvUNet, features {result['features']}, "
          f"{result['layers']} AC-Norm layers, {result['layer_loads']} layer loads per load_state_dict, "
          f"{result['calibrated_layers']} calibrated; CPU, 1 thread, {args.repetitions} interleaved repetitions)\n")
    print("| load | tau = 1 (ms) | tau = auto (ms) | auto / tau1 |")
    print("|---|---|---|---|")
    first = result["first_load_s"]
    print(f"| first (nothing calibrated) | {1e3 * first['tau1']:.1f} | {1e3 * first['auto']:.1f} | "
          f"{first['auto'] / first['tau1']:.2f} |")
    reload = result["reload_s"]
    print(f"| reload (median) | {1e3 * reload['tau1']:.1f} | {1e3 * reload['auto']:.1f} | "
          f"{result['reload_ratio_auto_over_tau1']:.3f} ({low:.3f}-{high:.3f}) |")
    print(f"\nbisections run per reload: {result['new_calibrations_per_reload']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
