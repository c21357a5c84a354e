"""nnUNetv2_acnorm_benchmark through its real console script, on a tiny planned dataset with a checkpoint of
its planned network: the local executor (2 methods x 2 folds, one run failing on purpose), resuming, the
retry of the failed run alone, the refusal of other options on the same folder, the print executor, bad
input, and the SLURM executor against a real SLURM (submit, wait, gather, report).

The SLURM test needs a cluster that answers ``sinfo`` (``bash scripts/local_slurm.sh`` starts one on
localhost); without one it is skipped, unless ``NNUNET_ACNORM_REQUIRE_SLURM=1`` (set by ``.ci/run``) makes
it fail instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.factories.checkpoints import save_nnunet_v2_checkpoint
from tests.factories.nnunet import (TINY_CONFIG, TINY_ID, TINY_NAME, acnorm_trainer_env, copy_planned,
                                    planned_tiny_dataset, run_console)

pytestmark = pytest.mark.integration
SCRIPT = "nnUNetv2_acnorm_benchmark"
DATASET_ID, CONFIG = TINY_ID, TINY_CONFIG
VANILLA, ACNORM = "nnUNetTrainerFinetune_tinyTest", "nnUNetTrainerACNorm_tinyTest"
STOCK = "nnUNetTrainer_acnormTinyValTest"  # nnU-Net's own trainer class, as a user's method
#: the run that fails while the fail file lists it (tests/nnunet_ext_test_trainers)
FAILING = f"{ACNORM}:1"
REQUIRE_SLURM = "NNUNET_ACNORM_REQUIRE_SLURM"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A planned and preprocessed 5-case dataset, a checkpoint of its planned network, the environment."""
    base = tmp_path_factory.mktemp("benchmark")
    copy_planned(planned_tiny_dataset(tmp_path_factory), base)  # the shared planned dataset, a private copy
    env_plan = acnorm_trainer_env(base, training=False)
    plans = json.loads((Path(env_plan["nnUNet_preprocessed"]) / TINY_NAME / "nnUNetPlans.json").read_text())
    checkpoint = save_nnunet_v2_checkpoint(base / "pretrained.pth",
                                           architecture=plans["configurations"][CONFIG]["architecture"], num_classes=2)
    fail_file = base / "fail_these_runs.txt"
    env = {**env_plan, "ACNORM_TEST_FAIL_FILE": str(fail_file)}
    return {"base": base, "env": env, "checkpoint": checkpoint, "fail_file": fail_file}


def _args(data, out, *extra, folds=("0", "1"), seeds=("0",), methods=(VANILLA, ACNORM)):
    return ["-d", DATASET_ID, "-c", CONFIG, "-pretrained_weights", data["checkpoint"], "-tr", *methods,
            "-f", *folds, "--seeds", *seeds, "-device", "cpu", "--env", "nnUNet_n_proc_DA=0", "-o", out, *extra]


def _one_error_line(proc, *fragments) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{SCRIPT}: error: ") and "Traceback" not in proc.stderr, lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _states(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "state").glob("*.json"))}


def _ended(out: Path, n: int) -> bool:
    states = _states(out)
    return len(states) == n and all(s["state"] in ("done", "failed") for s in states.values())


def _tree(out: Path) -> dict:
    """Every file under out/runs and out/logs with its modification time (what a call must not touch)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for sub in ("runs", "logs") for p in (out / sub).rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def failed_benchmark(data):
    """The first call: 2 methods x 2 folds, 2 at a time on the 2 CPUs, ACNorm's fold 1 failing on purpose."""
    data["fail_file"].write_text(FAILING + "\n")
    out = data["base"] / "bench"
    start = time.time()
    proc = run_console(SCRIPT, *_args(data, out), "--jobs", 2, env=data["env"], check=False)
    return {"out": out, "proc": proc, "seconds": time.time() - start}


