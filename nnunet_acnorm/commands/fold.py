"""``nnUNetv2_acnorm_fold``: fold a trained AC-Norm model folder into one for stock ``nnUNetTrainer``
(:func:`nnunet_acnorm.nnunet.fold.fold_model_folder`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.nnunet.fold import STOCK_TRAINER, FoldError, fold_model_folder

PROG = "nnUNetv2_acnorm_fold"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fold the AC-Norm layers of a trained model folder into plain norms, for stock nnU-Net "
                    "inference without the plugin (nnUNetv2_predict -tr nnUNetTrainer -p <plans>_foldedFrom_<trainer>).")
    parser.add_argument("-d", help="dataset name or id (with -c, -tr, -p: the model folder in nnUNet_results)")
    parser.add_argument("-c", help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", default="nnUNetTrainerACNorm", help="trainer (default: nnUNetTrainerACNorm)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-i", help="the model folder itself (instead of -d/-c/-tr/-p)")
    parser.add_argument("-o", help="output model folder (default: nnUNetTrainer__<plans>_foldedFrom_<trainer>__<config> "
                                   "next to the model folder); never inside the model folder")
    parser.add_argument("-chk", nargs="+", help="checkpoint file names (default: every checkpoint_*.pth)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a folded model this command wrote before (atomically; nothing else is replaced)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.i:
        model_folder = Path(args.i)
    else:
        if not (args.d and args.c):
            raise FoldError("give the model folder with -i, or -d DATASET -c CONFIGURATION [-tr] [-p]")
        results = os.environ.get("nnUNet_results")
        if not results:
            raise FoldError("nnUNet_results is not set; set it or pass the model folder with -i")
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        try:
            dataset_name = maybe_convert_to_dataset_name(args.d)
        except RuntimeError as e:
            raise FoldError(f"dataset {args.d} not found: {str(e).splitlines()[0]}") from None
        model_folder = Path(results) / dataset_name / f"{args.tr}__{args.p}__{args.c}"
    report = fold_model_folder(model_folder, args.o, overwrite=args.overwrite, checkpoint_names=args.chk)
    print(f"\nFolded model written to {report.output_folder}\n"
          f"  norm_op: {report.norm_op}; checkpoints: {', '.join(report.checkpoints)}\n"
          f"  largest softmax difference to the AC-Norm network (random input): {report.max_probability_difference:.2e}\n"
          f"Predict with stock nnU-Net (no plugin needed):\n"
          f"  nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT -m {report.output_folder}\n"
          f"  or: nnUNetv2_predict -i INPUT -o OUTPUT -d DATASET -c {report.configuration} -tr {STOCK_TRAINER} "
          f"-p {report.plans_identifier} -f FOLDS")


def fold_entry(argv: list[str] | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    fold_entry()
