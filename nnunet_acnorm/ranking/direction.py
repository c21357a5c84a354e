"""The ranking's estimators and its decision record (no torch import: the command's options and
``--help`` read it).

:data:`DIRECTION` is what the printed wording follows: until an experiment that can settle it
(experiments/direction_experiment.py) has chosen an estimator and its direction, ``settled`` is
False and the command says that it cannot rank reliably. After such a run, the experiment writes
the record its numbers support (``decision`` in its direction.json); copy it here with the
numbers in ``evidence``.
"""
from __future__ import annotations

from typing import Sequence

from nnunet_acnorm.errors import InputError

#: the estimators the command computes: name -> (column label, what it is). Every one ranks higher
#: first: the literature's convention for LogME and H-score; for AC-Corr the sign of the project's
#: (weak) evidence, see DIRECTION.
ESTIMATORS = {
    "ac_corr": ("AC-Corr", "AC-Corr after the steps over the chosen layers (--layers; default the deepest encoder "
                "norm), with its value at step 0 beside it"),
    "ac_corr_all": ("AC-Corr all", "AC-Corr after the same steps over all norm layers (no extra step: the same "
                    "fine-tuned network)"),
    "logme": ("LogME", "LogME (You et al. 2021) of the labels given the deepest encoder norm's pretrained features "
              "at labelled voxels"),
    "hscore": ("H-score", "H-score (Bao et al. 2019), Ledoit-Wolf-shrunk covariance, on the same features as LogME"),
}
#: The decision record the command's wording follows. ``settled``: whether an experiment that can
#: settle it (fine-tunings that succeed, several sources, seeds and targets:
#: experiments/direction_experiment.py) has chosen ``estimator`` and its direction. Until then
#: the command says that it cannot rank reliably, shows the estimators side by side, orders by the
#: chosen one (higher first: the convention, not a finding) and recommends nothing.
DIRECTION = {
    "settled": False,
    "estimator": "ac_corr",
    "higher_is_better": True,
    "layers": "deepest",
    "steps": 1,
    "evidence": ("the only experiment so far (benchmarks/acnorm_direction_experiment.py, docs/ranking.md: 7 source "
                 "models, one MR target, one seed) gave AC-Corr after one step Kendall tau +0.73 (p 0.03) with the "
                 "fine-tuned Dice, but 4 of its 7 fine-tunings failed (Dice 0), so that tau mostly tells failed "
                 "fine-tunings apart; LogME had tau -0.51 there. experiments/direction_experiment.py (at least 8 "
                 "sources, 3 seeds, two targets) has not been run yet"),
    "experiment": "experiments/direction_experiment.py",
}


class UnknownEstimator(InputError):
    pass


def parse_estimators(text: str | Sequence[str]) -> list[str]:
    """``"ac_corr,logme"`` -> ["ac_corr", "logme"] (order kept, duplicates dropped); unknown names raise
    :class:`UnknownEstimator` with one line naming them and the known ones."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise UnknownEstimator(f"unknown estimator(s) {', '.join(unknown)}; known: {', '.join(ESTIMATORS)}")
    if not names:
        raise UnknownEstimator(f"no estimator given; known: {', '.join(ESTIMATORS)}")
    return list(dict.fromkeys(names))


def reliable(rank_by: str) -> bool:
    """Whether the order by ``rank_by`` is the one an experiment has settled."""
    return bool(DIRECTION["settled"]) and DIRECTION["estimator"] == rank_by


def direction_statement(rank_by: str) -> str:
    """What the command says about how much its order is worth (from :data:`DIRECTION`)."""
    way = "higher" if DIRECTION["higher_is_better"] else "lower"
    if reliable(rank_by):
        return f"The order ({way} {rank_by} first) is the one the direction experiment supports: {DIRECTION['evidence']}"
    if DIRECTION["settled"]:
        return (f"This order cannot be relied on: the direction experiment selected {DIRECTION['estimator']} "
                f"({way} first), not {rank_by}: {DIRECTION['evidence']}")
    return (f"This ranking cannot be relied on: no estimator has been shown to predict the fine-tuned Dice, in "
            f"either direction. The estimators are shown side by side; the order (highest {rank_by} first) is a "
            f"convention, not a recommendation. Evidence: {DIRECTION['evidence']}")
