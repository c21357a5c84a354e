"""``nnUNetv2_acnorm_demo``: the whole AC-Norm workflow on bundled real CT and MR, on CPU.

1. Build two nnU-Net raw datasets from the bundled TotalSegmentator examples (labels remapped to
   0..4: background, liver, spleen, kidneys, stomach; resampled to 6 mm in-plane for speed):
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

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_TRAINER_FOLDER = Path(__file__).resolve().parent / "nnunet_ext"
SOURCE_ID, TARGET_ID = 981, 982
SOURCE_NAME, TARGET_NAME = f"Dataset{SOURCE_ID}_DemoCTOrgans", f"Dataset{TARGET_ID}_DemoMROrgans"
CONFIG = "2d"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3, "stomach": 4}
#: TotalSegmentator label id -> demo label id (everything else: background)
TOTALSEG_TO_DEMO = {5: 1, 1: 2, 2: 3, 3: 3, 6: 4}
N_SLABS = 5
TEST_SLAB = 2
PRETRAIN_TRAINER = "nnUNetTrainer_acnormDemoPretrain"
FINETUNE_TRAINERS = {"AC-Norm": "nnUNetTrainerACNorm_acnormDemo", "vanilla": "nnUNetTrainerFinetune_acnormDemo"}
PLANS = "nnUNetPlans"
SOURCE_PLANS = "DemoMRPlansForCT"


class DemoError(RuntimeError):
    pass


def _remap(seg):
    import numpy as np

    out = np.zeros(seg.shape, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_DEMO.items():
        out[seg == src] = dst
    return out


def _slabs(n_slices: int, n: int) -> list[tuple[int, int]]:
    edges = [round(i * n_slices / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


#: in-plane spacing (mm) the demo resamples to: 2x coarser than the data, 4x cheaper training
DEMO_INPLANE_SPACING = 6.0


def _resample_inplane(image, is_label: bool):
    import SimpleITK as sitk

    spacing = image.GetSpacing()
    new_spacing = (DEMO_INPLANE_SPACING, DEMO_INPLANE_SPACING, spacing[2])
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), spacing, new_spacing)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), new_spacing,
                         image.GetDirection(), 0, image.GetPixelID())


def _write_dataset(raw: Path, name: str, image_file: str, seg_file: str, channel: str, test_slab: int | None,
                   tests_dir: Path | None) -> int:
    import SimpleITK as sitk

    image, seg = sitk.ReadImage(str(DATA_DIR / image_file)), sitk.ReadImage(str(DATA_DIR / seg_file))
    labels = sitk.GetImageFromArray(_remap(sitk.GetArrayFromImage(seg)))
    labels.CopyInformation(seg)
    image, labels = _resample_inplane(image, False), _resample_inplane(labels, True)
    folder = raw / name
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    n_train = 0
    for i, (z0, z1) in enumerate(_slabs(image.GetSize()[2], N_SLABS)):
        case = f"{name.split('_')[1].lower()}_{i:02d}"
        if i == test_slab:
            (tests_dir / "imagesTs").mkdir(parents=True, exist_ok=True)
            (tests_dir / "labelsTs").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image[:, :, z0:z1], str(tests_dir / "imagesTs" / f"{case}_0000.nii.gz"))
            sitk.WriteImage(labels[:, :, z0:z1], str(tests_dir / "labelsTs" / f"{case}.nii.gz"))
            continue
        sitk.WriteImage(image[:, :, z0:z1], str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(labels[:, :, z0:z1], str(folder / "labelsTr" / f"{case}.nii.gz"))
        n_train += 1
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": LABELS, "numTraining": n_train, "file_ending": ".nii.gz",
        "description": "bundled TotalSegmentator example (Apache-2.0), see nnunet_acnorm/demo/data/README.md"},
        indent=2))
    return n_train


def _dice_per_label(pred_file: Path, ref_file: Path) -> dict[str, float]:
    import SimpleITK as sitk

    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
    dice = {}
    for name, label in LABELS.items():
        if label == 0:
            continue
        p, r = pred == label, ref == label
        denom = p.sum() + r.sum()
        dice[name] = float(2 * (p & r).sum() / denom) if denom else float("nan")
    return dice


class Runner:
    def __init__(self, out: Path, env: dict, total_steps: int):
        self.out, self.env, self.total, self.step = out, env, total_steps, 0
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, title: str, script: str, *args, env: dict | None = None) -> None:
        self.step += 1
        exe = Path(sys.executable).parent / script
        cmd = [str(exe) if exe.exists() else script, *[str(a) for a in args]]
        log = self.out / "logs" / f"{self.step:02d}_{script}.log"
        print(f"[{self.step}/{self.total}] {title}\n    $ {' '.join(cmd[:1] and [script] + cmd[1:])}", flush=True)
        start = time.time()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if "Epoch " in line and "time" not in line or "Pseudo dice" in line or "train_loss" in line:
                    print("      " + line.split(": ", 1)[-1].rstrip(), flush=True)
            proc.wait()
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-15:]
            raise DemoError(f"step failed: {' '.join(cmd)} (exit {proc.returncode}); log: {log}\n  "
                            + "\n  ".join(tail))
        print(f"    done in {time.time() - start:.0f} s (log: {log.relative_to(self.out)})", flush=True)


def run_demo(out: Path, pretrain_epochs: int, finetune_epochs: int, iterations: int, overwrite: bool) -> dict:
    from nnunet_acnorm.trainers.discovery import trainer_shim_folder, with_trainer_folder

    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DemoError(f"output folder {out} exists and is not empty; pass --overwrite or another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    raw, pre, res = out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"
    for d in (raw, pre, res):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res),
               PYTHONUNBUFFERED="1", nnUNet_compile="false")
    env.pop("nnUNet_n_proc_DA", None)
    ext = with_trainer_folder(env.get("nnUNet_extTrainer"), trainer_shim_folder())
    env["nnUNet_extTrainer"] = with_trainer_folder(ext, str(DEMO_TRAINER_FOLDER))
    train_env = dict(env, nnUNet_n_proc_DA="0")
    t0 = time.time()

    print("[0] Building datasets from the bundled TotalSegmentator examples (labels: "
          + ", ".join(f"{k}={v}" for k, v in LABELS.items()) + ")", flush=True)
    n_src = _write_dataset(raw, SOURCE_NAME, "ct_abdomen.nii.gz", "ct_abdomen_seg.nii.gz", "CT", None, None)
    n_tgt = _write_dataset(raw, TARGET_NAME, "mr_abdomen.nii.gz", "mr_abdomen_seg.nii.gz", "MR", TEST_SLAB, out)
    print(f"    source {SOURCE_NAME}: {n_src} CT slabs; target {TARGET_NAME}: {n_tgt} MR slabs for training, "
          f"1 held out in imagesTs/labelsTs", flush=True)

    run = Runner(out, env, total_steps=10)
    run("Plan and preprocess the target (MR)", "nnUNetv2_plan_and_preprocess", "-d", TARGET_ID, "-c", CONFIG,
        "-np", 1, "-npfp", 1)
    run("Fingerprint the source (CT)", "nnUNetv2_extract_fingerprint", "-d", SOURCE_ID, "-np", 1)
    run("Move the target's plans to the source (same architecture)", "nnUNetv2_move_plans_between_datasets",
        "-s", TARGET_ID, "-t", SOURCE_ID, "-sp", PLANS, "-tp", SOURCE_PLANS)
    # nnU-Net 2.8.1: preprocessing needs dataset.json in the preprocessed folder, which the moves do not copy
    shutil.copy(raw / SOURCE_NAME / "dataset.json", pre / SOURCE_NAME / "dataset.json")
    run("Preprocess the source with the moved plans", "nnUNetv2_preprocess", "-d", SOURCE_ID, "-plans_name",
        SOURCE_PLANS, "-c", CONFIG, "-np", 1)
    run(f"Pretrain on CT with stock nnU-Net ({pretrain_epochs} epochs x {iterations} iterations)",
        "nnUNetv2_train", SOURCE_ID, CONFIG, "all", "-tr", PRETRAIN_TRAINER, "-p", SOURCE_PLANS, "-device", "cpu",
        env=dict(train_env, ACNORM_DEMO_EPOCHS=str(pretrain_epochs), ACNORM_DEMO_ITERATIONS=str(iterations)))
    checkpoint = res / SOURCE_NAME / f"{PRETRAIN_TRAINER}__{SOURCE_PLANS}__{CONFIG}" / "fold_all" / "checkpoint_final.pth"
    dice = {}
    for label, trainer in FINETUNE_TRAINERS.items():
        run(f"Fine-tune on MR, {label} ({finetune_epochs} epochs x {iterations} iterations, -pretrained_weights)",
            "nnUNetv2_train", TARGET_ID, CONFIG, "all", "-tr", trainer, "-device", "cpu", "-pretrained_weights",
            checkpoint, env=dict(train_env, ACNORM_DEMO_EPOCHS=str(finetune_epochs),
                                 ACNORM_DEMO_ITERATIONS=str(iterations)))
    for label, trainer in FINETUNE_TRAINERS.items():
        pred = out / "predictions" / trainer
        run(f"Predict the held-out MR slab ({label})", "nnUNetv2_predict", "-i", out / "imagesTs", "-o", pred,
            "-d", TARGET_ID, "-c", CONFIG, "-f", "all", "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1)
        ref = next((out / "labelsTs").glob("*.nii.gz"))
        dice[label] = _dice_per_label(pred / ref.name, ref)

    summary = {"dice_held_out_mr_slab": dice, "pretrain_epochs": pretrain_epochs, "finetune_epochs": finetune_epochs,
               "iterations_per_epoch": iterations, "minutes": round((time.time() - t0) / 60, 1)}
    (out / "dice.json").write_text(json.dumps(summary, indent=2))
    _print_summary(out, dice, summary)
    return summary


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
    print(f"\nTotal time: {summary['minutes']} min. With schedules this short the numbers show that the workflow "
          "runs, not which method is better.")
    print(f"""
