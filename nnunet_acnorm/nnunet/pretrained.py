"""Checks around the checkpoints the fine-tuning trainers load.

- ``-pretrained_weights``: nnU-Net's loader (``nnunetv2.run.load_pretrained_weights``) asserts
  that every network key except the segmentation layers is in the file with the same shape, but
  its message prints the whole tensor of the network instead of its shape, and a missing or
  foreign file ends in a traceback. The fine-tuning trainers call :func:`check_pretrained_weights`
  first and stop with one line that names the file, the first offending key and both shapes (and,
  where the file says so, the plans it was made for, or the ``module.`` prefix it carries).
- Strict AC-Norm reload: the networks the AC-Norm trainers build demand their source affines
  (``source_weight``/``source_bias``) in every state dict they load, except while in "pretrained
  loading" mode (:func:`set_strict_source`), which only ``-pretrained_weights`` switches on.
- :func:`load_nnunet_checkpoint`: ``torch.load(weights_only=True)`` (no pickled code runs) with
  errors that say what is wrong with the file.
"""
from __future__ import annotations

import os
import sys

from torch import nn

from nnunet_acnorm.checkpoints.io import CheckpointReadError, safe_torch_load
from nnunet_acnorm.checkpoints.keys import first_misfit, transferable_keys, wrapper_prefix
from nnunet_acnorm.errors import InputError

class PretrainedWeightsError(InputError):
    """The pretrained checkpoint cannot initialise this network."""


