"""The statistics of a comparison: per method the Dice per unit of pairing (seed or case), and against
the baseline the paired differences with a bootstrap interval and a Wilcoxon signed-rank test
(scipy); the result is one JSON-ready dict (see docs/compare.md)."""
from __future__ import annotations

import math
import warnings

import numpy as np

from nnunet_acnorm.compare.data import Comparison, Method, check_baseline, to_float

#: bootstrap settings (fixed: the interval is reproducible run to run)
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
CONFIDENCE_LEVEL = 0.95
#: differences smaller than this in absolute value count as ties (and as 0 for the Wilcoxon test)
TIE_TOLERANCE = 1e-12


def _nanmean(values, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(values, dtype=float), axis=axis)


def _describe(values) -> dict:
    """n (finite values), mean and sample standard deviation (ddof 1; None for n < 2) of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    return {"n": n, "mean": float(v.mean()) if n else None, "sd": float(v.std(ddof=1)) if n >= 2 else None}


def _json_safe(obj):
    """NaN/inf -> None, numpy scalars -> Python; for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _per_run_arrays(method: Method, cases: list, labels: list) -> np.ndarray:
    """Dice as an array (runs, cases, labels)."""
    return np.array([[[to_float(run.dice[c].get(k)) for k in labels] for c in cases] for run in method.runs],
                    dtype=float)


def choose_unit(comparison: Comparison) -> tuple:
    """("seed", seeds, note) when every method has runs for the same >= 2 seeds, else ("case", None, note)."""
    seed_sets = [tuple(sorted(r.seed for r in m.runs)) if all(r.seed is not None for r in m.runs) else None
                 for m in comparison.methods]
    n = len(comparison.cases)
    if seed_sets[0] is not None and len(seed_sets[0]) >= 2 and all(s == seed_sets[0] for s in seed_sets):
        seeds = list(seed_sets[0])
        return "seed", seeds, (f"seed: every method has runs for seeds {', '.join(map(str, seeds))}; a unit is one "
                               f"run's mean Dice over the {n} cases, paired by seed")
    if all(len(m.runs) == 1 for m in comparison.methods):
        why = "one run per method"
    else:
        why = "the methods do not share a set of >= 2 seeds (" + "; ".join(
            f"{m.name}: {', '.join(str(r.seed) for r in m.runs)}" for m in comparison.methods) + ")"
        why += "; a method's runs are averaged per case over its seeds"
    return "case", None, f"case: paired by case ({n} cases); {why}"


def paired_statistics(differences) -> dict:
    """Mean, bootstrap interval, Wilcoxon signed-rank test and wins/ties/losses of paired differences
    (method - baseline; non-finite ones dropped)."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    d = np.where(np.abs(d) < TIE_TOLERANCE, 0.0, d)
    n = int(d.size)
    out = {"n": n, "mean_difference": float(d.mean()) if n else None, "ci_low": None, "ci_high": None,
           "ci_method": None, "wilcoxon_p": None, "wilcoxon_note": None,
           "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}
    if n < 2:
        out["ci_method"] = "undefined (n < 2)"
        out["wilcoxon_note"] = "undefined (n < 2)"
        return out
    method = "percentile" if np.ptp(d) == 0 else "BCa"
    ci = None
    for m in ((method, "percentile") if method == "BCa" else (method,)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((d,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=CONFIDENCE_LEVEL,
                                  method=m, vectorized=True, rng=np.random.default_rng(BOOTSTRAP_SEED))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            ci, method = (low, high), m
            break
    if ci is not None:
        # a bootstrap mean lies within [min, max] of the data; clip the rounding of summing n floats
        out["ci_low"], out["ci_high"] = float(np.clip(ci[0], d.min(), d.max())), float(np.clip(ci[1], d.min(), d.max()))
        out["ci_method"] = method if method == "BCa" or np.ptp(d) > 0 else "percentile (all differences equal)"
    else:
        out["ci_method"] = "undefined"
    if not np.any(d != 0):
        out["wilcoxon_note"] = "undefined (all differences are 0)"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.wilcoxon(d, alternative="two-sided")
        out["wilcoxon_p"] = float(res.pvalue)
    return out


def compute_statistics(comparison: Comparison, baseline: str | None = None) -> dict:
    """The result as a JSON-ready dict (see docs/compare.md); raises CompareError for an unknown baseline."""
    names = [m.name for m in comparison.methods]
    baseline = names[0] if baseline is None else baseline
    check_baseline(baseline, names)
    cases, labels = comparison.cases, list(comparison.labels)
    unit, seeds, unit_note = choose_unit(comparison)
    per_method = {m.name: _method_arrays(m, cases, labels, unit, seeds) for m in comparison.methods}
    methods_out = [_method_entry(m, per_method[m.name], None if m.name == baseline else per_method[baseline],
                                 cases, labels)
                   for m in comparison.methods]
    return _json_safe({
        "tool": "nnUNetv2_acnorm_compare",
        "mode": comparison.mode,
        "unit": unit,
        "unit_note": unit_note,
        "seeds": seeds,
        "baseline": baseline,
        "labels": [{"key": k, "name": comparison.labels[k]} for k in labels],
        "cases": cases,
        "settings": _settings(),
        "methods": methods_out,
        "notes": comparison.notes,
        "inputs": comparison.inputs,
    })


def _method_arrays(method: Method, cases: list, labels: list, unit: str, seeds: list | None) -> dict:
    """A method's Dice per run, case, label and unit of pairing (arrays; NaN labels skipped in means)."""
    arr = _per_run_arrays(method, cases, labels)  # runs x cases x labels
    run_case_mean = _nanmean(arr, axis=2)  # mean Dice of a case = mean over labels, NaN labels skipped
    case_labels = _nanmean(arr, axis=0)  # cases x labels, averaged over runs
    case_mean = _nanmean(run_case_mean, axis=0)  # cases, averaged over runs
    if unit == "seed":
        order = [next(i for i, r in enumerate(method.runs) if r.seed == s) for s in seeds]
        unit_ids = [str(s) for s in seeds]
        unit_mean = _nanmean(run_case_mean[order], axis=1)
        unit_labels = _nanmean(arr[order], axis=1)  # seeds x labels
    else:
        unit_ids, unit_mean, unit_labels = list(cases), case_mean, case_labels
    return {"unit_ids": unit_ids, "unit_mean": unit_mean, "unit_labels": unit_labels, "case_mean": case_mean,
            "case_labels": case_labels, "arr": arr, "run_case_mean": run_case_mean}


