"""The benchmark's result: ``nnUNetv2_acnorm_compare``'s statistics over the finished runs, and a
Markdown report to paste into a paper.

The comparison takes the largest set of methods, seeds and folds in which every run has finished
(:func:`complete_subset`), so that every method is compared on the same validation cases and seeds;
what it leaves out is listed. Each method's model folders are read with
:func:`nnunet_acnorm.compare.load_model_folders` (nnU-Net's own ``summary.json`` per fold), paired
by the seed the plan gave each run, and compared with
:func:`~nnunet_acnorm.compare.compute_statistics`; the table, CSV, JSON and plot are
:func:`~nnunet_acnorm.compare.write_results`'s.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from nnunet_acnorm.benchmark.executors import describe, duration
from nnunet_acnorm.benchmark.plan import BenchmarkError, Plan
from nnunet_acnorm.benchmark.state import BenchmarkFolder, RunStatus
from nnunet_acnorm.checkpoints.io import atomic_write_text
from nnunet_acnorm.compare import (BOOTSTRAP_RESAMPLES, CONFIDENCE_LEVEL, Comparison, compute_statistics, format_table,
                                   load_model_folders, report_text, write_results)

REPORT_FILE = "report.md"


def complete_subset(plan: Plan, statuses: list[RunStatus], baseline: str) -> tuple[list, list, list] | None:
    """(methods, seeds, folds) with every run finished, or None when the baseline has no finished run. Greedy:
    while a run is missing, drop the seed, fold or (non-baseline) method whose removal keeps a comparison (two
    methods or more), then the most finished runs, then the fewest missing ones, then the most methods."""
    done = {(s.run.method, s.run.seed, s.run.fold) for s in statuses if s.state == "done"}
    methods = [m.name for m in plan.methods if any(d[0] == m.name for d in done)]
    seeds, folds = list(plan.what["seeds"]), list(plan.what["folds"])
    if baseline not in methods:
        return None

    def kept(ms, ss, fs):
        return sum((m, s, f) in done for m in ms for s in ss for f in fs)

    def preference(option):
        ms, ss, fs = option
        return len(ms) >= 2, kept(*option), kept(*option) - len(ms) * len(ss) * len(fs), len(ms)

    while seeds and folds and kept(methods, seeds, folds) < len(methods) * len(seeds) * len(folds):
        options = [([m for m in methods if m != x], seeds, folds) for x in methods if x != baseline]
        options += [(methods, [s for s in seeds if s != x], folds) for x in seeds]
        options += [(methods, seeds, [f for f in folds if f != x]) for x in folds]
        methods, seeds, folds = max(options, key=preference)
    return (methods, seeds, folds) if seeds and folds else None


def _debug_json(fold_folder: str) -> dict:
    try:
        with open(os.path.join(fold_folder, "debug.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_comparison(plan: Plan, folder: BenchmarkFolder, methods: list, seeds: list, folds: list) -> Comparison:
    """The runs of ``methods`` x ``seeds`` x ``folds`` as a :class:`~nnunet_acnorm.compare.Comparison`,
    one method per benchmark method (two methods may share a trainer), paired by the plan's seeds."""
    runs = {(r.method, r.seed): r for r in plan.runs}
    parts, seed_of = [], {}
    for name in methods:
        model_folders = [runs[(name, s)].model_folder for s in seeds]
        seed_of.update({os.path.normpath(os.path.abspath(f)): s for f, s in zip(model_folders, seeds)})
        part = load_model_folders(model_folders, [str(f) for f in folds])
        part.methods[0].name = name
        for run in part.methods[0].runs:
            run.seed, run.seed_source = seed_of[os.path.normpath(run.source)], "benchmark plan (nnUNet_acnorm_seed)"
        parts.append(part)
    first = parts[0]
    for name, part in zip(methods, parts):
        if part.cases != first.cases or list(part.labels) != list(first.labels):
            raise BenchmarkError(f"the validation cases or labels of {name} differ from those of {methods[0]}; the "
                                 "runs of one benchmark must come from one dataset and split")
    return Comparison(mode="model_folders", methods=[p.methods[0] for p in parts], labels=first.labels,
                      cases=first.cases, notes=[],
                      inputs={"benchmark": folder.out, "methods": methods, "seeds": seeds, "folds": folds,
                              "model_folders": {p.methods[0].name: [r.source for r in p.methods[0].runs]
                                                for p in parts}})


