"""Rank candidate checkpoints for one nnU-Net target by AC-Corr (and, on request, LogME).

For every candidate: the same seed, the same batches (same cases and crops), a fresh AC-Norm
network whose source affines are the candidate's, ``steps`` fine-tuning steps, AC-Corr over the
chosen layers. A candidate that cannot be used is kept in the result as skipped, with its reason.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from nnunet_acnorm.ac_corr import LayerSelection, select_layers
from nnunet_acnorm.norms import acnorm_modules
from nnunet_acnorm.ranking.estimators import ac_corr_after_steps, logme_of_layer
from nnunet_acnorm.ranking.nnunet_target import (CandidateSkipped, TargetTask, build_loss, epoch_steps,
                                                 finetune_optimizer, fixed_batches, nnunet_train_step,
                                                 prepare_candidate)

#: Which way AC-Corr ranks. Neither the paper's abstract nor its reference code says; this is
#: the direction the project's experiment supports (benchmarks/acnorm_direction_experiment.py,
#: docs/ranking.md), with the caveat printed next to every ranking.
HIGHER_AC_CORR_IS_BETTER = True
DIRECTION_NOTE = ("direction: higher AC-Corr is ranked first. The evidence is weak: in the project's direction "
                  "experiment (benchmarks/acnorm_direction_experiment.py: 7 source models fine-tuned on one MR target, "
                  "docs/ranking.md) AC-Corr after one step had Kendall tau +0.73 (p 0.03) and Pearson r +0.48 "
                  "(p 0.27) with the fine-tuned Dice, mostly by telling apart sources whose fine-tuning failed")
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

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("sparse_correlations")
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
        """Candidates with an AC-Corr: the ranked ones, then the excluded ones."""
        return self.ranked + self.excluded

    @property
    def listed(self) -> list[CandidateResult]:
        """All candidates in the order the outputs list them: ranked, excluded, skipped."""
        return self.measured + self.skipped

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans_identifier,
                "steps": self.steps, "layers": self.layers, "seed": self.seed, "lr": self.lr,
                "higher_ac_corr_is_better": self.higher_is_better, "direction_note": self.direction_note,
                "estimated_seconds_per_nnunet_epoch": self.epoch_seconds(),
                "candidates": [c.to_json() for c in self.listed]}

    def epoch_seconds(self) -> float | None:
        """One nnU-Net fine-tuning epoch (250 iterations) at the median measured step time."""
        per_step = [c.seconds_per_step for c in self.measured if c.seconds_per_step]
        return float(np.median(per_step) * NNUNET_ITERATIONS_PER_EPOCH) if per_step else None


def candidate_names(paths: Sequence[str]) -> list[str]:
    """Short unique names: the file name, with parent folders added where names collide."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    depth = {i: 1 for i in range(len(paths))}
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
                    seed: int = 0, device: str | torch.device = "cpu", lr: float | None = None, tau: float = 1.0,
                    with_logme: bool = False, family: str | None = None, trust_pickle: bool = False,
                    adapt_input_channels: bool = False, progress: bool = True, logs: dict | None = None) -> Ranking:
    """Rank ``paths`` on ``target``. ``steps``: a number of steps, or ``"epoch"`` (one pass over the
    target's cases: ceil(cases / batch size) steps of each candidate's plans)."""
    from tqdm import tqdm

    device = torch.device(device)
    names = candidate_names(paths)
    results: list[CandidateResult] = []
    batch_cache: dict[tuple, list[dict]] = {}
    bar = tqdm(list(zip(names, paths)), desc="AC-Corr", unit="candidate", disable=not progress)
    for name, path in bar:
        bar.set_postfix_str(name[-40:])
        result = CandidateResult(name=name, path=os.path.abspath(path), status="skipped")
        log = io.StringIO()
        started = time.perf_counter()
        try:
            prepared = prepare_candidate(path, target, seed, family, trust_pickle, adapt_input_channels, log)
            result.family, result.plans_identifier = prepared.family, prepared.plans_identifier
            result.pretrained_weights, result.notes = prepared.pretrained_weights, prepared.notes
            network = prepared.network.to(device)
            n_steps = epoch_steps(target, prepared.plans) if steps == "epoch" else int(steps)
            config = prepared.plans["configurations"][target.configuration]
            key = (config["data_identifier"], tuple(config["patch_size"]), config["batch_size"], n_steps)
            if key not in batch_cache:
                batch_cache[key] = fixed_batches(target, prepared.plans, n_steps, seed)
            batches = batch_cache[key]
            try:
                chosen = select_layers(list(acnorm_modules(network)), layers)
            except (KeyError, ValueError) as e:
                raise CandidateSkipped(str(e).strip("'\"")) from None
            if with_logme:
                result.logme = logme_of_layer(network, select_layers(list(acnorm_modules(network)), "deepest")[0],
                                              batches, seed=seed, device=device)
            torch.manual_seed(seed)
            optimizer = finetune_optimizer(network, lr)
            train_step = nnunet_train_step(network, build_loss(prepared.plans, target).to(device), optimizer, device)
            step_start = time.perf_counter()
            measured = ac_corr_after_steps(network, train_step, batches, n_steps, chosen, tau)
            result.seconds_per_step = (time.perf_counter() - step_start) / n_steps
            result.status = "ranked"
            result.ac_corr, result.ac_corr_at_start = measured.score, measured.score_at_start
            result.per_layer, result.per_layer_at_start = measured.per_layer, measured.per_layer_at_start
            result.steps, result.losses = measured.steps, measured.losses
            result.sparse_correlations = measured.sparse_correlations
            if measured.degenerate_layers:
                result.status = "excluded"
                result.reason = degenerate_reason(measured.degenerate_layers)
        except CandidateSkipped as e:
            result.reason = str(e)
        except (ValueError, RuntimeError) as e:  # a network/plans problem of this candidate only
            result.reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        result.seconds = time.perf_counter() - started
        if logs is not None:
            logs[name] = log.getvalue()
        results.append(result)
    ranked = [r for r in results if r.status == "ranked"]
    ranked.sort(key=lambda r: (-r.ac_corr if HIGHER_AC_CORR_IS_BETTER else r.ac_corr, r.name))
    for i, r in enumerate(ranked, start=1):
        r.rank = i
    numeric_steps = ranked[0].steps if ranked else (0 if steps == "epoch" else int(steps))
    return Ranking(target.dataset_name, target.configuration, target.plans_identifier, numeric_steps,
                   layers if isinstance(layers, str) else list(layers), seed, lr, HIGHER_AC_CORR_IS_BETTER,
                   DIRECTION_NOTE, results)


