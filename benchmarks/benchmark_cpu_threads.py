"""CPU thread settings for trainings side by side: total training steps per second, as ratios.

    python benchmarks/benchmark_cpu_threads.py [--steps 30] [--repetitions 2]

Each configuration runs P worker processes at once, each doing nnU-Net-like training steps
(the demo's 2D PlainConvUNet: features 32-256, instance norm, batch 10, patch 4 x 64, Dice-free
cross-entropy, SGD) with T torch threads:

- ``1 x all``: one training with every core (what ``nnUNetv2_train -device cpu`` does alone);
- ``P x all``: P trainings side by side, each with every core (``nnUNetv2_train``'s setting,
  which overrides ``OMP_NUM_THREADS``, for two runs at once);
- ``P x 1``: P trainings side by side with one thread each (``OMP_NUM_THREADS=1``, which our
  trainers honour; what the demo and the experiments do).

Reported: total steps per second of all workers and the ratio to ``1 x all``; configurations are
interleaved over repetitions (the machine is shared and noisy), medians. One run, ratios only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import sys, time, torch
from torch import nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet
threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
net = PlainConvUNet(1, 4, (32, 64, 128, 256), nn.Conv2d, [[3, 1], [3, 3], [3, 3], [3, 3]],
                    [[1, 1], [1, 2], [2, 2], [2, 2]], (2, 2, 2, 2), 5, (2, 2, 2), True, nn.InstanceNorm2d,
                    {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True})
opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
x, y = torch.randn(10, 1, 4, 64), torch.randint(0, 5, (10, 4, 64))
def step():
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(time.perf_counter() - start)
"""


def run_config(processes: int, threads: int, steps: int) -> float:
    """Total steps per second of ``processes`` workers started together."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(threads), str(steps)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    times = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(steps / t for t in times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    configs = {f"1 x {cores} threads": (1, cores), f"{args.processes} x {cores} threads": (args.processes, cores),
               f"{args.processes} x 1 thread": (args.processes, 1)}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repetitions):
        for name, (p, t) in configs.items():
            rates[name].append(run_config(p, t, args.steps))
    base = statistics.median(rates[next(iter(configs))])
    print(f"{cores} cores, {args.steps} steps per worker, {args.repetitions} interleaved repetitions (medians)\n")
    print("| configuration | total steps/s | ratio to one training with every core |\n|---|---|---|")
    result = {}
    for name, values in rates.items():
        median = statistics.median(values)
        result[name] = {"steps_per_s": median, "ratio": median / base, "all": values}
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
