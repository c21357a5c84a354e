"""The benchmark scripts run and print their tables (quick settings; figures are in docs/performance.md)."""
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark_module(name: str):
    """A benchmark script as a module (the script under test, loaded from its file)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_norm_layer_benchmark_quick_run():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "benchmark_norm_layers.py"), "--quick",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 3D") or line.startswith("| 2D")]
    assert len(rows) == 8
    for row in rows:
        time_plain, time_two_pass, memory_plain, memory_two_pass = (float(c) for c in row.strip("|").split("|")[3:7])
        assert math.isfinite(time_plain) and math.isfinite(time_two_pass), row  # timings: figures, not claims
        # saved-activation memory is deterministic: the fused layer keeps what the plain norm keeps
        # (one normalised tensor), the two-pass formula keeps more
        assert 0.99 <= memory_plain <= 1.01, row
        assert memory_two_pass < 0.8, row


@pytest.mark.parametrize("norm_cls,dim", [(nn.BatchNorm3d, 3), (nn.InstanceNorm3d, 3), (nn.BatchNorm2d, 2),
                                          (nn.InstanceNorm2d, 2)])
@pytest.mark.parametrize("with_conv", [True, False])
def test_norm_layer_benchmark_times_one_computation_two_ways(norm_cls, dim, with_conv):
    """What the table compares is the same layer: the fused and the two-pass AC-Norm variants give
    the same output and the same gradients (input, targets), and both differ from the plain norm."""
    bench = _benchmark_module("benchmark_norm_layers")
    variants = bench.make_variants(norm_cls, 6, dim, with_conv)
    x = torch.randn(2, 6, *[5] * dim, generator=torch.Generator().manual_seed(0)) * 2 + 1
    results = {}
    for name, module in variants.items():
        module.train()
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.square().sum().backward()
        norm = module[-1] if with_conv else module
        norm = getattr(norm, "plain", norm)  # the two-pass variant wraps a plain norm
        results[name] = (y.detach(), xi.grad, {"weight": norm.weight.grad, "bias": norm.bias.grad})
    (y_fused, gx_fused, p_fused), (y_two, gx_two, p_two) = results["AC-Norm fused"], results["AC-Norm two-pass"]
    assert torch.isfinite(y_fused).all() and torch.isfinite(gx_fused).all()
    torch.testing.assert_close(y_fused, y_two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fused, gx_two, rtol=1e-4, atol=1e-4)
    for key in ("weight", "bias"):
        assert p_fused[key] is not None and p_two[key] is not None, f"no gradient of the target {key}"
        torch.testing.assert_close(p_fused[key], p_two[key], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y_fused, results["plain"][0], rtol=1e-3, atol=1e-3), "AC-Norm equal to plain"


def test_isolated_interleaved_times_runs_each_variant_in_its_own_process_and_reports_worker_errors(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned workers import _common by name, as the scripts do
    import _common as common
    # build(*args) must be picklable: functools.partial(int, "3") is a run that returns 3
    import functools
    times, faults = common.isolated_interleaved_times({"a": (functools.partial, (int, "3"))}, 5, 2, processes=2)
    assert set(times) == set(faults) == {"a"}
    assert len(times["a"]) == 5 and all(t >= 0 for t in times["a"])
    assert len(faults["a"]) == 5 and all(f >= 0 for f in faults["a"])
    with pytest.raises(RuntimeError, match=r"bad: benchmark worker failed: ValueError"):
        common.isolated_interleaved_times({"bad": (int, ("x",))}, 1, 1)
    # --same-process: the same builds, built and timed here, with the page faults per repetition too
    times, faults = common.timed_builds({"a": (functools.partial, (int, "3")), "b": (functools.partial, (float, "4"))},
                                        3, 2, same_process=True)
    assert set(times) == set(faults) == {"a", "b"}
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in (*times.values(), *faults.values()))


def _run_if_environment(key: str, value: str | None):
    """A benchmark build (run in a spawned worker): fails unless the worker's ``key`` is ``value``."""
    import os

    if os.environ.get(key) != value:
        raise ValueError(f"{key}={os.environ.get(key)!r} in the worker, expected {value!r}")
    return lambda: None


def test_paired_workers_time_every_variant_and_start_with_the_malloc_settings_asked_for(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    import _common as common
    import functools
    import os

    trim = common.MALLOC_SETTINGS["no-trim"]["MALLOC_TRIM_THRESHOLD_"]
    builds = {"a": (functools.partial, (int, "3")), "b": (_run_if_environment, ("MALLOC_TRIM_THRESHOLD_", trim))}
    times, faults = common.isolated_interleaved_times(builds, 5, 2, processes=2, paired=True, malloc="no-trim")
    assert set(times) == set(faults) == {"a", "b"}
    assert all(len(v) == 5 and all(t >= 0 for t in v) for v in (*times.values(), *faults.values()))
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ, "the parent's environment was not restored"
    # glibc's defaults: the worker has no such variable, and a paired worker's failure names its variants
    with pytest.raises(RuntimeError, match=r"a, b: benchmark worker failed: ValueError: MALLOC_TRIM_THRESHOLD_=None"):
        common.isolated_interleaved_times(builds, 1, 1, paired=True)
    with pytest.raises(ValueError, match="worker processes"):
        common.timed_builds(builds, 1, 1, same_process=True, malloc="no-trim")
    assert common.timing_mode(False, 2, paired=True, malloc="no-trim") == \
        "2 worker processes, each timing all variants back to back, malloc no-trim"


def test_classification_benchmark_quick_run_one_process_per_variant():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "benchmark_classification.py"), "--depth", "18",
                             "--size", "32", "--batch_size", "2", "--steps", "1", "--repeats", "4", "--threads", "1",
                             "--processes", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 process per variant, used in turn" in result.stdout
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| vanilla") or line.startswith("| AC-Norm")}
    assert set(rows) == {"vanilla", "AC-Norm"}
    for row in rows.values():
        rate, low, high, page_faults = (float(c) for c in row.strip("|").split("|")[1:5])
        assert 0 < low <= rate <= high and page_faults >= 0, row   # timings: figures, not claims
    ratio, low, high = _classification_ratio(result.stdout, "bootstrap interval")
    assert math.isfinite(ratio) and 0 < low <= ratio <= high


