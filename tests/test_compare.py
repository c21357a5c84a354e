"""nnUNetv2_acnorm_compare through its real console script: prediction folders against a label folder
(tiny label maps whose Dice is worked out by hand below), trained-model folders in nnU-Net's format
(fold_X/validation/summary.json, fold_X/debug.json) with runs over seeds in two nnUNet_results roots, a
summary.json written by nnU-Net's own evaluation, and the bad inputs that must stop with one line.

Label maps (8x8x8, z-slices of 64 voxels): reference label 1 (liver) = z 0-3 (256 voxels), label 2
(spleen) = z 4-7, y 0-3 (128 voxels), background = z 4-7, y 4-7 (128 voxels); case_003 has no spleen.
Dice = 2 TP / (2 TP + FP + FN):

    case      A: liver, spleen           B: liver, spleen               A mean  B mean  B - A
    case_000  1, 2/3 (spleen z 4-5)      1, 1                           5/6     1       1/6
    case_001  2/3 (liver z 0-1), 1       6/7 (liver z 0-2), 1           5/6     13/14   2/21
    case_002  1, 1                       4/5 (liver + 128 bg voxels), 1 1       9/10    -1/10
    case_003  1, NaN (no spleen at all)  1, 0 (64 bg voxels spleen)     1       1/2     -1/2

NaN: a label absent in both reference and prediction (nnU-Net gives NaN) is skipped in the means.
"""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.factories.nnunet import run_console

pytestmark = pytest.mark.integration
SCRIPT = "nnUNetv2_acnorm_compare"
SHAPE = (8, 8, 8)
CASES = ["case_000", "case_001", "case_002", "case_003"]
NAN = float("nan")
DICE_A = {"case_000": (1.0, 2 / 3), "case_001": (2 / 3, 1.0), "case_002": (1.0, 1.0), "case_003": (1.0, NAN)}
DICE_B = {"case_000": (1.0, 1.0), "case_001": (6 / 7, 1.0), "case_002": (4 / 5, 1.0), "case_003": (1.0, 0.0)}
MEAN_A = [5 / 6, 5 / 6, 1.0, 1.0]
MEAN_B = [1.0, 13 / 14, 9 / 10, 1 / 2]
DIFF_BA = [1 / 6, 2 / 21, -1 / 10, -1 / 2]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_def_n_proc="1", PYTHONUNBUFFERED="1")


