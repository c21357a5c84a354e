"""Rank candidate checkpoints for one nnU-Net target by transferability estimators, side by side.

For every candidate: the same seed, the same batches (same cases and crops), a fresh AC-Norm
network whose source affines are the candidate's; the estimators of ``--estimators``
(:data:`ESTIMATORS`) on it: LogME and H-score on the pretrained deepest encoder norm's features at
labelled voxels, then AC-Corr after ``steps`` fine-tuning steps over the chosen layers (and over
all layers). The order is by one estimator (``rank_by``); :data:`DIRECTION` records whether an
experiment has settled which estimator to trust and which way, and the printed wording follows it.
A candidate that cannot be used is kept in the result as skipped, with its reason.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from nnunet_acnorm.norms.ac_corr import LayerSelection, select_layers
from nnunet_acnorm.norms import acnorm_modules
from nnunet_acnorm.outputs import check_replaceable, replace_folder
from nnunet_acnorm.ranking.direction import (DIRECTION, ESTIMATORS, direction_statement,  # noqa: F401
                                             parse_estimators, reliable)
from nnunet_acnorm.ranking.estimators import (_near_constant_source, ac_corr_after_steps, ac_corr_in_float64,
                                              norm_features_at_labels)
from nnunet_acnorm.ranking.hscore import hscore
from nnunet_acnorm.ranking.logme import logme
from nnunet_acnorm.ranking.nnunet_target import (CandidateSkipped, TargetTask, build_loss, epoch_steps,
                                                 finetune_optimizer, fixed_batches, nnunet_train_step,
                                                 prepare_candidate, trainer_lr, trainer_tau)

#: estimators that need the pretrained features at labelled voxels / the fine-tuning steps
FEATURE_ESTIMATORS = {"logme": logme, "hscore": hscore}
STEP_ESTIMATORS = ("ac_corr", "ac_corr_all")

#: kept for readers of older results: the sign the order uses
HIGHER_AC_CORR_IS_BETTER = DIRECTION["higher_is_better"]
#: iterations of one nnU-Net training epoch (the cost comparison)
NNUNET_ITERATIONS_PER_EPOCH = 250

RESULT_FILES = ("ranking.csv", "ranking.json", "ranking.png", "sparse_correlations.png", "sparse_correlations.npz")


@dataclass
class CandidateResult:
    name: str
    path: str
    status: str  # "ranked", "excluded" (measured, but cannot be ranked: see reason) or "skipped" (not measured)
    reason: str = ""
    family: str | None = None
    rank: int | None = None
    #: estimator name -> value (None: not computable for this candidate, see notes)
    scores: dict[str, float | None] = field(default_factory=dict)
    ac_corr: float | None = None
    ac_corr_at_start: float | None = None
    per_layer: dict[str, float] = field(default_factory=dict)
    per_layer_at_start: dict[str, float] = field(default_factory=dict)
    logme: float | None = None
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float | None = None
    plans_identifier: str | None = None
    pretrained_weights: str | None = None
    notes: list[str] = field(default_factory=list)
    sparse_correlations: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    #: per layer of sparse_correlations, its channels in the order of the source indicators (plots)
    source_orders: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("sparse_correlations")
        out.pop("source_orders")
        return out


@dataclass
class Ranking:
    dataset: str
    configuration: str
    plans_identifier: str
    steps: int
    layers: str | list[str]
    seed: int
    lr: float | None
    higher_is_better: bool
    direction_note: str
    candidates: list[CandidateResult]
    estimators: list[str] = field(default_factory=lambda: ["ac_corr"])
    rank_by: str = "ac_corr"
    #: the nnU-Net fold whose training cases the batches came from, and those cases (None: every case)
    fold: int | str | None = None
    cases: list[str] | None = None
    #: the temperature of the steps and of S: a number, or "auto" (calibrated per layer)
    tau: float | str = 1.0
    #: which of lr / tau are nnUNetTrainerACNorm's defaults (not given by the caller)
    trainer_defaults: tuple[str, ...] = ()

    @property
    def order_word(self) -> str:
        """How the table is ordered by ``rank_by``: "highest" or "lowest" first."""
        return "highest" if self.higher_is_better else "lowest"

    @property
    def reliable(self) -> bool:
        return reliable(self.rank_by)

    @property
    def ranked(self) -> list[CandidateResult]:
        return sorted((c for c in self.candidates if c.status == "ranked"), key=lambda c: c.rank)

    @property
    def excluded(self) -> list[CandidateResult]:
        """Measured, but left out of the order (degenerate source layers: AC-Corr there says nothing)."""
        return [c for c in self.candidates if c.status == "excluded"]

    @property
    def skipped(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.status == "skipped"]

    @property
    def measured(self) -> list[CandidateResult]:
        """Candidates with scores: the ranked ones, then the excluded ones."""
        return self.ranked + self.excluded

    @property
    def listed(self) -> list[CandidateResult]:
        """All candidates in the order the outputs list them: ranked, excluded, skipped."""
        return self.measured + self.skipped

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans_identifier,
                "steps": self.steps, "layers": self.layers, "seed": self.seed, "lr": self.lr, "tau": self.tau,
                "trainer_defaults": list(self.trainer_defaults),
                "fold": self.fold, "cases": self.cases,
                "estimators": self.estimators, "rank_by": self.rank_by, "reliable": self.reliable,
                "higher_is_better": self.higher_is_better, "direction": dict(DIRECTION),
                "direction_note": self.direction_note,
                "estimated_seconds_per_nnunet_epoch": self.epoch_seconds(),
                "candidates": [c.to_json() for c in self.listed]}

    def epoch_seconds(self) -> float | None:
        """One nnU-Net fine-tuning epoch (250 iterations) at the median measured step time."""
        per_step = [c.seconds_per_step for c in self.measured if c.seconds_per_step]
        return float(np.median(per_step) * NNUNET_ITERATIONS_PER_EPOCH) if per_step else None


#: path parts that name no run: nnU-Net's fold folders and checkpoint files
GENERIC_PATH_PARTS = re.compile(r"fold_(\d+|all)|checkpoint_(final|best|latest)\.pth")


def candidate_names(paths: Sequence[str]) -> list[str]:
    """Short unique names: the shortest suffix of each path (file name, then parent folders) that
    tells the candidates apart and holds a part other than nnU-Net's fold folders and checkpoint
    names ("fold_0/checkpoint_final.pth" names no run; its model folder does)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]

    def informative_depth(p: list[str]) -> int:
        depth = 1
        while depth < len(p) and all(GENERIC_PATH_PARTS.fullmatch(x) for x in p[-depth:]):
            depth += 1
        return depth

    depth = {i: informative_depth(parts[i]) for i in range(len(paths))}
    while True:
        names = ["/".join(parts[i][-depth[i]:]) for i in range(len(paths))]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        grew = False
        for i, name in enumerate(names):
            if name in clashes and depth[i] < len(parts[i]):
                depth[i] += 1
                grew = True
        if not grew:
            return [f"{n}#{i}" for i, n in enumerate(names)]