def test_first_call_runs_every_run_and_reports_the_failure(failed_benchmark, data):
    out, proc = failed_benchmark["out"], failed_benchmark["proc"]
    assert proc.returncode == 3, (proc.stdout[-3000:], proc.stderr[-3000:])
    plan = json.loads((out / "plan.json").read_text())
    assert [r["id"] for r in plan["runs"]] == [f"{m}__seed0__fold{f}" for m in (VANILLA, ACNORM) for f in "01"]
    assert plan["what"]["pretrained_weights"]["sha256"] and plan["versions"]["nnunetv2"].startswith("2.8")
    states = _states(out)
    assert {k: v["state"] for k, v in states.items()} == {
        f"{VANILLA}__seed0__fold0": "done", f"{VANILLA}__seed0__fold1": "done",
        f"{ACNORM}__seed0__fold0": "done", f"{ACNORM}__seed0__fold1": "failed"}
    # each run: its own nnUNet_results (seed, method), its seed, its CPU, the pretrained weights
    done = states[f"{ACNORM}__seed0__fold0"]
    assert done["command"][-2:] == ["-pretrained_weights", str(data["checkpoint"])]
    log = Path(done["log"]).read_text()
    assert f"nnUNet_results={out / 'runs' / 'seed0' / ACNORM}" in log and "nnUNet_acnorm_seed=0" in log
    assert "OMP_NUM_THREADS=1" in log and "nnUNet_n_proc_DA=0" in log
    assert {s["slot"] for s in states.values()} <= {"CPUs 0", "CPUs 1"}
    debug = json.loads((out / "runs/seed0" / ACNORM / TINY_NAME / f"{ACNORM}__nnUNetPlans__{CONFIG}"
                        / "fold_0" / "debug.json").read_text())
    assert debug["seed"] == "0"
    # the failure: on the console with the last lines of its log, and in the report
    assert "fails on purpose" in proc.stdout and "--retry-failed" in proc.stderr
    report = (out / "report" / "report.md").read_text()
    assert "fails on purpose" in report and "failed (attempt 1" in report
    # the comparison covers what every method finished (fold 0), and says what it left out
    comparison = json.loads((out / "report" / "comparison" / "comparison.json").read_text())
    assert [m["name"] for m in comparison["methods"]] == [VANILLA, ACNORM]
    assert comparison["inputs"]["folds"] == ["0"] and "fold 1" in report
    assert (out / "report" / "comparison" / "paired_differences.png").stat().st_size > 0


