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
        checkpoint = load_nnunet_checkpoint(fname)
    except (ValueError, FileNotFoundError) as e:
        raise PretrainedWeightsError(f"{e}; pass a checkpoint_final.pth written by nnUNetv2_train, or convert "
                                     "other formats with nnUNetv2_acnorm_import") from None
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


def _numpy_checkpoint_globals() -> list:
    """numpy objects nnU-Net checkpoints hold (in their training logs): safe to unpickle."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_nnunet_checkpoint(fname: str) -> dict:
    """Load an nnU-Net checkpoint with ``weights_only=True`` (plus the numpy scalars and dtypes its
    logs hold), so a tampered file cannot run code. Raises ValueError/FileNotFoundError with one clear line."""
    if not os.path.isfile(fname):
        raise FileNotFoundError(f"checkpoint not found: {fname}")
    try:
        with torch.serialization.safe_globals(_numpy_checkpoint_globals()):
            checkpoint = torch.load(fname, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load checkpoint {fname} safely ({first[:300]}); it is corrupted or not a "
                         "checkpoint written by nnUNetv2_train") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ValueError(f"{fname} is not an nnU-Net checkpoint (no 'network_weights' entry)")
    return checkpoint