What is in {out}:
  nnUNet_raw/            the two datasets built from the bundled data ({SOURCE_NAME}, {TARGET_NAME})
  nnUNet_preprocessed/   nnU-Net plans and preprocessed data (the source uses the target's plans: {SOURCE_PLANS})
  nnUNet_results/{SOURCE_NAME}/{PRETRAIN_TRAINER}__{SOURCE_PLANS}__{CONFIG}/fold_all/checkpoint_final.pth
                         the CT-pretrained checkpoint (stock nnU-Net)
  nnUNet_results/{TARGET_NAME}/<trainer>__{PLANS}__{CONFIG}/fold_all/
                         the fine-tuned models: {', '.join(FINETUNE_TRAINERS.values())}
                         (training_log_*.txt, progress.png, checkpoint_final.pth with AC-Norm source affines)
  imagesTs/, labelsTs/   the held-out MR slab and its labels
  predictions/<trainer>/ the segmentations of the held-out slab
  dice.json              the table above
  logs/                  the full output of every nnU-Net command
Deploy the AC-Norm model for stock nnU-Net: nnUNetv2_acnorm_fold -i nnUNet_results/{TARGET_NAME}/{FINETUNE_TRAINERS['AC-Norm']}__{PLANS}__{CONFIG}""")


def demo_entry(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_acnorm_demo",
        description="Run the AC-Norm workflow on the bundled real CT/MR example: pretrain on CT with stock nnU-Net, "
                    "fine-tune on MR with AC-Norm and vanilla fine-tuning, print the Dice of both.")
    parser.add_argument("--output", default="acnorm_demo_output", help="output folder (default: ./acnorm_demo_output)")
    parser.add_argument("--pretrain-epochs", type=int, default=25)
    parser.add_argument("--finetune-epochs", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=20, help="training iterations per epoch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    for name in ("pretrain_epochs", "finetune_epochs", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        run_demo(Path(args.output), args.pretrain_epochs, args.finetune_epochs, args.iterations, args.overwrite)
    except DemoError as e:
        print(f"nnUNetv2_acnorm_demo: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("nnUNetv2_acnorm_demo: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    demo_entry()