def rank_candidates(paths: Sequence[str], target: TargetTask, steps: int | str = 1, layers: LayerSelection = "deepest",
                    seed: int = 0, device: str | torch.device = "cpu", lr: float | None = None,
                    tau: float | None = None,
                    with_logme: bool = False, family: str | None = None, trust_pickle: bool = False,
                    adapt_input_channels: bool = False, progress: bool = True, logs: dict | None = None,
                    estimators: Sequence[str] | None = None, rank_by: str = "ac_corr") -> Ranking:
    """Rank ``paths`` on ``target``. ``steps``: a number of steps, or ``"epoch"`` (one pass over the
    target's cases: ceil(cases / batch size) steps of each candidate's plans). ``lr``, ``tau``
    (None: ``nnUNetTrainerACNorm``'s peak lr and temperature) are those of the steps; S is computed
    at the same temperature. ``estimators`` (default ["ac_corr"]; ``with_logme`` adds "logme") are
    computed for every candidate; the order is by ``rank_by`` (added to the estimators if missing),
    higher first."""
    from tqdm import tqdm

    estimators = parse_estimators(list(estimators or ["ac_corr"]) + (["logme"] if with_logme else []))
    parse_estimators([rank_by])
    if rank_by not in estimators:
        estimators.insert(0, rank_by)
    settings = _RankSettings(target, steps, layers, seed, torch.device(device), lr, tau, family, trust_pickle,
                             adapt_input_channels, estimators, rank_by)
    results: list[CandidateResult] = []
    batch_cache: dict[tuple, list[dict]] = {}
    bar = tqdm(list(zip(candidate_names(paths), paths)), desc="Ranking", unit="candidate", disable=not progress)
    for name, path in bar:
        bar.set_postfix_str(name[-40:])
        log = io.StringIO()
        results.append(_measure_candidate(name, path, settings, batch_cache, log))
        if logs is not None:
            logs[name] = log.getvalue()
    higher = DIRECTION["higher_is_better"] if rank_by == DIRECTION["estimator"] else True
    ranked = [r for r in results if r.status == "ranked"]
    ranked.sort(key=lambda r: (-r.scores[rank_by] if higher else r.scores[rank_by], r.name))
    for i, r in enumerate(ranked, start=1):
        r.rank = i
    numeric_steps = ranked[0].steps if ranked else (0 if steps == "epoch" else int(steps))
    if not any(e in STEP_ESTIMATORS for e in estimators):
        numeric_steps = 0
    defaults = tuple(name for name, value in (("lr", lr), ("tau", tau)) if value is None)
    return Ranking(target.dataset_name, target.configuration, target.plans_identifier, numeric_steps,
                   layers if isinstance(layers, str) else list(layers), seed, trainer_lr() if lr is None else lr,
                   higher, direction_statement(rank_by), results, list(estimators), rank_by, target.fold,
                   None if target.cases is None else list(target.cases), trainer_tau() if tau is None else tau,
                   defaults)


