"""The whole AC-Norm workflow on bundled real CT and MR, on CPU (``nnUNetv2_acnorm_demo``).

1. Build two nnU-Net raw datasets from the bundled TotalSegmentator examples (labels remapped to
   0..4: background, liver, spleen, kidneys, stomach; resampled to 4 mm isotropic, axial 2D slices):
   source = abdominal CT cut into 5 slabs (the pretraining task),
   target = abdominal MR cut into 5 slabs, 4 for training and 1 held out for testing.
2. nnU-Net's supervised-pretraining workflow: plan and preprocess the target, move its plans to
   the source (``nnUNetv2_move_plans_between_datasets``), preprocess the source with them.
3. Pretrain on CT with a stock nnU-Net trainer (short schedule).
4. Fine-tune on MR from that checkpoint with ``-pretrained_weights``: AC-Norm and vanilla.
5. Predict the held-out MR slab with both and print the Dice per organ.

Every step is a real nnU-Net console script in a subprocess; their logs go to ``logs/``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nnunet_acnorm.demo.datasets import CT_ORGANS, MR_ORGANS, write_raw_dataset
from nnunet_acnorm.nnunet.seeding import SEED_ENV
from nnunet_acnorm.errors import InputError

DEMO_TRAINER_FOLDER = Path(__file__).resolve().parent / "nnunet_ext"
SOURCE, TARGET = CT_ORGANS, MR_ORGANS
SOURCE_ID, TARGET_ID = SOURCE.dataset_id, TARGET.dataset_id
SOURCE_NAME, TARGET_NAME = SOURCE.folder_name, TARGET.folder_name
CONFIG = "2d"
LABELS = TARGET.labels
PRETRAIN_TRAINER = "nnUNetTrainerScratch_acnormDemo"
FINETUNE_TRAINERS = {"AC-Norm": "nnUNetTrainerACNorm_acnormDemo", "vanilla": "nnUNetTrainerFinetune_acnormDemo"}
PLANS = "nnUNetPlans"
SOURCE_PLANS = "DemoMRPlansForCT"


class DemoError(InputError):
    pass


def _dice_per_label(pred_file: Path, ref_file: Path) -> dict[str, float]:
    """Dice per organ with nnU-Net's own evaluation code (NaN where the organ is in neither)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    organs = {name: label for name, label in LABELS.items() if label != 0}
    metrics = compute_metrics(str(ref_file), str(pred_file), SimpleITKIO(), list(organs.values()))["metrics"]
    return {name: float(metrics[label]["Dice"]) for name, label in organs.items()}


class EpochProgress:
    """One line per finished epoch of an ``nnUNetv2_train`` run, read from its output: epoch,
    train loss and nnU-Net's pseudo Dice per class (the lines nnU-Net logs: ``Epoch N``,
    ``train_loss``, ``Pseudo dice [...]``, ``Epoch time``).

    Example::

        progress = EpochProgress("AC-Norm", epochs=20)
        for line in process.stdout:
            if (summary := progress.feed(line)) is not None:
                print(summary)   # AC-Norm: epoch 3/20, train loss -0.412, pseudo Dice 0.712 0.000 0.301 0.455
    """

    _EPOCH = re.compile(r"(?:^|: )Epoch (\d+)\s*$")
    _LOSS = re.compile(r"train_loss (\S+)")
    _DICE = re.compile(r"Pseudo dice \[(.*)\]")
    _DONE = re.compile(r"Epoch time: ([\d.]+) s")

    def __init__(self, label: str = "", epochs: int | None = None):
        self.label, self.epochs = label, epochs
        self.epoch: int | None = None
        self.loss: float | None = None
        self.dice: list[float] = []

    def feed(self, line: str) -> str | None:
        """Take one output line; returns the epoch's summary when the line ends an epoch."""
        if match := self._EPOCH.search(line):
            self.epoch, self.loss, self.dice = int(match.group(1)), None, []
        elif match := self._LOSS.search(line):
            self.loss = float(match.group(1))
        elif match := self._DICE.search(line):
            values = re.sub(r"np\.float\d+\(([^)]*)\)", r"\1", match.group(1))
            self.dice = [float(v) for v in values.split(",") if v.strip()]
        elif (match := self._DONE.search(line)) and self.epoch is not None:
            return self._summary(float(match.group(1)))
        return None

    def _summary(self, seconds: float) -> str:
        total = f"/{self.epochs}" if self.epochs else ""
        loss = "n/a" if self.loss is None else f"{self.loss:.3f}"
        dice = " ".join(f"{d:.3f}" for d in self.dice) or "n/a"
        label = f"{self.label}: " if self.label else ""
        return f"{label}epoch {self.epoch + 1}{total}, train loss {loss}, pseudo Dice {dice} ({seconds:.0f} s)"


