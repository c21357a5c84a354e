"""``nnUNetv2_acnorm_predict`` / ``nnUNetv2_acnorm_predict_from_modelfolder``: nnU-Net's own
prediction commands (same arguments), with every checkpoint read by ``torch.load(weights_only=True)``.

Stock ``nnUNetv2_predict`` reads checkpoints with ``torch.load(weights_only=False)``, so a tampered
``checkpoint_final.pth`` runs the code its pickle names. These entry points replace ``torch.load``
in their own process by a weights-only load (numpy scalars of the training logs allowed; nothing
else), set ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` for any process they start, and then run nnU-Net's
entry point unchanged. A file that needs pickled code, a truncated file, a checkpoint that does
not fit its network (for AC-Norm trainers: one without its source affines), one that is not a
checkpoint of ``nnUNetv2_train`` (a bare state dict), one whose ``trainer_name`` is not the trainer
of its model folder (``-tr``), or one with NaN/infinite weights
(:mod:`nnunet_acnorm.nnunet.trained_checkpoints`) ends the command with one line naming the file.
Before that, a missing model or input folder, and an output folder that is, contains or lies inside
the model or input folder or is an nnU-Net root, or cannot be written
(:func:`nnunet_acnorm.outputs.check_output`), end it with one line.

Without the plugin, stock nnU-Net gets the same protection from the environment variable alone
for folded model folders (``nnUNetv2_acnorm_fold`` writes checkpoints of tensors and plain Python
values only): ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 nnUNetv2_predict_from_modelfolder -m <folded> ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.outputs import check_output


def _install_safe_torch_load() -> None:
    import torch

    from nnunet_acnorm.checkpoints.io import safe_torch_load
    from nnunet_acnorm.nnunet.trained_checkpoints import check_trained_checkpoint, folder_trainer

    if getattr(torch.load, "_acnorm_safe", False):
        return
    unsafe = torch.load

    def weights_only_load(f, map_location=None, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            checkpoint = safe_torch_load(f, map_location=map_location)
            if Path(f).parent.name.startswith("fold_"):  # a trained checkpoint nnU-Net's predictor reads
                check_trained_checkpoint(f, checkpoint, folder_trainer(f), "its model folder (-tr)")
            return checkpoint
        kwargs["weights_only"] = True
        return unsafe(f, map_location, *args, **kwargs)

    weights_only_load._acnorm_safe = True
    torch.load = weights_only_load


def _known_arguments(argv: list[str]) -> argparse.Namespace:
    """The arguments of nnU-Net's predict commands that say what is read and written (exact flags:
    argparse would read nnU-Net's ``-device`` as ``-d evice``)."""
    def value(flag: str, default=None):
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else default

    return argparse.Namespace(i=value("-i"), o=value("-o"), m=value("-m"), d=value("-d"), c=value("-c"),
                              p=value("-p", "nnUNetPlans"), tr=value("-tr", "nnUNetTrainer"))


def _model_folder(args: argparse.Namespace) -> str | None:
    if args.m is not None:
        return args.m
    if args.d is None or args.c is None or not os.environ.get("nnUNet_results"):
        return None  # nnU-Net's own parser names what is missing
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset = maybe_convert_to_dataset_name(args.d)
    except RuntimeError as e:
        raise InputError(f"-d {args.d}: {str(e).splitlines()[0]}") from None
    return os.path.join(os.environ["nnUNet_results"], dataset, f"{args.tr}__{args.p}__{args.c}")


def check_predict_arguments(argv: list[str]) -> None:
    """InputError for a model folder that does not exist, an input folder that does not exist, or an
    output (-o) that is, contains or lies inside the model or input folder, or an nnU-Net root."""
    args = _known_arguments(argv)
    model_folder = _model_folder(args)
    if model_folder is not None and not os.path.isdir(model_folder):
        raise InputError(f"model folder {model_folder} does not exist" + (
            "" if args.m else f" (from -d {args.d} -tr {args.tr} -p {args.p} -c {args.c}): train it first or "
            "check -tr/-p/-c"))
    if args.i is not None and not os.path.exists(args.i):
        raise InputError(f"-i {args.i} does not exist")
    if args.o is not None:
        check_output(args.o, "-o", reads={"model folder": model_folder, "input": args.i})


def _nnunet_entry(entry_name: str):
    def main(argv=None) -> None:
        check_predict_arguments(sys.argv[1:] if argv is None else argv)
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # inherited by any worker process
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        _install_safe_torch_load()
        from nnunetv2.inference import predict_from_raw_data

        from nnunet_acnorm.checkpoints.io import CheckpointReadError

        try:
            getattr(predict_from_raw_data, entry_name)()  # parses sys.argv itself
        except CheckpointReadError as e:
            advice = (". Only if you trust its source, use nnU-Net's own command (it loads with weights_only=False)"
                      if e.kind == "pickle" else "")
            raise InputError(f"{e}{advice}") from None
        except RuntimeError as e:
            text = str(e)
            if "Error(s) in loading state_dict" not in text:
                raise
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            raise InputError(f"the checkpoint does not fit the network its trainer builds: "
                             f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    return main


def predict_entry() -> None:
    run_command("nnUNetv2_acnorm_predict", _nnunet_entry("predict_entry_point"))


def predict_from_modelfolder_entry() -> None:
    run_command("nnUNetv2_acnorm_predict_from_modelfolder", _nnunet_entry("predict_entry_point_modelfolder"))


if __name__ == "__main__":
    predict_entry()
