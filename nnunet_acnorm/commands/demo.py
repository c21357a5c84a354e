"""``nnUNetv2_acnorm_demo``: the AC-Norm workflow on the bundled real CT/MR example
(:func:`nnunet_acnorm.demo.pipeline.run_demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.demo.pipeline import run_demo
from nnunet_acnorm.outputs import check_output, check_replaceable, replace_folder

PROG = "nnUNetv2_acnorm_demo"
#: what the demo writes into its output folder (the only files --overwrite replaces)
DEMO_OUTPUTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "imagesTs", "labelsTs", "predictions",
                "dice.json", "logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the AC-Norm workflow on the bundled real CT/MR example: pretrain on CT with stock nnU-Net, "
                    "fine-tune on MR with AC-Norm and vanilla fine-tuning, print the Dice of both.")
    parser.add_argument("--output", default="acnorm_demo_output", help="output folder (default: ./acnorm_demo_output)")
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=25, help="training iterations per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pretraining and both fine-tunings "
                        "(nnUNet_acnorm_seed); the two fine-tunings differ only by method")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output of an earlier demo (when the new one is complete; nothing else is "
                             "replaced)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("pretrain_epochs", "finetune_epochs", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    out = check_output(args.output, "--output")
    check_replaceable(out, "--output", args.overwrite, lambda relative: relative.split("/")[0] in DEMO_OUTPUTS,
                      f"the demo's output ({', '.join(DEMO_OUTPUTS)})", empty_ok=True)
    if not out.is_dir() or not any(out.iterdir()):
        run_demo(out, args.pretrain_epochs, args.finetune_epochs, args.iterations, False, args.seed)
        return
    # --overwrite: the new demo runs beside the old output, which is replaced only when the new one is complete
    replace_folder(out, lambda staging: run_demo(staging, args.pretrain_epochs, args.finetune_epochs,
                                                 args.iterations, False, args.seed))
    print(f"The new demo output replaced {out}")


def demo_entry(argv: list[str] | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    demo_entry()
