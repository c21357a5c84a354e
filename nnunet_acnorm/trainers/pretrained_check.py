"""Check a ``-pretrained_weights`` file against the network before nnU-Net's stock loader runs.

nnU-Net's loader (``nnunetv2.run.load_pretrained_weights``) asserts that every network key except
the segmentation layers is in the file with the same shape, but its message prints the whole
tensor of the network instead of its shape, and a missing or foreign file ends in a traceback.
The fine-tuning trainers call :func:`check_pretrained_weights` first and stop with one line that
names the file, the first offending key and both shapes.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

#: keys nnU-Net's loader does not transfer (they depend on the number of classes)
SKIPPED_KEY_PARTS = (".seg_layers.",)


class PretrainedWeightsError(ValueError):
    """The pretrained checkpoint cannot initialise this network."""


def pretrained_weights_from_argv(argv: list[str] | None = None) -> str | None:
    """The value of ``-pretrained_weights`` in ``argv`` (nnUNetv2_train's command line), or None."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-pretrained_weights="):
            return arg.split("=", 1)[1]
    return None


def load_network_weights(fname: str) -> dict:
    """``checkpoint['network_weights']`` of an nnU-Net checkpoint, with clear errors."""
    if not os.path.isfile(fname):
        raise PretrainedWeightsError(f"pretrained weights file not found: {fname}")
    try:
        # nnU-Net checkpoints hold numpy values in their logs, which weights_only=True refuses;
        # nnU-Net's own loader reads the file with weights_only=False right after this check.
        checkpoint = torch.load(fname, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise PretrainedWeightsError(
            f"cannot read pretrained weights {fname} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a checkpoint_final.pth written by nnUNetv2_train") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise PretrainedWeightsError(
            f"{fname} is not an nnU-Net checkpoint (no 'network_weights' entry); pass a checkpoint "
            "written by nnUNetv2_train, or convert other formats with nnUNetv2_acnorm_import")
    return checkpoint["network_weights"]


def check_pretrained_weights(network: nn.Module, fname: str) -> dict:
    """Raise :class:`PretrainedWeightsError` unless nnU-Net's loader can put ``fname`` into ``network``.

    Returns the checkpoint's network weights.
    """
    pretrained = load_network_weights(fname)
    model_state = network.state_dict()
    for key, value in model_state.items():
        if any(part in key for part in SKIPPED_KEY_PARTS):
            continue
        if key not in pretrained:
            raise PretrainedWeightsError(
                f"{fname} does not fit this network: key '{key}' (shape {tuple(value.shape)}) is missing "
                f"in the checkpoint. It comes from another architecture or plans; pretrain with the plans "
                "of this dataset (nnUNetv2_move_plans_between_datasets) or pick the matching checkpoint")
        theirs = pretrained[key]
        if tuple(theirs.shape) != tuple(value.shape):
            raise PretrainedWeightsError(
                f"{fname} does not fit this network: first mismatching key '{key}' has shape "
                f"{tuple(theirs.shape)} in the checkpoint but {tuple(value.shape)} in the network. It comes "
                "from another architecture, plans or number of input channels; pretrain with the plans of "
                "this dataset (nnUNetv2_move_plans_between_datasets) or pick the matching checkpoint")
        if theirs.is_floating_point() and not torch.isfinite(theirs).all():
            raise PretrainedWeightsError(
                f"{fname}: key '{key}' contains NaN or infinite values; the checkpoint is corrupted or "
                "comes from a diverged run")
    return pretrained