class Runner:
    """Runs nnU-Net console scripts as numbered steps, each with its log under ``logs/``; an
    ``nnUNetv2_train`` step prints one line per epoch (:class:`EpochProgress`), labelled by run when
    several run side by side."""

    def __init__(self, out: Path, env: dict, total_steps: int):
        self.out, self.env, self.total, self.step = out, env, total_steps, 0
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, title: str, script: str, *args, env: dict | None = None, epochs: int | None = None) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total}] {title}", flush=True)
        self._run(f"{self.step:02d}_{script}", script, args, env, EpochProgress("", epochs))

    def parallel(self, title: str, jobs: dict[str, tuple[str, tuple, dict]], max_workers: int,
                 epochs: int | None = None) -> None:
        """Run several commands, ``max_workers`` side by side, as one step; each one's epochs are
        printed as they finish, labelled by the job's name."""
        self.step += 1
        print(f"[{self.step}/{self.total}] {title}", flush=True)
        with ThreadPoolExecutor(max_workers) as pool:
            futures = {label: pool.submit(self._run, f"{self.step:02d}_{label}", script, args, env,
                                          EpochProgress(label, epochs))
                       for label, (script, args, env) in jobs.items()}
            for future in futures.values():
                future.result()

    def _run(self, log_name: str, script: str, args: tuple, env: dict | None, progress: EpochProgress) -> None:
        exe = Path(sys.executable).parent / script
        cmd = [str(exe) if exe.exists() else script, *[str(a) for a in args]]
        log = self.out / "logs" / f"{log_name}.log"
        print(f"    $ {' '.join([script] + cmd[1:])}", flush=True)
        start = time.time()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                summary = progress.feed(line)
                if summary is not None:
                    print("      " + summary, flush=True)
            proc.wait()
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-15:]
            raise DemoError(f"step failed: {' '.join(cmd)} (exit {proc.returncode}); log: {log}\n  "
                            + "\n  ".join(tail))
        print(f"    done in {time.time() - start:.0f} s (log: {log.relative_to(self.out)})", flush=True)