def degenerate_reason(layers: Sequence[str]) -> str:
    return (f"not ranked: the source affines of {', '.join(layers)} give (nearly) the same domain indicator in "
            "every channel (untrained affines?), so S is full there and AC-Corr = C by construction, not evidence "
            "of transferability")


# -- output ---------------------------------------------------------------------------------------
def existing_results(folder: str) -> list[str]:
    return [f for f in RESULT_FILES if os.path.exists(os.path.join(folder, f))]


def write_results(ranking: Ranking, folder: str, overwrite: bool = False) -> list[str]:
    """CSV, JSON, S matrices (npz) and plots in ``folder``; refuses to replace earlier results
    unless ``overwrite``."""
    from nnunet_acnorm.ranking.plots import plot_scores, plot_sparse_correlations

    os.makedirs(folder, exist_ok=True)
    present = existing_results(folder)
    if present and not overwrite:
        raise FileExistsError(f"{folder} already holds results of an earlier ranking ({', '.join(present)}); "
                              "pass --overwrite to replace them or -o for another folder")
    written = []
    csv_file = os.path.join(folder, "ranking.csv")
    layer_names = sorted({n for c in ranking.measured for n in c.per_layer})
    with open(csv_file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "candidate", "family", "ac_corr", "ac_corr_at_start", "logme", "steps", "seconds",
                         *[f"layer:{n}" for n in layer_names], "status", "reason", "path"])
        for c in ranking.listed:
            writer.writerow([c.rank or "", c.name, c.family or "", _fmt(c.ac_corr), _fmt(c.ac_corr_at_start),
                             _fmt(c.logme), c.steps, f"{c.seconds:.2f}",
                             *[_fmt(c.per_layer.get(n)) for n in layer_names], c.status, c.reason, c.path])
    written.append(csv_file)
    json_file = os.path.join(folder, "ranking.json")
    with open(json_file, "w") as f:
        json.dump(ranking.to_json(), f, indent=2)
    written.append(json_file)
    matrices = {f"{c.name}::{layer}": s for c in ranking.measured for layer, s in c.sparse_correlations.items()}
    if matrices:
        npz_file = os.path.join(folder, "sparse_correlations.npz")
        np.savez_compressed(npz_file, **matrices)
        written.append(npz_file)
        written.append(plot_scores(ranking, os.path.join(folder, "ranking.png")))
        written.append(plot_sparse_correlations(ranking, os.path.join(folder, "sparse_correlations.png")))
    return written


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def format_table(ranking: Ranking, max_layers: int = 4) -> str:
    """The ranked table (and the skipped candidates) as text."""
    lines = []
    layer_names = []
    for c in ranking.ranked:
        for n in c.per_layer:
            if n not in layer_names:
                layer_names.append(n)
    shown = layer_names[:max_layers]
    has_logme = any(c.logme is not None for c in ranking.ranked)
    header = ["rank", "candidate", "family", "AC-Corr", "at step 0"] + (["LogME"] if has_logme else []) + \
        [f"{n}" for n in shown] + ["seconds"]
    rows = []
    for c in ranking.ranked:
        rows.append([str(c.rank), c.name, c.family or "", f"{c.ac_corr:.4f}", f"{c.ac_corr_at_start:.4f}"]
                    + ([f"{c.logme:.4f}" if c.logme is not None else ""] if has_logme else [])
                    + [f"{c.per_layer[n]:.4f}" if n in c.per_layer else "" for n in shown] + [f"{c.seconds:.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)
    if len(layer_names) > max_layers:
        lines.append(f"({len(layer_names) - max_layers} more layer(s) in ranking.csv)")
    if not rows:
        lines.append("(no candidate could be ranked)")
    for c in ranking.excluded:
        lines.append(f"excluded: {c.name} (AC-Corr {c.ac_corr:.4f}): {c.reason}")
    for c in ranking.skipped:
        lines.append(f"skipped: {c.name}: {c.reason}")
    return "\n".join(lines)
