"""Which transferability estimator predicts the fine-tuned Dice, and in which direction? (issue 10)

    python experiments/direction_experiment.py --output /tmp/acnorm_direction            # everything
    python experiments/direction_experiment.py --output OUT --publish experiments/results/direction
    python experiments/direction_experiment.py --output /tmp/direction_smoke --smoke     # a few minutes

For each target (``TARGETS``: the bundled MR abdominal organs, Dataset982, and the CT pelvis,
Dataset983), a zoo of at least 8 source models of different quality (``SOURCES``): supervised on
related and on unrelated labels, on CT and on MR, with long and short pretraining, self-supervised
on a denoising/inpainting pretext task, and a random initialisation. Every step is a real nnU-Net
console script in a subprocess (the machinery of ``experiments/finetune_experiment.py``, imported):

1. plan and preprocess the target (2d); its held-out slabs become nnU-Net's validation fold; move its
   plans to every source dataset and preprocess the source with them (so every source network has
   the target's architecture and ``-pretrained_weights`` fits);
2. pretrain every source (``nnUNetTrainerScratch_acnormDemo``, seed 0; the random initialisation is
   that trainer's network for the target's plans as nnU-Net initialises it, seeded, saved untrained in
   nnU-Net's checkpoint format);
3. fine-tune every source on the target with the seeded recipe (``--finetune-trainer``, default
   ``nnUNetTrainerACNorm_acnormDemo``; seeds via ``nnUNet_acnorm_seed``); nnU-Net's validation of
   the held-out slabs gives the fine-tuned Dice (mean over foreground labels);
4. the estimators, computed by the command a user runs, once per seed (the seed chooses the batches):
   ``nnUNetv2_acnorm_rank --steps 1 --estimators ac_corr,ac_corr_all,logme,hscore`` and
   ``nnUNetv2_acnorm_rank --steps 10 --estimators ac_corr,ac_corr_all`` (``--epoch`` would be one step
   here: 4 training cases, 2d batches of 10-12), both with ``--fold 0``: the batches come from the
   fold's training slabs only, so the estimators never see the held-out slab that scores the fine-tunings;
5. per target and estimator: Kendall tau and weighted tau (``scipy.stats.kendalltau``,
   ``scipy.stats.weightedtau``) between the estimator (mean over seeds) and the mean fine-tuned Dice,
   with bootstrap 95 % intervals (sources resampled with replacement, and within each the seeds,
   paired: the estimator and the Dice of the same seeds), over the sources the command ranks
   (untrained candidates are excluded there) and over all sources; and the decision record for
   ``nnunet_acnorm/ranking/direction.py`` the numbers support (``decision`` in direction.json).

The results in ``experiments/results/direction/`` were made by this script with its defaults on the
axial 4 mm datasets (2d networks on 80 x 96 slices); docs/ranking.md reads them.

Outputs in ``--output``: direction.json, direction.csv, direction.md, direction.png (and every run's
files, logs under logs/); ``--publish DIR`` copies the four into DIR. Finished steps are skipped, so
the script can be resumed or extended (more seeds: ``--seeds 0-4``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from finetune_experiment import CONFIG, PLANS, Experiment, _parse_seeds, budget_differences  # noqa: E402

from nnunet_acnorm.demo.datasets import (CT_ORGANS, CT_PELVIS, DATA_DIR, MR_ORGANS, SlabTask,  # noqa: E402
                                         write_holdout_split, write_raw_dataset)

PRETRAIN_TRAINER = "nnUNetTrainerScratch_acnormDemo"
FINETUNE_TRAINER = "nnUNetTrainerACNorm_acnormDemo"
PRETRAIN_SEED = 0

# -- source datasets besides the three bundled tasks (TotalSegmentator v2 ids; see demo/datasets.py) ----
#: CT abdomen, four structures that are not the target's organs: colon 20, autochthon 86/87, small bowel 18,
#: duodenum 19
CT_OTHER = SlabTask(984, "DirCTOther", "ct_abdomen.nii.gz", "ct_abdomen_seg.nii.gz", "CT",
                    {"background": 0, "colon": 1, "autochthon": 2, "small_bowel": 3, "duodenum": 4},
                    {20: 1, 86: 2, 87: 2, 18: 3, 19: 4}, held_out=())
#: the MR target's own training slabs (its held-out slab 2 is left out) with four other structures of
#: TotalSegmentator's MR label map (ids 44/45, 19, 15, 7: the largest after the organs)
MR_OTHER = SlabTask(985, "DirMROther", "mr_abdomen.nii.gz", "mr_abdomen_seg.nii.gz", "MR",
                    {"background": 0, "other_a": 1, "other_b": 2, "other_c": 3, "other_d": 4},
                    {44: 1, 45: 1, 19: 2, 15: 3, 7: 4}, held_out=(2,))
#: the CT pelvis target's training slabs with other structures: colon 20, small bowel 18, sacrum 25, femur 75/76
PELVIS_OTHER = SlabTask(986, "DirPelvisOther", "ct_pelvis.nii.gz", "ct_pelvis_seg.nii.gz", "CT",
                        {"background": 0, "colon": 1, "small_bowel": 2, "sacrum": 3, "femur": 4},
                        {20: 1, 18: 2, 25: 3, 75: 4, 76: 4}, held_out=(2,))
#: self-supervised pretext datasets (labels from the image alone, see write_pretext_dataset): id, name, base
PRETEXT = {"ssl_ct_abdomen": (987, "DirPretextCTAbdomen", CT_ORGANS, ()),
           "ssl_mr_abdomen": (988, "DirPretextMRAbdomen", MR_ORGANS, (2,)),
           "ssl_ct_pelvis": (989, "DirPretextCTPelvis", CT_PELVIS, (2,))}
PRETEXT_BANDS = 4


@dataclass(frozen=True)
class Source:
    key: str
    description: str
    dataset: str | None          #: a key of DATASETS (the task it is pretrained on); None: random init
    epochs_factor: float = 1.0   #: of --pretrain-epochs ("short" pretraining: 0.2)


DATASETS: dict[str, SlabTask] = {"ct_organs": CT_ORGANS, "mr_organs": MR_ORGANS, "ct_pelvis": CT_PELVIS,
                                 "ct_other": CT_OTHER, "mr_other": MR_OTHER, "pelvis_other": PELVIS_OTHER}
#: datasets cut from a target's own volume: only its training slabs (written without the held-out ones)
TRAIN_SLABS_ONLY = {"mr_other", "pelvis_other", "ssl_mr_abdomen", "ssl_ct_pelvis"}

TARGETS = {"mr_organs": MR_ORGANS, "ct_pelvis": CT_PELVIS}
SOURCES: dict[str, list[Source]] = {
    "mr_organs": [
        Source("ct_organs", "CT abdomen, the target's organs (related labels, other modality)", "ct_organs"),
        Source("ct_organs_short", "the same with 1/5 of the pretraining", "ct_organs", 0.2),
        Source("ct_other", "CT abdomen, four other structures (unrelated labels, CT)", "ct_other"),
        Source("ct_other_short", "the same with 1/5 of the pretraining", "ct_other", 0.2),
        Source("mr_other", "MR training slabs, four other structures (unrelated labels, MR)", "mr_other"),
        Source("ct_pelvis", "CT pelvis, its four structures (other anatomy, CT)", "ct_pelvis"),
        Source("ssl_ct_abdomen", "self-supervised on CT abdomen (denoising/inpainting pretext)", "ssl_ct_abdomen"),
        Source("ssl_mr_abdomen", "self-supervised on the MR training slabs (same pretext)", "ssl_mr_abdomen"),
        Source("random_init", "nnU-Net's initialisation, untrained", None),
    ],
    "ct_pelvis": [
        Source("pelvis_other", "CT pelvis training slabs, four other structures (same region and modality)",
               "pelvis_other"),
        Source("ct_other", "CT abdomen, colon/autochthon/bowel (partly the same structures, CT)", "ct_other"),
        Source("ct_organs", "CT abdomen organs (unrelated labels, CT)", "ct_organs"),
        Source("ct_organs_short", "the same with 1/5 of the pretraining", "ct_organs", 0.2),
        Source("mr_organs", "MR abdomen organs (unrelated labels, MR)", "mr_organs"),
        Source("ssl_ct_pelvis", "self-supervised on the CT pelvis training slabs (denoising/inpainting pretext)",
               "ssl_ct_pelvis"),
        Source("ssl_ct_abdomen", "self-supervised on CT abdomen (same pretext)", "ssl_ct_abdomen"),
        Source("random_init", "nnU-Net's initialisation, untrained", None),
    ],
}
SMOKE_SOURCES = ("ct_organs", "ssl_ct_abdomen", "random_init")

#: the estimators: column -> (rank run, estimator of nnUNetv2_acnorm_rank)
#: "one epoch" in the command's sense (--epoch: ceil(cases / batch size) steps) is ONE step on these targets
#: (5 slab cases, 2d batches of 10-12), the same as --steps 1; 10 steps (the old experiment's longer variant)
#: stands in for "more than the paper's single step"
RANK_RUNS = {"steps1": (["--steps", "1"], ["ac_corr", "ac_corr_all", "logme", "hscore"]),
             "steps10": (["--steps", "10"], ["ac_corr", "ac_corr_all"])}
ESTIMATOR_COLUMNS = {"ac_corr_1step": ("steps1", "ac_corr"), "ac_corr_all_1step": ("steps1", "ac_corr_all"),
                     "ac_corr_10steps": ("steps10", "ac_corr"), "ac_corr_all_10steps": ("steps10", "ac_corr_all"),
                     "logme": ("steps1", "logme"), "hscore": ("steps1", "hscore")}
#: what DIRECTION in nnunet_acnorm/ranking/direction.py would say for each column
DIRECTION_FIELDS = {"ac_corr_1step": ("ac_corr", "deepest", 1), "ac_corr_all_1step": ("ac_corr_all", "all", 1),
                    "ac_corr_10steps": ("ac_corr", "deepest", 10), "ac_corr_all_10steps": ("ac_corr_all", "all", 10),
                    "logme": ("logme", "deepest", None), "hscore": ("hscore", "deepest", None)}
#: AC-Corr before the step (ranking.json's ac_corr_at_start of the 1-step run): shown, not an estimator
START_COLUMN = "ac_corr_step0"
#: the columns of the tables: the estimators, then AC-Corr before the step
SHOWN_COLUMNS = (*ESTIMATOR_COLUMNS, START_COLUMN)
#: a fine-tuning "failed" below this mean foreground Dice
FAILED_DICE = 0.1


# -- the self-supervised pretext dataset -----------------------------------------------------------------
def write_pretext_volumes(folder: Path, base: SlabTask, seed: int = 0) -> tuple[Path, Path]:
    """A denoising/inpainting pretext as a segmentation task nnU-Net can train: the input is the volume
    with Gaussian noise (0.5 x its sd) and 25 % of 8 x 8-voxel in-plane blocks replaced by the median;
    the labels are :data:`PRETEXT_BANDS` + 1 intensity bands (quintiles) of the clean volume smoothed
    with sigma 2 voxels, so the network must restore the intensity structure under the corruption.
    No annotation is used. The corruption is drawn once (nnU-Net's data pipeline has no hook for a
    per-iteration corruption of the input without a trainer of its own)."""
    import SimpleITK as sitk
    from scipy.ndimage import gaussian_filter

    image = sitk.ReadImage(str(DATA_DIR / base.image_file))
    clean = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    smooth = gaussian_filter(clean, sigma=(0.5, 2.0, 2.0))
    edges = np.quantile(smooth, np.linspace(0, 1, PRETEXT_BANDS + 2)[1:-1])
    bands = np.digitize(smooth, edges).astype(np.uint8)
    rng = np.random.RandomState(seed)
    corrupted = clean + rng.randn(*clean.shape).astype(np.float32) * 0.5 * clean.std()
    block = 8
    fill = float(np.median(clean))
    for z in range(clean.shape[0]):
        for y in range(0, clean.shape[1], block):
            for x in range(0, clean.shape[2], block):
                if rng.rand() < 0.25:
                    corrupted[z, y:y + block, x:x + block] = fill
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{base.name}_pretext_image.nii.gz", folder / f"{base.name}_pretext_bands.nii.gz"
    for array, path in zip((corrupted, bands), paths):
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path))
    return paths


def pretext_task(key: str, folder: Path) -> SlabTask:
    dataset_id, name, base, held_out = PRETEXT[key]
    image, bands = folder / f"{base.name}_pretext_image.nii.gz", folder / f"{base.name}_pretext_bands.nii.gz"
    labels = {"background": 0, **{f"band_{i}": i for i in range(1, PRETEXT_BANDS + 1)}}
    # absolute paths: write_raw_dataset reads DATA_DIR / file, which is the file itself then
    return SlabTask(dataset_id, name, str(image), str(bands), base.channel, labels,
                    {i: i for i in range(1, PRETEXT_BANDS + 1)}, n_slabs=base.n_slabs, held_out=held_out)


# -- the experiment --------------------------------------------------------------------------------------
class DirectionExperiment(Experiment):
    def __init__(self, out: Path, epochs: int, pretrain_epochs: int, iterations: int,
                 finetune_trainer: str = FINETUNE_TRAINER):
        super().__init__(out, epochs, pretrain_epochs, iterations, methods={})
        self.finetune_trainer = finetune_trainer
        # one thread, and one export worker instead of nnU-Net's default 8 (on 2 shared cores the 8 spawned
        # workers made each validation minutes long)
        self.env = dict(self.env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_def_n_proc="1")

    def task(self, dataset: str) -> SlabTask:
        if dataset in PRETEXT:
            return pretext_task(dataset, self.out / "pretext_volumes")
        return DATASETS[dataset]

    @staticmethod
    def plans_name(target: SlabTask) -> str:
        return f"DirPlansFor{target.name}"

    # -- 1. datasets and plans ---------------------------------------------------------------------
    def write_raw(self, dataset: str) -> SlabTask:
        task = self.task(dataset)
        if (self.raw / task.folder_name / "dataset.json").exists():
            return task
        if dataset in PRETEXT:
            write_pretext_volumes(self.out / "pretext_volumes", PRETEXT[dataset][2])
        held_out_dir = self.out / "unused_held_out" / task.folder_name if dataset in TRAIN_SLABS_ONLY else None
        write_raw_dataset(self.raw, task, held_out_dir)
        return task

    def prepare_target(self, key: str) -> None:
        target = TARGETS[key]
        if (self.pre / target.folder_name / f"{PLANS}.json").exists() and \
                (self.pre / target.folder_name / "splits_final.json").exists():
            return
        print(f"[{key}] target: plan and preprocess", flush=True)
        self.write_raw(key)
        self.run(f"{key}_plan_target", "nnUNetv2_plan_and_preprocess", "-d", target.dataset_id, "-c", CONFIG,
                 "-np", 1, "-npfp", 1)
        write_holdout_split(self.pre, target)

    def prepare_source(self, key: str, source: Source) -> None:
        if source.dataset is None:
            return
        target = TARGETS[key]
        plans = self.plans_name(target)
        task = self.write_raw(source.dataset)
        folder = self.pre / task.folder_name
        if (folder / f"{plans}.json").exists() and (folder / f"{plans}_{CONFIG}").is_dir():
            return
        print(f"[{key}] source dataset {task.folder_name}: plans {plans}", flush=True)
        tag = f"{key}_{source.dataset}"
        if not (folder / "dataset_fingerprint.json").exists():
            self.run(f"{tag}_fingerprint", "nnUNetv2_extract_fingerprint", "-d", task.dataset_id, "-np", 1)
        self.run(f"{tag}_move_plans", "nnUNetv2_move_plans_between_datasets", "-s", target.dataset_id, "-t",
                 task.dataset_id, "-sp", PLANS, "-tp", plans)
        # nnU-Net 2.8: preprocessing needs dataset.json in the preprocessed folder, which the moves do not copy
        shutil.copy(self.raw / task.folder_name / "dataset.json", folder / "dataset.json")
        self.run(f"{tag}_preprocess", "nnUNetv2_preprocess", "-d", task.dataset_id, "-plans_name", plans, "-c",
                 CONFIG, "-np", 1)

    # -- 2. source models ---------------------------------------------------------------------------
    def source_root(self, key: str, source: Source) -> Path:
        return self.out / "sources" / key / source.key

    def source_checkpoint(self, key: str, source: Source) -> Path:
        task = TARGETS[key] if source.dataset is None else self.task(source.dataset)
        plans = PLANS if source.dataset is None else self.plans_name(TARGETS[key])
        return (self.source_root(key, source) / task.folder_name / f"{PRETRAIN_TRAINER}__{plans}__{CONFIG}"
                / "fold_all" / "checkpoint_final.pth")

    def pretrain_epochs_of(self, source: Source) -> int:
        return 0 if source.dataset is None else max(1, round(self.pretrain_epochs * source.epochs_factor))

    def pretrain(self, key: str, source: Source) -> str:
        ckpt = self.source_checkpoint(key, source)
        if ckpt.exists():
            return f"[{key}] source {source.key}: done before"
        if source.dataset is None:
            self.write_random_init(key, ckpt)
            return f"[{key}] source {source.key}: nnU-Net's initialisation written (untrained)"
        task = self.task(source.dataset)
        if ckpt.parent.exists():
            shutil.rmtree(ckpt.parent)
        epochs = self.pretrain_epochs_of(source)
        env = self.train_env(self.source_root(key, source), PRETRAIN_SEED, epochs)
        took = self.run(f"{key}_pretrain_{source.key}", "nnUNetv2_train", task.dataset_id, CONFIG, "all", "-tr",
                        PRETRAIN_TRAINER, "-p", self.plans_name(TARGETS[key]), "-device", "cpu", env=env)
        return f"[{key}] source {source.key}: {epochs} epochs in {took:.0f} s"

    def write_random_init(self, key: str, ckpt: Path) -> None:
        """The pretraining trainer's network for the target's plans, as nnU-Net initialises it (seeded, never
        trained), saved in nnU-Net's checkpoint format (the trainers refuse 0 epochs, so no nnUNetv2_train run)."""
        import torch
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_acnorm.demo.demo_trainers import DEMO_TRAINERS

        target = TARGETS[key]
        plans = json.loads((self.pre / target.folder_name / f"{PLANS}.json").read_text())
        dataset_json = json.loads((self.pre / target.folder_name / "dataset.json").read_text())
        manager = PlansManager(plans)
        labels = manager.get_label_manager(dataset_json)
        torch.manual_seed(PRETRAIN_SEED)
        network = DEMO_TRAINERS[PRETRAIN_TRAINER].build_network_architecture(
            manager, manager.get_configuration(CONFIG), len(dataset_json["channel_names"]),
            labels.num_segmentation_heads, True)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        partial = ckpt.with_suffix(".partial")
        torch.save({"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                    "logging": {}, "_best_ema": None, "current_epoch": 0, "trainer_name": PRETRAIN_TRAINER,
                    "init_args": {"plans": plans, "configuration": CONFIG, "fold": "all", "dataset_json": dataset_json,
                                  "device": "cpu"},
                    "inference_allowed_mirroring_axes": None}, partial)
        partial.replace(ckpt)

    # -- 3. fine-tunings ----------------------------------------------------------------------------
    def run_folder(self, key: str, source: Source, seed: int) -> Path:
        return (self.out / "runs" / key / source.key / f"seed_{seed}" / TARGETS[key].folder_name
                / f"{self.finetune_trainer}__{PLANS}__{CONFIG}")

    def finetune(self, key: str, source: Source, seed: int) -> str:
        folder = self.run_folder(key, source, seed)
        if (folder / "fold_0" / "validation" / "summary.json").exists():
            return f"[{key}] {source.key} seed {seed}: done before"
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished run: start it again from its seed
        env = self.train_env(self.out / "runs" / key / source.key / f"seed_{seed}", seed, self.epochs)
        took = self.run(f"{key}_finetune_{source.key}_seed{seed}", "nnUNetv2_train", TARGETS[key].dataset_id, CONFIG,
                        0, "-tr", self.finetune_trainer, "-pretrained_weights", self.source_checkpoint(key, source),
                        "-device", "cpu", env=env)
        return f"[{key}] {source.key} seed {seed}: {took:.0f} s, Dice {foreground_dice(folder):.3f}"

    # -- 4. estimators ------------------------------------------------------------------------------
    def rank_folder(self, key: str, run: str, seed: int) -> Path:
        return self.out / "rank" / key / f"{run}_seed{seed}"

    def rank(self, key: str, sources: list[Source], run: str, seed: int) -> str:
        folder = self.rank_folder(key, run, seed)
        if (folder / "ranking.json").exists():
            done = json.loads((folder / "ranking.json").read_text())
            measured = {c["path"] for c in done["candidates"] if c["status"] != "skipped"}
            if measured >= {str(self.source_checkpoint(key, s)) for s in sources}:
                return f"[{key}] rank {run} seed {seed}: done before"
        options, estimators = RANK_RUNS[run]
        try:
            took = self.run(f"{key}_rank_{run}_seed{seed}", "nnUNetv2_acnorm_rank", "-d", TARGETS[key].dataset_id,
                            "-c", CONFIG, "--fold", 0, "-i", *[self.source_checkpoint(key, s) for s in sources],
                            *options,
                            "--estimators", ",".join(estimators), "--seed", seed, "-o", folder, "--overwrite",
                            "--no_progress")
        except RuntimeError:
            if not (folder / "ranking.json").exists():
                raise
            # exit 1 with results: no candidate could be ranked (all excluded or skipped); their scores are kept
            return f"[{key}] rank {run} seed {seed}: no candidate ranked (see {folder / 'ranking.json'})"
        skipped = [c["name"] for c in json.loads((folder / "ranking.json").read_text())["candidates"]
                   if c["status"] == "skipped"]
        return f"[{key}] rank {run} seed {seed}: {took:.0f} s" + (f"; SKIPPED {skipped}" if skipped else "")

    def estimates(self, key: str, sources: list[Source], seeds: list[int]) -> tuple[dict, dict]:
        """column -> source -> {seed: value}; and source -> status in the 1-step ranking (ranked/excluded)."""
        by_path = {str(self.source_checkpoint(key, s)): s.key for s in sources}
        values: dict[str, dict[str, dict[int, float]]] = {c: {s.key: {} for s in sources} for c in SHOWN_COLUMNS}
        status: dict[str, str] = {}
        for seed, run, ranking in self.rankings(key, seeds):
            for cand in ranking["candidates"]:
                source = by_path.get(cand["path"])
                if source is None:
                    continue
                if run == "steps1" and status.get(source) != "ranked":  # ranked at any seed: ranked
                    status[source] = cand["status"]
                if run == "steps1" and cand.get("ac_corr_at_start") is not None:
                    values[START_COLUMN][source][seed] = float(cand["ac_corr_at_start"])
                for column, (r, est) in ESTIMATOR_COLUMNS.items():
                    value = cand.get("scores", {}).get(est)
                    if r == run and value is not None:
                        values[column][source][seed] = float(value)
        return values, status

    def rankings(self, key: str, seeds: list[int]):
        """(seed, run, ranking.json) of every ranking run of ``key`` that wrote its results."""
        for seed in seeds:
            for run in RANK_RUNS:
                file = self.rank_folder(key, run, seed) / "ranking.json"
                if file.exists():
                    yield seed, run, json.loads(file.read_text())

    def step_settings(self, targets: list[str], seeds: list[int]) -> list[dict]:
        """The learning rate and temperature of the ranking command's steps, as its ranking.json files record them
        (one entry per distinct setting; one entry when every run used the same)."""
        found = []
        for ranking in (r for key in targets for _, _, r in self.rankings(key, seeds)):
            setting = {"lr": ranking["lr"], "tau": ranking["tau"], "trainer_defaults": ranking["trainer_defaults"]}
            found += [setting] if setting not in found else []
        return found