def method_facts(plan: Plan, statuses: list[RunStatus]) -> dict:
    """Per method: trainer, initialisation, whether its runs record their seed, budget, runs finished, time."""
    facts = {}
    for m in plan.methods:
        mine = [s for s in statuses if s.run.method == m.name]
        done = [s for s in mine if s.state == "done"]
        debug = [_debug_json(s.run.fold_folder) for s in done]
        seeded = [str(d.get("seed")) == str(s.run.seed) for d, s in zip(debug, done)]
        budgets = sorted({f"{d.get('num_epochs')} x {d.get('num_iterations_per_epoch')}, batch {d.get('batch_size')}"
                          for d in debug if d})
        times = [s.seconds for s in done if s.seconds is not None]
        facts[m.name] = {"trainer": m.trainer, "pretrained": m.pretrained, "runs": len(mine), "done": len(done),
                         "seeded": (all(seeded) if seeded else None), "budget": budgets,
                         "mean_seconds": sum(times) / len(times) if times else None}
    return facts


def _cell(values) -> str:
    return ", ".join(str(v) for v in values) or "-"


def _setup_section(plan: Plan, statuses: list[RunStatus]) -> list[str]:
    w, v = plan.what, plan.versions
    counts = {state: sum(s.state == state for s in statuses) for state in ("done", "failed", "running", "queued")}
    ckpt = w["pretrained_weights"]
    rows = [("dataset", f"{w['dataset']}, configuration {w['configuration']}, plans {w['plans']}"),
            ("pretrained checkpoint", f"`{ckpt['path']}` (sha256 {ckpt['sha256'][:16]}...)" if ckpt else "none"),
            ("folds", f"{_cell(w['folds'])} of nnU-Net's cross-validation split (splits_final.json)"),
            ("seeds", f"{_cell(w['seeds'])} (nnUNet_acnorm_seed)"), ("device", w["device"]),
            ("extra environment", _cell(f"{k}={val}" for k, val in w["env"].items())),
            ("nnUNet_extTrainer", f"`{plan.environment['nnUNet_extTrainer']}`"),
            ("software", f"nnunet-acnorm {v.get('nnunet-acnorm')}, nnU-Net {v.get('nnunetv2')}, torch {v.get('torch')}, "
                         f"Python {v.get('python')}"),
            ("runs", f"{len(statuses)} planned: {counts['done']} finished, {counts['failed']} failed, "
                     f"{counts['running']} running, {counts['queued']} queued")]
    return ["## Setup", "", "| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows] + [""]


def _methods_section(facts: dict) -> list[str]:
    lines = ["## Methods", "", "| method | trainer | initialisation | seeded by nnUNet_acnorm_seed | budget (epochs x "
             "iterations per epoch, batch size) | runs finished | mean time per run |", "|---|---|---|---|---|---|---|"]
    for name, f in facts.items():
        seeded = {True: "yes", False: "no (the trainer does not read it)", None: "-"}[f["seeded"]]
        lines.append(f"| {name} | `{f['trainer']}` | {'pretrained' if f['pretrained'] else 'random (scratch)'} | "
                     f"{seeded} | {_cell(f['budget'])} | {f['done']}/{f['runs']} | {duration(f['mean_seconds'])} |")
    return lines + [""]


def _labels_section(result: dict) -> list[str]:
    names = {lab["key"]: lab["name"] for lab in result["labels"]}
    lines = [f"## Per-label paired differences against {result['baseline']}", "",
             f"| method | label | Δ Dice [{int(CONFIDENCE_LEVEL * 100)} % CI] | p (Wilcoxon) | wins/ties/losses |",
             "|---|---|---|---|---|"]
    for m in result["methods"]:
        for key, st in ((m["vs_baseline"] or {}).get("labels") or {}).items():
            if st["mean_difference"] is None:
                delta = "n/a"
            else:
                ci = (f" [{st['ci_low']:+.4f}, {st['ci_high']:+.4f}]" if st["ci_low"] is not None else " [n/a]")
                delta = f"{st['mean_difference']:+.4f}{ci}"
            p = f"{st['wilcoxon_p']:.3g}" if st["wilcoxon_p"] is not None else "n/a"
            lines.append(f"| {m['name']} | {names.get(key, key)} | {delta} | {p} | "
                         f"{st['wins']}/{st['ties']}/{st['losses']} |")
    return lines + [""]


def _unfinished_section(folder: BenchmarkFolder, plan: Plan, statuses: list[RunStatus], subset) -> list[str]:
    lines = ["## Not finished, and left out of the comparison", ""]
    for s in statuses:
        if s.state == "done":
            continue
        where = s.detail.get("slurm_job") or s.detail.get("slot") or ""
        line = f"- {describe(s.run)}: {s.state}" + (f" (attempt {s.attempt}" + (f", {where}" if where else "") + ")"
                                                     if s.attempt else "")
        if s.state == "failed":
            line += f", {s.detail.get('reason')}; log `{s.detail.get('log')}`, last lines:"
            lines += [line, "", "  ```", *[f"  {t}" for t in folder.log_tail(s)], "  ```"]
        else:
            lines.append(line)
    if subset is not None:
        methods, seeds, folds = subset
        left = [f"method {m.name}" for m in plan.methods if m.name not in methods]
        left += [f"seed {s}" for s in plan.what["seeds"] if s not in seeds]
        left += [f"fold {f}" for f in plan.what["folds"] if f not in folds]
        if left:
            lines.append(f"- left out of the comparison, so that every method is compared on the same runs' cases: "
                         f"{', '.join(left)}")
    if len(lines) == 2:
        lines.append("Every planned run finished and is in the comparison.")
    return lines + [""]


def methods_paragraph(plan: Plan, result: dict, facts: dict) -> str:
    """A paragraph for a paper's methods section, from what the plan and the comparison say."""
    w, v = plan.what, plan.versions
    described = "; ".join(f"{n} (`{f['trainer']}`{'' if f['pretrained'] else ', random initialisation'})"
                          for n, f in facts.items() if n in {m['name'] for m in result["methods"]})
    source = os.path.basename(w["pretrained_weights"]["path"]) if w["pretrained_weights"] else None
    budget = _cell(sorted({b for f in facts.values() for b in f["budget"]}))
    unit = (f"per seed (a run's mean Dice over all its validation cases; n = {len(result['seeds'])} seeds)"
            if result["unit"] == "seed" else f"per validation case (averaged over seeds; n = {len(result['cases'])} cases)")
    folds = result["inputs"]["folds"]
    return (f"Methods were compared with nnU-Net v2 ({v.get('nnunetv2')}) and nnunet-acnorm ({v.get('nnunet-acnorm')}) "
            f"on {w['dataset']} (configuration {w['configuration']}, plans {w['plans']}). Each method was trained with "
            f"nnUNetv2_train on cross-validation fold(s) {_cell(folds)} with seed(s) {_cell(result['seeds'] or w['seeds'])}"
            + (f", fine-tuned from the pretrained checkpoint {source}" if source else "")
            + f": {described}. Training budget (epochs x iterations per epoch, batch size): {budget}. "
            f"Dice per label on each fold's validation cases is nnU-Net's own evaluation (summary.json); mean Dice is "
            f"the mean over labels. Each method is compared with {result['baseline']} by the paired difference in "
            f"mean Dice {unit}, with a {int(CONFIDENCE_LEVEL * 100)} % bootstrap confidence interval (BCa, "
            f"{BOOTSTRAP_RESAMPLES} resamples) and a two-sided Wilcoxon signed-rank test (nnUNetv2_acnorm_compare).")


def reproduce_command(plan: Plan, out: str) -> str:
    w = plan.what
    parts = ["nnUNetv2_acnorm_benchmark", "-d", w["dataset"], "-c", w["configuration"], "-p", w["plans"]]
    if w["pretrained_weights"]:
        parts += ["-pretrained_weights", w["pretrained_weights"]["path"]]
    parts += ["-tr", *[m.name for m in plan.methods], "-f", *w["folds"], "--seeds", *map(str, w["seeds"]),
              "-device", w["device"], *[a for k, val in w["env"].items() for a in ("--env", f"{k}={val}")],
              *[a for f in plan.environment.get("trainer_folders", []) for a in ("--trainer-folder", f)], "-o", out]
    return " ".join(parts)


def build_report(folder: BenchmarkFolder, plan: Plan, statuses: list[RunStatus], baseline: str | None = None):
    """(comparison result or None, Markdown text, why there is no comparison or None)."""
    baseline = baseline or plan.methods[0].name
    if baseline not in [m.name for m in plan.methods]:
        raise BenchmarkError(f"--baseline {baseline} is not one of the methods ({', '.join(m.name for m in plan.methods)})")
    subset = complete_subset(plan, statuses, baseline)
    facts = method_facts(plan, statuses)
    result, why = None, None
    if subset is None:
        why = f"no comparison yet: the baseline {baseline} has no finished run"
    else:
        result = compute_statistics(load_comparison(plan, folder, *subset), baseline)
    w = plan.what
    lines = [f"# Benchmark of {len(plan.methods)} methods on {w['dataset']} ({w['configuration']})", "",
             f"Written by nnUNetv2_acnorm_benchmark on {time.strftime('%Y-%m-%d %H:%M')} from `{folder.out}` (plan: "
             "plan.json). The comparison's files are in comparison/.", ""]
    lines += _setup_section(plan, statuses) + _methods_section(facts)
    if result is not None:
        lines += ["## Results", "", report_text(result), ""] + _labels_section(result)
        lines += ["## For a methods section", "", methods_paragraph(plan, result, facts), ""]
    else:
        lines += ["## Results", "", why, ""]
    lines += _unfinished_section(folder, plan, statuses, subset)
    lines += ["## Reproduce", "", "```bash", reproduce_command(plan, folder.out), "```", ""]
    return result, "\n".join(lines), why


def write_report(folder: BenchmarkFolder, plan: Plan, statuses: list[RunStatus], baseline: str | None = None) -> dict:
    """Write OUT/report/ (report.md, status.json, comparison/) anew from the finished runs, swapped in whole;
    returns {"result", "report", "why"}."""
    result, markdown, why = build_report(folder, plan, statuses, baseline)
    tmp = os.path.join(folder.out, f".report.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if result is not None:
        write_results(result, os.path.join(tmp, "comparison"))
    atomic_write_text(os.path.join(tmp, REPORT_FILE), markdown)
    status = [{"run": s.run.id, "state": s.state, **{k: s.detail.get(k) for k in ("attempt", "reason", "log",
                                                                              "slurm_job", "started", "ended")}}
              for s in statuses]
    atomic_write_text(os.path.join(tmp, "status.json"), json.dumps(status, indent=2) + "\n")
    old = os.path.join(folder.out, f".report.old.{os.getpid()}")
    if os.path.isdir(folder.report):
        os.rename(folder.report, old)
    os.rename(tmp, folder.report)
    shutil.rmtree(old, ignore_errors=True)
    return {"result": result, "report": os.path.join(folder.report, REPORT_FILE), "why": why,
            "table": format_table(result) if result is not None else None}


def status_lines(folder: BenchmarkFolder, plan: Plan, statuses: list[RunStatus], tails: bool = True) -> list[str]:
    """The console's view: per method the count of runs per state, then every run not finished (failed ones with
    the last lines of their log)."""
    lines = []
    for m in plan.methods:
        mine = [s.state for s in statuses if s.run.method == m.name]
        counts = ", ".join(f"{mine.count(state)} {state}" for state in ("done", "running", "queued", "failed",
                                                                        "interrupted", "todo") if mine.count(state))
        lines.append(f"  {m.name:24} {counts}")
    for s in statuses:
        if s.state == "done":
            continue
        where = s.detail.get("slurm_job") or s.detail.get("slot") or ""
        lines.append(f"  {s.state:11} {describe(s.run)}" + (f"  [{where}]" if where else ""))
        if s.state == "failed":
            lines.append(f"      {s.detail.get('reason')}; log: {s.detail.get('log')}")
            if tails:
                lines += [f"      | {t}" for t in folder.log_tail(s)]
    return lines
