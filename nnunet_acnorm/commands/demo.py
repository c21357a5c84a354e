"""``nnUNetv2_acnorm_demo``: the AC-Norm workflow on the bundled real CT/MR example
(:func:`nnunet_acnorm.demo.pipeline.run_demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.demo.pipeline import run_demo

PROG = "nnUNetv2_acnorm_demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the AC-Norm workflow on the bundled real CT/MR example: pretrain on CT with stock nnU-Net, "
                    "fine-tune on MR with AC-Norm and vanilla fine-tuning, print the Dice of both.")
    parser.add_argument("--output", default="acnorm_demo_output", help="output folder (default: ./acnorm_demo_output)")
    parser.add_argument("--pretrain-epochs", type=int, default=25)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pretraining and both fine-tunings "
                        "(nnUNet_acnorm_seed); the two fine-tunings differ only by method")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("pretrain_epochs", "finetune_epochs", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    run_demo(Path(args.output), args.pretrain_epochs, args.finetune_epochs, args.iterations, args.overwrite,
             args.seed)


def demo_entry(argv: list[str] | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    demo_entry()
