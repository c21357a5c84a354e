"""Compare segmentation methods by Dice, with paired statistics (``nnUNetv2_acnorm_compare``).

    nnUNetv2_acnorm_compare -ref LABEL_FOLDER -pred FOLDER_A FOLDER_B ... -o OUT
                            [-dj dataset.json] [-names A B ...] [-baseline NAME] [-np N] [--overwrite]
    nnUNetv2_acnorm_compare -m MODEL_FOLDER [MODEL_FOLDER ...] -o OUT [-baseline NAME] [-f FOLDS] [--overwrite]

The first form evaluates prediction folders against a label folder with nnU-Net's own evaluation code
(``compute_metrics``); the second reads the cross-validation results nnU-Net wrote into trained model
folders (``fold_X/validation/summary.json``), pooling runs of one trainer over seeds. Both give per-method
Dice (per label and the mean over labels), paired differences against a baseline with a bootstrap
interval and a Wilcoxon signed-rank test, and write ``comparison.csv``, ``comparison.json`` and
``paired_differences.png``. See docs/compare.md.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from nnunet_acnorm.errors import InputError
from nnunet_acnorm.outputs import check_output, check_replaceable, replace_folder

RESULT_FILES = ("comparison.csv", "comparison.json", "paired_differences.png")
#: bootstrap settings (fixed: the interval is reproducible run to run)
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
CONFIDENCE_LEVEL = 0.95
#: differences smaller than this in absolute value count as ties (and as 0 for the Wilcoxon test)
TIE_TOLERANCE = 1e-12
#: show a progress bar from this many evaluations on
PROGRESS_FROM = 50


class CompareError(InputError):
    """A problem with the input of a comparison (nothing is written before it is checked)."""


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Run:
    """One set of results of a method: a prediction folder, or one trained model folder (all its folds)."""
    source: str
    dice: dict  # case id -> {label key: Dice (nan where nnU-Net gives NaN)}
    seed: int | None = None
    seed_source: str = "none"  # "debug.json", "numbered" (no seed found: order given) or "none" (label mode)
    folds: list = field(default_factory=list)


@dataclass
class Method:
    name: str
    runs: list


@dataclass
class Comparison:
    """Everything the statistics need: methods with per-case Dice, in a fixed case and label order."""
    mode: str  # "label_folder" or "model_folders"
    methods: list
    labels: dict  # label key -> display name, in order
    cases: list
    notes: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- small helpers


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


def _some(items, k: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


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


def _to_float(value) -> float:
    return float("nan") if value is None else float(value)


def _label_key(label_or_region) -> str:
    """Key of a label (``"1"``) or region (``"(1, 2)"``), as nnU-Net's summary.json writes them."""
    if isinstance(label_or_region, (tuple, list)):
        return str(tuple(int(i) for i in label_or_region))
    return str(int(label_or_region))


def _label_names(dataset_json: dict | None) -> dict:
    """label key -> name from a dataset.json "labels" dict (``{"liver": 1}``, regions ``{"tumor": [1, 2]}``)."""
    names = {}
    for name, value in ((dataset_json or {}).get("labels") or {}).items():
        if name in ("background", "ignore"):
            continue
        try:
            if isinstance(value, (list, tuple)):
                value = int(value[0]) if len(value) == 1 else tuple(value)
            names.setdefault(_label_key(value), name)
        except (TypeError, ValueError, IndexError):
            continue
    return names


def _unique_names(folders: list) -> list:
    """Folder basenames, made unique by the shortest distinguishing path suffix (``run1/pred``)."""
    parts = [os.path.normpath(os.path.abspath(f)).split(os.sep) for f in folders]
    depth = [1] * len(folders)
    for _ in range(max(len(p) for p in parts)):
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            return names
        depth = [d + 1 if n in dup else d for n, d in zip(names, depth)]
    return ["/".join(p[-d:]) for p, d in zip(parts, depth)]


