"""nnU-Net's process settings on a CPU (docs/cpu.md): seconds of real ``nnUNetv2_train`` runs.

    python benchmarks/benchmark_cpu_settings.py --workdir /tmp/cpu_settings [--repetitions 2]
        [--json benchmarks/results/cpu_settings.json]

On a tiny generated 2D dataset (5 cases of 24 slices of 24 x 24, one label; planned and
preprocessed once in ``--workdir``), fold 0 (4 training cases, 1 validation case):

- ``--val`` of an ``nnUNetTrainerFinetune_1epoch`` model (the final validation every training ends
  with: one case predicted and exported), with ``nnUNet_def_n_proc`` unset (nnU-Net's export pool
  of 8 spawned processes) and ``nnUNet_def_n_proc=1``;
- one training epoch of ``nnUNetTrainerFinetune_1epoch`` (nnU-Net's 250 iterations) with
  ``nnUNet_n_proc_DA=0`` (augmentation in the training process) and unset (nnU-Net's
  min(12, cores) worker processes).

Every run is a fresh process, timed whole (start-up included); the epoch time is nnU-Net's own
(``Epoch time`` in its log). Configurations are interleaved over repetitions; the load average
before each run is recorded (on a shared machine more processes also get a larger share of the
cores). One run of this script, ratios and seconds with their conditions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET, TRAINER = 917, "nnUNetTrainerFinetune_1epoch"


def write_dataset(raw: Path) -> None:
    """Dataset917_CpuSettings: 5 noisy volumes with one bright box each (nnU-Net raw format)."""
    import SimpleITK as sitk

    folder = raw / f"Dataset{DATASET}_CpuSettings"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for case in range(5):
        seg = np.zeros((24, 24, 24), dtype=np.uint8)
        z, y, x = rng.integers(0, 16, 3)
        seg[z:z + 8, y:y + 8, x:x + 8] = 1
        image = rng.normal(0.0, 1.0, seg.shape).astype(np.float32) + 3.0 * seg
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / f"case_{case:03d}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / "labelsTr" / f"case_{case:03d}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "box": 1},
                                                     "numTraining": 5, "file_ending": ".nii.gz"}))


def environment(workdir: Path, **settings: str | None) -> dict:
    env = dict(os.environ, nnUNet_raw=str(workdir / "raw"), nnUNet_preprocessed=str(workdir / "preprocessed"),
               nnUNet_results=str(workdir / "results"), nnUNet_compile="false")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        env.pop(name, None)
    env.update({k: v for k, v in settings.items() if v is not None})
    return env


def timed(args: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, load average before, output) of one console script run."""
    script = str(Path(sys.executable).parent / args[0])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([script, *args[1:]], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, load, proc.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    train = ["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    if not (args.workdir / "preprocessed" / f"Dataset{DATASET}_CpuSettings").is_dir():
        write_dataset(args.workdir / "raw")
        timed(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "2d", "-np", "1", "-npfp", "1"],
              environment(args.workdir))
    runs: dict[str, list[dict]] = {}
    configs = {"val, nnUNet_def_n_proc unset (8)": (train + ["--val"], {"nnUNet_n_proc_DA": "0"}),
               "val, nnUNet_def_n_proc=1": (train + ["--val"], {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}),
               "train, nnUNet_n_proc_DA=0": (train, {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}),
               "train, nnUNet_n_proc_DA unset": (train, {"nnUNet_def_n_proc": "1"})}
    timed(train, environment(args.workdir, nnUNet_def_n_proc="1"))  # the model --val validates
    for _ in range(args.repetitions):
        for name, (command, settings) in configs.items():
            seconds, load, out = timed(command, environment(args.workdir, **settings))
            epoch = re.findall(r"Epoch time: ([\d.]+) s", out)
            runs.setdefault(name, []).append({"seconds": seconds, "epoch_seconds": float(epoch[-1]) if epoch else None,
                                              "load_before": load})
    report(runs, args.json)


def report(runs: dict[str, list[dict]], json_file: str | None) -> None:
    print(f"{os.cpu_count()} cores; median over {len(next(iter(runs.values())))} interleaved repetitions\n")
    print("| configuration | seconds (whole run) | nnU-Net epoch time | load average before |\n|---|---|---|---|")
    for name, values in runs.items():
        epochs = [v["epoch_seconds"] for v in values if v["epoch_seconds"] is not None]
        epoch = f"{statistics.median(epochs):.0f}" if epochs else "-"
        loads = ", ".join(f"{v['load_before']:.1f}" for v in values)
        print(f"| {name} | {statistics.median(v['seconds'] for v in values):.0f} | {epoch} | {loads} |")
    if json_file:
        with open(json_file, "w") as fh:
            json.dump({"cores": os.cpu_count(), "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
