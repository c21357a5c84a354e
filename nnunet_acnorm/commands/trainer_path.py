"""``nnUNetv2_acnorm_trainer_path``: print the folder that makes nnU-Net find the AC-Norm trainers."""
from __future__ import annotations

import argparse
import os

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.nnunet.discovery import ENV_VAR, trainer_shim_folder, with_trainer_folder

PROG = "nnUNetv2_acnorm_trainer_path"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the folder that makes nnU-Net find the AC-Norm trainers, for "
                    "'export nnUNet_extTrainer=$(nnUNetv2_acnorm_trainer_path)'. After 'pip install' this "
                    "is done automatically at interpreter start; use this where that is switched off "
                    "(python -S, PYTHONNOUSERSITE setups, frozen apps) or to see the folder.")
    parser.add_argument("--append", action="store_true",
                        help="print the current $nnUNet_extTrainer with the folder appended (keeps your folders)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(with_trainer_folder(os.environ.get(ENV_VAR)) if args.append else trainer_shim_folder())


def trainer_path_entry(argv: list[str] | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    trainer_path_entry()
