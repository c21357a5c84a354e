"""How the runs of a benchmark execute: here (:class:`LocalExecutor`), as one SLURM job array
(:class:`SlurmExecutor`, through submitit), or printed for any other scheduler (:class:`PrintExecutor`).

Each executor has ``check()`` (raises :class:`~nnunet_acnorm.benchmark.plan.BenchmarkError` before
anything is written) and ``execute(folder, plan, runs)``. Where a run stands is read from the files
(:mod:`~nnunet_acnorm.benchmark.state`) and, for runs handed to SLURM, from ``squeue``
(:class:`SlurmJobs`), so that a later call of any executor sees the same thing.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from nnunet_acnorm.benchmark.plan import BenchmarkError, Plan, PlannedRun
from nnunet_acnorm.benchmark.state import BenchmarkFolder
from nnunet_acnorm.benchmark.worker import Slot, execute_run, resume_mode, run_environment, slurm_task, train_command

#: squeue states of a task that has started
ACTIVE_SLURM_STATES = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT")


def describe(run: PlannedRun) -> str:
    return f"{run.method} seed {run.seed} fold {run.fold}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ------------------------------------------------------------------------------------------- local


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device torch sees."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(device: str, jobs: int | None, gpus: list[str] | None = None, cpus: list[int] | None = None) -> list[Slot]:
    """One slot per concurrent run: on ``cuda`` a GPU each (runs share GPUs round-robin when ``jobs`` exceeds
    them), on ``cpu``/``mps`` an equal share of this process's CPUs (pinned, ``OMP_NUM_THREADS`` = share)."""
    if jobs is not None and jobs < 1:
        raise BenchmarkError(f"--jobs {jobs}: at least 1")
    if device == "cuda":
        gpus = visible_gpus() if gpus is None else [str(g) for g in gpus]
        if not gpus:
            raise BenchmarkError("-device cuda, but no GPU is visible here (CUDA_VISIBLE_DEVICES / torch); use -device "
                                 "cpu, or --executor slurm to run on a cluster's GPUs")
        jobs = jobs or len(gpus)
        return [Slot(f"GPU {gpus[i % len(gpus)]}", {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}) for i in range(jobs)]
    if gpus:
        raise BenchmarkError(f"--gpus is for -device cuda (the device is {device})")
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None and hasattr(os, "sched_getaffinity") else cpus
    cpus = cpus or list(range(os.cpu_count() or 1))
    jobs = jobs or 1
    share = max(1, len(cpus) // jobs)
    slots = []
    for i in range(jobs):
        mine = [cpus[(i * share + k) % len(cpus)] for k in range(share)]
        threads = str(len(mine))
        slots.append(Slot(f"CPUs {','.join(map(str, mine))}", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
                          frozenset(mine)))
    return slots


class LocalExecutor:
    """``jobs`` runs at a time on this machine, each in its slot (:func:`local_slots`), with progress on
    the console: finished and failed runs as they end, and a bar with the running/failed counts and ETA."""

    def __init__(self, device: str, jobs: int | None = None, gpus: list[str] | None = None, progress: bool = True,
                 output=print):
        self.device, self.jobs, self.gpus, self.progress, self.output = device, jobs, gpus, progress, output
        self.slots: list[Slot] = []

    def check(self) -> None:
        self.slots = local_slots(self.device, self.jobs, self.gpus)

    def execute(self, folder: BenchmarkFolder, plan: Plan, runs: list[PlannedRun]) -> list[dict]:
        if not self.slots:
            self.check()
        if not runs:
            return []
        self.output(f"{len(runs)} run(s), {len(self.slots)} at a time: {'; '.join(s.label for s in self.slots)}")
        free: queue.Queue = queue.Queue()
        for slot in self.slots:
            free.put(slot)
        stop, processes = threading.Event(), []

        def one(run: PlannedRun) -> dict:
            slot = free.get()
            try:
                if stop.is_set():
                    return {"run": run.id, "state": "interrupted"}
                return execute_run(folder, plan, run, slot, processes.append, stop.is_set)
            finally:
                free.put(slot)

        with ThreadPoolExecutor(len(self.slots)) as pool:
            futures = {pool.submit(one, run): run for run in runs}
            try:
                return self._follow(futures)
            except KeyboardInterrupt:
                stop.set()
                for process in processes:
                    if process.poll() is None:
                        process.terminate()
                raise

    def _follow(self, futures: dict) -> list[dict]:
        """Wait for the runs; a line per finished run (with the count and an ETA), and a bar on a terminal."""
        from tqdm import tqdm

        states, start, total = [], time.time(), len(futures)
        bar = tqdm(total=total, unit="run", desc="benchmark", file=sys.stderr, dynamic_ncols=True,
                   disable=not (self.progress and sys.stderr.isatty()))
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    states.append(future.result())
                    eta = (time.time() - start) / len(states) * (total - len(states))
                    self._report_end(bar, futures[future], states[-1], f"[{len(states)}/{total}, ETA {duration(eta)}]")
                    bar.update()
                failed = sum(s["state"] == "failed" for s in states)
                bar.set_postfix_str(f"running {min(len(pending), len(self.slots))}, failed {failed}", refresh=False)
        finally:
            bar.close()
        return states

    def _report_end(self, bar, run: PlannedRun, state: dict, count: str) -> None:
        took = duration(state["ended"] - state["started"]) if "ended" in state else "-"
        if state["state"] == "done":
            line = f"{count} done     {describe(run)} ({took})"
        else:
            line = f"{count} {state['state'].upper():8} {describe(run)} ({state.get('reason', '')}; log: {state.get('log')})"
        if bar.disable:
            self.output(line)
        else:
            bar.write(line, file=sys.stdout)


# ------------------------------------------------------------------------------------------- SLURM


def slurm_job_name(folder: BenchmarkFolder) -> str:
    """The name of this benchmark's SLURM jobs (squeue finds them by it)."""
    return "acnorm_bench_" + hashlib.sha1(folder.out.encode()).hexdigest()[:10]


def parse_time(value: str) -> int:
    """SLURM's time formats (``MIN``, ``MIN:SEC``, ``H:MIN:SEC``, ``D-H``, ``D-H:MIN``, ``D-H:MIN:SEC``) in minutes."""
    text = str(value).strip()
    days, dash, rest = text.partition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in rest.split(":")]
        if len(parts) > 3 or (dash and not days):
            raise ValueError
        if dash:  # D-H[:MIN[:SEC]]
            hours, minutes, seconds = (parts + [0, 0])[:3]
        elif len(parts) == 3:  # H:MIN:SEC
            hours, minutes, seconds = parts
        else:  # MIN or MIN:SEC
            hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
        total = int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    except ValueError:
        raise BenchmarkError(f"--time {value}: use minutes or SLURM's D-HH:MM:SS") from None
    if total < 1:
        raise BenchmarkError(f"--time {value}: at least one minute")
    return total


