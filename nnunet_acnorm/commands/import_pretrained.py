"""``nnUNetv2_acnorm_import``: prepare an nnU-Net dataset for fine-tuning from a pretrained file.

    nnUNetv2_acnorm_import -d 501 -c 3d_fullres -i Genesis_Chest_CT.pt
    nnUNetv2_train 501 3d_fullres 0 -p <plans> -tr nnUNetTrainerACNorm -pretrained_weights <checkpoint>
    nnUNetv2_acnorm_import -d 501 -c 3d_fullres -i <results>/Dataset291_.../nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres \
        --encoder_only          # then -tr nnUNetTrainerACNorm_encoderOnly

What it does is :func:`nnunet_acnorm.nnunet.plans.import_pretrained`'s job: new plans for the
pretrained network, preprocessing if needed, and an nnU-Net checkpoint for ``-pretrained_weights``.
"""
from __future__ import annotations

import argparse

from nnunet_acnorm.checkpoints import FAMILIES
from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.nnunet.plans import import_pretrained

PROG = "nnUNetv2_acnorm_import"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Prepare an nnU-Net dataset for fine-tuning from a pretrained checkpoint: new plans for the "
                    "pretrained network, preprocessing if needed, and an nnU-Net checkpoint for -pretrained_weights.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-i", dest="file", required=True,
                   help="the pretrained checkpoint file, or an nnU-Net v2 results folder (e.g. a TotalSegmentator model: "
                        "Dataset291_.../nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres) or a checkpoint inside one")
    p.add_argument("-f", dest="family", choices=sorted(FAMILIES), default=None,
                   help="force the family (default: detected from the file's content)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow a file that needs arbitrary pickled Python objects (can run code: only for trusted files)")
    p.add_argument("-p", dest="source_plans", default="nnUNetPlans", help="source plans identifier (default nnUNetPlans)")
    p.add_argument("-pl", dest="plans_name", default=None,
                   help="identifier of the new plans (default <source plans>__<family>)")
    p.add_argument("-o", dest="output", default=None,
                   help="checkpoint to write (default nnUNet_preprocessed/<dataset>/acnorm_pretrained/<plans>__<config>.pth)")
    p.add_argument("-np", dest="num_processes", type=int, default=2, help="processes for preprocessing (default 2)")
    p.add_argument("--no_preprocess", action="store_true", help="do not run the preprocessing (print the command)")
    p.add_argument("--overwrite", action="store_true", help="replace plans/checkpoint written by an earlier import")
    p.add_argument("--encoder_only", action="store_true",
                   help="take only the encoder (stem included) from the file; the decoder starts fresh (as nnU-Net's "
                        "PretrainedTrainer). Train with the _encoderOnly trainers, e.g. nnUNetTrainerACNorm_encoderOnly")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import_pretrained(args.dataset, args.configuration, args.file, args.family, args.trust_pickle, args.source_plans,
                      args.plans_name, args.output, args.num_processes, not args.no_preprocess, args.overwrite,
                      echo=print, encoder_only=args.encoder_only)


def import_entry(argv: list[str] | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    import_entry()
