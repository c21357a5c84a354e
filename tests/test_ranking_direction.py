"""The decision record (nnunet_acnorm/ranking/direction.py): the command's wording in each of its
states, and the record against the direction experiment's published decision."""
import json
from pathlib import Path

import pytest

from nnunet_acnorm.ranking import direction
from nnunet_acnorm.ranking.direction import DIRECTION, direction_statement, reliable

PUBLISHED = Path(__file__).resolve().parents[1] / "experiments" / "results" / "direction" / "direction.json"
FIELDS = ("settled", "estimator", "higher_is_better", "layers", "steps", "evidence")


@pytest.mark.parametrize("record, rank_by, expected", [
    ({"settled": False, "estimator": "ac_corr", "higher_is_better": True}, "ac_corr",
     ("This ranking cannot be relied on", "highest ac_corr first) is a convention, not a recommendation")),
    ({"settled": True, "estimator": "logme", "higher_is_better": False}, "logme",
     ("The order (lower logme first) is the one the direction experiment supports",)),
    ({"settled": True, "estimator": "logme", "higher_is_better": True}, "ac_corr",
     ("This order cannot be relied on: the direction experiment selected logme (higher first), not ac_corr",)),
])
def test_the_statement_follows_the_record(monkeypatch, record, rank_by, expected):
    monkeypatch.setattr(direction, "DIRECTION", {**DIRECTION, **record, "evidence": "EVIDENCE"})
    statement = direction_statement(rank_by)
    for part in expected:
        assert part in statement
    assert statement.endswith("EVIDENCE")
    assert reliable(rank_by) is (record["settled"] and record["estimator"] == rank_by)


def test_the_record_is_the_published_experiments_decision():
    """DIRECTION is copied by hand from the direction experiment's output: once results are published
    (experiments/results/direction/direction.json), every field must be the published decision's;
    before that, the record must not claim to be settled."""
    if not PUBLISHED.exists():
        assert DIRECTION["settled"] is False
        return
    decision = json.loads(PUBLISHED.read_text())["decision"]
    assert {k: DIRECTION[k] for k in FIELDS} == {k: decision[k] for k in FIELDS}
    assert DIRECTION["experiment"] == "experiments/direction_experiment.py"


def test_the_records_step_settings_are_the_published_experiments():
    """DIRECTION_STEP_SETTINGS (what the command prints as the settings of the evidence) must be the one
    setting every ranking run of the published experiment recorded (step_settings in direction.json)."""
    published = json.loads(PUBLISHED.read_text()).get("step_settings")
    assert published is not None, "re-publish the direction experiment: its direction.json has no step_settings"
    assert [{k: s[k] for k in ("lr", "tau")} for s in published] == [direction.DIRECTION_STEP_SETTINGS]


@pytest.mark.parametrize("lr, tau, text", [(0.01, "auto", "lr 0.01, temperature calibrated per layer"),
                                            (1e-3, 1.0, "lr 0.001, temperature 1")])
def test_step_settings_are_named_as_the_command_names_them(lr, tau, text):
    assert direction.step_settings_text(lr, tau) == text