def foreground_dice(model_folder: Path) -> float:
    """nnU-Net's mean foreground Dice over the validation cases of fold 0 (summary.json)."""
    summary = json.loads((model_folder / "fold_0" / "validation" / "summary.json").read_text())
    return float(summary["foreground_mean"]["Dice"])


# -- statistics ------------------------------------------------------------------------------------------
def _taus(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.stats import kendalltau, weightedtau

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(kendalltau(x, y).statistic), float(weightedtau(x, y).statistic)


def correlation(dice: dict[str, dict[int, float]], estimator: dict[str, dict[int, float]], sources: list[str],
                n_boot: int = 2000, seed: int = 0) -> dict:
    """Kendall tau and weighted tau between the estimator and the fine-tuned Dice (both means over seeds) over
    ``sources``, with percentile bootstrap 95 % intervals: sources resampled with replacement, and within each
    source its seeds (the estimator and the Dice of the same seeds)."""
    sources = [s for s in sources if dice.get(s) and set(dice[s]) & set(estimator.get(s, {}))]
    paired = {s: sorted(set(dice[s]) & set(estimator[s])) for s in sources}
    x = np.array([statistics.fmean(estimator[s][k] for k in paired[s]) for s in sources])
    y = np.array([statistics.fmean(dice[s][k] for k in paired[s]) for s in sources])
    tau, wtau = _taus(x, y)
    rng = np.random.RandomState(seed)
    boot_tau, boot_wtau = [], []
    for _ in range(n_boot if len(sources) >= 3 else 0):
        picked = rng.randint(0, len(sources), size=len(sources))
        bx, by = [], []
        for i in picked:
            seeds = paired[sources[i]]
            chosen = [seeds[j] for j in rng.randint(0, len(seeds), size=len(seeds))]
            bx.append(statistics.fmean(estimator[sources[i]][k] for k in chosen))
            by.append(statistics.fmean(dice[sources[i]][k] for k in chosen))
        t, w = _taus(np.array(bx), np.array(by))
        boot_tau.append(t)
        boot_wtau.append(w)

    def interval(values):
        values = [v for v in values if not math.isnan(v)]
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [math.nan] * 2

    return {"n_sources": len(sources), "sources": sources, "kendall_tau": tau, "kendall_tau_ci": interval(boot_tau),
            "weighted_tau": wtau, "weighted_tau_ci": interval(boot_wtau), "bootstrap": len(boot_tau),
            "bootstrap_undefined": sum(math.isnan(v) for v in boot_tau)}


def decide(results: dict) -> dict:
    """The decision record the numbers support: an estimator whose Kendall tau interval (over the ranked
    sources) excludes 0 with the same sign on every target; among those, the largest smallest |tau|.
    Otherwise not settled (the command then keeps saying that it cannot rank reliably)."""
    targets = list(results["targets"])
    candidates = []
    for column in ESTIMATOR_COLUMNS:
        stats = [results["targets"][t]["correlations"][column]["ranked"] for t in targets]
        lows, highs = [s["kendall_tau_ci"][0] for s in stats], [s["kendall_tau_ci"][1] for s in stats]
        if any(math.isnan(v) for v in lows + highs):
            continue
        if all(lo > 0 for lo in lows) or all(hi < 0 for hi in highs):
            candidates.append((min(abs(s["kendall_tau"]) for s in stats), column, all(lo > 0 for lo in lows)))
    def tau(t, c):
        r = results["targets"][t]["correlations"][c]["ranked"]
        return (f"{c} tau {_f(r['kendall_tau'], 2)} [{_f(r['kendall_tau_ci'][0], 2)}, {_f(r['kendall_tau_ci'][1], 2)}] "
                f"over {r['n_sources']} sources")

    summary = "; ".join(f"{t}: " + ", ".join(tau(t, c) for c in ESTIMATOR_COLUMNS) for t in targets)
    per_target = ", ".join(f"{t} {len(results['targets'][t]['sources'])}" for t in targets)
    budget = (f"sources per target: {per_target}; seeds {results['seeds']}, fine-tuning {results['epochs']} "
              f"x {results['iterations']} iterations with {results['finetune_trainer']}")
    if not candidates:
        return {"settled": False, "estimator": "ac_corr", "higher_is_better": True, "layers": "deepest", "steps": 1,
                "evidence": f"experiments/direction_experiment.py ({budget}): no estimator's Kendall tau interval "
                            f"excludes 0 with one sign on every target ({summary})",
                "experiment": "experiments/direction_experiment.py"}
    _, column, positive = max(candidates)
    estimator, layers, steps = DIRECTION_FIELDS[column]
    return {"settled": True, "estimator": estimator, "higher_is_better": positive, "layers": layers,
            "steps": steps if steps is not None else 1, "column": column,
            "evidence": f"experiments/direction_experiment.py ({budget}): {summary}",
            "experiment": "experiments/direction_experiment.py"}


# -- outputs ---------------------------------------------------------------------------------------------
def _f(value, digits=3) -> str:
    """A value for the tables; ``digits=2``: a signed tau."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.2f}" if digits == 2 else f"{value:.{digits}f}"


def results_markdown(results: dict) -> str:
    lines = [f"Made by experiments/direction_experiment.py{' --smoke (NOT results: a test of the machinery)' if results['smoke'] else ''}: "
             f"fine-tuning {results['epochs']} epochs x {results['iterations']} iterations with "
             f"`{results['finetune_trainer']}`, sources pretrained {results['pretrain_epochs']} epochs "
             f"(short: 1/5), seeds {results['seeds']}; bootstrap {results['n_boot']} resamples of sources and "
             f"seeds. Dice: nnU-Net's mean foreground Dice on the held-out slabs. {START_COLUMN}: the 1-step run's "
             "AC-Corr before its step (shown, not an estimator).", ""]
    for key, res in results["targets"].items():
        lines += [f"## Target {key} ({TARGETS[key].folder_name})", "",
                  "| source | description | status in the ranking | fine-tuned Dice mean ± sd | " +
                  " | ".join(SHOWN_COLUMNS) + " |", "|---|---|---|---|" + "---|" * len(SHOWN_COLUMNS)]
        for s in res["sources"]:
            row = res["per_source"][s]
            lines.append(f"| {s} | {row['description']} | {row['status']} | {_f(row['dice_mean'])} ± "
                         f"{_f(row['dice_sd'])} | " + " | ".join(_f(row["estimators"].get(c), 4)
                                                                 for c in SHOWN_COLUMNS) + " |")
        lines += ["", f"Failed fine-tunings (Dice < {FAILED_DICE}): {res['failed_runs']} of {res['runs']}; "
                  f"random init reaches {_f(res['random_init_dice'])}; sources above it: "
                  f"{', '.join(res['above_random_init']) or 'none'}.", "",
                  "| estimator | sources | Kendall tau [95 % CI] | weighted tau [95 % CI] | all sources: Kendall tau "
                  "[95 % CI] |", "|---|---|---|---|---|"]
        for c in ESTIMATOR_COLUMNS:
            r, a = res["correlations"][c]["ranked"], res["correlations"][c]["all"]
            lines.append(f"| {c} | {r['n_sources']} | {_f(r['kendall_tau'], 2)} [{_f(r['kendall_tau_ci'][0], 2)}, "
                         f"{_f(r['kendall_tau_ci'][1], 2)}] | {_f(r['weighted_tau'], 2)} "
                         f"[{_f(r['weighted_tau_ci'][0], 2)}, {_f(r['weighted_tau_ci'][1], 2)}] | "
                         f"{_f(a['kendall_tau'], 2)} [{_f(a['kendall_tau_ci'][0], 2)}, {_f(a['kendall_tau_ci'][1], 2)}] |")
        lines.append("")
    d = results["decision"]
    lines += ["## Decision", "", ("Settled: " + f"{d['estimator']} ({'higher' if d['higher_is_better'] else 'lower'} "
                                  "is better)" if d["settled"] else "Not settled: the command keeps saying that it "
                                                                    "cannot rank reliably."),
              "", f"Record for nnunet_acnorm/ranking/direction.py: `{json.dumps(d)}`", ""]
    return "\n".join(lines)


def write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "source", "description", "status", "seeds", "dice_mean", "dice_sd", *SHOWN_COLUMNS])
        for key, res in results["targets"].items():
            for s in res["sources"]:
                row = res["per_source"][s]
                w.writerow([key, s, row["description"], row["status"], len(row["dice_per_seed"]),
                            _f(row["dice_mean"], 4), _f(row["dice_sd"], 4),
                            *[_f(row["estimators"].get(c), 6) for c in SHOWN_COLUMNS]])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(results["targets"])
    columns = list(ESTIMATOR_COLUMNS)
    fig, axes = plt.subplots(len(targets), len(columns), figsize=(3.0 * len(columns), 2.9 * len(targets)),
                             squeeze=False)
    for i, key in enumerate(targets):
        res = results["targets"][key]
        for j, c in enumerate(columns):
            ax = axes[i][j]
            for s in res["sources"]:
                row = res["per_source"][s]
                x = row["estimators"].get(c)
                if x is None or row["dice_mean"] is None:
                    continue
                excluded = row["status"] != "ranked"
                ax.errorbar(x, row["dice_mean"], yerr=row["dice_sd"], fmt="x" if excluded else "o", ms=4,
                            color="grey" if excluded else "tab:blue", capsize=2)
                ax.annotate(s, (x, row["dice_mean"]), fontsize=5, xytext=(2, 2), textcoords="offset points")
            r = res["correlations"][c]["ranked"]
            ax.set_title(f"{key}: {c}\ntau {_f(r['kendall_tau'], 2)} [{_f(r['kendall_tau_ci'][0], 2)}, "
                         f"{_f(r['kendall_tau_ci'][1], 2)}]", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("fine-tuned Dice", fontsize=7)
    fig.suptitle("Estimators vs fine-tuned Dice (mean ± sd over seeds; grey x: excluded from the ranking)"
                 + (" — SMOKE RUN, not results" if results["smoke"] else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OUTPUT_FILES = ("direction.json", "direction.csv", "direction.md", "direction.png")


def analyse(exp: DirectionExperiment, targets: list[str], sources: dict[str, list[Source]], seeds: list[int],
            n_boot: int, smoke: bool) -> dict:
    results = {"smoke": smoke, "epochs": exp.epochs, "iterations": exp.iterations,
               "pretrain_epochs": exp.pretrain_epochs, "finetune_trainer": exp.finetune_trainer, "seeds": seeds,
               "n_boot": n_boot, "n_sources": max(len(v) for v in sources.values()), "targets": {}}
    for key in targets:
        zoo = sources[key]
        dice = {s.key: {seed: foreground_dice(exp.run_folder(key, s, seed)) for seed in seeds
                        if (exp.run_folder(key, s, seed) / "fold_0" / "validation" / "summary.json").exists()}
                for s in zoo}
        values, status = exp.estimates(key, zoo, seeds)
        ranked = [s.key for s in zoo if status.get(s.key) == "ranked"]
        per_source = {}
        for s in zoo:
            d = list(dice[s.key].values())
            per_source[s.key] = {
                "description": s.description, "status": status.get(s.key, "not ranked"),
                "pretrain_epochs": exp.pretrain_epochs_of(s), "dice_per_seed": {str(k): v for k, v in dice[s.key].items()},
                "dice_mean": statistics.fmean(d) if d else None, "dice_sd": statistics.stdev(d) if len(d) > 1 else 0.0,
                "estimators": {c: statistics.fmean(values[c][s.key].values()) if values[c][s.key] else None
                               for c in SHOWN_COLUMNS},
                "estimators_per_seed": {c: {str(k): v for k, v in values[c][s.key].items()} for c in ESTIMATOR_COLUMNS}}
        random_dice = per_source.get("random_init", {}).get("dice_mean")
        all_runs = [v for s in zoo for v in dice[s.key].values()]
        results["targets"][key] = {
            "sources": [s.key for s in zoo], "per_source": per_source, "runs": len(all_runs),
            "failed_runs": sum(v < FAILED_DICE for v in all_runs), "random_init_dice": random_dice,
            "above_random_init": [s for s, r in per_source.items() if random_dice is not None and r["dice_mean"]
                                  is not None and s != "random_init" and r["dice_mean"] > random_dice],
            "correlations": {c: {"ranked": correlation(dice, values[c], ranked, n_boot),
                                 "all": correlation(dice, values[c], [s.key for s in zoo], n_boot)}
                             for c in ESTIMATOR_COLUMNS}}
    results["step_settings"] = exp.step_settings(targets, seeds)
    results["decision"] = decide(results)
    return results


def wall_minutes(out: Path, minutes: float | None) -> float:
    """The wall minutes of every invocation that trained or ranked into ``out`` (a resumed run adds its own),
    kept in ``out/wall_minutes.json``; ``minutes`` None (``--analyse-only``) adds nothing."""
    file = out / "wall_minutes.json"
    spent = json.loads(file.read_text()) if file.exists() else []
    if minutes is not None:
        spent.append(minutes)
        file.write_text(json.dumps(spent) + "\n")
    return sum(spent)


def write_outputs(results: dict, folder: Path) -> None:
    (folder / "direction.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(results, folder / "direction.csv")
    (folder / "direction.md").write_text(results_markdown(results))
    plot(results, folder / "direction.png")


def publish(out: Path, folder: Path) -> None:
    """Copy the results (JSON, CSV, Markdown, plot) into ``folder`` (e.g. experiments/results/direction)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        shutil.copy(out / name, folder / name)
    print(f"published to {folder}; copy its decision record into nnunet_acnorm/ranking/direction.py (DIRECTION)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--targets", default=None, help=f"comma-separated, of {', '.join(TARGETS)} (default all)")
    parser.add_argument("--sources", default=None, help="comma-separated source keys (default the whole zoo)")
    parser.add_argument("--seeds", default=None, help="e.g. 0-2 (default 0-2)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 10)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="source pretraining epochs (default 25)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default 40)")
    parser.add_argument("--finetune-trainer", default=FINETUNE_TRAINER)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one CPU thread each)")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 2000)")
    parser.add_argument("--analyse-only", action="store_true", help="no training or ranking: analyse what exists")
    parser.add_argument("--smoke", action="store_true",
                        help="a test of the machinery, not results: target mr_organs, sources "
                             f"{', '.join(SMOKE_SOURCES)}, seed 0, 1 epoch x 2 iterations, 200 bootstrap resamples")
    parser.add_argument("--publish", type=Path, help="copy the results into this folder (experiments/results/...)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    targets = (args.targets or ("mr_organs" if smoke else ",".join(TARGETS))).split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    wanted = args.sources.split(",") if args.sources else (list(SMOKE_SOURCES) if smoke else None)
    known = {s.key for zoo in SOURCES.values() for s in zoo}
    if wanted and set(wanted) - known:
        parser.error(f"unknown source(s) {sorted(set(wanted) - known)}; known: {', '.join(sorted(known))}")
    sources = {t: [s for s in SOURCES[t] if wanted is None or s.key in wanted] for t in targets}
    seeds = _parse_seeds(args.seeds or ("0" if smoke else "0-2"))
    epochs = args.epochs or (1 if smoke else 10)
    pretrain_epochs = args.pretrain_epochs or (1 if smoke else 25)
    iterations = args.iterations or (2 if smoke else 40)
    n_boot = args.bootstrap or (200 if smoke else 2000)
    if args.publish and smoke:
        parser.error("--publish: a smoke run is a test of the machinery, not results; run without --smoke")
    budget = {"epochs": epochs, "pretrain_epochs": pretrain_epochs, "iterations": iterations}
    differ = budget_differences(args.output / "budget.json", budget)
    if differ:  # finished steps are skipped: runs of another budget would be analysed as this one's
        parser.error(f"{args.output} holds runs of another budget ({'; '.join(differ)}): resume with its budget, "
                     "or use another --output")
    exp = DirectionExperiment(args.output, epochs, pretrain_epochs, iterations, args.finetune_trainer)
    t0 = time.time()
    if not args.analyse_only:
        (exp.out / "budget.json").write_text(json.dumps(budget) + "\n")
        for key in targets:
            exp.prepare_target(key)
            for source in sources[key]:
                exp.prepare_source(key, source)
        print(f"datasets and plans ready after {(time.time() - t0) / 60:.1f} min", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda job: exp.pretrain(*job), [(k, s) for k in targets for s in sources[k]]):
                print(line, flush=True)
            jobs = [(k, s, seed) for seed in seeds for k in targets for s in sources[k]]
            for line in pool.map(lambda job: exp.finetune(*job), jobs):
                print(line, flush=True)
            ranks = [(k, sources[k], run, seed) for k in targets for run in RANK_RUNS for seed in seeds]
            for line in pool.map(lambda job: exp.rank(*job), ranks):
                print(line, flush=True)
        print(f"training and ranking done in {(time.time() - t0) / 60:.1f} min", flush=True)
    results = analyse(exp, targets, sources, seeds, n_boot, smoke)
    results["minutes"] = wall_minutes(exp.out, None if args.analyse_only else (time.time() - t0) / 60)
    write_outputs(results, exp.out)
    print(results_markdown(results))
    print(f"outputs: {', '.join(str(exp.out / f) for f in OUTPUT_FILES)}")
    if args.publish:
        publish(exp.out, args.publish)


if __name__ == "__main__":
    main()
