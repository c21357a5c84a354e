"""What the benchmark scripts share: their common options, interleaved timing, peak memory.

Benchmark code only (the library never imports it); the scripts import it as ``_common`` from their
own folder.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import time
from typing import Any, Callable, NamedTuple

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


def add_precision_arguments(parser: argparse.ArgumentParser, dtype: bool = False) -> argparse.ArgumentParser:
    """``--amp`` / ``--no-amp`` and ``--compile`` / ``--no-compile``; unset, what ``nnUNetv2_train``
    does on the device (:func:`resolve_precision`). ``dtype``: also ``--amp-dtype`` (nnU-Net's own
    training step always autocasts to float16)."""
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision as nnUNetv2_train: autocast (+ GradScaler in training steps); "
                             "default: nnU-Net's choice for the device (CUDA: on; CPU, mps: off, float32)")
    if dtype:
        parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16",
                            help="the autocast dtype of --amp (nnU-Net's: float16)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the network (and nnU-Net's Dice loss) as nnUNetv2_train does; default: "
                             "nnU-Net's choice (CUDA: on unless nnUNet_compile says otherwise; CPU, mps: off)")
    return parser


def resolve_precision(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> str:
    """Fill in ``args.amp`` / ``args.compile`` left unset with nnU-Net's choice for ``device``
    (``training_step.nnunet_precision``); refuse --amp off CUDA. Returns a description."""
    from nnunet_acnorm.nnunet.training_step import nnunet_precision

    amp, compiled = nnunet_precision(device)
    args.amp = amp if args.amp is None else args.amp
    args.compile = compiled if args.compile is None else args.compile
    if args.amp and device.type != "cuda":
        parser.error(f"--amp: nnU-Net's mixed precision (autocast + GradScaler) is CUDA's; on {device.type} it "
                     "trains in float32 (leave --amp out)")
    dtype = getattr(args, "amp_dtype", "float16")
    return f"{'autocast ' + dtype if args.amp else 'float32'}, {'torch.compile' if args.compile else 'eager'}"


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


def _isolated_worker(builds: dict[str, tuple[Callable[..., Callable[[], None]], tuple]], threads: int | None,
                     device: str, warmup: int, conn) -> None:
    """Child process of :func:`isolated_interleaved_times`: build its runs (name -> (build, args)),
    warm them up, then, each time the parent asks (calls, names), time ``calls`` calls of each named
    run in that order, answering per run and call: (seconds, minor page faults)."""
    try:
        if threads:
            torch.set_num_threads(threads)
        runs = {name: build(*build_args) for name, (build, build_args) in builds.items()}
        for run in runs.values():
            for _ in range(warmup):
                run()
        sync(torch.device(device))
        conn.send("ready")
        while (request := conn.recv()) is not None:
            calls, names = request
            answer = []
            for name in names:
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                sync(torch.device(device))
                start = time.perf_counter()
                for _ in range(calls):
                    runs[name]()
                sync(torch.device(device))
                seconds = (time.perf_counter() - start) / calls
                answer.append((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls))
            conn.send(answer)
    except BaseException as error:  # the parent raises it: a benchmark must not hang on a dead child
        conn.send(RuntimeError(f"benchmark worker failed: {type(error).__name__}: {error}"))
    finally:
        conn.close()


class IsolatedTimes(NamedTuple):
    """Per call, name -> one value per repetition: wall-clock seconds and minor page faults. (The
    worker's CPU time, tried too, equalled its wall-clock time with one thread: this machine's noise
    is a slower CPU, not time spent descheduled.)"""
    seconds: dict[str, list[float]]
    page_faults: dict[str, list[float]]


#: glibc malloc settings (``mallopt`` environment variables) under which freed memory is neither
#: returned to the system nor taken from fresh mappings: after the warm-up, no step page-faults
#: (``--malloc no-trim`` of the trainer benchmarks; ``default`` leaves glibc's own)
MALLOC_SETTINGS = {"default": {},
                   "no-trim": {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 34)}}


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    """``os.environ`` with ``variables`` set, for the processes started inside (restored after)."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def worker_index(repetition: int, processes: int) -> int:
    """The worker process (0 .. ``processes`` - 1) of each variant that times ``repetition``:
    repetitions 2k and 2k+1 (one in each order) go to worker k mod ``processes``."""
    return (repetition // 2) % processes


def repetition_clusters(repetitions: int, processes: int, same_process: bool = False) -> list[int] | None:
    """The worker of each repetition (:func:`worker_index`), the clusters :func:`median_interval`
    resamples; None where there are fewer than two (one process, or ``same_process``)."""
    clusters = [worker_index(r, processes) for r in range(repetitions)]
    return None if same_process or len(set(clusters)) < 2 else clusters


def isolated_interleaved_times(builds: dict[str, tuple[Callable[..., Callable[[], None]], tuple]], repetitions: int,
                               calls: int, device: str = "cpu", threads: int | None = None, warmup: int = 2,
                               processes: int = 1, paired: bool = False, malloc: str = "default") -> IsolatedTimes:
    """As :func:`interleaved_times`, but the runs live in spawned worker processes: name ->
    (``build``, ``args``), where ``build(*args)`` (picklable: a module-level function) returns the
    function to time. Returns :class:`IsolatedTimes`, each name -> one value per repetition.

    By default each run has processes of its own. The parent runs one process at a time,
    interleaving the runs in alternating order, so that machine load still hits all alike, while no
    run shares the C heap of another: in one process, one run's allocations change where the other's
    land and how often glibc's malloc returns memory to the system and faults it back in (ResNet-50
    at 224x224: in one process 27 k minor page faults per AC-Norm step and none per vanilla one;
    45-68 k each in processes of their own).

    A process has its own speed too: the same network timed in 4 processes gave paired ratios of
    1.000-1.021 in one run and 0.995-1.064 in another (memory layout, page faults), each over 30
    repetitions. So each run gets ``processes`` processes, used in turn:
    repetitions 2k and 2k+1 (one in each order) go to process k mod ``processes``, and the paired
    ratios average over as many processes as there are.

    ``paired``: each of the ``processes`` workers builds all the runs and times them itself, back to
    back in alternating order, so that the ratios of a repetition are free of the process's own
    speed; it suits runs whose heaps do not interact (inference without page faults: see ``malloc``).
    ``malloc`` names the workers' :data:`MALLOC_SETTINGS`."""
    context = multiprocessing.get_context("spawn")
    groups = [dict(builds)] if paired else [{name: value} for name, value in builds.items()]
    workers: list[list[tuple[Any, Any]]] = [[] for _ in groups]
    try:
        with _environment(MALLOC_SETTINGS[malloc]):
            for group, pool in zip(groups, workers):
                for _ in range(processes):
                    parent, child = context.Pipe()
                    process = context.Process(target=_isolated_worker, daemon=True,
                                              args=(group, threads, device, warmup, child))
                    process.start()
                    child.close()
                    pool.append((process, parent))
        for group, pool in zip(groups, workers):
            for _, conn in pool:
                _check(", ".join(group), conn.recv())
        result = IsolatedTimes({name: [] for name in builds}, {name: [] for name in builds})
        for repetition in range(repetitions):
            forward = repetition % 2 == 0
            for group, pool in (list(zip(groups, workers)) if forward else list(zip(groups, workers))[::-1]):
                names = list(group) if forward else list(group)[::-1]
                conn = pool[worker_index(repetition, processes)][1]
                conn.send((calls, names))
                for name, answer in zip(names, _check(", ".join(group), conn.recv())):
                    for values, value in zip(result, answer):
                        values[name].append(value)
        return result
    finally:
        for pool in workers:
            for process, conn in pool:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for pool in workers:
            for process, _ in pool:
                process.join(timeout=60)
                if process.is_alive():
                    process.terminate()


def timed_builds(builds: dict[str, tuple[Callable[..., Callable[[], None]], tuple]], repetitions: int, calls: int,
                 device: str = "cpu", threads: int | None = None, processes: int = 1, same_process: bool = False,
                 warmup: int = 2, paired: bool = False, malloc: str = "default") -> IsolatedTimes:
    """The trainer benchmarks' timing: :func:`isolated_interleaved_times`, or with ``same_process``
    every run built and timed in this process by :func:`interleaved_times` (the earlier way, which
    lets the runs share one heap), with the page faults of each repetition counted alike (under this
    process's malloc settings: ``malloc`` applies to spawned workers only)."""
    if not same_process:
        return isolated_interleaved_times(builds, repetitions, calls, device, threads, warmup, processes, paired,
                                          malloc)
    if malloc != "default":
        raise ValueError("malloc settings apply to worker processes; set them in the environment for --same-process")
    if threads:
        torch.set_num_threads(threads)
    runs = {name: build(*build_args) for name, (build, build_args) in builds.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    faults: dict[str, list[float]] = {name: [] for name in runs}

    def counted(name, run):
        def timed_block():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            run()
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return timed_block

    seconds = interleaved_times({name: counted(name, run) for name, run in runs.items()}, repetitions, calls,
                                torch.device(device))
    per_repetition = {name: [sum(f[i:i + calls]) / calls for i in range(0, len(f), calls)]
                      for name, f in faults.items()}
    return IsolatedTimes(seconds, per_repetition)


def timing_mode(same_process: bool, processes: int, paired: bool = False, malloc: str = "default") -> str:
    """How a run was timed, for the benchmark's heading."""
    if same_process:
        return "one process"
    plural = "es" if processes > 1 else ""
    mode = (f"{processes} worker process{plural}, each timing all variants back to back" if paired
            else f"{processes} process{plural} per variant, used in turn")
    return mode + ("" if malloc == "default" else f", malloc {malloc}")


def _check(name: str, message):
    if isinstance(message, BaseException):
        raise RuntimeError(f"{name}: {message}")
    return message


def median_interval(values: list[float], confidence: float = 0.95,
                    clusters: list | None = None) -> tuple[float, float, float]:
    """The median of ``values`` (per-repetition ratios) and its bootstrap interval (percentile
    method, 9999 resamples, fixed seed: the same data give the same interval).

    ``clusters`` (one label per value: the worker process of each repetition, see
    :func:`repetition_clusters`): with two or more labels, the resamples draw whole clusters with
    replacement, each with all its values (the cluster bootstrap). A process has its own speed, so
    the repetitions of one process are not independent draws: resampling them one by one gives an
    interval that ignores the process-to-process spread (ResNet-50 64x64, 6 processes per variant:
    per-process median ratios 0.934-1.007 while the per-repetition interval was 0.965-0.998).
    With fewer than two labels, the values are resampled one by one."""
    import numpy as np
    from scipy import stats

    data = np.asarray(values, dtype=float)
    if len(data) < 2 or np.ptp(data) == 0:
        return float(np.median(data)), float(np.median(data)), float(np.median(data))
    if clusters is not None and len(clusters) != len(data):
        raise ValueError(f"median_interval: {len(clusters)} cluster labels for {len(data)} values")
    rng = np.random.default_rng(0)
    if clusters is None or len(set(clusters)) < 2:
        res = stats.bootstrap((data,), np.median, n_resamples=9999, confidence_level=confidence, method="percentile",
                              rng=rng)
        return float(np.median(data)), float(res.confidence_interval.low), float(res.confidence_interval.high)
    labels = np.asarray(clusters)
    groups = [data[labels == label] for label in dict.fromkeys(clusters)]
    medians = np.array([np.median(np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))]))
                        for _ in range(9999)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(data)), float(low), float(high)


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
