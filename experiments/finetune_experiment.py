"""Seeded, paired comparison of fine-tuning methods on real transfers built from the bundled data.

    python experiments/finetune_experiment.py --output /tmp/acnorm_experiment          # everything
    python experiments/finetune_experiment.py --output OUT --transfers ct_to_mr --seeds 0-9 \\
        --methods vanilla,acnorm_tau1                                                   # a part

For each transfer (a source task, a target task; see ``TRANSFERS``):

1. nnU-Net's supervised-pretraining workflow on the bundled volumes (``nnunet_acnorm.demo.datasets``):
   plan and preprocess the target (2d), move its plans to the source, preprocess the source with
   them; the target's held-out slabs become nnU-Net's validation fold (``splits_final.json``).
2. Pretrain one source model per network type (InstanceNorm: nnU-Net's default; BatchNorm: as
   ``nnUNetTrainerBN``) with ``nnUNetv2_train ... -tr nnUNetTrainerScratch[BN]_acnormDemo`` (seed 0).
3. For every seed and method, ``nnUNetv2_train TARGET 2d 0 -tr <trainer> -pretrained_weights
   <source checkpoint>`` (none for "scratch") with ``nnUNet_acnorm_seed=<seed>``, each seed in its
   own ``nnUNet_results`` root; nnU-Net's own validation of fold 0 (the held-out slabs) is the result.
4. ``nnUNetv2_acnorm_compare -m`` over all runs of a transfer (paired by seed, against vanilla),
   and a summary (``results.md``, ``results.json``) with the success counts (Dice > 0.5 on the
   transfer's success label) and the comparison tables.

Every step is a real nnU-Net console script in a subprocess (logs under ``OUT/logs``). Runs that
finished (validation summary present) are skipped, so the script can be resumed or extended.
Training runs ``--jobs`` at a time, one CPU thread each (measured fastest on 2 cores: see
docs/experiments.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nnunet_acnorm.benchmark.plan import software_versions
from nnunet_acnorm.demo.datasets import (CT_ORGANS, CT_SPINE_UNSEEN, CT_PELVIS, MR_ORGANS, SlabTask,
                                         write_holdout_split, write_raw_dataset)
from nnunet_acnorm.demo.pipeline import DEMO_TRAINER_FOLDER
from nnunet_acnorm.nnunet.discovery import trainer_shim_folder, with_trainer_folder
from nnunet_acnorm.nnunet.seeding import SEED_ENV

CONFIG = "2d"
PLANS = "nnUNetPlans"


@dataclass(frozen=True)
class Transfer:
    key: str
    source: SlabTask
    target: SlabTask
    source_plans: str          #: the target's plans, moved to the source under this name
    success_label: str         #: a run "segments" the target when this label's Dice > 0.5


TRANSFERS = {t.key: t for t in (
    # held out: another patient's CT (another scanner), fetched from PyPI (nnunet_acnorm/demo/totalseg_sdist.py)
    Transfer("mr_to_ct_unseen_patient", MR_ORGANS, CT_SPINE_UNSEEN, "DemoUnseenCTPlansForMR", "vertebrae"),
    Transfer("ct_to_mr", CT_ORGANS, MR_ORGANS, "DemoMRPlansForCT", "liver"),
    Transfer("ct_abdomen_to_pelvis", CT_ORGANS, CT_PELVIS, "DemoPelvisPlansForCT", "hips"),
)}

#: method -> (trainer, network type of the source checkpoint or None for no pretrained weights)
METHODS = {
    "scratch": ("nnUNetTrainerScratch_acnormDemo", None),
    "vanilla": ("nnUNetTrainerFinetune_acnormDemo", "IN"),
    "acnorm": ("nnUNetTrainerACNorm_acnormDemo", "IN"),  # the default (calibrated) temperature
    "acnorm_tau1": ("nnUNetTrainerACNorm_tau1_acnormDemo", "IN"),
    # nnU-Net master's PretrainedTrainer recipe and its --from_scratch twin (docs/baselines.md)
    "nnunet_recipe": ("nnUNetTrainerPretrainedRecipe_acnormDemo", "IN"),
    "nnunet_recipe_scratch": ("nnUNetTrainerPretrainedRecipe_fromScratch_acnormDemo", None),
    # the fine-tuning baselines (docs/baselines.md)
    "l2sp": ("nnUNetTrainerL2SP_acnormDemo", "IN"),
    "acnorm_l2sp": ("nnUNetTrainerACNorm_L2SP_acnormDemo", "IN"),
    "spd": ("nnUNetTrainerSPD_acnormDemo", "IN"),
    "acnorm_spd": ("nnUNetTrainerACNorm_SPD_acnormDemo", "IN"),
    "lpft": ("nnUNetTrainerLPFT_acnormDemo", "IN"),
    "delta": ("nnUNetTrainerDELTA_acnormDemo", "IN"),
    "bss": ("nnUNetTrainerBSS_acnormDemo", "IN"),
    "dlr": ("nnUNetTrainerDiscriminativeLR_acnormDemo", "IN"),
    # BatchNorm networks (the paper's setting)
    "vanilla_BN": ("nnUNetTrainerFinetuneBN_acnormDemo", "BN"),
    "acnorm_BN": ("nnUNetTrainerACNormBN_acnormDemo", "BN"),  # the default (calibrated) temperature
    "acnorm_BN_tau1": ("nnUNetTrainerACNormBN_tau1_acnormDemo", "BN"),
    "nnunet_recipe_BN": ("nnUNetTrainerPretrainedRecipeBN_acnormDemo", "BN"),
    "spd_BN": ("nnUNetTrainerSPDBN_acnormDemo", "BN"),
    "stochnorm_BN": ("nnUNetTrainerStochNormBN_acnormDemo", "BN"),
}
#: comparison groups: (name, methods, baseline); each group's methods share a source checkpoint
GROUPS = [("IN", ["scratch", "nnunet_recipe_scratch", "vanilla", "nnunet_recipe", "acnorm", "acnorm_tau1", "l2sp",
                  "acnorm_l2sp", "spd", "acnorm_spd", "lpft", "delta", "bss", "dlr"], "vanilla"),
          ("BN", ["vanilla_BN", "nnunet_recipe_BN", "acnorm_BN", "acnorm_BN_tau1", "spd_BN", "stochnorm_BN"],
           "vanilla_BN")]
PRETRAIN_TRAINERS = {"IN": "nnUNetTrainerScratch_acnormDemo", "BN": "nnUNetTrainerScratchBN_acnormDemo"}
PRETRAIN_SEED = 0


def _parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            seeds.extend(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


class Experiment:
    def __init__(self, out: Path, epochs: int, pretrain_epochs: int, iterations: int,
                 methods: dict[str, tuple[str, str | None]] = METHODS, trainer_folders: tuple[str, ...] = (),
                 groups: list[tuple[str, list[str], str]] = GROUPS):
        self.methods, self.groups = methods, groups
        self.out = out.resolve()
        self.raw, self.pre = self.out / "nnUNet_raw", self.out / "nnUNet_preprocessed"
        self.epochs, self.pretrain_epochs, self.iterations = epochs, pretrain_epochs, iterations
        for d in (self.raw, self.pre, self.out / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                   nnUNet_results=str(self.out / "pretrained"), PYTHONUNBUFFERED="1", nnUNet_compile="false")
        env.pop("nnUNet_n_proc_DA", None)  # 0 breaks nnU-Net's planning; set for training only
        ext = with_trainer_folder(env.get("nnUNet_extTrainer"), trainer_shim_folder())
        env["nnUNet_extTrainer"] = with_trainer_folder(ext, str(DEMO_TRAINER_FOLDER))
        for folder in trainer_folders:
            env["nnUNet_extTrainer"] = with_trainer_folder(env["nnUNet_extTrainer"], str(folder))
        self.env = env

    def train_env(self, results: Path, seed: int, epochs: int) -> dict:
        # nnUNet_def_n_proc=1: nnU-Net's final validation exports in a pool of 8 spawned processes by
        # default (each imports torch: about half a CPU minute per run on 2 cores); same predictions
        return dict(self.env, nnUNet_results=str(results), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
                    OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{SEED_ENV: str(seed), "ACNORM_DEMO_EPOCHS": str(epochs),
                                            "ACNORM_DEMO_ITERATIONS": str(self.iterations)})

    def run(self, log_name: str, *cmd, env: dict | None = None) -> float:
        exe = Path(sys.executable).parent / str(cmd[0])
        argv = [str(exe) if exe.exists() else str(cmd[0]), *[str(c) for c in cmd[1:]]]
        log = self.out / "logs" / f"{log_name}.log"
        start = time.time()
        with open(log, "w") as fh:
            proc = subprocess.run(argv, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "\n    ".join(log.read_text().splitlines()[-12:])
            raise RuntimeError(f"failed (exit {proc.returncode}): {' '.join(argv)}\n  log {log}:\n    {tail}")
        return time.time() - start

    # -- 1. datasets -------------------------------------------------------------------------
    def prepare(self, transfer: Transfer) -> None:
        s, t = transfer.source, transfer.target
        marker = self.pre / s.folder_name / f"{transfer.source_plans}.json"
        if marker.exists() and (self.pre / t.folder_name / "splits_final.json").exists():
            return
        print(f"[{transfer.key}] datasets and plans", flush=True)
        if not (self.raw / s.folder_name).exists():
            write_raw_dataset(self.raw, s)
        if not (self.raw / t.folder_name).exists():
            write_raw_dataset(self.raw, t)
        self.run(f"{transfer.key}_plan_target", "nnUNetv2_plan_and_preprocess", "-d", t.dataset_id, "-c", CONFIG,
                 "-np", 1, "-npfp", 1)
        write_holdout_split(self.pre, t)
        self.run(f"{transfer.key}_fingerprint_source", "nnUNetv2_extract_fingerprint", "-d", s.dataset_id, "-np", 1)
        self.run(f"{transfer.key}_move_plans", "nnUNetv2_move_plans_between_datasets", "-s", t.dataset_id, "-t",
                 s.dataset_id, "-sp", PLANS, "-tp", transfer.source_plans)
        # nnU-Net 2.8.1: preprocessing needs dataset.json in the preprocessed folder, which the moves do not copy
        shutil.copy(self.raw / s.folder_name / "dataset.json", self.pre / s.folder_name / "dataset.json")
        self.run(f"{transfer.key}_preprocess_source", "nnUNetv2_preprocess", "-d", s.dataset_id, "-plans_name",
                 transfer.source_plans, "-c", CONFIG, "-np", 1)

    # -- 2. source models --------------------------------------------------------------------
    def checkpoint(self, transfer: Transfer, net: str) -> Path:
        trainer = PRETRAIN_TRAINERS[net]
        return (self.out / "pretrained" / transfer.source.folder_name / f"{trainer}__{transfer.source_plans}__{CONFIG}"
                / "fold_all" / "checkpoint_final.pth")

    def pretrain(self, transfer: Transfer, net: str) -> None:
        ckpt = self.checkpoint(transfer, net)
        if ckpt.exists():
            return
        env = self.train_env(self.out / "pretrained", PRETRAIN_SEED, self.pretrain_epochs)
        took = self.run(f"{transfer.key}_pretrain_{net}", "nnUNetv2_train", transfer.source.dataset_id, CONFIG, "all",
                        "-tr", PRETRAIN_TRAINERS[net], "-p", transfer.source_plans, "-device", "cpu", env=env)
        print(f"[{transfer.key}] pretrained the {net} source in {took:.0f} s", flush=True)

    # -- 3. fine-tunings ---------------------------------------------------------------------
    def model_folder(self, transfer: Transfer, method: str, seed: int) -> Path:
        trainer = self.methods[method][0]
        return self.out / "runs" / f"seed_{seed}" / transfer.target.folder_name / f"{trainer}__{PLANS}__{CONFIG}"

    def finetune(self, transfer: Transfer, method: str, seed: int) -> str:
        folder = self.model_folder(transfer, method, seed)
        if (folder / "fold_0" / "validation" / "summary.json").exists():
            return f"[{transfer.key}] {method} seed {seed}: done before"
        trainer, net = self.methods[method]
        cmd = ["nnUNetv2_train", transfer.target.dataset_id, CONFIG, 0, "-tr", trainer, "-device", "cpu"]
        if net is not None:
            cmd += ["-pretrained_weights", self.checkpoint(transfer, net)]
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished run: start it again from its seed
        took = self.run(f"{transfer.key}_{method}_seed{seed}", *cmd,
                        env=self.train_env(self.out / "runs" / f"seed_{seed}", seed, self.epochs))
        dice = _label_dice(folder, transfer.target.labels[transfer.success_label])
        return f"[{transfer.key}] {method} seed {seed}: {took:.0f} s, {transfer.success_label} Dice {dice:.3f}"

    # -- 4. comparison -----------------------------------------------------------------------
    def done_seeds(self, transfer: Transfer, method: str, seeds: list[int]) -> list[int]:
        return [s for s in seeds
                if (self.model_folder(transfer, method, s) / "fold_0" / "validation" / "summary.json").exists()]

    def compare(self, transfer: Transfer, name: str, methods: list[str], seeds: list[int], baseline: str) -> dict:
        """``nnUNetv2_acnorm_compare -m`` over ``methods`` x ``seeds`` (paired by seed) against ``baseline``."""
        folders = [self.model_folder(transfer, m, s) for m in methods for s in seeds]
        out = self.out / f"compare_{transfer.key}_{name}"
        self.run(f"{transfer.key}_compare_{name}", "nnUNetv2_acnorm_compare", "-m", *folders, "-o", out, "-baseline",
                 f"{self.methods[baseline][0]}__{PLANS}__{CONFIG}", "--overwrite")
        return {"name": name, "methods": methods, "seeds": seeds, "baseline": baseline, "folder": str(out),
                "comparison": json.loads((out / "comparison.json").read_text()),
                "report": (out / "comparison.md").read_text()}

    def comparisons(self, transfer: Transfer, methods: list[str], seeds: list[int]) -> list[dict]:
        """Per group of methods (IN, BN networks): all its methods on their common seeds; and, where some
        methods have more seeds, those methods on theirs."""
        results = []
        for group, members, baseline in self.groups:
            done = {m: self.done_seeds(transfer, m, seeds) for m in members if m in methods}
            done = {m: d for m, d in done.items() if len(d) >= 2}
            if baseline not in done or len(done) < 2:
                continue
            common = sorted(set.intersection(*(set(d) for d in done.values())))
            results.append(self.compare(transfer, f"{group}_{len(common)}seeds", list(done), common, baseline))
            most = max(len(d) for d in done.values())
            wide = [m for m, d in done.items() if len(d) == most]
            if most > len(common) and baseline in wide and len(wide) >= 2:
                results.append(self.compare(transfer, f"{group}_{most}seeds", wide, done[baseline], baseline))
        return results

    def success(self, transfer: Transfer, methods: list[str], seeds: list[int]) -> dict:
        """Per method: runs, how many segment the success label (Dice > 0.5), its Dice per seed."""
        label = transfer.target.labels[transfer.success_label]
        out = {}
        for m in methods:
            done = self.done_seeds(transfer, m, seeds)
            if not done:
                continue
            dice = {s: _label_dice(self.model_folder(transfer, m, s), label) for s in done}
            values = list(dice.values())
            out[m] = {"trainer": self.methods[m][0], "runs": len(values), "segmented": sum(d > 0.5 for d in values),
                      "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "dice_per_seed": {str(s): round(d, 4) for s, d in dice.items()}}
        return out


#: the full matrix this script is meant to fill (every transfer x every method, this many seeds)
FULL_SEEDS = 5


def results_markdown(results: dict) -> str:
    lines = [f"Budget: {results['epochs']} fine-tuning epochs x {results['iterations']} iterations "
             f"(source models: {results['pretrain_epochs']} epochs), seeds {results['seeds'][0]}-{results['seeds'][-1]} "
             "where run; made by experiments/finetune_experiment.py.", ""]
    for key, res in results["transfers"].items():
        t = TRANSFERS[key]
        lines += [f"## {key}: {t.source.name} -> {t.target.name}", ""]
        if res.get("software"):
            versions = ", ".join(f"{k} {v}" for k, v in res["software"].items() if v and k != "platform")
            lines += [f"Compared at commit {res.get('commit')} with {versions} "
                      "(the environment that compared these runs).", ""]
        lines += [f"| method | trainer | runs | {t.success_label} Dice > 0.5 | {t.success_label} Dice mean ± sd |",
                  "|---|---|---|---|---|"]
        for m, s in res["success"].items():
            lines.append(f"| {m} | `{s['trainer']}` | {s['runs']} | {s['segmented']}/{s['runs']} | "
                         f"{s['mean']:.3f} ± {s['sd']:.3f} |")
        for comp in res["comparisons"]:
            lines += ["", f"### {comp['name']} (baseline {comp['baseline']}, seeds {comp['seeds']})", "",
                      comp["report"].strip()]
        lines.append("")
    return "\n".join(lines)


def _commit() -> str | None:
    """The checkout's commit (with "+changes" when its tracked files differ from it), or None outside git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def _label_dice(model_folder: Path, label: int) -> float:
    """Mean Dice of ``label`` over the validation cases of fold 0 (nnU-Net's summary.json)."""
    summary = json.loads((model_folder / "fold_0" / "validation" / "summary.json").read_text())
    values = [case["metrics"][str(label)]["Dice"] for case in summary["metric_per_case"]]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str] | None = None, methods_table: dict[str, tuple[str, str | None]] = METHODS,
         trainer_folders: tuple[str, ...] = (), description: str = __doc__.split("\n\n")[0],
         groups: list[tuple[str, list[str], str]] = GROUPS, to_readme: bool = True) -> None:
    """The experiment over ``methods_table``, compared per group of ``groups``; ``to_readme``: whether
    --publish also writes the README's results block and the demo's summary (this script's methods)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--transfers", default=",".join(TRANSFERS))
    parser.add_argument("--methods", default=",".join(methods_table))
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,1,7")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (the demo's budget)")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one CPU thread each)")
    parser.add_argument("--no-compare", action="store_true", help="train only")
    parser.add_argument("--compare-only", action="store_true",
                        help="no training: compare the runs that exist (missing method x seed runs are left out)")
    parser.add_argument("--publish", type=Path, help="publish this run's transfers into this folder "
                        "(experiments/results/...), keeping the other transfers published there")
    args = parser.parse_args(argv)
    transfers = [TRANSFERS[k] for k in args.transfers.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in methods_table]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(methods_table)}")
    seeds = _parse_seeds(args.seeds)
    budget = {"epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "iterations": args.iterations}
    if args.publish and (conflict := publish_conflict(args.publish, budget)):
        parser.error(conflict)  # before any training: the published tables hold one budget
    exp = Experiment(args.output, args.epochs, args.pretrain_epochs, args.iterations, methods_table, trainer_folders,
                     groups)
    t0 = time.time()
    for transfer in transfers:
        exp.prepare(transfer)
    nets = sorted({methods_table[m][1] for m in methods} - {None})
    if not args.compare_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: exp.pretrain(*job), [(t, n) for t in transfers for n in nets]))
            jobs = [(t, m, s) for s in seeds for t in transfers for m in methods]
            for line in pool.map(lambda job: exp.finetune(*job), jobs):
                print(line, flush=True)
        print(f"training done in {(time.time() - t0) / 60:.1f} min", flush=True)
    if args.no_compare:
        return
    results = dict(budget, seeds=seeds, methods={m: methods_table[m][0] for m in methods}, transfers={})
    environment = {"software": software_versions(), "commit": _commit()}
    for transfer in transfers:
        results["transfers"][transfer.key] = {"success": exp.success(transfer, methods, seeds),
                                              "comparisons": exp.comparisons(transfer, methods, seeds), **environment}
    (exp.out / "results.json").write_text(json.dumps(results, indent=2))
    (exp.out / "results.md").write_text(results_markdown(results))
    print(results_markdown(results))
    if args.publish:
        publish(args.publish, results, to_readme)


def publish(folder: Path, results: dict, to_readme: bool = True) -> None:
    """Publish the transfers of ``results`` into ``folder`` (e.g. experiments/results/finetune): their
    comparison folders (tables, JSON, plots) replace the earlier ones of the same transfers; the other
    transfers already published there stay, each with the commit and packages that compared it. With
    ``to_readme``, then the README's results table and the demo's summary, from all published transfers."""
    folder.mkdir(parents=True, exist_ok=True)
    merged = merged_results(results, folder / "results.json")
    current = {Path(comp["folder"]).name for res in merged["transfers"].values() for comp in res["comparisons"]}
    for stale in folder.glob("compare_*"):  # results of earlier runs are replaced, not kept beside
        if stale.is_dir() and stale.name not in current:
            shutil.rmtree(stale)
    for res in results["transfers"].values():
        for comp in res["comparisons"]:
            target = folder / Path(comp["folder"]).name
            target.mkdir(exist_ok=True)
            for name in ("comparison.md", "comparison.csv", "comparison.json", "paired_differences.png"):
                shutil.copy(Path(comp["folder"]) / name, target / name)
    (folder / "results.json").write_text(json.dumps(merged, indent=2))
    (folder / "results.md").write_text(results_markdown(merged))
    print(f"published to {folder}")
    if not to_readme:
        return
    summary = demo_summary(merged)
    DEMO_SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    readme = README.read_text()
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    README.write_text(readme[:start] + "\n" + readme_table(summary, merged) + readme[end:])
    print(f"published to {DEMO_SUMMARY} and the results table of {README}")


def budget_differences(file: Path, budget: dict) -> list[str]:
    """``["epochs 6 there, 3 here", ...]``: where ``budget`` differs from the one recorded in the JSON ``file``
    (none where there is no such file)."""
    earlier = json.loads(file.read_text()) if file.is_file() else budget
    return [f"{key} {earlier.get(key)} there, {value} here"
            for key, value in budget.items() if earlier.get(key) != value]


def publish_conflict(folder: Path, budget: dict) -> str | None:
    """Why the results of ``budget`` cannot join those published in ``folder`` (None if they can)."""
    published = folder / "results.json"
    differ = budget_differences(published, budget)
    if differ:
        return (f"{published} holds results of another budget ({'; '.join(differ)}): run with its budget, "
                "or publish into another folder")
    return None


def merged_results(results: dict, published: Path) -> dict:
    """``results`` plus the transfers of an earlier ``published`` results.json that it does not hold, in
    the order of TRANSFERS; an earlier transfer keeps the commit and packages that compared it."""
    if not published.is_file():
        return results
    earlier = json.loads(published.read_text())
    environment = {k: earlier[k] for k in ("software", "commit") if k in earlier}  # files of one environment
    transfers = {**{k: {**environment, **v} for k, v in earlier["transfers"].items()}, **results["transfers"]}
    return dict(results, seeds=sorted(set(earlier["seeds"]) | set(results["seeds"])),
                methods={**earlier["methods"], **results["methods"]},
                transfers={k: transfers[k] for k in TRANSFERS if k in transfers})


README = Path(__file__).resolve().parents[1] / "README.md"
README_START, README_END = "<!-- results table: experiments/finetune_experiment.py --publish -->", "<!-- end of results table -->"


def readme_table(summary: dict, results: dict) -> str:
    """The README's results block: one row per method of METHODS, one column per transfer of
    TRANSFERS, so every cell of the full matrix shows, run or not (issue 28: no silent gaps). A
    baseline's cell is its mean Dice ± sd, every other cell the paired difference to its group's
    baseline; a cell with fewer than FULL_SEEDS seeds says how many. Then the reading, copied from
    ``READING`` (written by hand from the tables, committed beside them)."""
    keys = list(TRANSFERS)
    lines = [f"Cells: a baseline's mean Dice ± sd over the seeds; every other method: paired Δ vs its baseline "
             f"(vanilla; `_BN` rows: vanilla_BN) [95 % CI], wins/losses; {FULL_SEEDS} seeds unless a cell says fewer.", "",
             "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(_cell(summary, key, method) for key in keys) + " |")
    if READING.is_file():
        lines += ["", READING.read_text().strip()]
    return "\n".join(lines) + "\n"


def _cell(summary: dict, key: str, method: str) -> str:
    rows = [r for r in summary["transfers"].get(key, {}).get("rows", []) if r["method"] == method]
    if not rows:
        runs = summary["transfers"].get(key, {}).get("success", {}).get(method, {}).get("runs", 0)
        return f"{runs} seed(s), not compared" if runs else "not run"
    row = max(rows, key=lambda r: r["seeds"])
    text = (f"{row['delta']:+.3f} [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}] {row['wins']}/{row['losses']}"
            if "delta" in row else f"{row['mean_dice']:.3f} ± {row['sd']:.3f}")
    return text + (f" ({row['seeds']} seeds)" if row["seeds"] < FULL_SEEDS else "")


#: the reading of the published tables (hand-written), appended to the README block by --publish
READING = Path(__file__).resolve().parent / "results" / "finetune" / "reading.md"


#: what nnUNetv2_acnorm_demo prints after its own single run: the experiment's numbers
DEMO_SUMMARY = Path(__file__).resolve().parents[1] / "nnunet_acnorm" / "demo" / "experiment_summary.json"


def demo_summary(results: dict) -> dict:
    """The experiment in a few numbers per transfer: success counts and paired differences in mean Dice."""
    summary = {"made_by": "experiments/finetune_experiment.py", "epochs": results["epochs"],
               "iterations": results["iterations"], "transfers": {}}
    for key, res in results["transfers"].items():
        rows = []
        for comp in res["comparisons"]:
            trainers = {m["name"]: m for m in comp["comparison"]["methods"]}
            for method in comp["methods"]:
                entry = trainers[f"{results['methods'][method]}__{PLANS}__{CONFIG}"]
                mean = entry["summary"]["mean_dice"]["units"]
                per_seed = res["success"][method]["dice_per_seed"]
                label_dice = [per_seed[str(seed)] for seed in comp["seeds"]]
                row = {"comparison": comp["name"], "method": method, "baseline": comp["baseline"],
                       "seeds": len(comp["seeds"]), "mean_dice": mean["mean"], "sd": mean["sd"],
                       "label_dice": statistics.fmean(label_dice),
                       "label_sd": statistics.stdev(label_dice) if len(label_dice) > 1 else 0.0,
                       "segmented": sum(d > 0.5 for d in label_dice)}
                if method != comp["baseline"]:
                    d = entry["vs_baseline"]["mean_dice"]
                    row.update(delta=d["mean_difference"], ci=[d["ci_low"], d["ci_high"]], p=d["wilcoxon_p"],
                               wins=d["wins"], losses=d["losses"])
                rows.append(row)
        summary["transfers"][key] = {"success_label": TRANSFERS[key].success_label, "success": {
            m: {"runs": s["runs"], "segmented": s["segmented"]} for m, s in res["success"].items()}, "rows": rows}
    return summary


if __name__ == "__main__":
    main()