def _method_entry(method: Method, pm: dict, base: dict | None, cases: list, labels: list) -> dict:
    """The result entry of one method (``pm``: its :func:`_method_arrays`; ``base``: the baseline's,
    None for the baseline itself)."""
    summary = {"mean_dice": {"units": _describe(pm["unit_mean"]), "cases": _describe(pm["case_mean"])},
               "labels": {k: {"units": _describe(pm["unit_labels"][:, j]), "cases": _describe(pm["case_labels"][:, j])}
                          for j, k in enumerate(labels)}}
    return {
        "name": method.name,
        "is_baseline": base is None,
        "runs": [{"source": r.source, "seed": r.seed, "seed_source": r.seed_source, "folds": r.folds or None,
                  "mean_dice": _describe(pm["run_case_mean"][i])["mean"],
                  "dice_per_case": {c: {k: pm["arr"][i, ci, j] for j, k in enumerate(labels)}
                                    for ci, c in enumerate(cases)}}
                 for i, r in enumerate(method.runs)],
        "summary": summary,
        "per_unit": {u: {"mean_dice": pm["unit_mean"][i], "labels": dict(zip(labels, pm["unit_labels"][i]))}
                     for i, u in enumerate(pm["unit_ids"])},
        "per_case": {c: {"mean_dice": pm["case_mean"][i], "labels": dict(zip(labels, pm["case_labels"][i]))}
                     for i, c in enumerate(cases)},
        "vs_baseline": None if base is None else _vs_baseline(pm, base, labels),
    }


def _vs_baseline(pm: dict, base: dict, labels: list) -> dict:
    """Paired statistics of a method against the baseline: mean Dice and each label, per unit."""
    diff_mean = pm["unit_mean"] - base["unit_mean"]
    vs = {"mean_dice": paired_statistics(diff_mean), "labels": {}}
    vs["mean_dice"]["differences"] = dict(zip(pm["unit_ids"], diff_mean))
    for j, k in enumerate(labels):
        d = pm["unit_labels"][:, j] - base["unit_labels"][:, j]
        vs["labels"][k] = paired_statistics(d)
        vs["labels"][k]["differences"] = dict(zip(pm["unit_ids"], d))
    return vs


def _settings() -> dict:
    """How the numbers were computed (recorded in comparison.json)."""
    return {
        "mean_dice": "per case: mean of the label Dice (nnU-Net's foreground mean); a label absent in both "
                     "reference and prediction has Dice NaN (nnU-Net) and is skipped (nanmean)",
        "difference": "method - baseline per unit, units with a NaN on either side dropped",
        "bootstrap": {"function": "scipy.stats.bootstrap of the mean of the paired differences",
                      "method": "BCa; percentile when all differences are equal or BCa is undefined",
                      "confidence_level": CONFIDENCE_LEVEL, "n_resamples": BOOTSTRAP_RESAMPLES,
                      "rng_seed": BOOTSTRAP_SEED},
        "wilcoxon": "scipy.stats.wilcoxon(differences), two-sided, zero_method 'wilcox' (zero differences "
                    "dropped), scipy's method 'auto'; undefined for n < 2 or all differences 0",
        "tie_tolerance": TIE_TOLERANCE,
    }
