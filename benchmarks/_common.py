"""What the benchmark scripts share: their common options, interleaved timing, peak memory.

Benchmark code only (the library never imports it); the scripts import it as ``_common`` from their
own folder.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def add_common_arguments(parser: argparse.ArgumentParser, *, network: bool = True) -> argparse.ArgumentParser:
    """The options of the training-step benchmarks: the built-in PlainConvUNet's shape (``network``),
    the interleaved repetitions, the device and thread count, a JSON copy of the results."""
    if network:
        parser.add_argument("--patch", type=int, nargs="+", default=[24, 24, 24])
        parser.add_argument("--features", type=int, nargs="+", default=[16, 32, 64])
        parser.add_argument("--batch", type=int, default=2)
        parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per repetition")
    parser.add_argument("--repetitions", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the results here")
    return parser


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(runs: dict[str, Callable[[], None]], repetitions: int, calls: int, device: torch.device,
                      before: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each of ``runs`` (name -> function), ``calls`` calls per repetition; the
    repetitions interleave the runs, in alternating order (a, b, b, a, a, b, ...), so that machine
    load hits all alike and none always runs first. ``before`` runs before each timed block (untimed)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repetition in range(repetitions):
        items = list(runs.items())
        for name, run in (items if repetition % 2 == 0 else items[::-1]):
            if before is not None:
                before()
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def cpu_peak_bytes(run: Callable[[], None]) -> int:
    """Peak memory allocated on the CPU while ``run()`` runs, above what was allocated before (from
    the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage
        peak = max(peak, current)
    return peak