def _check_folder(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise CompareError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise CompareError(f"{what} {path} is not a folder")
    return os.path.normpath(os.path.abspath(path))


def _no_duplicates(folders: list, what: str) -> None:
    seen = {}
    for f in folders:
        if f in seen:
            raise CompareError(f"{what} {f} is given twice")
        seen[f] = True


def _check_baseline(baseline: str | None, names: list) -> None:
    if baseline is not None and baseline not in names:
        raise CompareError(f"-baseline {baseline} is not one of the methods ({', '.join(names)})")


def _check_case_sets(methods: list, reference_name: str, reference_cases: set, what: str = "cases") -> None:
    for m in methods:
        for run in m.runs:
            cases = set(run.dice)
            missing, extra = sorted(reference_cases - cases), sorted(cases - reference_cases)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} case(s) missing ({_some(missing)})")
                if extra:
                    parts.append(f"{len(extra)} extra ({_some(extra)})")
                where = f" ({run.source})" if run.source != m.name else ""
                raise CompareError(f"method {m.name}{where} has other {what} than {reference_name}: "
                                   f"{'; '.join(parts)}; every method must cover the same {what}")


def check_output_folder(out: str, overwrite: bool, reads: dict | None = None) -> str:
    """The output folder, checked: not inside or around what the comparison reads (``reads``:
    description -> paths), writable, and new, empty, or (``overwrite``) holding only the results of
    an earlier comparison (:mod:`nnunet_acnorm.outputs`)."""
    out = str(check_output(out, "-o", reads=reads))
    check_replaceable(out, "-o", overwrite, set(RESULT_FILES + ("comparison.md",)).__contains__,
                      f"the results nnUNetv2_acnorm_compare writes ({', '.join(RESULT_FILES)}, comparison.md)",
                      empty_ok=True)
    return out


# --------------------------------------------------------------------------- mode 1: prediction folders


def _find_dataset_json(label_folder: str, dataset_json: str | None) -> str:
    if dataset_json is not None:
        if not os.path.isfile(dataset_json):
            raise CompareError(f"-dj {dataset_json} does not exist")
        return dataset_json
    for folder in (label_folder, os.path.dirname(label_folder)):
        candidate = os.path.join(folder, "dataset.json")
        if os.path.isfile(candidate):
            return candidate
    raise CompareError(f"no dataset.json in {label_folder} or its parent folder; pass -dj with the dataset's "
                       "dataset.json (it gives the labels and the file ending)")


def _read_dataset_json(path: str) -> dict:
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(content, dict) or not isinstance(content.get("labels"), dict) or "file_ending" not in content:
        raise CompareError(f"{path} is not an nnU-Net dataset.json: it needs a \"labels\" dict and \"file_ending\"")
    return content