class SlurmJobs:
    """What ``squeue`` says about this benchmark's jobs: run id -> (state, job id), for the jobs SLURM still
    lists. ``available`` is False where squeue cannot be asked (then nothing is known to be live)."""

    def __init__(self, folder: BenchmarkFolder):
        self.folder = folder
        self.submissions = read_submissions(folder)
        self.by_job = {job: run for s in self.submissions for job, run in s["jobs"].items()}
        self.states: dict = {}
        self.available, self.error = True, None
        if self.submissions:
            self._ask()

    def _ask(self) -> None:
        squeue = shutil.which("squeue")
        if squeue is None:
            self.available, self.error = False, "squeue is not on PATH"
            return
        proc = subprocess.run([squeue, "-h", "-r", "-n", slurm_job_name(self.folder), "-o", "%i %T"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            self.available, self.error = False, (proc.stderr.strip() or f"squeue exit {proc.returncode}")
            return
        for line in proc.stdout.splitlines():
            if line.strip():
                job, state = line.split()[:2]
                for one in _expand_array(job):
                    if one in self.by_job:
                        self.states[self.by_job[one]] = (state, one)

    def live(self, run_id: str):
        return self.states.get(run_id)


def _expand_array(job: str) -> list[str]:
    """``12_3`` -> [12_3]; ``12_[0-2,5%2]`` -> [12_0, 12_1, 12_2, 12_5]; ``12`` -> [12]."""
    if "_[" not in job:
        return [job]
    array, spec = job.split("_[", 1)
    out = []
    for part in spec.rstrip("]").split("%")[0].split(","):
        a, _, b = part.partition("-")
        out += [f"{array}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def read_submissions(folder: BenchmarkFolder) -> list[dict]:
    path = os.path.join(folder.slurm, "submissions.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class SlurmExecutor:
    """All runs as one SLURM job array through submitit; returns after the submission. Each array task runs
    :func:`~nnunet_acnorm.benchmark.worker.slurm_task` with this interpreter (the venv's python).

    Args:
        device: the plan's device (``cuda``: one GPU per run unless ``gpus_per_run`` says otherwise)
        partition, time, cpus_per_run, mem_gb, gpus_per_run: sbatch's --partition, --time (minutes),
            --cpus-per-task, --mem, --gpus-per-node
        jobs: runs at a time (the array's ``%N``; None: as many as SLURM allows)
        sbatch: further sbatch options, e.g. ``{"account": "x", "qos": "y", "gres": "gpu:a100:1"}``
    """

    def __init__(self, device: str, partition: str | None = None, time: int = 1440, cpus_per_run: int | None = None,
                 mem_gb: float | None = None, gpus_per_run: int | None = None, jobs: int | None = None,
                 sbatch: dict | None = None, output=print):
        self.device, self.partition, self.time, self.output = device, partition, time, output
        self.cpus_per_run, self.mem_gb, self.jobs, self.sbatch = cpus_per_run, mem_gb, jobs, dict(sbatch or {})
        self.gpus_per_run = (1 if device == "cuda" else 0) if gpus_per_run is None else gpus_per_run

    def check(self) -> None:
        missing = [tool for tool in ("sbatch", "srun", "squeue") if shutil.which(tool) is None]
        if missing:
            raise BenchmarkError(f"--executor slurm: {', '.join(missing)} not found on PATH (no SLURM client here); "
                                 "run where SLURM is, or use --executor local or print")
        for name, value in (("--jobs", self.jobs), ("--cpus-per-run", self.cpus_per_run),
                            ("--mem", self.mem_gb)):
            if value is not None and value <= 0:
                raise BenchmarkError(f"{name} {value}: must be positive")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise BenchmarkError("--executor slurm needs the package submitit (pip install submitit)") from None
        if self.partition is not None:
            self._check_partition()

    def _check_partition(self) -> None:
        proc = subprocess.run([shutil.which("sinfo") or "sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
        partitions = [p.strip().rstrip("*") for p in proc.stdout.split()] if proc.returncode == 0 else []
        if partitions and self.partition not in partitions:
            raise BenchmarkError(f"--partition {self.partition}: SLURM has no such partition (sinfo: "
                                 f"{', '.join(partitions)})")

    def parameters(self, folder: BenchmarkFolder, n: int) -> dict:
        params = {"job_name": slurm_job_name(folder), "time": self.time, "stderr_to_stdout": True,
                  "array_parallelism": min(self.jobs or n, n)}
        for key, value in (("partition", self.partition), ("cpus_per_task", self.cpus_per_run),
                           ("gpus_per_node", self.gpus_per_run or None)):
            if value is not None:
                params[key] = value
        if self.mem_gb is not None:
            params["mem"] = f"{int(self.mem_gb * 1024)}M"
        if self.sbatch:
            params["additional_parameters"] = self.sbatch
        return params

    def execute(self, folder: BenchmarkFolder, plan: Plan, runs: list[PlannedRun]) -> list[dict]:
        if not runs:
            return []
        import submitit

        executor = submitit.SlurmExecutor(folder=folder.slurm, python=shlex.quote(sys.executable))
        params = self.parameters(folder, len(runs))
        before = set(os.listdir(folder.slurm)) if os.path.isdir(folder.slurm) else set()
        try:
            executor.update_parameters(**params)
            jobs = executor.map_array(slurm_task, [folder.out] * len(runs), [r.id for r in runs])
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, ValueError) as e:
            for name in set(os.listdir(folder.slurm)) - before:  # submitit's files of the refused submission
                os.remove(os.path.join(folder.slurm, name))
            raise BenchmarkError(f"sbatch refused the job array: {_first_line(e)}") from None
        array = jobs[0].job_id.split("_")[0]
        record = {"array": array, "submitted": time.time(), "jobs": {j.job_id: r.id for j, r in zip(jobs, runs)},
                  "parameters": {k: v for k, v in params.items()},
                  "submission_file": str(jobs[0].paths.submission_file)}
        os.makedirs(folder.slurm, exist_ok=True)
        with open(os.path.join(folder.slurm, "submissions.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        self.output(f"submitted {len(runs)} run(s) as SLURM job {'array ' if len(runs) > 1 else ''}{array} "
                    f"({record['submission_file']}); call again with -o {folder.out} (or --status) to gather")
        return [{"run": r.id, "state": "queued", "slurm_job": j.job_id} for j, r in zip(jobs, runs)]


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if "error" in line.lower()] or lines
    return useful[0].strip()


# ------------------------------------------------------------------------------------------- print


class PrintExecutor:
    """Runs nothing: prints each run's ``nnUNetv2_train`` call with its environment, one per line, for any
    scheduler. Their results land where the plan (written as for the other executors) expects them, so a later
    call with the same -o gathers them."""

    def __init__(self, output=print):
        self.output = output

    def check(self) -> None:
        pass

    def commands(self, plan: Plan, runs: list[PlannedRun]) -> list[str]:
        lines = []
        for run in runs:
            env = run_environment(plan, run)
            argv = train_command(plan, run, resume_mode(run))
            lines.append(" ".join(["env"] + [f"{k}={shlex.quote(v)}" for k, v in env.items()]
                                  + [shlex.quote(a) for a in argv]))
        return lines

    def execute(self, folder: BenchmarkFolder, plan: Plan, runs: list[PlannedRun]) -> list[dict]:
        for line in self.commands(plan, runs):
            self.output(line)
        return []

