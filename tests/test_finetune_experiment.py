"""experiments/finetune_experiment.py's README block: the rows that ran, and every cell of the
full matrix (TRANSFERS x METHODS, FULL_SEEDS seeds) that did not, named (issue 28: no silent gaps)."""
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


def test_readme_block_names_every_cell_not_run(tmp_path):
    exp = _experiment()
    ran = next(iter(exp.TRANSFERS))
    summary = {"transfers": {ran: {"success_label": "x", "rows": [_row("vanilla", 5), _row("acnorm", 5, 0.02),
                                                                    _row("l2sp", 3, 0.01)],
                                   "success": {"vanilla": {"runs": 5}, "acnorm": {"runs": 5}, "l2sp": {"runs": 3}}}}}
    missing = exp.not_run(summary)
    assert "vanilla" not in missing[ran] and "acnorm" not in missing[ran]
    assert "l2sp (3 seeds)" in missing[ran] and "scratch" in missing[ran]
    for other in exp.TRANSFERS:
        if other != ran:
            assert missing[other] == list(exp.METHODS)
    exp.READING = tmp_path / "reading.md"
    exp.READING.write_text("The reading.\n")
    block = exp.readme_table(summary, {})
    assert f"| {ran} | acnorm | 5 | 0.500 ± 0.100 | +0.020 [+0.010, +0.030], 3/2 |" in block
    assert "Not run yet" in block and "every method" in block and "l2sp (3 seeds)" in block
    assert block.rstrip().endswith("The reading.")