def thread_plan(n_jobs: int, cpus: int | None = None) -> tuple[int, int]:
    """(parallel fine-tunings, CPU threads each): one thread per fine-tuning, as many side by side
    as there are cores (at most ``n_jobs``); see docs/trainers.md for the measurement behind it."""
    cpus = cpus or os.cpu_count() or 1
    parallel = max(1, min(n_jobs, cpus))
    return parallel, max(1, cpus // parallel)


def run_demo(out: Path, pretrain_epochs: int, finetune_epochs: int, iterations: int, overwrite: bool,
             seed: int = 0) -> dict:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DemoError(f"output folder {out} exists and is not empty; pass --overwrite or another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    raw, pre, res = out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"
    for d in (raw, pre, res):
        d.mkdir(parents=True, exist_ok=True)
    env = _demo_env(raw, pre, res)
    parallel, threads = thread_plan(len(FINETUNE_TRAINERS))
    # nnUNet_def_n_proc=1: nnU-Net's final validation of each training exports through a pool of 8 spawned
    # processes by default, each importing torch (minutes of CPU on 2 cores); one does the same work here
    train_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", **{SEED_ENV: str(seed)})
    t0 = time.time()

    print("[0] Building datasets from the bundled TotalSegmentator examples (labels: "
          + ", ".join(f"{k}={v}" for k, v in LABELS.items()) + ")", flush=True)
    write_raw_dataset(raw, SOURCE)
    write_raw_dataset(raw, TARGET, held_out_dir=out)
    print(f"    source {SOURCE_NAME}: {SOURCE.n_slabs} CT slabs; target {TARGET_NAME}: {len(TARGET.train_cases)} MR "
          f"slabs for training, {len(TARGET.held_out)} held out in imagesTs/labelsTs", flush=True)

    run = Runner(out, env, total_steps=8)
    run("Plan and preprocess the target (MR)", "nnUNetv2_plan_and_preprocess", "-d", TARGET_ID, "-c", CONFIG,
        "-np", 1, "-npfp", 1)
    run("Fingerprint the source (CT)", "nnUNetv2_extract_fingerprint", "-d", SOURCE_ID, "-np", 1)
    run("Move the target's plans to the source (same architecture)", "nnUNetv2_move_plans_between_datasets",
        "-s", TARGET_ID, "-t", SOURCE_ID, "-sp", PLANS, "-tp", SOURCE_PLANS)
    # nnU-Net 2.8.1: preprocessing needs dataset.json in the preprocessed folder, which the moves do not copy
    shutil.copy(raw / SOURCE_NAME / "dataset.json", pre / SOURCE_NAME / "dataset.json")
    run("Preprocess the source with the moved plans", "nnUNetv2_preprocess", "-d", SOURCE_ID, "-plans_name",
        SOURCE_PLANS, "-c", CONFIG, "-np", 1)
    run(f"Pretrain on CT from scratch, nnU-Net's network and loss ({pretrain_epochs} epochs x {iterations} "
        f"iterations, seed {seed})", "nnUNetv2_train", SOURCE_ID, CONFIG, "all", "-tr", PRETRAIN_TRAINER, "-p",
        SOURCE_PLANS, "-device", "cpu", epochs=pretrain_epochs,
        env=dict(train_env, ACNORM_DEMO_EPOCHS=str(pretrain_epochs), ACNORM_DEMO_ITERATIONS=str(iterations)))
    checkpoint = res / SOURCE_NAME / f"{PRETRAIN_TRAINER}__{SOURCE_PLANS}__{CONFIG}" / "fold_all" / "checkpoint_final.pth"
    finetune_env = dict(train_env, ACNORM_DEMO_EPOCHS=str(finetune_epochs), ACNORM_DEMO_ITERATIONS=str(iterations),
                        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    jobs = {label: ("nnUNetv2_train", (TARGET_ID, CONFIG, "all", "-tr", trainer, "-device", "cpu",
                                       "-pretrained_weights", checkpoint), finetune_env)
            for label, trainer in FINETUNE_TRAINERS.items()}
    run.parallel(f"Fine-tune on MR from the CT checkpoint: {' and '.join(FINETUNE_TRAINERS)}, {parallel} at a time "
                 f"({finetune_epochs} epochs x {iterations} iterations, seed {seed}, {threads} CPU thread(s) each)",
                 jobs, max_workers=parallel, epochs=finetune_epochs)
    dice = _predict_held_out(run, out, dict(env, OMP_NUM_THREADS=str(parallel * threads)))
    summary = {"dice_held_out_mr_slab": dice, "seed": seed, "pretrain_epochs": pretrain_epochs,
               "finetune_epochs": finetune_epochs, "iterations_per_epoch": iterations,
               "minutes": round((time.time() - t0) / 60, 1)}
    (out / "dice.json").write_text(json.dumps(summary, indent=2))
    _print_summary(out, dice, summary)
    return summary


def _demo_env(raw: Path, pre: Path, res: Path) -> dict:
    """The environment of the demo's nnU-Net commands: its own nnU-Net folders, the trainer shims."""
    from nnunet_acnorm.nnunet.discovery import trainer_shim_folder, with_trainer_folder

    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res),
               PYTHONUNBUFFERED="1", nnUNet_compile="false", OMP_WAIT_POLICY="PASSIVE")
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks nnU-Net's planning; set for training only
    ext = with_trainer_folder(env.get("nnUNet_extTrainer"), trainer_shim_folder())
    env["nnUNet_extTrainer"] = with_trainer_folder(ext, str(DEMO_TRAINER_FOLDER))
    return env


def _predict_held_out(run, out: Path, predict_env: dict) -> dict:
    """Dice per label of each fine-tuned model's prediction of the held-out MR slab."""
    dice = {}
    ref = next((out / "labelsTs").glob("*.nii.gz"))
    for label, trainer in FINETUNE_TRAINERS.items():
        pred = out / "predictions" / trainer
        run(f"Predict the held-out MR slab ({label})", "nnUNetv2_predict", "-i", out / "imagesTs", "-o", pred,
            "-d", TARGET_ID, "-c", CONFIG, "-f", "all", "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1,
            env=predict_env)
        dice[label] = _dice_per_label(pred / ref.name, ref)
    return dice


def _print_summary(out: Path, dice: dict, summary: dict) -> None:
    import math

    organs = [k for k in LABELS if k != "background"]
    print("\nDice on the held-out MR slab (CT-pretrained, fine-tuned on 4 MR slabs):")
    print("| fine-tuning | " + " | ".join(organs) + " | mean |")
    print("|---|" + "---|" * (len(organs) + 1))
    for label, per in dice.items():
        vals = [per[o] for o in organs]
        finite = [v for v in vals if not math.isnan(v)]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals)
              + f" | {sum(finite) / max(1, len(finite)):.3f} |")
    print(f"\nTotal time: {summary['minutes']} min. This is one seeded run on one held-out slab: a smoke test that "
          "the workflow runs, not evidence about the methods.")
    _print_experiment_summary()
    print(f"""
What is in {out}:
  nnUNet_raw/            the two datasets built from the bundled data ({SOURCE_NAME}, {TARGET_NAME})
  nnUNet_preprocessed/   nnU-Net plans and preprocessed data (the source uses the target's plans: {SOURCE_PLANS})
  nnUNet_results/{SOURCE_NAME}/{PRETRAIN_TRAINER}__{SOURCE_PLANS}__{CONFIG}/fold_all/checkpoint_final.pth
                         the CT-pretrained checkpoint (nnU-Net's network and loss, trained from scratch)
  nnUNet_results/{TARGET_NAME}/<trainer>__{PLANS}__{CONFIG}/fold_all/
                         the fine-tuned models: {', '.join(FINETUNE_TRAINERS.values())}
                         (training_log_*.txt, progress.png, checkpoint_final.pth with AC-Norm source affines)
  imagesTs/, labelsTs/   the held-out MR slab and its labels
  predictions/<trainer>/ the segmentations of the held-out slab
  dice.json              the table above
  logs/                  the full output of every nnU-Net command
Deploy the AC-Norm model for stock nnU-Net: nnUNetv2_acnorm_fold -i nnUNet_results/{TARGET_NAME}/{FINETUNE_TRAINERS['AC-Norm']}__{PLANS}__{CONFIG}""")


