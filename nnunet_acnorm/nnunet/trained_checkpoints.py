"""Checks of a trained nnU-Net checkpoint before its weights are used (``--c``, ``--val``, the safe
predict, ``nnUNetv2_acnorm_fold``, ``nnUNetv2_acnorm_compare -m``).

A checkpoint is refused with one line when

- it is not a checkpoint ``nnUNetv2_train`` wrote (a bare state dict: no ``trainer_name`` or
  ``network_weights``);
- its ``trainer_name`` is not the trainer the user named (``-tr``) or the trainer of the model
  folder it lies in (``<trainer>__<plans>__<configuration>/fold_X/``): nnU-Net builds the network
  from ``trainer_name``, so an edited name would predict with another network (for example a
  stripped AC-Norm checkpoint renamed to the vanilla trainer, or a vanilla checkpoint in an
  AC-Norm folder);
- a tensor of its weights holds NaN or infinite values (a diverged training or an edited file).

Examples::

    check_trained_checkpoint(path, checkpoint, trainer=folder_trainer(path))
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_acnorm.checkpoints.io import first_non_finite
from nnunet_acnorm.errors import InputError


class TrainedCheckpointError(InputError):
    """A trained checkpoint must not be used; the message names the file and what to do."""


def folder_trainer(checkpoint_path) -> str | None:
    """The trainer named by the model folder of ``<model folder>/fold_X/<checkpoint>``, or None
    where the folder is not named ``<trainer>__<plans>__<configuration>``."""
    path = Path(os.path.abspath(os.fspath(checkpoint_path)))
    if not path.parent.name.startswith("fold_"):
        return None
    from nnunet_acnorm.checkpoints.results_folder import split_model_folder_name

    parts = split_model_folder_name(path.parent.parent.name)
    return parts[0] if parts else None


def check_trained_checkpoint(path, checkpoint, trainer: str | None = None, trainer_source: str = "its model folder",
                             weights: bool = True) -> None:
    """Raise :class:`TrainedCheckpointError` unless ``checkpoint`` (read from ``path``) may be used.

    Args:
        trainer: the trainer the checkpoint must come from (None: not checked).
        trainer_source: where ``trainer`` comes from, for the message (``-tr``, ``its model folder``).
        weights: also check that every weight is finite.
    """
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict) \
            or not isinstance(checkpoint.get("trainer_name"), str):
        missing = "network_weights" if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint \
            else "trainer_name"
        raise TrainedCheckpointError(
            f"{path} is not a checkpoint written by nnUNetv2_train (no '{missing}' entry; a bare state dict?): "
            "nnU-Net cannot tell which network it belongs to. Use the checkpoint_final.pth of a training")
    written_by = checkpoint["trainer_name"]
    if trainer is not None and written_by != trainer:
        raise TrainedCheckpointError(
            f"{path} was written by trainer {written_by}, but {trainer_source} names {trainer}: the checkpoint was "
            f"moved or edited, and {written_by}'s network is not {trainer}'s. Refusing it; use the checkpoint "
            f"{trainer} wrote (or, if {written_by} is right, its own model folder / -tr {written_by})")
    if weights:
        key, count = first_non_finite(checkpoint["network_weights"])
        if key is not None:
            raise TrainedCheckpointError(
                f"{path}: {count} weight tensor(s) hold NaN or infinite values (first: '{key}'): the training "
                "diverged or the file was edited. Refusing it; use an earlier checkpoint or train again with a "
                "lower learning rate")