@dataclass(frozen=True)
class _RankSettings:
    """The settings every candidate of one ranking is measured with (see :func:`rank_candidates`)."""
    target: TargetTask
    steps: int | str
    layers: LayerSelection
    seed: int
    device: torch.device
    lr: float | None
    tau: float | None
    family: str | None
    trust_pickle: bool
    adapt_input_channels: bool
    estimators: list
    rank_by: str


def _measure_candidate(name: str, path: str, settings: _RankSettings, batch_cache: dict, log) -> CandidateResult:
    """One candidate's result: ranked, excluded (measured, not rankable) or skipped (its problem named)."""
    result = CandidateResult(name=name, path=os.path.abspath(path), status="skipped")
    started = time.perf_counter()
    try:
        degenerate = _score_candidate(result, path, settings, batch_cache, log)
        result.scores = {e: result.scores.get(e) for e in settings.estimators}
        result.status = "ranked"
        if degenerate:
            result.status = "excluded"
            result.reason = degenerate_reason(degenerate)
        elif result.scores.get(settings.rank_by) is None:
            result.status = "excluded"
            result.reason = f"not ranked: no {settings.rank_by} for this candidate (see its notes)"
    except CandidateSkipped as e:
        result.reason = str(e)
    except (ValueError, RuntimeError) as e:  # a network/plans problem of this candidate only
        result.reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result.seconds = time.perf_counter() - started
    return result


def _score_candidate(result: CandidateResult, path: str, settings: _RankSettings, batch_cache: dict,
                     log) -> list[str]:
    """Prepare the candidate's AC-Norm network on the target and fill ``result``'s scores; returns the
    chosen layers whose source indicators are near-constant (the candidate cannot be ranked then)."""
    target, seed = settings.target, settings.seed
    prepared = prepare_candidate(path, target, seed, settings.family, settings.trust_pickle,
                                 settings.adapt_input_channels, log, settings.tau)
    result.family, result.plans_identifier = prepared.family, prepared.plans_identifier
    result.pretrained_weights, result.notes = prepared.pretrained_weights, prepared.notes
    network = prepared.network.to(settings.device)
    n_steps = epoch_steps(target, prepared.plans) if settings.steps == "epoch" else int(settings.steps)
    config = prepared.plans["configurations"][target.configuration]
    key = (config["data_identifier"], tuple(config["patch_size"]), config["batch_size"], n_steps)
    if key not in batch_cache:
        batch_cache[key] = fixed_batches(target, prepared.plans, n_steps, seed)
    batches = batch_cache[key]
    modules = acnorm_modules(network)
    try:
        chosen = select_layers(list(modules), settings.layers)
    except (KeyError, ValueError) as e:
        raise CandidateSkipped(str(e).strip("'\"")) from None
    # the source indicators of the chosen layers, before anything moves them (tolerance test)
    degenerate = [n for n in chosen if _near_constant_source(modules[n])]
    _feature_scores(result, network, modules, batches, settings)  # the pretrained features, before any step
    if any(e in STEP_ESTIMATORS for e in settings.estimators):
        _step_scores(result, network, modules, prepared.plans, batches, n_steps, chosen, settings)
    return degenerate


