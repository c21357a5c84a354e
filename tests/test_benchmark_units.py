"""The benchmark runner's parts without training: method aliases, the plan's checks, where a run stands,
how a run resumes, the comparison's complete subset, local slots, SLURM time and array parsing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_acnorm.benchmark.executors import SlurmExecutor, _expand_array, local_slots, parse_time
from nnunet_acnorm.benchmark.methods import UnknownMethodError, alias_of, alias_table, resolve_methods
from nnunet_acnorm.benchmark.plan import BenchmarkError, BenchmarkSpec, Plan, expand_runs, make_plan
from nnunet_acnorm.benchmark.report import complete_subset
from nnunet_acnorm.benchmark.state import BenchmarkFolder, RunStatus
from nnunet_acnorm.benchmark.worker import resume_mode, train_command
from nnunet_acnorm.errors import InputError
from tests.factories.checkpoints import save_nnunet_v2_checkpoint


def test_aliases_come_from_the_trainer_registry():
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS

    assert alias_of("nnUNetTrainerACNormBN_tau1") == "acnorm_BN_tau1"
    assert alias_of("nnUNetTrainerACNorm_L2SP") == "acnorm_l2sp"
    assert alias_of("nnUNetTrainerDiscriminativeLRBN") == "dlr_BN"
    assert alias_of("nnUNetTrainerFinetune_100epochs") == "vanilla_100epochs"
    assert alias_of("nnUNetTrainer") is None and alias_of("MyTrainer") is None
    table = alias_table()
    for alias in ("vanilla", "acnorm", "acnorm_tau1", "acnorm_tauAuto", "l2sp", "acnorm_l2sp", "lpft", "delta",
                  "bss", "dlr", "stochnorm_BN", "vanilla_BN", "acnorm_BN", "scratch", "scratch_BN"):
        assert alias in table, alias
    assert table["acnorm"].trainer == "nnUNetTrainerACNorm" and table["acnorm"].pretrained
    assert table["scratch"].trainer == "nnUNetTrainerFinetune" and not table["scratch"].pretrained
    assert {m.trainer for m in table.values()} == set(TRAINERS)  # every trainer of the package has an alias


def test_the_same_method_twice_is_refused():
    with pytest.raises(UnknownMethodError, match="-tr vanilla and nnUNetTrainerFinetune are the same method"):
        resolve_methods(["vanilla", "nnUNetTrainerFinetune"])
    methods = resolve_methods(["scratch", "vanilla", "nnUNetTrainer"])  # stock trainers are found by nnU-Net
    assert [(m.trainer, m.pretrained) for m in methods] == [("nnUNetTrainerFinetune", False),
                                                           ("nnUNetTrainerFinetune", True), ("nnUNetTrainer", True)]


def test_epochs_pick_the_schedule_variant_and_scripts_may_name_methods():
    from nnunet_acnorm.benchmark.methods import Method

    methods = resolve_methods(["acnorm", "scratch", "nnUNetTrainer"], epochs=100)
    assert [(m.name, m.trainer, m.pretrained) for m in methods] == [
        ("acnorm_100epochs", "nnUNetTrainerACNorm_100epochs", True),
        ("scratch_100epochs", "nnUNetTrainerFinetune_100epochs", False),
        ("nnUNetTrainer_100epochs", "nnUNetTrainer_100epochs", True)]  # nnU-Net's own schedule variant
    assert resolve_methods(["l2sp"], epochs=5)[0].trainer == "nnUNetTrainerL2SP_5epochs"
    with pytest.raises(UnknownMethodError, match="-tr l2sp with --epochs 7: no alias or trainer l2sp_7epochs"):
        resolve_methods(["l2sp"], epochs=7)
    mine = resolve_methods([Method("from_scratch", "nnUNetTrainerACNorm", False), "acnorm"])
    assert [m.name for m in mine] == ["from_scratch", "acnorm"]
    with pytest.raises(UnknownMethodError, match="nnU-Net finds no trainer class nnUNetTrainerNope"):
        resolve_methods([Method("x", "nnUNetTrainerNope")])
    with pytest.raises(UnknownMethodError, match="method name 'a/b'"):
        resolve_methods([Method("a/b", "nnUNetTrainerACNorm")])
    with pytest.raises(UnknownMethodError, match="are the same method"):
        resolve_methods([Method("acnorm", "nnUNetTrainerACNorm_tau1"), "acnorm"])  # one name, two trainers


@pytest.mark.parametrize("text,minutes", [("90", 90), ("30:30", 31), ("2:00:00", 120), ("1-00:00:00", 1440),
                                          ("2-12", 3600), ("1-2:30", 1590)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["x", "1:2:3:4", "0", "-5"])
def test_bad_slurm_times_are_refused(text):
    with pytest.raises(BenchmarkError, match="--time"):
        parse_time(text)


def test_squeue_array_ids_are_expanded():
    assert _expand_array("12_3") == ["12_3"] and _expand_array("12") == ["12"]
    assert _expand_array("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]


def test_local_slots_pin_gpus_or_share_cpus():
    cpu = local_slots("cpu", 2, cpus=[0, 1, 2, 3])
    assert [s.cpus for s in cpu] == [frozenset({0, 1}), frozenset({2, 3})]
    assert [s.env["OMP_NUM_THREADS"] for s in cpu] == ["2", "2"]
    assert [s.cpus for s in local_slots("cpu", 3, cpus=[0, 1])] == [frozenset({0}), frozenset({1}), frozenset({0})]
    gpu = local_slots("cuda", 3, gpus=["0", "3"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu] == ["0", "3", "0"] and gpu[0].cpus is None
    assert len(local_slots("cuda", None, gpus=["0", "1", "2"])) == 3
    with pytest.raises(BenchmarkError, match="no GPU is visible"):
        local_slots("cuda", None, gpus=[])
    with pytest.raises(BenchmarkError, match="--jobs 0"):
        local_slots("cpu", 0)


def test_slurm_executor_without_slurm_is_one_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BenchmarkError, match="sbatch, srun, squeue not found"):
        SlurmExecutor("cuda").check()


# ------------------------------------------------------------------------------------------- plans


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """A preprocessed dataset folder as nnUNetv2_plan_and_preprocess leaves it (2-fold split, 3d_fullres
    preprocessed, 2d only planned), and a checkpoint."""
    pre = tmp_path / "preprocessed"
    folder = pre / "Dataset950_Plan"
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (folder / "nnUNetPlans_3d_fullres" / "case_000.b2nd").write_bytes(b"x")
    plans = {"dataset_name": "Dataset950_Plan", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"},
                                "2d": {"data_identifier": "nnUNetPlans_2d"}}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    (folder / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 2))
    for var, sub in (("nnUNet_preprocessed", pre), ("nnUNet_raw", tmp_path / "raw"), ("nnUNet_results", tmp_path / "r")):
        Path(sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(sub))
    return {"pre": pre, "checkpoint": save_nnunet_v2_checkpoint(tmp_path / "ckpt.pth"), "out": tmp_path / "out"}


def _spec(p, **kw) -> BenchmarkSpec:
    values = dict(dataset="950", configuration="3d_fullres", methods=["vanilla", "acnorm"],
                  pretrained_weights=p["checkpoint"], folds=["0", "1"], seeds=[0, 1], device="cpu")
    values.update(kw)
    return BenchmarkSpec(**values)


def test_plan_expands_runs_and_round_trips(preprocessed):
    plan = make_plan(_spec(preprocessed, methods=["vanilla", "scratch"]), preprocessed["out"])
    assert len(plan.runs) == 8 and not os.path.exists(preprocessed["out"])
    run = plan.run("scratch__seed1__fold0")
    assert run.results_root == str(preprocessed["out"] / "runs" / "seed1" / "scratch")
    assert run.model_folder.endswith("Dataset950_Plan/nnUNetTrainerFinetune__nnUNetPlans__3d_fullres")
    assert not run.pretrained and "-pretrained_weights" not in train_command(plan, run)
    again = Plan.from_json(plan.to_json(), "plan.json")
    assert again.runs == plan.runs and again.what == plan.what


@pytest.mark.parametrize("change,message", [
    ({"folds": ["2"]}, "-f 2: the cross-validation split has folds 0-1"),
    ({"folds": ["all", "0"]}, "-f all trains on every case"),
    ({"seeds": [0, 0]}, "--seeds 0 is given twice"),
    ({"env": {"nnUNet_results": "/x"}}, "--env nnUNet_results: the benchmark sets"),
    ({"configuration": "2d"}, "planned but not preprocessed"),
    ({"configuration": "3d_lowres"}, "configuration '3d_lowres' is not in"),
    ({"pretrained_weights": None}, "-pretrained_weights is needed: vanilla, acnorm"),
    ({"methods": ["vanila"]}, "did you mean vanilla"),
    ({"device": "tpu"}, "-device tpu"),
])
def test_plan_refuses_bad_input(preprocessed, change, message):
    with pytest.raises(InputError, match=message):
        make_plan(_spec(preprocessed, **change), preprocessed["out"])
    assert not os.path.exists(preprocessed["out"])


def test_scratch_alone_needs_no_checkpoint_and_other_options_are_refused(preprocessed):
    scratch = make_plan(_spec(preprocessed, methods=["scratch"], pretrained_weights=None), preprocessed["out"])
    folder = BenchmarkFolder(preprocessed["out"])
    folder.write_plan(scratch)
    with pytest.raises(BenchmarkError, match="never overwritten"):
        folder.write_plan(scratch)
    other = make_plan(_spec(preprocessed, methods=["scratch"], pretrained_weights=None, folds=["1"]),
                      preprocessed["out"])
    with pytest.raises(BenchmarkError, match=r"other options \(folds: 0,1 -> 1\)"):
        folder.check_same(folder.read_plan(), other)


# ------------------------------------------------------------------------------------------- runs


def _plan(out, methods=("a", "b"), seeds=(0,), folds=("0", "1")) -> Plan:
    what = {"dataset": "Dataset950_Plan", "plans": "nnUNetPlans", "configuration": "3d_fullres", "device": "cpu",
            "methods": [{"name": m, "trainer": f"T{m}", "pretrained": True} for m in methods],
            "seeds": list(seeds), "folds": list(folds), "env": {}, "pretrained_weights": {"path": "/w.pth"}}
    return Plan(what, expand_runs(what, str(out)), {"nnUNet_extTrainer": "", "nnUNet_preprocessed": "/p"}, {})


def test_a_run_resumes_from_what_its_last_attempt_left(tmp_path):
    plan = _plan(tmp_path)
    run = plan.runs[0]
    assert resume_mode(run) == "fresh" and train_command(plan, run)[-2:] == ["-pretrained_weights", "/w.pth"]
    os.makedirs(run.fold_folder)
    Path(run.fold_folder, "checkpoint_latest.pth").write_bytes(b"")
    assert resume_mode(run) == "continue" and train_command(plan, run, "continue")[-1] == "--c"
    Path(run.fold_folder, "checkpoint_final.pth").write_bytes(b"")
    assert resume_mode(run) == "validate" and train_command(plan, run, "validate")[-1] == "--val"


class _Squeue:
    def __init__(self, live):
        self.states = live

    def live(self, run_id):
        return self.states.get(run_id)


def test_where_a_run_stands(tmp_path):
    plan = _plan(tmp_path)
    folder = BenchmarkFolder(tmp_path)
    run = plan.runs[0]
    assert folder.status(run).state == "todo"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    folder.write_state(run, {"state": "running", "host": socket.gethostname(), "pid": int(dead.stdout), "attempt": 1})
    assert folder.status(run).state == "interrupted"  # its process is gone: the next call continues it
    folder.write_state(run, {"state": "running", "host": socket.gethostname(), "pid": os.getpid(), "attempt": 1})
    assert folder.status(run).state == "running"
    folder.write_state(run, {"state": "running", "slurm_job": "7_0", "attempt": 1})
    assert folder.status(run, _Squeue({})).state == "interrupted"  # SLURM no longer lists the job (time limit)
    assert folder.status(run, _Squeue({run.id: ("RUNNING", "7_0")})).state == "running"
    assert folder.status(run, None).state == "running"  # SLURM cannot be asked: trust the file
    folder.write_state(run, {"state": "failed", "attempt": 1})
    assert folder.status(run, _Squeue({run.id: ("PENDING", "8_0")})).state == "queued"
    assert folder.status(run).state == "failed"
    os.makedirs(os.path.dirname(run.summary_file))
    Path(run.summary_file).write_text("{}")
    assert folder.status(run).state == "done"


def test_the_comparison_takes_a_complete_subset(tmp_path):
    plan = _plan(tmp_path, methods=("a", "b", "c"), seeds=(0, 1), folds=("0", "1", "2"))

    def statuses(missing):
        return [RunStatus(r, "failed" if (r.method, r.seed, r.fold) in missing or r.method == "c" else "done", {})
                for r in plan.runs]

    assert complete_subset(plan, statuses(set()), "a") == (["a", "b"], [0, 1], ["0", "1", "2"])
    assert complete_subset(plan, statuses({("b", 1, "2")}), "a") == (["a", "b"], [0, 1], ["0", "1"])
    assert complete_subset(plan, statuses({("b", 1, "2"), ("b", 1, "1"), ("b", 1, "0")}), "a") == (
        ["a", "b"], [0], ["0", "1", "2"])
    assert complete_subset(plan, statuses({("a", s, f) for s in (0, 1) for f in "012"}), "a") is None


def test_a_call_starts_only_runs_left_and_failed_ones_on_request(tmp_path):
    from nnunet_acnorm.benchmark.runner import Benchmark

    plan = _plan(tmp_path, folds=("0", "1", "2", "3", "4", "5"))
    states = ["done", "failed", "running", "queued", "interrupted", "todo"]
    statuses = [RunStatus(r, state, {}) for r, state in zip(plan.runs, states)]
    bench = Benchmark(BenchmarkFolder(tmp_path), plan, is_new=False)
    assert [r.fold for r in bench.runs_to_start(statuses=statuses)] == ["4", "5"]
    assert [r.fold for r in bench.runs_to_start(retry_failed=True, statuses=statuses)] == ["1", "4", "5"]


def test_no_run_starts_while_slurm_cannot_say_what_it_still_holds(tmp_path, monkeypatch):
    from nnunet_acnorm.benchmark.runner import Benchmark

    plan = _plan(tmp_path)
    folder = BenchmarkFolder(tmp_path)
    os.makedirs(folder.slurm)
    Path(folder.slurm, "submissions.jsonl").write_text(json.dumps({"array": "5", "jobs": {"5_0": plan.runs[0].id}}) + "\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    bench = Benchmark(folder, plan, is_new=False)
    assert [s.state for s in bench.statuses()] == ["todo"] * 4 and "squeue" in bench.slurm_error
    with pytest.raises(BenchmarkError, match="SLURM cannot be asked"):
        bench.execute(executor=None)


@pytest.mark.parametrize("behaviour,state,reason", [
    ("import sys; sys.exit(1)", "failed", "exit status 1"),
    ("pass", "failed", "exit status 0, but no fold_0/validation/summary.json"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "interrupted", "stopped by SIGTERM"),
    ("import os; p = os.environ['nnUNet_results'] + '/Dataset950_Plan/Ta__nnUNetPlans__3d_fullres/fold_0/validation'; "
     "os.makedirs(p); open(p + '/summary.json', 'w').write('{}')", "done", None),
])
def test_a_runs_end_is_read_from_its_process(tmp_path, monkeypatch, behaviour, state, reason):
    """A real child process as the training: its exit status, signal or missing summary decide the state."""
    from nnunet_acnorm.benchmark import worker

    script = tmp_path / "fake_train.py"
    script.write_text(f"import sys\nprint('args', sys.argv[1:])\n{behaviour}\n")
    plan = _plan(tmp_path / "out")
    plan.environment["nnUNet_preprocessed"] = str(tmp_path)
    run = plan.runs[0]
    folder = BenchmarkFolder(tmp_path / "out")
    monkeypatch.setattr(worker, "train_command", lambda p, r, mode: [sys.executable, str(script), r.fold])
    end = worker.execute_run(folder, plan, run)
    assert end["state"] == state and (end.get("reason") or "").startswith(reason or "")
    assert folder.read_state(run) == end and "args ['0']" in Path(end["log"]).read_text()
    assert folder.status(run).state == state
