"""The output of a comparison: the printed report and table, and the files written to ``-o``
(comparison.csv, comparison.json, paired_differences.png, comparison.md), swapped in atomically."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from nnunet_acnorm.compare.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE_LEVEL
from nnunet_acnorm.outputs import check_output, check_replaceable, replace_folder

RESULT_FILES = ("comparison.csv", "comparison.json", "paired_differences.png")


def check_output_folder(out: str, overwrite: bool, reads: dict | None = None) -> str:
    """The output folder, checked: not inside or around what the comparison reads (``reads``:
    description -> paths), writable, and new, empty, or (``overwrite``) holding only the results of
    an earlier comparison (:mod:`nnunet_acnorm.outputs`)."""
    out = str(check_output(out, "-o", reads=reads))
    check_replaceable(out, "-o", overwrite, set(RESULT_FILES + ("comparison.md",)).__contains__,
                      f"the results nnUNetv2_acnorm_compare writes ({', '.join(RESULT_FILES)}, comparison.md)",
                      empty_ok=True)
    return out


def _f(x, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(stat: dict) -> str:
    if stat["wilcoxon_p"] is None:
        return "n/a (" + stat["wilcoxon_note"].split("(", 1)[-1]
    return f"{stat['wilcoxon_p']:.3g}"


def _mean_sd(desc: dict) -> str:
    if desc["mean"] is None:
        return "n/a"
    return f"{desc['mean']:.4f} ± {_f(desc['sd'])}" if desc["sd"] is not None else f"{desc['mean']:.4f}"


def format_table(result: dict) -> str:
    """The markdown table: one row per method."""
    unit, baseline = result["unit"], result["baseline"]
    labels = result["labels"]
    header = ["method", "runs", f"n ({unit}s)", f"mean Dice ± sd over {unit}s"]
    if unit == "seed":
        header.append("mean Dice ± sd over cases")
    header += [lab["name"] for lab in labels]
    header += [f"Δ mean Dice vs {baseline} [95% CI]", "p (Wilcoxon)", "wins/ties/losses"]
    rows = []
    for m in result["methods"]:
        s = m["summary"]
        row = [m["name"] + (" (baseline)" if m["is_baseline"] else ""), str(len(m["runs"])),
               str(s["mean_dice"]["units"]["n"]), _mean_sd(s["mean_dice"]["units"])]
        if unit == "seed":
            row.append(_mean_sd(s["mean_dice"]["cases"]))
        row += [_f(s["labels"][lab["key"]]["units"]["mean"]) for lab in labels]
        vs = m["vs_baseline"]
        if vs is None:
            row += ["–", "–", "–"]
        else:
            st = vs["mean_dice"]
            ci = (f" [{_f(st['ci_low'], sign=True)}, {_f(st['ci_high'], sign=True)}]" if st["ci_low"] is not None
                  else " [n/a]")
            row += [_f(st["mean_difference"], sign=True) + ci, _p(st), f"{st['wins']}/{st['ties']}/{st['losses']}"]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


CSV_COLUMNS = ["method", "label_key", "label", "unit", "n_units", "mean_units", "sd_units", "n_cases", "mean_cases",
               "sd_cases", "baseline", "n_pairs", "mean_difference", "ci_low", "ci_high", "ci_method", "wilcoxon_p",
               "wilcoxon_note", "wins", "ties", "losses"]


def _csv_rows(result: dict) -> list:
    rows = []
    for m in result["methods"]:
        items = [("mean", "mean Dice", m["summary"]["mean_dice"],
                  m["vs_baseline"]["mean_dice"] if m["vs_baseline"] else None)]
        items += [(lab["key"], lab["name"], m["summary"]["labels"][lab["key"]],
                   m["vs_baseline"]["labels"][lab["key"]] if m["vs_baseline"] else None) for lab in result["labels"]]
        for key, name, desc, vs in items:
            row = {"method": m["name"], "label_key": key, "label": name, "unit": result["unit"],
                   "n_units": desc["units"]["n"], "mean_units": desc["units"]["mean"], "sd_units": desc["units"]["sd"],
                   "n_cases": desc["cases"]["n"], "mean_cases": desc["cases"]["mean"], "sd_cases": desc["cases"]["sd"],
                   "baseline": result["baseline"]}
            if vs is not None:
                row.update({"n_pairs": vs["n"], **{k: vs[k] for k in ("mean_difference", "ci_low", "ci_high",
                                                                     "ci_method", "wilcoxon_p", "wilcoxon_note",
                                                                     "wins", "ties", "losses")}})
            rows.append({c: ("" if row.get(c) is None else row.get(c)) for c in CSV_COLUMNS})
    return rows


def _wrap(name: str, width: int = 22) -> str:
    """Line breaks for a plot label: at nnU-Net's "__" separators, else every ``width`` characters."""
    parts = name.split("__") if len(name) > width else [name]
    lines = []
    for part in parts:
        lines += [part[i:i + width] for i in range(0, len(part), width)] or [""]
    return "\n".join(lines)