def _feature_scores(result: CandidateResult, network, modules: dict, batches: list, settings: _RankSettings) -> None:
    """The estimators of the pretrained features at the deepest encoder norm (LogME, H-score)."""
    wanted = [e for e in settings.estimators if e in FEATURE_ESTIMATORS]
    if not wanted:
        return
    deepest = select_layers(list(modules), "deepest")[0]
    features, labels = norm_features_at_labels(network, deepest, batches, seed=settings.seed, device=settings.device)
    for est in wanted:
        try:
            result.scores[est] = FEATURE_ESTIMATORS[est](features, labels)
        except ValueError as e:
            result.scores[est] = None
            result.notes.append(f"{est}: {e}")
    result.logme = result.scores.get("logme")


def _step_scores(result: CandidateResult, network, modules: dict, plans: dict, batches: list, n_steps: int,
                 chosen: list, settings: _RankSettings) -> None:
    """AC-Corr after ``n_steps`` of nnU-Net's train step on the target (and over all layers, if asked)."""
    torch.manual_seed(settings.seed)
    optimizer = finetune_optimizer(network, settings.lr)
    loss = build_loss(plans, settings.target).to(settings.device)
    train_step = nnunet_train_step(network, loss, optimizer, settings.device)
    step_start = time.perf_counter()
    measured = ac_corr_after_steps(network, train_step, batches, n_steps, chosen, settings.tau)
    result.seconds_per_step = (time.perf_counter() - step_start) / n_steps
    result.ac_corr, result.ac_corr_at_start = measured.score, measured.score_at_start
    result.per_layer, result.per_layer_at_start = measured.per_layer, measured.per_layer_at_start
    result.steps, result.losses = measured.steps, measured.losses
    result.sparse_correlations = measured.sparse_correlations
    result.source_orders = measured.source_orders
    if "ac_corr" in settings.estimators:
        result.scores["ac_corr"] = measured.score
    if "ac_corr_all" in settings.estimators:
        result.scores["ac_corr_all"] = ac_corr_in_float64(modules, list(modules), settings.tau).score


def degenerate_reason(layers: Sequence[str]) -> str:
    return (f"not ranked: the source affines of {', '.join(layers)} give (nearly) the same domain indicator in "
            "every channel (untrained affines?), so S is full there and AC-Corr = C by construction, not evidence "
            "of transferability")


# -- output ---------------------------------------------------------------------------------------
def existing_results(folder: str) -> list[str]:
    return [f for f in RESULT_FILES if os.path.exists(os.path.join(folder, f))]


#: the folder of per-candidate logs in a ranking's output
LOGS_FOLDER = "logs"


def _owned(relative: str) -> bool:
    """Whether ``relative`` (a path in the output folder) is a file a ranking writes."""
    folder, _, name = relative.rpartition("/")
    return relative in RESULT_FILES or (folder == LOGS_FOLDER and name.endswith(".txt"))


def check_output_folder(folder: str, overwrite: bool) -> None:
    """FileExistsError if ``folder`` holds results of an earlier ranking and not ``overwrite``;
    :class:`~nnunet_acnorm.outputs.OutputError` unless it is new, empty or (``overwrite``) holds only
    what a ranking writes (:func:`~nnunet_acnorm.outputs.check_replaceable`)."""
    present = existing_results(folder) if os.path.isdir(folder) else []
    if present and not overwrite:
        raise FileExistsError(f"{folder} already holds results of an earlier ranking ({', '.join(present)}); "
                              "pass --overwrite to replace them or -o for another folder")
    check_replaceable(folder, "-o", overwrite, _owned, f"the results nnUNetv2_acnorm_rank writes "
                      f"({', '.join(RESULT_FILES)}, {LOGS_FOLDER}/*.txt)", empty_ok=True)


def write_results(ranking: Ranking, folder: str, overwrite: bool = False, logs: dict[str, str] | None = None
                  ) -> list[str]:
    """CSV, JSON, S matrices (npz), plots and the candidates' ``logs`` (name -> text) in ``folder``,
    written beside it and swapped in atomically (:func:`~nnunet_acnorm.outputs.replace_folder`: a
    kill at any point leaves the old or the new results whole); refuses to replace earlier results
    unless ``overwrite`` (:func:`check_output_folder`). Returns the paths of the result files."""
    check_output_folder(folder, overwrite)
    written: list[str] = []

    def write(staging) -> None:
        written[:] = [os.path.join(folder, os.path.relpath(path, staging))
                      for path in _write_files(ranking, str(staging), logs or {})]
        check_output_folder(folder, overwrite)  # again: it may have changed meanwhile

    replace_folder(folder, write)
    return written


