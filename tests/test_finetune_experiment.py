"""experiments/finetune_experiment.py's README block: every cell of the full matrix (METHODS x
TRANSFERS) shows, with its result, its number of seeds where fewer than FULL_SEEDS, or "not run"
(issue 28: no silent gaps)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests.factories.nnunet import TESTS_DIR


def _experiment():
    spec = importlib.util.spec_from_file_location("finetune_experiment",
                                                  TESTS_DIR.parent / "experiments" / "finetune_experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(method, seeds, delta=None):
    row = {"method": method, "seeds": seeds, "mean_dice": 0.5, "sd": 0.1}
    if delta is not None:
        row.update(delta=delta, ci=[delta - 0.01, delta + 0.01], wins=3, losses=2)
    return row


def test_readme_block_shows_every_cell_of_the_matrix(tmp_path):
    exp = _experiment()
    ran = next(iter(exp.TRANSFERS))
    summary = {"transfers": {ran: {"success_label": "x", "rows": [_row("vanilla", 5), _row("acnorm", 5, 0.02),
                                                                    _row("l2sp", 3, 0.01)],
                                   "success": {"vanilla": {"runs": 5}, "acnorm": {"runs": 5}, "l2sp": {"runs": 3},
                                               "spd": {"runs": 1}}}}}
    exp.READING = tmp_path / "reading.md"
    exp.READING.write_text("The reading.\n")
    block = exp.readme_table(summary, {})
    table = [line for line in block.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | " + " | ".join(exp.TRANSFERS) + " |"
    cells = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[1:] for line in table[1:]}
    assert list(cells) == list(exp.METHODS)  # every method a row, every transfer a column
    assert all(len(row) == len(exp.TRANSFERS) for row in cells.values())
    assert cells["vanilla"][0] == "0.500 ± 0.100"
    assert cells["acnorm"][0] == "+0.020 [+0.010, +0.030] 3/2"
    assert cells["l2sp"][0] == "+0.010 [+0.000, +0.020] 3/2 (3 seeds)"
    assert cells["spd"][0] == "1 seed(s), not compared" and cells["scratch"][0] == "not run"
    assert all(row[1:] == ["not run"] * (len(exp.TRANSFERS) - 1) for row in cells.values())
    assert block.rstrip().endswith("The reading.")


def test_results_name_the_commit_and_package_versions():
    """The published tables say, per transfer, which code and packages compared its runs (runs of
    other commits differ)."""
    exp = _experiment()
    key = next(iter(exp.TRANSFERS))
    results = {"epochs": 6, "iterations": 25, "pretrain_epochs": 8, "seeds": [0, 4], "transfers": {key: {
        "success": {}, "comparisons": [], "commit": exp._commit(),
        "software": {"python": "3.11.7", "platform": "Linux", "torch": "2.14.1", "submitit": None}}}}
    text = exp.results_markdown(results)
    commit = results["transfers"][key]["commit"]
    assert (f"Compared at commit {commit} with python 3.11.7, torch 2.14.1 "
            "(the environment that compared these runs).") in text
    assert "Linux" not in text and "submitit" not in text
    assert commit is None or len(commit.split("+")[0]) == 40


def _compared_transfer(exp, out, key, seeds=(0, 1)):
    """What main() holds for one compared transfer: vanilla and acnorm on ``seeds``, their comparison
    folder written under ``out`` as nnUNetv2_acnorm_compare writes it."""
    folder = out / f"compare_{key}_IN_{len(seeds)}seeds"
    folder.mkdir(parents=True)
    for name in ("comparison.md", "comparison.csv", "comparison.json", "paired_differences.png"):
        (folder / name).write_text(f"{key} {name}")
    units = {"mean": 0.5, "sd": 0.1}
    vs = {"mean_difference": 0.02, "ci_low": 0.01, "ci_high": 0.03, "wilcoxon_p": 0.5, "wins": 2, "losses": 0}
    entries = [{"name": f"{exp.METHODS[m][0]}__{exp.PLANS}__{exp.CONFIG}", "summary": {"mean_dice": {"units": units}},
                **({"vs_baseline": {"mean_dice": vs}} if m == "acnorm" else {})} for m in ("vanilla", "acnorm")]
    success = {m: {"trainer": exp.METHODS[m][0], "runs": len(seeds), "segmented": 1, "mean": 0.5, "sd": 0.1,
                   "dice_per_seed": {str(s): 0.5 for s in seeds}} for m in ("vanilla", "acnorm")}
    return {"success": success, "software": {"torch": "2.14.1"}, "commit": f"commit-of-{key}",
            "comparisons": [{"name": f"IN_{len(seeds)}seeds", "methods": ["vanilla", "acnorm"], "seeds": list(seeds),
                             "baseline": "vanilla", "folder": str(folder), "comparison": {"methods": entries},
                             "report": f"report of {key}"}]}


def test_publishing_one_transfer_keeps_the_others_published(tmp_path, monkeypatch):
    """Publishing a transfer replaces that transfer's results and keeps every other published
    transfer (its comparison folder, its tables, the commit that compared it), so the full matrix can
    be filled one transfer at a time (issue 28)."""
    exp = _experiment()
    first, second = list(exp.TRANSFERS)[:2]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{exp.README_START}\nold table\n{exp.README_END}\nrest\n")
    monkeypatch.setattr(exp, "README", readme)
    monkeypatch.setattr(exp, "DEMO_SUMMARY", tmp_path / "summary.json")
    monkeypatch.setattr(exp, "READING", tmp_path / "reading.md")
    published = tmp_path / "published"
    methods = {m: exp.METHODS[m][0] for m in ("vanilla", "acnorm")}
    budget = {"epochs": 6, "pretrain_epochs": 8, "iterations": 25}
    exp.publish(published, dict(budget, seeds=[0, 1], methods=methods, transfers={
        second: _compared_transfer(exp, tmp_path / "a", second)}))
    (published / f"compare_{first}_IN_9seeds").mkdir()  # a stale folder of the transfer published next
    exp.publish(published, dict(budget, seeds=[0, 1, 2], methods=methods, transfers={
        first: _compared_transfer(exp, tmp_path / "b", first, seeds=(0, 1, 2))}))

    results = json.loads((published / "results.json").read_text())
    assert list(results["transfers"]) == [first, second]  # the order of TRANSFERS
    assert results["transfers"][second]["commit"] == f"commit-of-{second}" and results["seeds"] == [0, 1, 2]
    assert sorted(p.name for p in published.glob("compare_*")) == sorted(
        [f"compare_{first}_IN_3seeds", f"compare_{second}_IN_2seeds"])
    assert (published / f"compare_{second}_IN_2seeds" / "comparison.md").read_text() == f"{second} comparison.md"
    text = (published / "results.md").read_text()
    assert f"report of {first}" in text and f"report of {second}" in text
    assert f"Compared at commit commit-of-{second} with torch 2.14.1" in text
    table = [line for line in readme.read_text().splitlines() if line.startswith("| acnorm |")]
    assert table == ["| acnorm | " + " | ".join(
        "+0.020 [+0.010, +0.030] 2/0" + (" (3 seeds)" if k == first else " (2 seeds)") if k in (first, second)
        else "not run" for k in exp.TRANSFERS) + " |"]

    before = readme.read_text(), (tmp_path / "summary.json").read_text()
    exp.publish(tmp_path / "sweep", dict(budget, seeds=[0, 1], methods=methods, transfers={
        first: _compared_transfer(exp, tmp_path / "c", first)}), to_readme=False)  # as recipe_sweep.py publishes
    assert (readme.read_text(), (tmp_path / "summary.json").read_text()) == before
    assert list(json.loads((tmp_path / "sweep" / "results.json").read_text())["transfers"]) == [first]


def test_publishing_another_budget_beside_published_results_is_refused(tmp_path):
    """Results of another budget (epochs, iterations) would mix in one table: the script refuses in
    one line before training anything, and the published results stay as they were."""
    published = tmp_path / "published"
    published.mkdir()
    (published / "results.json").write_text(json.dumps({"epochs": 6, "pretrain_epochs": 8, "iterations": 25}))
    proc = subprocess.run([sys.executable, str(TESTS_DIR.parent / "experiments" / "finetune_experiment.py"),
                           "--output", str(tmp_path / "out"), "--epochs", "3", "--publish", str(published)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "another budget (epochs 6 there, 3 here): run with its budget, or publish into another folder" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert json.loads((published / "results.json").read_text())["epochs"] == 6


def test_the_recipe_sweep_compares_every_variant_against_the_trainers_recipe():
    """experiments/recipe_sweep.py: each base trainer's recipe variants form one comparison group
    whose baseline is the base at the trainers' own recipe (lr 1e-2, every patch on foreground),
    and each variant's trainer carries the recipe its name says."""
    exp = _experiment()
    spec = importlib.util.spec_from_file_location("recipe_sweep", TESTS_DIR.parent / "experiments" / "recipe_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    grouped = [m for _, members, _ in sweep.SWEEP_GROUPS for m in members]
    assert sorted(grouped) == sorted(sweep.SWEEP_METHODS)  # every variant compared, once
    recipes = sys.modules["acnorm_recipe_trainers"]
    for base, members, baseline in sweep.SWEEP_GROUPS:
        assert baseline in members and all(m.startswith(f"{base}@") for m in members)
        main_trainer = recipes.BASES[base]  # the trainer the main experiment runs for this method
        assert main_trainer.__name__ == exp.METHODS[base][0]
        current = recipes.TRAINERS[sweep.SWEEP_METHODS[baseline][0]]
        assert issubclass(current, main_trainer)
        assert (current.finetune_initial_lr, current.finetune_oversample_foreground, current.warmup_fraction) == (
            main_trainer.finetune_initial_lr, main_trainer.finetune_oversample_foreground, main_trainer.warmup_fraction)
        old = recipes.TRAINERS[sweep.SWEEP_METHODS[f"{base}@lr1e-3_fg33"][0]]
        assert (old.finetune_initial_lr, old.finetune_oversample_foreground) == (1e-3, 0.33)
