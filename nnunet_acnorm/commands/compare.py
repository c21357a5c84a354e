"""``nnUNetv2_acnorm_compare``: compare segmentation methods by Dice, with paired statistics
(:mod:`nnunet_acnorm.compare`; see docs/compare.md).

    nnUNetv2_acnorm_compare -ref LABEL_FOLDER -pred FOLDER_A FOLDER_B ... -o OUT
                            [-dj dataset.json] [-names A B ...] [-baseline NAME] [-np N] [--overwrite]
    nnUNetv2_acnorm_compare -m MODEL_FOLDER [MODEL_FOLDER ...] -o OUT [-baseline NAME] [-f FOLDS] [--overwrite]
"""
from __future__ import annotations

import argparse

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.compare import (CompareError, check_output_folder, compute_statistics, load_model_folders,
                                   load_prediction_folders, report_text, write_results)

PROG = "nnUNetv2_acnorm_compare"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compare segmentation methods by Dice with paired statistics against a baseline. Either "
                    "prediction folders against a label folder (-ref/-pred), or trained nnU-Net model folders (-m; "
                    "their fold_X/validation/summary.json; folders with the same name are runs of one method over "
                    "seeds). Writes comparison.csv, comparison.json and paired_differences.png to -o.")
    p.add_argument("-ref", dest="reference", help="label folder (reference segmentations)")
    p.add_argument("-pred", dest="predictions", nargs="+", help="prediction folders, one per method")
    p.add_argument("-m", dest="models", nargs="+",
                   help="trained model folders .../DatasetXXX_Name/<trainer>__<plans>__<configuration>")
    p.add_argument("-o", dest="output", required=True,
                   help="output folder: new or empty, or with --overwrite one holding only the results of an earlier "
                        "comparison; never inside the folders compared")
    p.add_argument("-dj", dest="dataset_json", default=None,
                   help="dataset.json with the labels and file_ending (default: the label folder's or its parent's)")
    p.add_argument("-names", nargs="+", default=None, help="method names for -pred (default: the folder names)")
    p.add_argument("-baseline", default=None, help="method compared against (default: the first)")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for the evaluation of -pred (default: nnU-Net's default_num_processes)")
    p.add_argument("-f", dest="folds", nargs="+", default=None,
                   help="folds of -m model folders, e.g. 0 1 2 3 4 or all (default: every fold_N folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier comparison in -o (atomically; nothing else is replaced)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def run_compare(args) -> dict:
    """Validate, load, compute, write; raises CompareError for bad input (nothing written before)."""
    if args.models and (args.reference or args.predictions):
        raise CompareError("-m cannot be combined with -ref/-pred: compare model folders or prediction folders")
    if not args.models:
        if not args.reference or not args.predictions:
            raise CompareError("pass -ref LABEL_FOLDER -pred FOLDER [FOLDER ...], or -m MODEL_FOLDER [...]")
        if args.folds is not None:
            raise CompareError("-f (folds) is for -m model folders")
    else:
        for flag, value in (("-dj", args.dataset_json), ("-names", args.names), ("-np", args.num_processes)):
            if value is not None:
                raise CompareError(f"{flag} is only for -ref/-pred (with -m the method names are the folder names)")
    if args.num_processes is not None and args.num_processes < 1:
        raise CompareError(f"-np must be >= 1, got {args.num_processes}")
    reads = {"model folder": args.models, "label folder": args.reference, "prediction folder": args.predictions,
             "dataset.json": args.dataset_json}
    out = check_output_folder(args.output, args.overwrite, reads)

    if args.models:
        comparison = load_model_folders(args.models, args.folds, baseline=args.baseline)
    else:
        if args.num_processes is None:
            from nnunetv2.configuration import default_num_processes

            num_processes = default_num_processes
        else:
            num_processes = args.num_processes
        comparison = load_prediction_folders(args.reference, args.predictions, args.dataset_json, args.names,
                                             num_processes=num_processes, progress=not args.no_progress,
                                             baseline=args.baseline)
    result = compute_statistics(comparison, args.baseline)
    written = write_results(result, out, args.overwrite)
    result["_written"] = written
    return result


def main(argv: list | None = None) -> None:
    result = run_compare(build_parser().parse_args(argv))
    written = result.pop("_written")
    print(report_text(result))
    print(f"Written: {', '.join(written)}")


def compare_entry(argv: list | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    compare_entry()
