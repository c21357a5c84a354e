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
#: The decision record the command's wording follows, copied from the direction experiment's
#: published decision (experiments/results/direction/direction.json; a test checks that they agree).
#: ``settled``: whether that experiment (fine-tunings that succeed, 8-9 sources, 3 seeds, two
#: targets) found an estimator whose Kendall tau interval excludes 0 with one sign on both targets.
#: It found none, so the command says that it cannot rank reliably, shows the estimators side by
#: side, orders by the chosen one (higher first: a convention, not a finding) and recommends nothing.
DIRECTION = {
    "settled": False,
    "estimator": "ac_corr",
    "higher_is_better": True,
    "layers": "deepest",
    "steps": 1,
    "evidence": ("experiments/direction_experiment.py (sources per target: mr_organs 9, ct_pelvis 8; seeds [0, 1, 2], "
                 "fine-tuning 10 x 40 iterations with nnUNetTrainerACNorm_acnormDemo): no estimator's Kendall tau inte"
                 "rval excludes 0 with one sign on every target (mr_organs: ac_corr_1step tau +0.14 [-0.33, +0.70] ove"
                 "r 8 sources, ac_corr_all_1step tau +0.21 [-0.33, +0.71] over 8 sources, ac_corr_10steps tau +0.21 [-"
                 "0.33, +0.71] over 8 sources, ac_corr_all_10steps tau +0.21 [-0.36, +0.70] over 8 sources, logme tau "
                 "+0.36 [-0.57, +0.57] over 8 sources, hscore tau -0.14 [-0.70, +0.50] over 8 sources; ct_pelvis: ac_c"
                 "orr_1step tau -0.24 [-0.90, +0.33] over 7 sources, ac_corr_all_1step tau -0.05 [-0.90, +0.50] over 7"
                 " sources, ac_corr_10steps tau +0.05 [-0.81, +0.52] over 7 sources, ac_corr_all_10steps tau -0.05 [-0"
                 ".81, +0.52] over 7 sources, logme tau +0.05 [-0.50, +0.81] over 7 sources, hscore tau -0.24 [-0.62, "
                 "+0.71] over 7 sources)"),
    "experiment": "experiments/direction_experiment.py",
}

#: the step settings DIRECTION's evidence was measured with, as the experiment's ranking runs recorded them
#: (``step_settings`` in its direction.json; a test checks that they agree); ``tau`` "auto": calibrated per layer
DIRECTION_STEP_SETTINGS = {"lr": 0.01, "tau": "auto"}


def temperature_text(tau: float | str) -> str:
    """``calibrated per layer`` for ``"auto"``, else the number: how the command names a temperature."""
    return "calibrated per layer" if tau == "auto" else f"{tau:g}"


def step_settings_text(lr: float, tau: float | str) -> str:
    """``lr 0.01, temperature calibrated per layer`` / ``lr 0.001, temperature 1``: how the command names settings."""
    return f"lr {lr:g}, temperature {temperature_text(tau)}"


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
