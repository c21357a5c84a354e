"""A benchmark in its output folder, for commands and scripts alike.

    from nnunet_acnorm.benchmark import Benchmark, BenchmarkSpec, LocalExecutor

    spec = BenchmarkSpec("501", "3d_fullres", ["vanilla", "acnorm", "l2sp"], "checkpoint_final.pth",
                         folds=["0", "1", "2", "3", "4"], seeds=[0], device="cuda")
    bench = Benchmark.open("bench_out", spec)       # checks everything; refuses other options in a used folder
    executor = LocalExecutor("cuda", jobs=4)
    executor.check()                                 # before anything is written
    with bench.locked():
        bench.start()                                # writes plan.json (once) and nnU-Net's split if missing
        bench.execute(executor)                      # the runs not finished (and not failed, unless retry_failed)
        summary = bench.report(baseline="vanilla")   # OUT/report/: report.md, comparison/
"""
from __future__ import annotations

import contextlib
import json
import os

from nnunet_acnorm.benchmark.executors import SlurmJobs, read_submissions
from nnunet_acnorm.benchmark.plan import BenchmarkError, BenchmarkSpec, Plan, PlannedRun, make_plan
from nnunet_acnorm.benchmark.report import write_report
from nnunet_acnorm.benchmark.state import BenchmarkFolder, RunStatus
from nnunet_acnorm.checkpoints.io import atomic_write_text

#: states whose runs the next execution starts (failed ones only with retry_failed)
STARTABLE = ("todo", "interrupted")


class Benchmark:
    """A plan and its output folder. ``is_new``: the plan is not written yet (:meth:`start` writes it)."""

    def __init__(self, folder: BenchmarkFolder, plan: Plan, is_new: bool):
        self.folder, self.plan, self.is_new = folder, plan, is_new
        self.slurm_error: str | None = None

    @classmethod
    def open(cls, out: str, spec: BenchmarkSpec | None = None, environ=None) -> "Benchmark":
        """The benchmark in ``out``: with ``spec``, checked against the plan already there (or a new plan); without,
        the plan already there. Writes nothing; raises :class:`BenchmarkError` with one line."""
        folder = BenchmarkFolder(out)
        existing = folder.read_plan()
        if spec is None:
            if existing is None:
                raise BenchmarkError(f"{folder.out} holds no benchmark yet: give -d, -c, -tr (and -pretrained_weights) "
                                     "to start one")
            return cls(folder, existing, False)
        plan = make_plan(spec, folder.out, environ)
        if existing is not None:
            folder.check_same(existing, plan)
            return cls(folder, existing, False)
        return cls(folder, plan, True)

    @contextlib.contextmanager
    def locked(self, wait_for_others: bool = True):
        """Hold the folder's lock inside the block. ``wait_for_others=False``: where another call holds it, go on
        without (the block gets False) instead of raising."""
        try:
            handle = self.folder.lock()
        except BenchmarkError:
            if wait_for_others:
                raise
            yield False
            return
        try:
            yield True
        finally:
            handle.close()

    def start(self) -> None:
        """Write the plan (a new benchmark) and nnU-Net's cross-validation split where it is missing (the runs would
        otherwise race to write it)."""
        if self.is_new:
            self.folder.write_plan(self.plan)
            self.is_new = False
        ensure_splits(self.plan)

    def statuses(self) -> list[RunStatus]:
        slurm = None
        if read_submissions(self.folder):
            slurm = SlurmJobs(self.folder)
            self.slurm_error = None if slurm.available else slurm.error
            slurm = slurm if slurm.available else None
        return self.folder.statuses(self.plan, slurm)

    def runs_to_start(self, retry_failed: bool = False, statuses: list[RunStatus] | None = None) -> list[PlannedRun]:
        states = STARTABLE + (("failed",) if retry_failed else ())
        return [s.run for s in (statuses or self.statuses()) if s.state in states]

    def execute(self, executor, retry_failed: bool = False) -> list[dict]:
        """Start the runs not finished, not running or queued (and not failed, unless ``retry_failed``)."""
        if self.is_new:
            raise BenchmarkError("call start() first: the plan is written before anything runs")
        runs = self.runs_to_start(retry_failed)
        if self.slurm_error and runs:
            raise BenchmarkError(
                f"SLURM cannot be asked about the jobs submitted for {self.folder.out} ({self.slurm_error}), so runs "
                "still queued there could start twice; call where squeue works, or, if none of those jobs is queued or "
                f"running any more, move {self.folder.slurm}/submissions.jsonl away")
        return executor.execute(self.folder, self.plan, runs)

    def report(self, baseline: str | None = None, statuses: list[RunStatus] | None = None) -> dict:
        return write_report(self.folder, self.plan, statuses or self.statuses(), baseline)


def ensure_splits(plan: Plan) -> str | None:
    """nnU-Net's 5-fold split (``generate_crossval_split``, seed 12345, as ``nnUNetTrainer.do_split``) written to
    ``splits_final.json`` if the dataset has none; the path written, or None."""
    folder = plan.what["preprocessed_folder"]
    path = os.path.join(folder, "splits_final.json")
    if os.path.isfile(path) or all(f == "all" for f in plan.what["folds"]):
        return None
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(os.path.join(folder, plan.what["plans"] + ".json")) as f:
        config = PlansManager(json.load(f)).get_configuration(plan.what["configuration"])
    data = os.path.join(folder, config.data_identifier)
    identifiers = sorted(infer_dataset_class(data).get_identifiers(data))
    splits = generate_crossval_split(identifiers, seed=12345, n_splits=5)
    atomic_write_text(path, json.dumps(splits, indent=4))
    return path