def _labels_to_evaluate(dataset_json: dict, path: str):
    """(labels or regions, ignore label) exactly as nnU-Net's trainer evaluates its validation."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
        regions = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    except Exception as e:  # nnU-Net asserts/raises on malformed label dicts
        raise CompareError(f"labels of {path} are not valid for nnU-Net: {e}") from None
    if lm.has_regions:
        regions = [tuple(int(i) for i in r) if isinstance(r, (tuple, list)) else int(r) for r in regions]
    else:
        regions = [int(r) for r in regions]
    if not regions:
        raise CompareError(f"{path} declares no foreground label")
    return regions, lm.ignore_label


def _defined_labels(dataset_json: dict) -> set:
    """Every label value ``dataset.json`` defines (background, labels, regions' members, ignore)."""
    defined = set()
    for value in dataset_json["labels"].values():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            try:
                defined.add(int(v))
            except (TypeError, ValueError):
                pass
    return defined


def _list_cases(folder: str, file_ending: str) -> dict:
    """case id -> file for the files of ``folder`` that end with ``file_ending``."""
    return {f[: -len(file_ending)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(file_ending) and os.path.isfile(os.path.join(folder, f))}


class _ShapeMismatch(Exception):
    pass


class _ReadFailure(Exception):
    pass


def _shape(shape: tuple) -> str:
    """"8x8x8" for nnU-Net's (1, 8, 8, 8) segmentation arrays (the channel axis dropped)."""
    return "x".join(str(i) for i in (shape[1:] if len(shape) > 1 and shape[0] == 1 else shape))


class _CheckedReader:
    """Wraps an nnU-Net reader for ``compute_metrics``: refuses a prediction whose array shape differs
    from its reference's (numpy would otherwise broadcast or fail obscurely) and names a file it cannot read."""

    def __init__(self, reader, defined: set | None = None):
        self.reader = reader
        self.defined = defined
        self.shapes = []

    def read_seg(self, file):
        try:
            seg, props = self.reader.read_seg(file)
        except Exception as e:
            raise _ReadFailure(f"cannot read {file}: {type(e).__name__}: {e}") from None
        undefined = sorted(set(np.unique(seg).tolist()) - self.defined) if self.defined is not None else []
        if undefined:
            raise _ReadFailure(f"{file} holds label(s) {_some([int(v) if float(v).is_integer() else v for v in undefined])} "
                               "that dataset.json does not define: it belongs to another dataset or was written wrong")
        self.shapes.append((file, tuple(seg.shape)))
        if len(self.shapes) == 2 and self.shapes[0][1] != self.shapes[1][1]:
            (ref, ref_shape), (pred, pred_shape) = self.shapes
            raise _ShapeMismatch(f"prediction {pred} has shape {_shape(pred_shape)}, its reference {ref} has shape "
                                 f"{_shape(ref_shape)}")
        return seg, props


def _evaluate_case(task):
    """Dice per label of one (reference, prediction) pair with nnU-Net's ``compute_metrics``.
    Returns (index, {key: Dice}, None) or (index, None, error message). Top-level: runs in worker processes."""
    index, reference, prediction, reader, regions, ignore_label, defined = task
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    try:
        result = compute_metrics(reference, prediction, _CheckedReader(reader, defined), regions, ignore_label)
    except (_ShapeMismatch, _ReadFailure) as e:
        return index, None, str(e)
    except Exception as e:
        return index, None, f"evaluating {prediction} against {reference} failed: {type(e).__name__}: {e}"
    return index, {_label_key(r): float(result["metrics"][r]["Dice"]) for r in regions}, None


def load_prediction_folders(reference: str, predictions: list, dataset_json: str | None = None,
                            names: list | None = None, num_processes: int = 1, progress: bool = True,
                            baseline: str | None = None) -> Comparison:
    """Evaluate prediction folders against a label folder (validation first, then the evaluation)."""
    reference = _check_folder(reference, "label folder")
    folders = [_check_folder(p, "prediction folder") for p in predictions]
    _no_duplicates(folders, "prediction folder")
    dj_path = _find_dataset_json(reference, dataset_json)
    dj = _read_dataset_json(dj_path)
    file_ending = dj["file_ending"]
    regions, ignore_label = _labels_to_evaluate(dj, dj_path)

    if names is None:
        names = _unique_names(folders)
    elif len(names) != len(folders):
        raise CompareError(f"-names gives {len(names)} name(s) for {len(folders)} prediction folder(s)")
    elif len(set(names)) != len(names):
        raise CompareError(f"-names are not unique: {_some(sorted({n for n in names if names.count(n) > 1}))}")
    _check_baseline(baseline, names)

    ref_cases = _list_cases(reference, file_ending)
    if not ref_cases:
        raise CompareError(f"label folder {reference} holds no {file_ending} files")
    pred_cases = []
    for name, folder in zip(names, folders):
        cases = _list_cases(folder, file_ending)
        if not cases:
            raise CompareError(f"prediction folder {folder} (method {name}) holds no {file_ending} files")
        no_ref = sorted(set(cases) - set(ref_cases))
        if no_ref:
            raise CompareError(f"method {name}: {len(no_ref)} prediction(s) without a reference in {reference} "
                               f"({_some(no_ref)})")
        pred_cases.append(cases)
    # every method must have the same cases (those of the first)
    methods = [Method(n, [Run(source=f, dice={c: None for c in cases})]) for n, f, cases in
               zip(names, folders, pred_cases)]
    first = set(pred_cases[0])
    _check_case_sets(methods, f"method {names[0]}", first)
    cases = sorted(first)

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    example = ref_cases[cases[0]]
    try:
        reader = determine_reader_writer_from_dataset_json(dj, example, verbose=False)()
    except Exception as e:
        raise CompareError(f"no nnU-Net reader for {file_ending} files can read {example}: {e}") from None

    defined = _defined_labels(dj)
    tasks = [((i, c), ref_cases[c], pc[c], reader, regions, ignore_label, defined)
             for i, pc in enumerate(pred_cases) for c in cases]
    results = _run_tasks(tasks, num_processes, progress)
    for (i, case), dice in results.items():
        methods[i].runs[0].dice[case] = dice

    notes = []
    if len(cases) < len(ref_cases):
        notes.append(f"{len(cases)} of the {len(ref_cases)} cases of the label folder have predictions (in every "
                     "method); only those are compared")
    names_by_key = _label_names(dj)
    labels = {_label_key(r): names_by_key.get(_label_key(r), _label_key(r)) for r in regions}
    return Comparison(mode="label_folder", methods=methods, labels=labels, cases=cases, notes=notes,
                      inputs={"reference": reference, "dataset_json": os.path.abspath(dj_path),
                              "prediction_folders": dict(zip(names, folders)), "file_ending": file_ending,
                              "reader": type(reader).__name__,
                              "ignore_label": ignore_label})


def _run_tasks(tasks: list, num_processes: int, progress: bool) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="evaluating", unit="case", file=sys.stderr,
               disable=not progress or len(tasks) < PROGRESS_FROM, leave=False)
    results = {}
    try:
        if num_processes > 1 and len(tasks) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
                for index, dice, error in pool.imap_unordered(_evaluate_case, tasks):
                    if error:
                        pool.terminate()
                        raise CompareError(error)
                    results[index] = dice
                    bar.update()
        else:
            for task in tasks:
                index, dice, error = _evaluate_case(task)
                if error:
                    raise CompareError(error)
                results[index] = dice
                bar.update()
    finally:
        bar.close()
    return results


# ------------------------------------------------------------------------------- mode 2: model folders


def _fold_folders(model_folder: str, folds: list | None) -> list:
    if folds is None:
        found = []
        for entry in os.listdir(model_folder):
            m = re.fullmatch(r"fold_(\d+)", entry)
            if m and os.path.isdir(os.path.join(model_folder, entry)):
                found.append((int(m.group(1)), entry))
        if not found:
            raise CompareError(f"{model_folder} has no fold_X folders; -m takes trained nnU-Net model folders "
                               "(.../DatasetXXX_Name/<trainer>__<plans>__<configuration>)")
        return [(str(k), os.path.join(model_folder, e)) for k, e in sorted(found)]
    out = []
    for f in folds:
        path = os.path.join(model_folder, f"fold_{f}")
        if not os.path.isdir(path):
            raise CompareError(f"{path} does not exist (-f {' '.join(folds)})")
        out.append((str(f), path))
    return out


def _val_command(model_folder: str, fold: str) -> str:
    from nnunet_acnorm.checkpoints.results_folder import split_model_folder_name

    parts = split_model_folder_name(os.path.basename(model_folder))
    dataset = os.path.basename(os.path.dirname(model_folder))
    m = re.match(r"Dataset(\d+)_", dataset)
    if parts:
        trainer, plans, configuration = parts
        return f"nnUNetv2_train {m.group(1) if m else dataset} {configuration} {fold} -tr {trainer} -p {plans} --val"
    return "nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS --val"


def _read_seed(fold_folder: str):
    path = os.path.join(fold_folder, "debug.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f).get("seed")
    except (OSError, ValueError, AttributeError) as e:
        raise CompareError(f"cannot read {path}: {e}") from None
    try:  # nnU-Net writes the trainer's attributes as strings: "seed": "3"
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _check_fold_weights(fold_folder: str) -> None:
    """A validation made by a model with NaN/infinite weights (or another trainer's checkpoint) is
    no result: refuse the fold when its checkpoint_final.pth, where it can be read (weights-only),
    says so."""
    from nnunet_acnorm.checkpoints.io import CheckpointReadError, safe_torch_load
    from nnunet_acnorm.nnunet.trained_checkpoints import check_trained_checkpoint, folder_trainer

    path = os.path.join(fold_folder, "checkpoint_final.pth")
    try:
        checkpoint = safe_torch_load(path)
    except CheckpointReadError:
        return  # deleted to save space, cut in a copy, not weights-only: the summary is what is compared
    check_trained_checkpoint(path, checkpoint, folder_trainer(path), "the name of its model folder")


def _strip_ending(file_name: str, file_ending: str | None) -> str:
    if file_ending and file_name.endswith(file_ending):
        return file_name[: -len(file_ending)]
    return file_name


def _model_dataset_json(model_folder: str) -> dict | None:
    """The dataset.json nnU-Net copies into a model folder (labels, file_ending), or None."""
    path = os.path.join(model_folder, "dataset.json")
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _read_model_folder(model_folder: str, folds: list | None, file_ending: str | None) -> tuple:
    """(Run with Dice per case and label, seeds found per fold); case ids are file names less ``file_ending``."""
    dice, seeds, fold_names, first_fold = {}, {}, [], {}
    for fold, fold_folder in _fold_folders(model_folder, folds):
        summary = os.path.join(fold_folder, "validation", "summary.json")
        if not os.path.isfile(summary):
            raise CompareError(f"{fold_folder} has no validation/summary.json (nnU-Net's cross-validation result); "
                               f"run `{_val_command(model_folder, fold)}` first")
        try:
            with open(summary) as f:
                content = json.load(f)
            per_case = content["metric_per_case"]
            for entry in per_case:
                file = entry.get("reference_file") or entry["prediction_file"]
                case = _strip_ending(os.path.basename(file), file_ending)
                if case in dice:
                    raise CompareError(f"case {case} is in both fold_{first_fold[case]} and fold_{fold} of "
                                       f"{model_folder}; pick disjoint folds with -f")
                dice[case] = {str(k): _to_float(v["Dice"]) for k, v in entry["metrics"].items()}
                first_fold[case] = fold
        except CompareError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CompareError(f"{summary} is not an nnU-Net summary.json (metric_per_case with reference_file and "
                               f"metrics {{label: {{\"Dice\": ...}}}}): {type(e).__name__}: {e}") from None
        _check_fold_weights(fold_folder)
        seeds[fold] = _read_seed(fold_folder)
        fold_names.append(fold)
    if not dice:
        raise CompareError(f"the validation summaries of {model_folder} hold no cases")
    return Run(source=model_folder, dice=dice, folds=fold_names), seeds


def load_model_folders(model_folders: list, folds: list | None = None, baseline: str | None = None) -> Comparison:
    """Read the cross-validation results of trained model folders; same basename = one method, runs over seeds."""
    folders = [_check_folder(p, "model folder") for p in model_folders]
    _no_duplicates(folders, "model folder")
    groups: dict = {}
    notes = []
    dataset_jsons = [dj for dj in (_model_dataset_json(f) for f in folders) if dj is not None]
    # one file ending for every folder, so that case ids agree even where a dataset.json is missing
    file_ending = next((dj["file_ending"] for dj in dataset_jsons if isinstance(dj.get("file_ending"), str)), None)
    for folder in folders:
        run, seeds = _read_model_folder(folder, folds, file_ending)
        groups.setdefault(os.path.basename(folder), []).append((run, seeds))
    methods = []
    for name, runs in groups.items():
        for run, seeds in runs:
            distinct = {s for s in seeds.values() if s is not None}
            if len(distinct) > 1:
                raise CompareError(f"the folds of {run.source} have different seeds in debug.json "
                                   f"({', '.join(f'fold_{k}: {v}' for k, v in seeds.items())}); one run has one seed")
            run.seed = distinct.pop() if distinct else None  # a fold without debug.json takes its run's seed
        if all(run.seed is not None for run, _ in runs):
            by_seed = {}
            for run, _ in runs:
                if run.seed in by_seed:
                    raise CompareError(f"two runs of {name} have seed {run.seed} (debug.json): {by_seed[run.seed]} and "
                                       f"{run.source}")
                by_seed[run.seed] = run.source
                run.seed_source = "debug.json"
        else:
            for k, (run, _) in enumerate(runs):
                run.seed, run.seed_source = k, "numbered"
            if len(runs) > 1:
                notes.append(f"{name}: no seed in the debug.json of every run; its {len(runs)} runs are numbered "
                             f"0..{len(runs) - 1} in the order given")
        methods.append(Method(name, [r for r, _ in runs]))
    _check_baseline(baseline, [m.name for m in methods])

    # same cases everywhere
    first_run = methods[0].runs[0]
    reference_cases = set(first_run.dice)
    _check_case_sets(methods, f"{methods[0].name} ({first_run.source})", reference_cases)
    cases = sorted(reference_cases)
    # same labels everywhere
    label_keys = list(first_run.dice[cases[0]])
    for m in methods:
        for run in m.runs:
            for case in cases:
                if set(run.dice[case]) != set(label_keys):
                    raise CompareError(f"case {case} of {run.source} has labels {sorted(run.dice[case])}, "
                                       f"{first_run.source} has {sorted(label_keys)}: not the same dataset")
    label_keys = sorted(label_keys, key=_label_sort_key)
    names_by_key = _label_names(dataset_jsons[0] if dataset_jsons else None)
    labels = {k: names_by_key.get(k, k) for k in label_keys}
    return Comparison(mode="model_folders", methods=methods, labels=labels, cases=cases, notes=notes,
                      inputs={"model_folders": folders,
                              "folds": folds if folds is not None else "every fold_X folder (numbered folds)"})


def _label_sort_key(key: str):
    numbers = [int(x) for x in re.findall(r"-?\d+", key)]
    return (0 if key.lstrip("-").isdigit() else 1, numbers, key)


# ------------------------------------------------------------------------------------------ statistics


def _per_run_arrays(method: Method, cases: list, labels: list) -> np.ndarray:
    """Dice as an array (runs, cases, labels)."""
    return np.array([[[_to_float(run.dice[c].get(k)) for k in labels] for c in cases] for run in method.runs],
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
    _check_baseline(baseline, names)
    cases, labels = comparison.cases, list(comparison.labels)
    unit, seeds, unit_note = choose_unit(comparison)

    per_method = {}
    for m in comparison.methods:
        arr = _per_run_arrays(m, cases, labels)  # runs x cases x labels
        run_case_mean = _nanmean(arr, axis=2)  # mean Dice of a case = mean over labels, NaN labels skipped
        case_labels = _nanmean(arr, axis=0)  # cases x labels, averaged over runs
        case_mean = _nanmean(run_case_mean, axis=0)  # cases, averaged over runs
        if unit == "seed":
            order = [next(i for i, r in enumerate(m.runs) if r.seed == s) for s in seeds]
            unit_ids = [str(s) for s in seeds]
            unit_mean = _nanmean(run_case_mean[order], axis=1)
            unit_labels = _nanmean(arr[order], axis=1)  # seeds x labels
        else:
            unit_ids, unit_mean, unit_labels = list(cases), case_mean, case_labels
        per_method[m.name] = {"unit_ids": unit_ids, "unit_mean": unit_mean, "unit_labels": unit_labels,
                              "case_mean": case_mean, "case_labels": case_labels, "arr": arr,
                              "run_case_mean": run_case_mean}

    base = per_method[baseline]
    methods_out = []
    for m in comparison.methods:
        pm = per_method[m.name]
        summary = {"mean_dice": {"units": _describe(pm["unit_mean"]), "cases": _describe(pm["case_mean"])},
                   "labels": {k: {"units": _describe(pm["unit_labels"][:, j]), "cases": _describe(pm["case_labels"][:, j])}
                              for j, k in enumerate(labels)}}
        entry = {
            "name": m.name,
            "is_baseline": m.name == baseline,
            "runs": [{"source": r.source, "seed": r.seed, "seed_source": r.seed_source, "folds": r.folds or None,
                      "mean_dice": _describe(pm["run_case_mean"][i])["mean"],
                      "dice_per_case": {c: {k: pm["arr"][i, ci, j] for j, k in enumerate(labels)}
                                        for ci, c in enumerate(cases)}}
                     for i, r in enumerate(m.runs)],
            "summary": summary,
            "per_unit": {u: {"mean_dice": pm["unit_mean"][i], "labels": dict(zip(labels, pm["unit_labels"][i]))}
                         for i, u in enumerate(pm["unit_ids"])},
            "per_case": {c: {"mean_dice": pm["case_mean"][i], "labels": dict(zip(labels, pm["case_labels"][i]))}
                         for i, c in enumerate(cases)},
            "vs_baseline": None,
        }
        if m.name != baseline:
            diff_mean = pm["unit_mean"] - base["unit_mean"]
            vs = {"mean_dice": paired_statistics(diff_mean), "labels": {}}
            vs["mean_dice"]["differences"] = dict(zip(pm["unit_ids"], diff_mean))
            for j, k in enumerate(labels):
                d = pm["unit_labels"][:, j] - base["unit_labels"][:, j]
                vs["labels"][k] = paired_statistics(d)
                vs["labels"][k]["differences"] = dict(zip(pm["unit_ids"], d))
            entry["vs_baseline"] = vs
        methods_out.append(entry)

    return _json_safe({
        "tool": "nnUNetv2_acnorm_compare",
        "mode": comparison.mode,
        "unit": unit,
        "unit_note": unit_note,
        "seeds": seeds,
        "baseline": baseline,
        "labels": [{"key": k, "name": comparison.labels[k]} for k in labels],
        "cases": cases,
        "settings": {
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
        },
        "methods": methods_out,
        "notes": comparison.notes,
        "inputs": comparison.inputs,
    })


# --------------------------------------------------------------------------------------------- output


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


# ------------------------------------------------------------------------------------------------ CLI