def plot_paired_differences(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [m for m in result["methods"] if not m["is_baseline"]]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(others) + 2.5), 4.2))
    rng = np.random.default_rng(0)
    ax.axhline(0.0, color="0.3", linewidth=1, linestyle="--", zorder=1)
    for x, m in enumerate(others):
        st = m["vs_baseline"]["mean_dice"]
        d = np.array([v for v in st["differences"].values() if v is not None], dtype=float)
        ax.scatter(x + rng.uniform(-0.12, 0.12, d.size), d, s=14, alpha=0.6, color="tab:blue", zorder=2,
                   label=f"per {result['unit']}" if x == 0 else None)
        if st["mean_difference"] is not None:
            low = st["ci_low"] if st["ci_low"] is not None else st["mean_difference"]
            high = st["ci_high"] if st["ci_high"] is not None else st["mean_difference"]
            ax.errorbar([x + 0.3], [st["mean_difference"]],
                        yerr=[[st["mean_difference"] - low], [high - st["mean_difference"]]], fmt="o", color="tab:red",
                        capsize=4, zorder=3, label="mean, 95% bootstrap CI" if x == 0 else None)
    if not others:
        ax.text(0.5, 0.5, "only the baseline: nothing to compare", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(len(others)))
    ax.set_xticklabels([_wrap(m["name"]) for m in others], fontsize=7)
    ax.set_xlim(-0.6, max(len(others) - 1, 0) + 0.7)
    ax.set_ylabel("Δ mean Dice (method - baseline)")
    ax.set_title(f"Paired differences in mean Dice, unit: {result['unit']}\nbaseline: {_wrap(result['baseline'], 60)}",
                 fontsize=8)
    if others:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(result: dict, out: str, overwrite: bool = False) -> list:
    """Write the result files into a new folder beside ``out`` and swap it in atomically
    (:func:`nnunet_acnorm.outputs.replace_folder`); returns the paths of the files in ``out``."""
    def write(staging) -> None:
        _write_files(result, str(staging))
        check_output_folder(out, overwrite)  # again: it may have changed meanwhile

    replace_folder(out, write)
    return [os.path.join(out, name) for name in ("comparison.csv", "comparison.json", "paired_differences.png",
                                                 "comparison.md")]


def _write_files(result: dict, out: str) -> list:
    csv_path = os.path.join(out, "comparison.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_csv_rows(result))
    json_path = os.path.join(out, "comparison.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
    png_path = plot_paired_differences(result, os.path.join(out, "paired_differences.png"))
    md_path = os.path.join(out, "comparison.md")
    with open(md_path, "w") as f:
        f.write(report_text(result) + "\n")
    return [csv_path, json_path, png_path, md_path]


def report_text(result: dict) -> str:
    """The printed report: what was compared, the unit of pairing, the table and its legend."""
    labels = ", ".join(f"{lab['key']} {lab['name']}" if lab["name"] != lab["key"] else lab["key"]
                       for lab in result["labels"])
    source = "prediction folders vs " + result["inputs"]["reference"] if result["mode"] == "label_folder" \
        else "model folders (cross-validation summaries)"
    lines = [f"Compared {len(result['methods'])} method(s) on {len(result['cases'])} cases, {source}; labels: {labels}",
             f"Unit of pairing: {result['unit_note']}", "", format_table(result), "",
             f"Δ: paired difference method - baseline ({result['baseline']}) in mean Dice (mean over labels per case, "
             f"NaN labels skipped); CI: {int(CONFIDENCE_LEVEL * 100)}% bootstrap (BCa, percentile when all differences "
             f"are equal; {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); p: two-sided Wilcoxon signed-rank."]
    lines += [f"Note: {note}" for note in result["notes"]]
    return "\n".join(lines)
