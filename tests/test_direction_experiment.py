"""experiments/direction_experiment.py's bookkeeping: a resumed run keeps the budget of its runs, and
the published time is that of every invocation that trained."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests.factories.nnunet import TESTS_DIR

SCRIPT = TESTS_DIR.parent / "experiments" / "direction_experiment.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("direction_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_resuming_with_another_budget_is_refused(tmp_path):
    """Finished steps are skipped on resume, so runs of another budget would be analysed (and published)
    as this one's: the script refuses in one line before any work, and the record stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    budget = {"epochs": 10, "pretrain_epochs": 25, "iterations": 40}
    (out / "budget.json").write_text(json.dumps(budget))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out), "--epochs", "20", "--analyse-only"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert (f"{out} holds runs of another budget (epochs 10 there, 20 here): resume with its budget, or use "
            "another --output") in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["budget.json"]
    assert json.loads((out / "budget.json").read_text()) == budget


def test_the_published_minutes_add_up_every_invocation_that_trained(tmp_path):
    exp = _experiment()
    assert exp.wall_minutes(tmp_path, 2.5) == 2.5
    assert exp.wall_minutes(tmp_path, 4.0) == 6.5  # a resumed run adds its own time
    assert exp.wall_minutes(tmp_path, None) == 6.5  # --analyse-only adds nothing