class NnunetCheckpointError(InputError):
    """An nnU-Net checkpoint cannot be used. ``kind``: ``missing``, ``directory``, ``empty``,
    ``corrupt`` (truncated or not a PyTorch file), ``pickle`` (needs arbitrary pickled objects),
    ``format`` (a PyTorch file, but no nnU-Net checkpoint)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def pretrained_weights_from_argv(argv: list[str] | None = None) -> str | None:
    """The value of ``-pretrained_weights`` in ``argv`` (nnUNetv2_train's command line), or None."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-pretrained_weights="):
            return arg.split("=", 1)[1]
    return None


def continue_training_from_argv(argv: list[str] | None = None) -> bool:
    """Whether ``argv`` (nnUNetv2_train's command line) continues a training (``--c``)."""
    argv = sys.argv if argv is None else argv
    return "--c" in argv[1:]


def load_network_weights(fname: str) -> dict:
    """``checkpoint['network_weights']`` of an nnU-Net checkpoint, with clear errors."""
    return _load_pretrained_checkpoint(fname)["network_weights"]


def _load_pretrained_checkpoint(fname: str) -> dict:
    try:
        return load_nnunet_checkpoint(fname)
    except NnunetCheckpointError as e:
        if e.kind == "missing":
            raise PretrainedWeightsError(f"pretrained weights file not found: {fname}") from None
        if e.kind == "pickle":
            raise PretrainedWeightsError(
                f"{e}. Only if you trust its source, convert it with nnUNetv2_acnorm_import -i {fname} "
                "--trust_pickle, which writes a checkpoint of tensors only") from None
        raise PretrainedWeightsError(f"{e}; pass a checkpoint_final.pth written by nnUNetv2_train, or convert "
                                     "other formats with nnUNetv2_acnorm_import") from None


def _origin(checkpoint: dict) -> tuple[str | None, str]:
    """(plans the checkpoint was made for, a phrase saying so) from what the checkpoint records."""
    imported = checkpoint.get("acnorm_import")
    if isinstance(imported, dict) and imported.get("plans"):
        return str(imported["plans"]), (f"it was written by nnUNetv2_acnorm_import for the plans "
                                        f"'{imported['plans']}' (configuration {imported.get('configuration')})")
    init_args = checkpoint.get("init_args")
    plans = init_args.get("plans") if isinstance(init_args, dict) else None
    if isinstance(plans, dict) and plans.get("plans_name"):
        return str(plans["plans_name"]), (f"it was trained with the plans '{plans['plans_name']}' (configuration "
                                          f"{init_args.get('configuration')}) of {plans.get('dataset_name')}")
    return None, ""


def _misfit_advice(checkpoint: dict, plans_name: str | None) -> str:
    made_for, phrase = _origin(checkpoint)
    if isinstance(checkpoint.get("acnorm_import"), dict) and made_for and made_for != plans_name:
        return f"{phrase}: train with -p {made_for}"
    advice = ("pretrain with the plans of this dataset (nnUNetv2_move_plans_between_datasets) or pick the matching "
              "checkpoint")
    return f"{phrase}; {advice}" if phrase else advice


def check_pretrained_weights(network: nn.Module, fname: str, plans_name: str | None = None) -> dict:
    """Raise :class:`PretrainedWeightsError` unless nnU-Net's loader can put ``fname`` into ``network``.

    ``plans_name``: the plans of the training (to tell whether an imported checkpoint's plans are
    others). Returns the checkpoint's network weights.
    """
    checkpoint = _load_pretrained_checkpoint(fname)
    pretrained = checkpoint["network_weights"]
    model_state = network.state_dict()
    misfit = first_misfit(model_state, pretrained, transferable_keys(model_state))
    if misfit is None:
        return pretrained
    key = misfit.key
    if misfit.kind == "missing":
        prefix = wrapper_prefix(pretrained)
        if prefix is not None and prefix + key in pretrained:
            raise PretrainedWeightsError(
                f"{fname}: every key is under the prefix '{prefix}' (saved from a DDP/DataParallel-wrapped or "
                f"compiled network), which nnU-Net's -pretrained_weights loader does not strip: '{key}' is there "
                f"as '{prefix}{key}'. Re-save network_weights without the prefix, or convert the file with "
                f"nnUNetv2_acnorm_import -i {fname}, which strips it")
        raise PretrainedWeightsError(
            f"{fname} does not fit this network: key '{key}' (shape {misfit.network_shape}) is missing "
            f"in the checkpoint. It comes from another architecture or plans; "
            f"{_misfit_advice(checkpoint, plans_name)}")
    if misfit.kind == "shape":
        raise PretrainedWeightsError(
            f"{fname} does not fit this network: first mismatching key '{key}' has shape "
            f"{misfit.file_shape} in the checkpoint but {misfit.network_shape} in the network. It comes "
            "from another architecture, plans or number of input channels; "
            f"{_misfit_advice(checkpoint, plans_name)}")
    raise PretrainedWeightsError(
        f"{fname}: key '{key}' contains NaN or infinite values; the checkpoint is corrupted or "
        "comes from a diverged run")


def load_nnunet_checkpoint(fname: str, map_location="cpu") -> dict:
    """Load an nnU-Net checkpoint with ``weights_only=True`` (plus the numpy scalars and dtypes its
    logs hold), so a tampered file cannot run code. Raises :class:`NnunetCheckpointError` (a
    ValueError; FileNotFoundError's message style for a missing file) with one clear line."""
    try:
        checkpoint = safe_torch_load(fname, map_location=map_location)
    except CheckpointReadError as e:
        if e.kind == "missing":
            raise NnunetCheckpointError(f"checkpoint not found: {fname}", "missing") from None
        if e.kind == "pickle":
            what = f" (it pickles {e.detail})" if e.detail else ""
            raise NnunetCheckpointError(
                f"cannot load checkpoint {fname}: it needs arbitrary pickled Python objects{what}, which can run "
                "code when loaded, so it was not loaded (checkpoints written by nnUNetv2_train never need them)",
                "pickle") from None
        if e.kind == "directory":
            raise NnunetCheckpointError(str(e), "directory") from None
        raise NnunetCheckpointError(f"cannot load checkpoint {fname} safely ({e.detail or str(e)}); it is truncated, "
                                    "corrupted or not a checkpoint written by nnUNetv2_train", e.kind) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnunetCheckpointError(f"{fname} is not an nnU-Net checkpoint (no 'network_weights' entry)", "format")
    return checkpoint


# -- strict AC-Norm reload ----------------------------------------------------------------------
def set_strict_source(network: nn.Module, strict: bool) -> int:
    """Make every AC-Norm layer of ``network`` demand (``strict=True``) or not demand its source
    affines in the state dicts it loads; returns the number of layers. ``strict=False`` is the
    "pretrained loading" mode: a plain checkpoint's norm affines become source and target."""
    from nnunet_acnorm.norms import acnorm_modules

    layers = acnorm_modules(network)
    for layer in layers.values():
        layer.strict_source = strict
    return len(layers)


def missing_source_layers(network: nn.Module, state_dict: dict) -> list[str]:
    """The AC-Norm layers of ``network`` whose ``source_weight``/``source_bias`` are not in
    ``state_dict`` (keys as the network names them)."""
    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.norms.modules import SOURCE_KEYS

    return [name for name in acnorm_modules(network)
            if not all(f"{name}.{key}" in state_dict for key in SOURCE_KEYS)]


def describe_missing_sources(fname: str, missing: list[str], n_layers: int, trainer_name: str) -> str:
    return (f"{fname} holds no source affines (source_weight/source_bias) for {len(missing)} of the {n_layers} "
            f"AC-Norm layers (first: '{missing[0]}'): a checkpoint written by {trainer_name} always holds them, so "
            "this one was stripped or edited. Refusing it: the frozen pretrained source cannot be recovered from "
            "it (only -pretrained_weights takes plain checkpoints)")


def remove_run_output(log_file: str | None, output_folder: str | None, stop_at: str | None) -> None:
    """Undo what a refused start wrote: its log file, then the folders it created if they are
    now empty, up to (not including) ``stop_at`` (nnUNet_results)."""
    if log_file and os.path.isfile(log_file):
        os.remove(log_file)
    if not output_folder:
        return
    folder = os.path.abspath(output_folder)
    stop = os.path.abspath(stop_at) if stop_at else None
    while folder and folder != stop and os.path.dirname(folder) != folder:
        if stop is not None and not folder.startswith(stop + os.sep):
            break
        try:
            os.rmdir(folder)  # only an empty folder
        except OSError:
            break
        folder = os.path.dirname(folder)