def _classification_ratio(stdout: str, interval: str) -> tuple[float, float, float]:
    """The AC-Norm / vanilla ratio and its interval from the classification benchmark's output."""
    line = stdout.split("AC-Norm / vanilla throughput: ")[1].splitlines()[0]
    match = re.fullmatch(rf"(\d+\.\d+) \(median of per-repeat ratios; 95 % {interval} (\d+\.\d+)-(\d+\.\d+); "
                         r"range .*\)", line)
    assert match, line
    return tuple(float(v) for v in match.groups())


def test_classification_benchmark_quick_run_paired_processes_cluster_interval():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "benchmark_classification.py"), "--depth", "18",
                             "--size", "32", "--batch_size", "2", "--steps", "1", "--repeats", "4", "--threads", "1",
                             "--processes", "2", "--paired", "--malloc", "no-trim"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 worker processes, each timing all variants back to back, malloc no-trim" in result.stdout
    ratio, low, high = _classification_ratio(result.stdout, "cluster bootstrap interval over the worker processes")
    assert 0 < low <= ratio <= high
    per_process = result.stdout.split("median ratio of each worker process: ")[1].splitlines()[0].split(", ")
    assert len(per_process) == 2 and all(float(r) > 0 for r in per_process), per_process


def test_median_interval_brackets_the_median_and_is_reproducible(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common as common
    values = [1.0, 0.9, 1.1, 0.95, 1.02, 0.97, 1.3, 0.99]
    median, low, high = common.median_interval(values)
    assert median == pytest.approx(0.995) and low < median < high
    assert common.median_interval(values) == (median, low, high)
    assert common.median_interval([1.5, 1.5]) == (1.5, 1.5, 1.5)


def test_median_interval_resamples_whole_worker_processes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common as common
    # the schedule the benchmarks cluster by: repetitions 2k and 2k+1 go to worker k mod processes
    assert [common.worker_index(r, 3) for r in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    assert common.repetition_clusters(8, 3) == [0, 0, 1, 1, 2, 2, 0, 0]
    assert common.repetition_clusters(8, 1) is None and common.repetition_clusters(2, 3) is None
    assert common.repetition_clusters(8, 3, same_process=True) is None
    # 4 processes with speeds of their own (0.90, 0.95, 1.00, 1.05) and little noise within each:
    # one by one, the 80 repetitions look precise; by process, the interval spans the processes' spread
    rng = np.random.default_rng(1)
    clusters = [common.worker_index(r, 4) for r in range(80)]
    values = [0.90 + 0.05 * c + rng.normal(0, 0.002) for c in clusters]
    median, low, high = common.median_interval(values)
    median_c, low_c, high_c = common.median_interval(values, clusters=clusters)
    assert median_c == median and low_c < low <= median <= high < high_c
    assert high - low < 0.05 < high_c - low_c
    assert low_c < 0.95 and high_c > 1.0, (low_c, high_c)
    assert common.median_interval(values, clusters=clusters) == (median_c, low_c, high_c)   # seeded
    # one process (or --same-process): no clusters to resample, the per-repetition interval
    assert common.median_interval(values, clusters=[0] * 80) == (median, low, high)
    for labels in ([0, 1, 2], [0]):   # also a single label of the wrong length
        with pytest.raises(ValueError, match=f"{len(labels)} cluster labels for 80 values"):
            common.median_interval(values, clusters=labels)


def test_trainer_benchmark_quick_run_paired_inference_without_page_faults(tmp_path):
    out = tmp_path / "trainer.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "benchmark_trainer.py"), "--threads", "1",
                             "--repetitions", "2", "--steps", "1", "--inference-batches", "1", "--processes", "1",
                             "--malloc", "no-trim", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "inference: 1 call per repetition, 1 worker process, each timing all variants back to back, " \
           "malloc no-trim" in result.stdout
    data = json.loads(out.read_text())
    networks = {"stock nnUNetTrainer network", "AC-Norm, folded", "AC-Norm, not folded"}
    assert set(data["inference_s"]) == set(data["inference_page_faults_per_call"]) == networks
    assert set(data["train_page_faults_per_step"]) == {"nnUNetTrainer", "nnUNetTrainerACNorm"}
    low, high = data["inference_ratio_unfolded_interval"]
    assert 0 < low <= data["inference_ratio_unfolded"] <= high
    assert data["max_softmax_difference_folded"] == 0.0
