"""experiments/finetune_experiment.py's README block: every cell of the full matrix (METHODS x
TRANSFERS) shows, with its result, its number of seeds where fewer than FULL_SEEDS, or "not run"
(issue 28: no silent gaps)."""
from __future__ import annotations

import importlib.util
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
    """The published tables say which code and packages compared them (runs of other commits differ)."""
    exp = _experiment()
    results = {"epochs": 6, "iterations": 25, "pretrain_epochs": 8, "seeds": [0, 4], "transfers": {},
               "software": {"python": "3.11.7", "platform": "Linux", "torch": "2.14.1", "submitit": None},
               "commit": exp._commit()}
    text = exp.results_markdown(results)
    assert f"Compared at commit {results['commit']} with python 3.11.7, torch 2.14.1 (the environment that compared the runs)." in text
    assert "Linux" not in text and "submitit" not in text
    assert results["commit"] is None or len(results["commit"].split("+")[0]) == 40