EXPERIMENT_SUMMARY = Path(__file__).resolve().parent / "experiment_summary.json"


def _print_experiment_summary(path: Path = EXPERIMENT_SUMMARY) -> None:
    """What the seeded, repeated runs of experiments/finetune_experiment.py measured (same data, same budget)."""
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    print(f"\nWhat repeated seeded runs show ({summary['made_by']}, {summary['epochs']} epochs x "
          f"{summary['iterations']} iterations, paired by seed; docs/experiments.md):")
    for key, transfer in summary["transfers"].items():
        label = transfer["success_label"]
        counts = ", ".join(f"{m} {s['segmented']}/{s['runs']}" for m, s in transfer["success"].items())
        print(f"  {key}: runs with {label} Dice > 0.5: {counts}")
        for row in transfer["rows"]:
            if "delta" not in row:
                continue
            lo, hi = row["ci"]
            verdict = ("fewer than 5 seeds: not evidence" if row["seeds"] < 5 else "better" if lo > 0
                       else "worse" if hi < 0 else "no difference shown")
            print(f"    {row['method']} vs {row['baseline']} ({row['seeds']} seeds): mean Dice {row['mean_dice']:.3f}, "
                  f"paired difference {row['delta']:+.3f} [95% CI {lo:+.3f}, {hi:+.3f}]: {verdict}")