def _write_files(ranking: Ranking, folder: str, logs: dict[str, str]) -> list[str]:
    from nnunet_acnorm.ranking.plots import plot_scores, plot_sparse_correlations

    written = []
    csv_file = os.path.join(folder, "ranking.csv")
    layer_names = sorted({n for c in ranking.measured for n in c.per_layer})
    with_steps = any(e in STEP_ESTIMATORS for e in ranking.estimators)
    with open(csv_file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "candidate", "family", *ranking.estimators,
                         *(["ac_corr_at_start"] if with_steps else []), "steps", "seconds",
                         *[f"layer:{n}" for n in layer_names], "status", "reason", "path"])
        for c in ranking.listed:
            writer.writerow([c.rank or "", c.name, c.family or "", *[_fmt(c.scores.get(e)) for e in ranking.estimators],
                             *([_fmt(c.ac_corr_at_start)] if with_steps else []), c.steps, f"{c.seconds:.2f}",
                             *[_fmt(c.per_layer.get(n)) for n in layer_names], c.status, c.reason, c.path])
    written.append(csv_file)
    json_file = os.path.join(folder, "ranking.json")
    with open(json_file, "w") as f:
        json.dump(ranking.to_json(), f, indent=2)
    written.append(json_file)
    if ranking.measured:
        labels = {e: ESTIMATORS[e][0] for e in ranking.estimators}
        written.append(plot_scores(ranking, os.path.join(folder, "ranking.png"), labels))
    matrices = {f"{c.name}::{layer}": s for c in ranking.measured for layer, s in c.sparse_correlations.items()}
    if matrices:
        npz_file = os.path.join(folder, "sparse_correlations.npz")
        np.savez_compressed(npz_file, **matrices)
        written.append(npz_file)
        written.append(plot_sparse_correlations(ranking, os.path.join(folder, "sparse_correlations.png")))
    os.makedirs(os.path.join(folder, LOGS_FOLDER), exist_ok=True)
    for name, text in logs.items():
        if text:
            with open(os.path.join(folder, LOGS_FOLDER, name.replace(os.sep, "_") + ".txt"), "w") as f:
                f.write(text)
    return written


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def _cell(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def format_table(ranking: Ranking, max_layers: int = 4) -> str:
    """One table, one column per estimator (the ranked candidates), then the excluded candidates
    with their scores and reasons, and the skipped ones."""
    lines = []
    layer_names = []
    for c in ranking.ranked:
        for n in c.per_layer:
            if n not in layer_names:
                layer_names.append(n)
    with_ac_corr = "ac_corr" in ranking.estimators
    shown = layer_names[:max_layers] if with_ac_corr else []
    columns: list[tuple[str, callable]] = []
    for est in ranking.estimators:
        label = ESTIMATORS[est][0] + (" (order)" if est == ranking.rank_by else "")
        columns.append((label, lambda c, est=est: _cell(c.scores.get(est))))
        if est == "ac_corr":
            columns.append(("at step 0", lambda c: _cell(c.ac_corr_at_start)))
    columns += [(n, lambda c, n=n: _cell(c.per_layer.get(n))) for n in shown]
    header = ["rank", "candidate", "family"] + [h for h, _ in columns] + ["seconds"]
    rows = [[str(c.rank), c.name, c.family or ""] + [f(c) for _, f in columns] + [f"{c.seconds:.1f}"]
            for c in ranking.ranked]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)
    if with_ac_corr and len(layer_names) > max_layers:
        lines.append(f"({len(layer_names) - max_layers} more layer(s) in ranking.csv)")
    if not rows:
        lines.append("(no candidate could be ranked)")
    for c in ranking.excluded:
        values = ", ".join(f"{ESTIMATORS[e][0]} {_cell(c.scores.get(e))}" for e in ranking.estimators)
        lines.append(f"excluded: {c.name} ({values}): {c.reason}")
    for c in ranking.skipped:
        lines.append(f"skipped: {c.name}: {c.reason}")
    return "\n".join(lines)