def _write(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def _reference(case: str) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[0:4] = 1
    if case != "case_003":
        seg[4:8, 0:4] = 2
    return seg


def _prediction_a(case: str) -> np.ndarray:
    seg = _reference(case)
    if case == "case_000":
        seg[6:8, 0:4] = 0  # spleen only z 4-5: TP 64, FN 64 -> 2/3
    if case == "case_001":
        seg[2:4] = 0  # liver only z 0-1: TP 128, FN 128 -> 2/3
    return seg


def _prediction_b(case: str) -> np.ndarray:
    seg = _reference(case)
    if case == "case_001":
        seg[3] = 0  # liver z 0-2: TP 192, FN 64 -> 384/448 = 6/7
    if case == "case_002":
        seg[4:8, 4:8] = 1  # liver + 128 background voxels: TP 256, FP 128 -> 512/640 = 4/5
    if case == "case_003":
        seg[4:6, 4:8] = 2  # 64 background voxels as spleen, where there is none: TP 0, FP 64 -> Dice 0
    return seg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    dataset = base / "Dataset901_Tiny"
    labels = dataset / "labelsTr"
    for case in CASES:
        _write(labels / f"{case}.nii.gz", _reference(case))
        _write(base / "a" / "pred" / f"{case}.nii.gz", _prediction_a(case))
        _write(base / "b" / "pred" / f"{case}.nii.gz", _prediction_b(case))
        _write(base / "C" / f"{case}.nii.gz", _prediction_a(case))  # the same as A
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": len(CASES), "file_ending": ".nii.gz"}))
    (base / "a" / "pred" / "dataset.json").write_text("{}")  # nnUNetv2_predict writes such files: not cases
    return {"base": base, "labels": labels, "dataset_json": dataset / "dataset.json",
            "a": base / "a" / "pred", "b": base / "b" / "pred", "c": base / "C"}


def _assert_one_error_line(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{SCRIPT}: error: "), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _method(result, name):
    return next(m for m in result["methods"] if m["name"] == name)


def test_hand_made_dice_and_paired_statistics(folders, tmp_path):
    from scipy import stats

    out = tmp_path / "out"
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], folders["b"], folders["c"],
                       "-o", out, "-np", "2", env=_env())
    result = json.loads((out / "comparison.json").read_text())
    assert set(result) == {"tool", "mode", "unit", "unit_note", "seeds", "baseline", "labels", "cases", "settings",
                           "methods", "notes", "inputs"}
    assert result["mode"] == "label_folder" and result["unit"] == "case" and result["seeds"] is None
    assert result["cases"] == CASES
    assert result["labels"] == [{"key": "1", "name": "liver"}, {"key": "2", "name": "spleen"}]
    # names: folder basenames made unique by their parents; baseline = the first
    assert [m["name"] for m in result["methods"]] == ["a/pred", "b/pred", "C"]
    assert result["baseline"] == "a/pred"
    assert result["inputs"]["reader"] == "SimpleITKIO" and result["inputs"]["file_ending"] == ".nii.gz"
    assert proc.stderr.strip() == ""  # tidy: no warnings, no progress bar for a few cases

    for name, dice, means in (("a/pred", DICE_A, MEAN_A), ("b/pred", DICE_B, MEAN_B)):
        m = _method(result, name)
        for case in CASES:
            for key, expected in zip(("1", "2"), dice[case]):
                got = m["per_case"][case]["labels"][key]
                assert (got is None) if math.isnan(expected) else got == pytest.approx(expected, abs=1e-12)
        assert [m["per_case"][c]["mean_dice"] for c in CASES] == pytest.approx(means, abs=1e-12)
        s = m["summary"]
        assert s["mean_dice"]["units"]["n"] == 4
        assert s["mean_dice"]["units"]["mean"] == pytest.approx(np.mean(means), abs=1e-12)
        assert s["mean_dice"]["units"]["sd"] == pytest.approx(np.std(means, ddof=1), abs=1e-12)
        assert s["mean_dice"]["cases"] == s["mean_dice"]["units"]  # unit = case
        spleen = [dice[c][1] for c in CASES if not math.isnan(dice[c][1])]
        assert s["labels"]["2"]["units"]["n"] == len(spleen)
        assert s["labels"]["2"]["units"]["mean"] == pytest.approx(np.mean(spleen), abs=1e-12)
    assert _method(result, "a/pred")["summary"]["labels"]["2"]["units"]["mean"] == pytest.approx(8 / 9)  # NaN skipped

    vs = _method(result, "b/pred")["vs_baseline"]["mean_dice"]
    assert vs["n"] == 4 and (vs["wins"], vs["ties"], vs["losses"]) == (2, 0, 2)
    assert vs["mean_difference"] == pytest.approx(np.mean(DIFF_BA), abs=1e-12)
    assert [vs["differences"][c] for c in CASES] == pytest.approx(DIFF_BA, abs=1e-12)
    assert vs["ci_method"] == "BCa"
    assert min(DIFF_BA) - 1e-12 <= vs["ci_low"] <= vs["mean_difference"] <= vs["ci_high"] <= max(DIFF_BA) + 1e-12
    assert vs["ci_low"] < vs["ci_high"]
    assert vs["wilcoxon_p"] == pytest.approx(stats.wilcoxon(DIFF_BA).pvalue, abs=1e-12)
    # per label, e.g. the liver differences (0, 4/21, -1/5, 0), against scipy as well
    liver = _method(result, "b/pred")["vs_baseline"]["labels"]["1"]
    liver_d = [DICE_B[c][0] - DICE_A[c][0] for c in CASES]
    assert liver["n"] == 4 and (liver["wins"], liver["ties"], liver["losses"]) == (1, 2, 1)
    assert liver["wilcoxon_p"] == pytest.approx(stats.wilcoxon(liver_d).pvalue, abs=1e-12)
    spleen = _method(result, "b/pred")["vs_baseline"]["labels"]["2"]
    assert spleen["n"] == 3  # case_003: NaN in A, dropped from the pairs

    same = _method(result, "C")["vs_baseline"]["mean_dice"]  # identical to the baseline
    assert same["mean_difference"] == 0 and (same["wins"], same["ties"], same["losses"]) == (0, 4, 0)
    assert same["ci_low"] == same["ci_high"] == 0 and same["ci_method"] == "percentile (all differences equal)"
    assert same["wilcoxon_p"] is None and "all differences are 0" in same["wilcoxon_note"]
    assert _method(result, "a/pred")["vs_baseline"] is None

    # the printed table
    out_lines = proc.stdout.splitlines()
    assert any("Unit of pairing: case" in line for line in out_lines)
    header = next(line for line in out_lines if line.startswith("| method"))
    assert "n (cases)" in header and "liver" in header and "spleen" in header and "Δ mean Dice vs a/pred" in header
    row_b = next(line for line in out_lines if line.startswith("| b/pred "))
    assert f"{np.mean(MEAN_B):.4f} ± {np.std(MEAN_B, ddof=1):.4f}" in row_b
    assert f"{np.mean(DIFF_BA):+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}]" in row_b
    assert f"{vs['wilcoxon_p']:.3g}" in row_b and "2/0/2" in row_b
    row_c = next(line for line in out_lines if line.startswith("| C "))
    assert "n/a (all differences are 0)" in row_c
    assert next(line for line in out_lines if line.startswith("| a/pred (baseline)"))

    # CSV: one row per method and label (mean first), the same numbers
    import csv

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["method"], r["label_key"]) for r in rows] == [(n, k) for n in ("a/pred", "b/pred", "C")
                                                              for k in ("mean", "1", "2")]
    b_mean = next(r for r in rows if r["method"] == "b/pred" and r["label_key"] == "mean")
    assert float(b_mean["mean_difference"]) == pytest.approx(np.mean(DIFF_BA), abs=1e-12)
    assert float(b_mean["wilcoxon_p"]) == pytest.approx(vs["wilcoxon_p"]) and b_mean["unit"] == "case"
    png = (out / "paired_differences.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # the report as printed, also as markdown
    report = (out / "comparison.md").read_text()
    assert next(line for line in out_lines if line.startswith("| a/pred (baseline)")) in report
    assert "Unit of pairing: " in report


def test_names_baseline_and_dataset_json_flag(folders, tmp_path):
    """-names, -baseline and -dj (the label folder copied where no dataset.json is found)."""
    labels = tmp_path / "labels_only"
    shutil.copytree(folders["labels"], labels)
    proc = run_console(SCRIPT, "-ref", labels, "-pred", folders["a"], folders["b"], "-names", "vanilla", "acnorm",
                       "-baseline", "acnorm", "-dj", folders["dataset_json"], "-o", tmp_path / "out", "-np", "1",
                       env=_env())
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert result["baseline"] == "acnorm" and [m["name"] for m in result["methods"]] == ["vanilla", "acnorm"]
    vs = _method(result, "vanilla")["vs_baseline"]["mean_dice"]
    assert vs["mean_difference"] == pytest.approx(-np.mean(DIFF_BA), abs=1e-12)
    assert (vs["wins"], vs["losses"]) == (2, 2)
    assert "| acnorm (baseline) |" in proc.stdout

    proc = run_console(SCRIPT, "-ref", labels, "-pred", folders["a"], "-o", tmp_path / "out2", env=_env(), check=False)
    _assert_one_error_line(proc, "no dataset.json", "-dj")
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------- model folders


def _summary_json(per_case: dict, reference_folder: str, prediction_folder: str) -> dict:
    """nnU-Net 2.8's validation/summary.json (compute_metrics_on_folder + save_summary_json): metric_per_case
    with reference_file, prediction_file and metrics {label: {Dice, FN, FP, IoU, TN, TP, n_pred, n_ref}},
    per-label nanmeans in "mean", their mean in "foreground_mean"."""
    entries = []
    for case, dice in per_case.items():
        metrics = {}
        for label, d in dice.items():
            # any counts consistent with the Dice: TP = d * 50, FP = FN = (1 - d) * 50 ... Dice = 2TP/(2TP+FP+FN)
            if math.isnan(d):
                metrics[label] = {"Dice": NAN, "FN": 0, "FP": 0, "IoU": NAN, "TN": 512, "TP": 0, "n_pred": 0,
                                  "n_ref": 0}
            else:
                tp, fp, fn = 100 * d, 100 * (1 - d), 100 * (1 - d)
                metrics[label] = {"Dice": d, "FN": fn, "FP": fp, "IoU": tp / (tp + fp + fn), "TN": 512 - tp - fp - fn,
                                  "TP": tp, "n_pred": tp + fp, "n_ref": tp + fn}
        entries.append({"metrics": metrics, "prediction_file": f"{prediction_folder}/{case}.nii.gz",
                        "reference_file": f"{reference_folder}/{case}.nii.gz"})
    labels = sorted({k for e in entries for k in e["metrics"]})
    mean = {k: {"Dice": float(np.nanmean([e["metrics"][k]["Dice"] for e in entries]))} for k in labels}
    return {"foreground_mean": {"Dice": float(np.mean([mean[k]["Dice"] for k in labels]))}, "mean": mean,
            "metric_per_case": entries}


def _model_folder(root: Path, name: str, dice: dict, seed, folds=((0, CASES[:2]), (1, CASES[2:]))) -> Path:
    """A trained model folder (as nnUNetv2_train leaves it) in nnUNet_results root ``root``."""
    folder = root / "Dataset901_Tiny" / name
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2},
                                                     "file_ending": ".nii.gz", "numTraining": 4}))
    (folder / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    for fold, cases in folds:
        fold_folder = folder / f"fold_{fold}"
        (fold_folder / "validation").mkdir(parents=True)
        debug = {"batch_size": "2", "device": "cpu", "fold": str(fold), "num_epochs": "250",
                 "was_initialized": "True", "torch_version": "2.5.1", "cudnn_version": "None"}
        if seed is not None:
            debug["seed"] = str(seed)  # nnU-Net writes the trainer's attributes with str()
        with open(fold_folder / "debug.json", "w") as f:
            json.dump(debug, f, sort_keys=True, indent=4)
        summary = _summary_json({c: dice[c] for c in cases}, "/data/nnUNet_preprocessed/Dataset901_Tiny/"
                                "gt_segmentations", str(fold_folder / "validation"))
        with open(fold_folder / "validation" / "summary.json", "w") as f:
            json.dump(summary, f, sort_keys=True, indent=4)  # NaN written as NaN, as nnU-Net's save_json does
        (fold_folder / "checkpoint_final.pth").write_bytes(b"")
    return folder


def _dice(values: list) -> dict:
    """case -> {"1": liver, "2": spleen} from a list of (liver, spleen) in CASES order."""
    return {c: {"1": v[0], "2": v[1]} for c, v in zip(CASES, values)}


FT = "nnUNetTrainerFinetune__nnUNetPlans__3d_fullres"
AC = "nnUNetTrainerACNorm__nnUNetPlans__3d_fullres"
# per run: (liver, spleen) per case; case means in the comments
FT_SEED0 = [(0.8, 0.6), (0.7, 0.7), (0.9, 0.5), (0.6, 0.8)]  # 0.7 each -> 0.70
FT_SEED1 = [(0.5, 0.7), (0.6, 0.6), (0.7, 0.5), (0.6, NAN)]  # 0.6, 0.6, 0.6, 0.6 -> 0.60
AC_SEED0 = [(0.9, 0.7), (0.8, 0.8), (0.9, 0.9), (0.7, 0.7)]  # 0.8, 0.8, 0.9, 0.7 -> 0.80
AC_SEED1 = [(0.6, 0.6), (0.7, 0.7), (0.5, 0.9), (0.8, 0.6)]  # 0.6, 0.7, 0.7, 0.7 -> 0.675


def test_model_folders_runs_over_seeds_in_two_results_roots(tmp_path):
    from scipy import stats

    r1, r2 = tmp_path / "results_1", tmp_path / "results_2"
    ft1 = _model_folder(r1, FT, _dice(FT_SEED1), seed=1)
    ft0 = _model_folder(r2, FT, _dice(FT_SEED0), seed=0)
    ac0 = _model_folder(r1, AC, _dice(AC_SEED0), seed=0)
    ac1 = _model_folder(r2, AC, _dice(AC_SEED1), seed=1)
    out = tmp_path / "out"
    proc = run_console(SCRIPT, "-m", ft1, ac0, ft0, ac1, "-o", out, env=_env())
    result = json.loads((out / "comparison.json").read_text())
    assert result["mode"] == "model_folders" and result["unit"] == "seed" and result["seeds"] == [0, 1]
    assert [m["name"] for m in result["methods"]] == [FT, AC] and result["baseline"] == FT
    assert result["labels"] == [{"key": "1", "name": "liver"}, {"key": "2", "name": "spleen"}]
    assert result["cases"] == CASES
    ft, ac = _method(result, FT), _method(result, AC)
    assert [(r["seed"], r["seed_source"], r["folds"]) for r in ft["runs"]] == [(1, "debug.json", ["0", "1"]),
                                                                               (0, "debug.json", ["0", "1"])]
    # per seed: the run's mean over cases of the case means (NaN spleen of case_003 skipped: 0.6)
    assert ft["per_unit"]["0"]["mean_dice"] == pytest.approx(0.70)
    assert ft["per_unit"]["1"]["mean_dice"] == pytest.approx(0.60)
    assert ac["per_unit"]["0"]["mean_dice"] == pytest.approx(0.80)
    assert ac["per_unit"]["1"]["mean_dice"] == pytest.approx(0.675)
    assert ft["per_unit"]["1"]["labels"]["2"] == pytest.approx(np.mean([0.7, 0.6, 0.5]))
    assert ac["summary"]["mean_dice"]["units"]["mean"] == pytest.approx((0.8 + 0.675) / 2)
    assert ac["summary"]["mean_dice"]["units"]["sd"] == pytest.approx(np.std([0.8, 0.675], ddof=1))
    # over cases: each case averaged over the two seeds
    ac_cases = [(0.8 + 0.6) / 2, (0.8 + 0.7) / 2, (0.9 + 0.7) / 2, (0.7 + 0.7) / 2]
    assert [ac["per_case"][c]["mean_dice"] for c in CASES] == pytest.approx(ac_cases)
    assert ac["summary"]["mean_dice"]["cases"]["n"] == 4
    assert ac["summary"]["mean_dice"]["cases"]["mean"] == pytest.approx(np.mean(ac_cases))

    vs = ac["vs_baseline"]["mean_dice"]
    diffs = [0.80 - 0.70, 0.675 - 0.60]
    assert vs["n"] == 2 and vs["differences"] == {"0": pytest.approx(diffs[0]), "1": pytest.approx(diffs[1])}
    assert vs["mean_difference"] == pytest.approx(np.mean(diffs)) and (vs["wins"], vs["ties"], vs["losses"]) == (2, 0, 0)
    assert min(diffs) - 1e-12 <= vs["ci_low"] <= vs["mean_difference"] <= vs["ci_high"] <= max(diffs) + 1e-12
    assert vs["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert "Unit of pairing: seed" in proc.stdout and "n (seeds)" in proc.stdout
    assert "mean Dice ± sd over cases" in proc.stdout  # with seeds as the unit, the case statistics too


def test_model_folders_without_seeds_pair_by_case(tmp_path):
    """No seed in debug.json: runs numbered in the order given (and said so); seed sets differ -> unit case,
    a method's runs averaged per case; -f picks folds."""
    one_fold = ((0, CASES),)
    ft_a = _model_folder(tmp_path / "r1", FT, _dice(FT_SEED0), seed=None, folds=one_fold)
    ft_b = _model_folder(tmp_path / "r2", FT, _dice(FT_SEED1), seed=None, folds=one_fold)
    ac = _model_folder(tmp_path / "r3", AC, _dice(AC_SEED0), seed=None, folds=one_fold)
    out = tmp_path / "out"
    proc = run_console(SCRIPT, "-m", ac, ft_a, ft_b, "-o", out, "-f", "0", "-baseline", FT, env=_env())
    result = json.loads((out / "comparison.json").read_text())
    assert result["unit"] == "case" and result["baseline"] == FT
    ft = _method(result, FT)
    assert [(r["seed"], r["seed_source"]) for r in ft["runs"]] == [(0, "numbered"), (1, "numbered")]
    assert any("numbered" in n and FT in n for n in result["notes"]) and "numbered 0..1 in the order given" in proc.stdout
    ft_cases = [(0.7 + 0.6) / 2] * 4
    assert [ft["per_case"][c]["mean_dice"] for c in CASES] == pytest.approx(ft_cases)
    vs = _method(result, AC)["vs_baseline"]["mean_dice"]
    diffs = [0.8 - 0.65, 0.8 - 0.65, 0.9 - 0.65, 0.7 - 0.65]
    assert vs["n"] == 4 and vs["mean_difference"] == pytest.approx(np.mean(diffs))
    assert min(diffs) - 1e-12 <= vs["ci_low"] <= vs["mean_difference"] <= vs["ci_high"] <= max(diffs) + 1e-12
    assert "Unit of pairing: case" in proc.stdout


def test_model_folder_mode_reads_nnunets_own_summary_like_label_mode(folders, tmp_path):
    """A summary.json written by nnU-Net's compute_metrics_on_folder (as nnUNetv2_train --val does) gives
    the same per-case Dice in -m mode as the label-folder mode computes."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    model = tmp_path / "results" / "Dataset901_Tiny" / AC
    validation = model / "fold_0" / "validation"
    validation.mkdir(parents=True)
    for case in CASES:
        shutil.copy(folders["b"] / f"{case}.nii.gz", validation / f"{case}.nii.gz")
    compute_metrics_on_folder(str(folders["labels"]), str(validation), str(validation / "summary.json"), SimpleITKIO(),
                              ".nii.gz", [1, 2], None, num_processes=1)
    shutil.copy(folders["dataset_json"], model / "dataset.json")
    run_console(SCRIPT, "-m", model, "-o", tmp_path / "out", env=_env())
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    m = result["methods"][0]
    assert result["cases"] == CASES and m["vs_baseline"] is None
    assert [m["per_case"][c]["mean_dice"] for c in CASES] == pytest.approx(MEAN_B, abs=1e-12)
    assert m["per_case"]["case_001"]["labels"]["1"] == pytest.approx(6 / 7)


# ------------------------------------------------------------------------------------------- bad input


def test_mismatched_case_sets_are_refused(folders, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(folders["b"], short)
    (short / "case_003.nii.gz").unlink()
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], short, "-o", tmp_path / "out",
                       env=_env(), check=False)
    _assert_one_error_line(proc, "method short", "1 case(s) missing", "case_003")
    assert not (tmp_path / "out").exists()

    r = tmp_path / "models"
    ft = _model_folder(r / "r1", FT, _dice(FT_SEED0), seed=0)
    ac = _model_folder(r / "r1", AC, _dice(AC_SEED0), seed=0, folds=((0, CASES[:2]),))
    proc = run_console(SCRIPT, "-m", ft, ac, "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, f"method {AC}", "2 case(s) missing", "case_002", "case_003")
    assert not (tmp_path / "out").exists()


def test_missing_and_empty_folders_are_refused(folders, tmp_path):
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], tmp_path / "nowhere",
                       "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, "prediction folder", "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], tmp_path / "empty",
                       "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, "empty", "holds no .nii.gz files")
    proc = run_console(SCRIPT, "-m", tmp_path / "nowhere", "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, "model folder", "does not exist")
    assert not (tmp_path / "out").exists()


def test_fold_without_validation_summary_says_how_to_get_it(tmp_path):
    model = _model_folder(tmp_path / "results", AC, _dice(AC_SEED0), seed=0)
    (model / "fold_1" / "validation" / "summary.json").unlink()
    proc = run_console(SCRIPT, "-m", model, "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, str(model / "fold_1"), "no validation/summary.json",
                           "nnUNetv2_train 901 3d_fullres 1 -tr nnUNetTrainerACNorm -p nnUNetPlans --val")
    assert not (tmp_path / "out").exists()


def test_prediction_of_another_shape_is_refused(folders, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(folders["b"], wrong)
    _write(wrong / "case_002.nii.gz", np.zeros((8, 8, 9), dtype=np.uint8))
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], wrong, "-o", tmp_path / "out",
                       "-np", "1", env=_env(), check=False)
    _assert_one_error_line(proc, str(wrong / "case_002.nii.gz"), "shape 8x8x9", "shape 8x8x8")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(folders, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "comparison.json").write_text("{\"old\": true}")
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], folders["b"], "-o", out,
                       env=_env(), check=False)
    _assert_one_error_line(proc, str(out), "not empty", "--overwrite")
    assert (out / "comparison.json").read_text() == "{\"old\": true}" and sorted(os.listdir(out)) == [
        "comparison.json", "keep.txt"]
    # --overwrite replaces only the results of a comparison: a folder holding anything else is refused
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], folders["b"], "-o", out,
                       "--overwrite", env=_env(), check=False)
    _assert_one_error_line(proc, str(out), "keep.txt", "nothing was replaced")
    assert sorted(os.listdir(out)) == ["comparison.json", "keep.txt"]
    (out / "keep.txt").unlink()
    run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], folders["b"], "-o", out, "--overwrite",
                env=_env())
    assert json.loads((out / "comparison.json").read_text())["baseline"] == "a/pred"
    assert sorted(os.listdir(out)) == ["comparison.csv", "comparison.json", "comparison.md", "paired_differences.png"]
    assert not [p for p in out.parent.iterdir() if ".acnorm-" in p.name]


def test_unknown_baseline_is_refused(folders, tmp_path):
    proc = run_console(SCRIPT, "-ref", folders["labels"], "-pred", folders["a"], folders["b"], "-baseline", "nope",
                       "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, "-baseline nope is not one of the methods", "a/pred", "b/pred")
    model = _model_folder(tmp_path / "results", AC, _dice(AC_SEED0), seed=0)
    proc = run_console(SCRIPT, "-m", model, "-baseline", "nope", "-o", tmp_path / "out", env=_env(), check=False)
    _assert_one_error_line(proc, "-baseline nope", AC)
    assert not (tmp_path / "out").exists()
