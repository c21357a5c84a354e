"""What the fine-tuning trainers check around a ``nnUNetv2_train`` run, before nnU-Net would fail
with a traceback or two runs would mix one fold.

- :func:`check_results_writable`: the fold folder can be created and written (before nnU-Net's
  trainer creates it: a read-only ``nnUNet_results`` ends in one line, not ``PermissionError``).
- :func:`check_command_line`: ``--c`` with ``-pretrained_weights`` (nnU-Net raises a
  ``RuntimeError``), ``--val`` without ``checkpoint_final.pth``, a ``checkpoint_*.pth`` that is
  not a file (a directory of that name makes the final save fail after the whole training).
- :func:`check_plans_file`: ``-p`` naming a plans file the dataset does not have (nnU-Net raises a
  ``FileNotFoundError``); checked when nnU-Net imports the trainer shims, before it reads the plans.
- :func:`acquire_fold_lock`: one run per fold at a time (:class:`nnunet_acnorm.outputs.RunLock`,
  taken by rank 0 only, released when the process ends, also in DDP's worker processes).
- :func:`non_finite_state`: the line that stops a training whose loss or weights became NaN or
  infinite (nnU-Net saves checkpoints after the epoch; stopping before keeps the last finite ones).
"""
from __future__ import annotations

import atexit
import math
import os
import sys

from nnunet_acnorm.checkpoints.io import first_non_finite
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.outputs import RunLock, check_writable

#: the lock file in each fold folder
LOCK_NAME = "acnorm_train.lock"
#: nnUNetv2_train's checkpoint names
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class TrainingStartError(InputError):
    """A ``nnUNetv2_train`` run that must not start; the message says why and what to do."""


class TrainingStoppedError(InputError):
    """A ``nnUNetv2_train`` run that must not go on (its loss or weights became non-finite)."""


def fold_folder(trainer_name: str, plans: dict, configuration: str, fold) -> str | None:
    """The fold folder nnU-Net's trainer will use (``nnUNet_results/<dataset>/<trainer>__<plans>__<c>/fold_X``)."""
    results = os.environ.get("nnUNet_results")
    if not results or not isinstance(plans, dict) or "dataset_name" not in plans or "plans_name" not in plans:
        return None
    return os.path.join(results, plans["dataset_name"], f"{trainer_name}__{plans['plans_name']}__{configuration}",
                        f"fold_{fold}")


def check_results_writable(folder: str | None) -> None:
    if folder is not None:
        try:
            check_writable(folder, "the fold folder")
        except InputError as e:
            raise TrainingStartError(f"{e} (nnUNet_results={os.environ.get('nnUNet_results')})") from None


def _flag(argv: list[str], *names: str) -> bool:
    return any(a in names for a in argv[1:])


def check_command_line(output_folder: str, argv: list[str] | None = None) -> None:
    """TrainingStartError for a command line nnU-Net would fail on later (see the module)."""
    argv = sys.argv if argv is None else argv
    if _flag(argv, "--c") and any(a == "-pretrained_weights" or a.startswith("-pretrained_weights=") for a in argv):
        raise TrainingStartError("--c continues a training from its own checkpoint; -pretrained_weights only starts "
                                 "one. Drop one of them")
    for name in CHECKPOINT_NAMES:
        path = os.path.join(output_folder, name)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
            raise TrainingStartError(f"{path} is not a checkpoint file ({'a symbolic link' if os.path.islink(path) else 'a directory'}): "
                                     "nnU-Net reads and writes checkpoints under that name; move it away")
    final = os.path.join(output_folder, "checkpoint_final.pth")
    if _flag(argv, "--val") and not os.path.isfile(final):
        latest = [n for n in CHECKPOINT_NAMES[1:] if os.path.isfile(os.path.join(output_folder, n))]
        raise TrainingStartError(f"--val validates the finished training, but {final} does not exist"
                                 + (f" (the fold holds {', '.join(latest)}: continue the training with --c)" if latest
                                    else ": train this fold first"))


def _option_value(args: list[str], name: str, default: str) -> str:
    value = default
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def check_plans_file(argv: list[str] | None = None) -> None:
    """TrainingStartError when ``argv`` is a ``nnUNetv2_train`` command line whose plans file (``-p``,
    default nnUNetPlans) is not in the dataset's preprocessed folder: nnU-Net would end with a
    ``FileNotFoundError`` traceback. Runs where nnU-Net imports our trainer shims, before it loads
    the plans; a dataset nnU-Net cannot resolve is left to nnU-Net's own message."""
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) != "nnUNetv2_train" or len(argv) < 2 or argv[1].startswith("-"):
        return
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        return
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset = maybe_convert_to_dataset_name(argv[1] if argv[1].startswith("Dataset") else int(argv[1]))
    except (RuntimeError, ValueError):
        return
    plans = _option_value(argv[1:], "-p", "nnUNetPlans")
    folder = os.path.join(preprocessed, dataset)
    plans_file = os.path.join(folder, plans + ".json")
    if os.path.isfile(plans_file):
        return
    others = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json") and n not in (
        "dataset.json", "dataset_fingerprint.json", "splits_final.json")) if os.path.isdir(folder) else []
    raise TrainingStartError(f"-p {plans}: the plans file {plans_file} does not exist ("
                             + (f"plans there: {', '.join(others)}; " if others else "")
                             + f"plan the dataset with nnUNetv2_plan_and_preprocess -d {argv[1]}, import pretrained "
                             "plans with nnUNetv2_acnorm_import, or give an existing plans identifier with -p)")


def acquire_fold_lock(output_folder: str, fold_name: str, log) -> RunLock:
    """Take the lock of ``output_folder`` for this process (RunLockedError if another run holds it);
    it is released when the process ends (atexit, and multiprocessing's exit for DDP workers)."""
    import multiprocessing.util

    lock = RunLock(os.path.join(output_folder, LOCK_NAME), f"nnUNetv2_train of {fold_name}").acquire(log)
    atexit.register(lock.release)
    multiprocessing.util.Finalize(lock, lock.release, exitpriority=100)
    return lock


def non_finite_state(loss: float, state: dict, epoch: int) -> str | None:
    """The error line when the epoch's mean training ``loss`` or a tensor of ``state`` is NaN or
    infinite, else None."""
    key, count = first_non_finite(state)
    if key is None and math.isfinite(float(loss)):
        return None
    what = (f"the training loss became {float(loss)}" if not math.isfinite(float(loss)) else "") + \
        (" and " if key is not None and not math.isfinite(float(loss)) else "") + \
        (f"{count} weight tensor(s) became NaN or infinite (first: '{key}')" if key is not None else "")
    return (f"{what} in epoch {epoch}; training stopped without writing a checkpoint of it (the fold's checkpoints "
            "are from earlier, finite epochs). Lower the learning rate or check the data for NaN values, then "
            "continue with --c or start again")