def test_resume_skips_finished_and_failed_runs(failed_benchmark, data):
    out = failed_benchmark["out"]
    before, states = _tree(out), _states(out)
    proc = run_console(SCRIPT, *_args(data, out), env=data["env"], check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert _tree(out) == before and _states(out) == states  # nothing ran again, nothing was rewritten
    assert "run(s)," not in proc.stdout and "fails on purpose" in proc.stdout
    status = run_console(SCRIPT, "-o", out, "--status", env=data["env"])
    assert f"{ACNORM:24} 1 done, 1 failed" in status.stdout and _tree(out) == before


def test_other_options_on_the_same_folder_are_refused(failed_benchmark, data):
    out = failed_benchmark["out"]
    plan, before = (out / "plan.json").read_text(), _tree(out)
    proc = run_console(SCRIPT, *_args(data, out, seeds=("0", "1")), env=data["env"], check=False)
    _one_error_line(proc, "other options", "seeds: 0 -> 0,1", "use another -o")
    assert (out / "plan.json").read_text() == plan and _tree(out) == before


def test_print_executor_prints_the_runs_left_and_runs_nothing(failed_benchmark, data):
    out = failed_benchmark["out"]
    before = sorted(p for p in out.rglob("*"))
    proc = run_console(SCRIPT, "-o", out, "--executor", "print", "--retry-failed", env=data["env"])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # only the failed run is left
    command = lines[0]
    assert command.startswith("env ") and f"nnUNet_results={out / 'runs' / 'seed0' / ACNORM}" in command
    assert "nnUNet_acnorm_seed=0" in command and "nnUNet_n_proc_DA=0" in command
    assert command.endswith(f"{TINY_NAME} {CONFIG} 1 -tr {ACNORM} -p nnUNetPlans -device cpu "
                            f"-pretrained_weights {data['checkpoint']}")
    assert f"{Path(sys.executable).parent / 'nnUNetv2_train'} " in command
    assert sorted(p for p in out.rglob("*")) == before
    # a new folder: every run is printed; only the plan is written, so that a later call can gather their results
    fresh = data["base"] / "printed"
    proc = run_console(SCRIPT, *_args(data, fresh, methods=("vanilla", "scratch")), "--executor", "print",
                       env=data["env"])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and all("-tr nnUNetTrainerFinetune " in line for line in lines)
    assert ["-pretrained_weights" in line for line in lines] == [True, True, False, False]
    assert sorted(p.name for p in fresh.iterdir()) == [".lock", "plan.json"]


def test_retry_failed_runs_the_failed_run_alone(failed_benchmark, data):
    out = failed_benchmark["out"]
    data["fail_file"].unlink()
    retried = (f"{ACNORM}__seed0__fold1", f"runs/seed0/{ACNORM}/")  # its log names, its results root
    finished = {k: v for k, v in _tree(out).items() if not k.startswith(retried[1]) and retried[0] not in k}
    finished.update({k: v for k, v in _tree(out).items() if k.startswith(retried[1]) and "/fold_0/" in k})
    proc = run_console(SCRIPT, "-o", out, "--retry-failed", "--no-progress", env=data["env"])
    assert "1 run(s), 1 at a time" in proc.stdout and f"done     {ACNORM} seed 0 fold 1" in proc.stdout
    after = _tree(out)
    assert {k: after[k] for k in finished if k in after} == finished  # the other runs were not touched
    states = _states(out)
    assert all(s["state"] == "done" for s in states.values())
    assert states[f"{ACNORM}__seed0__fold1"]["attempt"] == 2
    assert (out / "logs" / f"{ACNORM}__seed0__fold1.attempt1.log").is_file()  # the failed attempt's log is kept
    comparison = json.loads((out / "report" / "comparison" / "comparison.json").read_text())
    assert comparison["inputs"]["folds"] == ["0", "1"] and comparison["unit"] == "case"
    acnorm = next(m for m in comparison["methods"] if m["name"] == ACNORM)
    assert acnorm["vs_baseline"]["mean_dice"]["n"] == 2  # the validation cases of both folds, paired
    report = (out / "report" / "report.md").read_text()
    assert "Every planned run finished" in report and "## For a methods section" in report


@pytest.mark.parametrize("case", ["unknown method", "not preprocessed", "unreadable checkpoint", "not a benchmark"])
def test_bad_input_is_one_line_and_writes_nothing(data, case, tmp_path):
    out = tmp_path / "out"
    args = _args(data, out, methods=("vanilla", "acnorm"))  # aliases: no trainer search, the error comes sooner
    if case == "unknown method":
        args[args.index("acnorm")] = "acnrom"
        fragments = ["-tr acnrom", "no such alias", "acnorm"]
    elif case == "not preprocessed":
        args[1] = "939"
        fragments = ["dataset 939"]
    elif case == "unreadable checkpoint":
        bad = tmp_path / "bad.pth"
        bad.write_text("not a checkpoint")
        args[args.index(data["checkpoint"])] = bad
        fragments = ["-pretrained_weights", str(bad)]
    else:
        out.mkdir()
        (out / "results.txt").write_text("someone's results")
        fragments = ["is not empty and holds no benchmark"]
    proc = run_console(SCRIPT, *args, env=data["env"], check=False)
    _one_error_line(proc, *fragments)
    if case == "not a benchmark":
        assert [p.name for p in out.iterdir()] == ["results.txt"]
    else:
        assert not out.exists()


# ------------------------------------------------------------------------------------------- SLURM


def _slurm_partition() -> str | None:
    """The default partition of a SLURM that answers, or None (with the reason in the skip/fail message)."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    proc = subprocess.run([sinfo, "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    up = [line.split() for line in proc.stdout.splitlines() if line.split()[1:2] and line.split()[1] in
          ("idle", "mix", "alloc")]
    return up[0][0].rstrip("*") if up else None


@pytest.fixture
def slurm_partition():
    partition = _slurm_partition()
    if partition is None:
        why = "no SLURM answers sinfo with an idle node (start one: bash scripts/local_slurm.sh)"
        if os.environ.get(REQUIRE_SLURM) == "1":
            pytest.fail(f"{REQUIRE_SLURM}=1 but {why}")
        pytest.skip(why)
    return partition


def test_slurm_submits_one_array_then_gathers_and_reports(slurm_partition, data):
    """Three methods (the plugin's two and a stock nnU-Net trainer), fold 0: one array of 3 tasks, 2 at a time."""
    out = data["base"] / "bench_slurm"
    data["fail_file"].unlink(missing_ok=True)
    submit = [*_args(data, out, folds=("0",), methods=(VANILLA, ACNORM, STOCK)), "--executor", "slurm",
              "--partition", slurm_partition, "--jobs", 2, "--time", "15", "--cpus-per-run", 1, "--mem", 2]
    refused = run_console(SCRIPT, *submit, "--partition", "no_such_partition", env=data["env"], check=False)
    _one_error_line(refused, "--partition no_such_partition: SLURM has no such partition")
    assert not out.exists()
    start = time.time()
    proc = run_console(SCRIPT, *submit, env=data["env"])
    assert time.time() - start < 120 and "submitted 3 run(s) as SLURM job array" in proc.stdout
    record = json.loads((out / "slurm" / "submissions.jsonl").read_text())
    script = Path(record["submission_file"]).read_text()
    for line in ("#SBATCH --array=0-2%2", f"#SBATCH --partition={slurm_partition}", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --time=15", "#SBATCH --mem=2048M", "#SBATCH --job-name=acnorm_bench_"):
        assert line in script, (line, script)
    # the tasks run the venv's python (the console script's interpreter: python or python3 of this venv)
    assert f"{Path(sys.executable).parent / 'python'}" in script and "-u -m submitit.core._submit" in script
    # a second call while the array is queued or running submits nothing
    again = run_console(SCRIPT, "-o", out, "--executor", "slurm", env=data["env"])
    assert "submitted" not in again.stdout and len((out / "slurm" / "submissions.jsonl").read_text().splitlines()) == 1
    deadline = time.time() + 600
    while not _ended(out, 3):
        assert time.time() < deadline, "the SLURM runs did not end within 10 minutes"
        time.sleep(3)
    gathered = run_console(SCRIPT, "-o", out, "--status", env=data["env"])
    states = _states(out)
    assert {s["state"] for s in states.values()} == {"done"}, states
    assert sorted(s["slurm_job"] for s in states.values()) == sorted(record["jobs"])
    assert all(s["slot"].startswith("SLURM job") for s in states.values())
    comparison = json.loads((out / "report" / "comparison" / "comparison.json").read_text())
    assert [m["name"] for m in comparison["methods"]] == [VANILLA, ACNORM, STOCK]
    assert [m["vs_baseline"]["mean_dice"]["n"] for m in comparison["methods"][1:]] == [1, 1]  # fold 0's case
    assert all(f"{m:24} 1 done" in gathered.stdout for m in (VANILLA, ACNORM, STOCK))
    assert "| 1 x 2, batch 2 | 1/1 |" in (out / "report" / "report.md").read_text()
