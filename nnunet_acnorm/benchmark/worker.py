"""One run of a benchmark: the ``nnUNetv2_train`` call, its environment, its log and its state file.

Every executor ends here: the local one calls :func:`execute_run` in a thread per slot, a SLURM array
task calls :func:`slurm_task` (through submitit). A run continues where its last attempt stopped: with
``checkpoint_final.pth`` only nnU-Net's validation runs (``--val``), with ``checkpoint_latest.pth`` the
training continues (``--c``), otherwise it starts from the pretrained weights; what an earlier attempt
left in the fold folder is then moved to ``OUT/attempts/<run>/attempt<k>/`` (nothing is overwritten).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from nnunet_acnorm.benchmark.plan import Plan, PlannedRun
from nnunet_acnorm.benchmark.state import BenchmarkFolder
from nnunet_acnorm.nnunet.seeding import SEED_ENV

TRAIN_SCRIPT = "nnUNetv2_train"
#: return codes of a training stopped from outside (SLURM's scancel and time limit send SIGTERM): interrupted,
#: not failed. SIGKILL is not among them: the kernel's out-of-memory killer sends it.
STOP_SIGNALS = {-signal.SIGTERM: "SIGTERM", -signal.SIGINT: "SIGINT", -signal.SIGHUP: "SIGHUP"}


@dataclass
class Slot:
    """Where a run executes: environment variables (``CUDA_VISIBLE_DEVICES``, thread counts) and the CPUs
    its process (and nnU-Net's augmentation workers) may use (None: all)."""
    label: str = "this process"
    env: dict = field(default_factory=dict)
    cpus: frozenset | None = None


def console_script(name: str) -> str:
    """Absolute path of a console script of the running interpreter's environment (a SLURM job runs the
    venv's script whatever its PATH), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.isfile(here) else (shutil.which(name) or name)


def resume_mode(run: PlannedRun) -> str:
    """``validate`` (final checkpoint, no validation), ``continue`` (a latest checkpoint) or ``fresh``."""
    if os.path.isfile(os.path.join(run.fold_folder, "checkpoint_final.pth")):
        return "validate"
    if os.path.isfile(os.path.join(run.fold_folder, "checkpoint_latest.pth")):
        return "continue"
    return "fresh"


def train_command(plan: Plan, run: PlannedRun, mode: str = "fresh", script: str | None = None) -> list[str]:
    """The ``nnUNetv2_train`` argv of ``run`` (``mode``: see :func:`resume_mode`)."""
    what = plan.what
    argv = [script or console_script(TRAIN_SCRIPT), what["dataset"], what["configuration"], run.fold, "-tr",
            run.trainer, "-p", what["plans"], "-device", what["device"]]
    if mode == "validate":
        argv.append("--val")
    elif mode == "continue":
        argv.append("--c")
    elif run.pretrained:
        argv += ["-pretrained_weights", what["pretrained_weights"]["path"]]
    return argv


def run_environment(plan: Plan, run: PlannedRun, slot_env: dict | None = None) -> dict:
    """The variables the runner sets for ``run`` (on top of the caller's environment)."""
    env = {"nnUNet_preprocessed": plan.environment["nnUNet_preprocessed"], "nnUNet_results": run.results_root,
           "nnUNet_extTrainer": plan.environment["nnUNet_extTrainer"], SEED_ENV: str(run.seed),
           "PYTHONUNBUFFERED": "1"}
    env.update(plan.what["env"])
    env.update(slot_env or {})
    return env


def _move_aside(folder: BenchmarkFolder, run: PlannedRun, attempt: int) -> str | None:
    """Move what an earlier attempt left in the fold folder to OUT/attempts/<run>/attempt<k>/."""
    if not os.path.isdir(run.fold_folder) or not os.listdir(run.fold_folder):
        return None
    target = os.path.join(folder.attempts, run.id, f"attempt{attempt}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(run.fold_folder, target)
    return target


def _start_state(run: PlannedRun, attempt: int, mode: str, log: str, argv: list, slot: Slot) -> dict:
    return {"run": run.id, "state": "running", "attempt": attempt, "mode": mode, "started": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), "slot": slot.label, "log": log, "command": argv,
            "slurm_job": _slurm_job_id()}


def _slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _log_header(run: PlannedRun, attempt: int, mode: str, argv: list, env: dict, slot: Slot, moved) -> str:
    lines = [f"# nnUNetv2_acnorm_benchmark: run {run.id}, attempt {attempt} ({mode}) on {socket.gethostname()}, "
             f"{slot.label}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
             "# " + " ".join(f"{k}={v}" for k, v in env.items()),
             "# " + " ".join(argv)]
    if moved:
        lines.append(f"# the previous attempt's fold folder was moved to {moved}")
    return "\n".join(lines) + "\n"


def execute_run(folder: BenchmarkFolder, plan: Plan, run: PlannedRun, slot: Slot | None = None,
                on_start=None, stopping=lambda: False) -> dict:
    """Run ``run`` once (the next attempt) in this process's environment plus the runner's; returns its final
    state (``done``, ``failed`` or ``interrupted`` when ``stopping()`` is true at its end).

    ``on_start(process)`` is called with the started ``subprocess.Popen`` (so that a caller can stop it)."""
    slot = slot or Slot()
    attempt = int(folder.read_state(run).get("attempt", 0)) + 1
    mode = resume_mode(run)
    moved = _move_aside(folder, run, attempt - 1) if mode == "fresh" else None
    argv = train_command(plan, run, mode)
    env_runner = run_environment(plan, run, slot.env)
    log = folder.log_file(run, attempt)
    os.makedirs(folder.logs, exist_ok=True)
    state = _start_state(run, attempt, mode, log, argv, slot)
    folder.write_state(run, state)
    if slot.cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, slot.cpus)  # this thread's CPUs: the child process inherits them
    with open(log, "x") as fh:
        fh.write(_log_header(run, attempt, mode, argv, env_runner, slot, moved))
        fh.flush()
        try:
            process = subprocess.Popen(argv, env={**os.environ, **env_runner}, stdout=fh, stderr=subprocess.STDOUT)
        except OSError as e:
            fh.write(f"# cannot start {argv[0]}: {e}\n")
            return _end(folder, run, state, None, f"cannot start {argv[0]}: {e}")
        if on_start is not None:
            on_start(process)
        returncode = process.wait()
    if stopping():
        return _end(folder, run, state, returncode, "stopped by the benchmark (interrupt)", "interrupted")
    if returncode in STOP_SIGNALS:  # scancel, a time limit, a kill: the next call continues it
        return _end(folder, run, state, returncode, f"stopped by {STOP_SIGNALS[returncode]}", "interrupted")
    if returncode == 0 and os.path.isfile(run.summary_file):
        return _end(folder, run, state, returncode, None, "done")
    return _end(folder, run, state, returncode, f"exit status {returncode}" if returncode != 0 else
                f"exit status 0, but no {os.path.relpath(run.summary_file, run.model_folder)} (nnU-Net's validation)")


def _end(folder: BenchmarkFolder, run: PlannedRun, state: dict, returncode, reason, final: str = "failed") -> dict:
    state.update(state=final, ended=time.time(), returncode=returncode)
    if reason:
        state["reason"] = reason
    folder.write_state(run, state)
    return state


def slurm_slot(device: str) -> Slot:
    """The slot of a SLURM task: SLURM pins the GPUs (``CUDA_VISIBLE_DEVICES``); threads = its CPUs."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    env = {"OMP_NUM_THREADS": cpus, "MKL_NUM_THREADS": cpus} if device == "cpu" and cpus else {}
    label = f"SLURM job {_slurm_job_id()}" + (f", {cpus} CPUs" if cpus else "")
    return Slot(label, env)


def slurm_task(out: str, run_id: str) -> str:
    """The function of one SLURM array task (submitit pickles a reference to it): run ``run_id`` of the
    benchmark in ``out``. Raises on failure, so that SLURM records the task as failed."""
    folder = BenchmarkFolder(out)
    plan = folder.require_plan()
    run = plan.run(run_id)
    state = execute_run(folder, plan, run, slurm_slot(plan.what["device"]))
    if state["state"] != "done":
        raise RuntimeError(f"run {run_id} {state['state']} ({state.get('reason')}); log: {state['log']}")
    return state["state"]
