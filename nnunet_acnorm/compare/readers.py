"""The two inputs of a comparison, read into a :class:`~nnunet_acnorm.compare.data.Comparison`:
prediction folders evaluated against a label folder with nnU-Net's own evaluation code
(:func:`load_prediction_folders`), and the cross-validation summaries nnU-Net wrote into trained model
folders (:func:`load_model_folders`). Every input is checked before anything is evaluated or written."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from nnunet_acnorm.compare.data import (CompareError, Comparison, Method, Run, check_baseline, label_key, some,
                                        to_float)
from nnunet_acnorm.inputs import read_json_object

#: show a progress bar from this many evaluations on
PROGRESS_FROM = 50


def _label_names(dataset_json: dict | None) -> dict:
    """label key -> name from a dataset.json "labels" dict (``{"liver": 1}``, regions ``{"tumor": [1, 2]}``)."""
    names = {}
    for name, value in ((dataset_json or {}).get("labels") or {}).items():
        if name in ("background", "ignore"):
            continue
        try:
            if isinstance(value, (list, tuple)):
                value = int(value[0]) if len(value) == 1 else tuple(value)
            names.setdefault(label_key(value), name)
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


def _check_case_sets(methods: list, reference_name: str, reference_cases: set, what: str = "cases") -> None:
    for m in methods:
        for run in m.runs:
            cases = set(run.dice)
            missing, extra = sorted(reference_cases - cases), sorted(cases - reference_cases)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} case(s) missing ({some(missing)})")
                if extra:
                    parts.append(f"{len(extra)} extra ({some(extra)})")
                where = f" ({run.source})" if run.source != m.name else ""
                raise CompareError(f"method {m.name}{where} has other {what} than {reference_name}: "
                                   f"{'; '.join(parts)}; every method must cover the same {what}")


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
    content = read_json_object(path, CompareError)
    if not isinstance(content.get("labels"), dict) or "file_ending" not in content:
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
            raise _ReadFailure(f"{file} holds label(s) {some([int(v) if float(v).is_integer() else v for v in undefined])} "
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
    return index, {label_key(r): float(result["metrics"][r]["Dice"]) for r in regions}, None


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
    names = _method_names(names, folders)
    check_baseline(baseline, names)
    ref_cases, pred_cases = _prediction_cases(reference, folders, names, file_ending)
    # every method must have the same cases (those of the first)
    methods = [Method(n, [Run(source=f, dice={c: None for c in cases})]) for n, f, cases in
               zip(names, folders, pred_cases)]
    first = set(pred_cases[0])
    _check_case_sets(methods, f"method {names[0]}", first)
    cases = sorted(first)
    reader = _reader(dj, ref_cases[cases[0]], file_ending)
    defined = _defined_labels(dj)
    tasks = [((i, c), ref_cases[c], pc[c], reader, regions, ignore_label, defined)
             for i, pc in enumerate(pred_cases) for c in cases]
    for (i, case), dice in _run_tasks(tasks, num_processes, progress).items():
        methods[i].runs[0].dice[case] = dice

    notes = []
    if len(cases) < len(ref_cases):
        notes.append(f"{len(cases)} of the {len(ref_cases)} cases of the label folder have predictions (in every "
                     "method); only those are compared")
    names_by_key = _label_names(dj)
    labels = {label_key(r): names_by_key.get(label_key(r), label_key(r)) for r in regions}
    return Comparison(mode="label_folder", methods=methods, labels=labels, cases=cases, notes=notes,
                      inputs={"reference": reference, "dataset_json": os.path.abspath(dj_path),
                              "prediction_folders": dict(zip(names, folders)), "file_ending": file_ending,
                              "reader": type(reader).__name__,
                              "ignore_label": ignore_label})


def _method_names(names: list | None, folders: list) -> list:
    """The names of the prediction folders' methods: ``-names``, checked, or the folder names."""
    if names is None:
        return _unique_names(folders)
    if len(names) != len(folders):
        raise CompareError(f"-names gives {len(names)} name(s) for {len(folders)} prediction folder(s)")
    if len(set(names)) != len(names):
        raise CompareError(f"-names are not unique: {some(sorted({n for n in names if names.count(n) > 1}))}")
    return names


def _prediction_cases(reference: str, folders: list, names: list, file_ending: str) -> tuple[dict, list]:
    """(case id -> label file, [case id -> prediction file per folder]); every prediction has a label."""
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
                               f"({some(no_ref)})")
        pred_cases.append(cases)
    return ref_cases, pred_cases


def _reader(dataset_json: dict, example: str, file_ending: str):
    """nnU-Net's reader for the dataset's files (as its evaluation picks it)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    try:
        return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)()
    except Exception as e:
        raise CompareError(f"no nnU-Net reader for {file_ending} files can read {example}: {e}") from None


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
                dice[case] = {str(k): to_float(v["Dice"]) for k, v in entry["metrics"].items()}
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
    check_baseline(baseline, [m.name for m in methods])

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
