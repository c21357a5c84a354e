"""Checks around the checkpoints the fine-tuning trainers load.

- ``-pretrained_weights``: the trainers read the file ONCE, with ``torch.load(weights_only=True)``
  (:func:`read_pretrained_weights`), check it against the network and keep the tensors; nnU-Net's
  ``run_training`` then calls its ``load_pretrained_weights(network, fname)``, which would open the
  path a second time with ``weights_only=False`` (a file swapped in between would run pickled code):
  :func:`route_pretrained_loading` makes that call, for this trainer's network only, put the tensors
  already read instead. What is checked is what is loaded.
- What loads (``parts``): ``"all"``: nnU-Net's rule, every network key except the segmentation
  layers (``.seg_layers.``) must be in the file with the same shape; ``"encoder"``: only the
  encoder and its stem (:func:`nnunet_acnorm.networks.encoder_prefixes`), the decoder and heads
  start fresh, as nnU-Net's ``PretrainedTrainer`` does. Convolution kernels whose spatial size
  differs (e.g. [3, 3, 3] in the file, [1, 3, 3] in anisotropic target plans) are bridged
  (:func:`nnunet_acnorm.checkpoints.adapt.bridge_kernel`); other shape differences (another depth or
  width) stop the start with one line that names the file, the first offending key and both shapes
  (and, where the file says so, the plans it was made for, or the ``module.`` prefix it carries).
- Strict AC-Norm reload: the networks the AC-Norm trainers build demand their source affines
  (``source_weight``/``source_bias``) in every state dict they load, except while in "pretrained
  loading" mode (:func:`set_strict_source`), which only ``-pretrained_weights`` switches on.
- :func:`load_nnunet_checkpoint`: ``torch.load(weights_only=True)`` (no pickled code runs) with
  errors that say what is wrong with the file.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_acnorm.checkpoints.adapt import fit_tensor
from nnunet_acnorm.checkpoints.io import CheckpointReadError, safe_torch_load
from nnunet_acnorm.checkpoints.keys import canonical_keys, is_alias, transferable_keys, wrapper_prefix
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.networks.parts import NoEncoderError, encoder_prefixes, is_encoder_key

#: what a trainer loads from -pretrained_weights (its class attribute ``pretrained_parts``)
PRETRAINED_PARTS = ("all", "encoder")
#: the largest magnitude of a pretrained norm affine that is accepted: float16's largest finite value
#: (a larger one overflows under nnU-Net's mixed precision; trained norm affines are orders smaller)
MAX_NORM_AFFINE = 65504.0

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


@dataclass
class PretrainedLoad:
    """What -pretrained_weights puts into a network: read once, checked, fitted."""

    path: str
    parts: str
    #: network key -> tensor to load (kernels already bridged)
    state: dict = field(default_factory=dict)
    #: "key: kernel [3, 3, 3] -> [1, 3, 3]" for every bridged tensor
    bridged: list = field(default_factory=list)
    #: network keys that start fresh (segmentation layers; decoder and heads for ``encoder``)
    fresh: list = field(default_factory=list)
    #: AC-Norm layers whose affines in the file are a fresh initialisation (an imported checkpoint's
    #: ``acnorm_import.fresh_keys``): their source is that initialisation
    unpretrained_norms: list = field(default_factory=list)


def _keys_to_load(network: nn.Module, parts: str) -> list[str]:
    own = network.state_dict()
    if parts == "all":
        return transferable_keys(own)
    if parts != "encoder":
        raise ValueError(f"pretrained_parts must be one of {PRETRAINED_PARTS}, got {parts!r}")
    try:
        prefixes = encoder_prefixes(network)
    except NoEncoderError as e:
        raise PretrainedWeightsError(str(e)) from None
    return [k for k in canonical_keys(own) if is_encoder_key(k, prefixes)]


def _refuse_misfit(fname: str, checkpoint: dict, pretrained: dict, key: str, own_shape, plans_name, parts) -> None:
    where = " (of the encoder, which the _encoderOnly trainers load)" if parts == "encoder" else ""
    if key not in pretrained:
        prefix = wrapper_prefix(pretrained)
        if prefix is not None and prefix + key in pretrained:
            raise PretrainedWeightsError(
                f"{fname}: every key is under the prefix '{prefix}' (saved from a DDP/DataParallel-wrapped or "
                f"compiled network), which nnU-Net's -pretrained_weights loader does not strip: '{key}' is there "
                f"as '{prefix}{key}'. Re-save network_weights without the prefix, or convert the file with "
                f"nnUNetv2_acnorm_import -i {fname}, which strips it")
        raise PretrainedWeightsError(
            f"{fname} does not fit this network: key '{key}' (shape {tuple(own_shape)}){where} is missing "
            f"in the checkpoint. It comes from another architecture or plans; {_misfit_advice(checkpoint, plans_name)}")
    raise PretrainedWeightsError(
        f"{fname} does not fit this network: first mismatching key '{key}'{where} has shape "
        f"{tuple(pretrained[key].shape)} in the checkpoint but {tuple(own_shape)} in the network (kernel sizes "
        "can be bridged, channel counts and depths cannot). It comes from another architecture, plans or number of "
        f"input channels; {_misfit_advice(checkpoint, plans_name)}")


def read_pretrained_weights(network: nn.Module, fname: str, plans_name: str | None = None,
                            parts: str = "all") -> PretrainedLoad:
    """Read ``fname`` once (``weights_only=True``) and check it against ``network``: raise
    :class:`PretrainedWeightsError` (one line) unless every key of ``parts`` is in the file with the
    network's shape (kernel sizes bridged) and finite values. ``plans_name``: the training's plans
    (to tell whether an imported checkpoint was made for others)."""
    checkpoint = _load_pretrained_checkpoint(fname)
    pretrained = checkpoint["network_weights"]
    own = network.state_dict()
    load = PretrainedLoad(os.path.abspath(fname), parts)
    keys = _keys_to_load(network, parts)
    affine_keys = norm_affine_keys(network)
    for key in keys:
        if key in pretrained and not isinstance(pretrained[key], torch.Tensor):
            raise PretrainedWeightsError(f"{fname}: network_weights['{key}'] is a {type(pretrained[key]).__name__}, "
                                         "not a tensor; the checkpoint was edited or is not an nnU-Net checkpoint")
        fitted = fit_tensor(pretrained[key], tuple(own[key].shape), False, 0) if key in pretrained else None
        if fitted is None:
            _refuse_misfit(fname, checkpoint, pretrained, key, own[key].shape, plans_name, parts)
        value, done = fitted
        if own[key].is_floating_point() and not value.is_floating_point():
            raise PretrainedWeightsError(f"{fname}: key '{key}' holds {str(value.dtype).removeprefix('torch.')} values "
                                         f"where the network has {str(own[key].dtype).removeprefix('torch.')}; the "
                                         "checkpoint was edited or is not a trained network's")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PretrainedWeightsError(f"{fname}: key '{key}' contains NaN or infinite values; the checkpoint is "
                                         "corrupted or comes from a diverged run")
        if key in affine_keys and value.is_floating_point() and value.abs().max() > MAX_NORM_AFFINE:
            raise PretrainedWeightsError(f"{fname}: the norm affine '{key}' holds {float(value.abs().max()):.3g}, more "
                                         f"than {MAX_NORM_AFFINE:g} in magnitude (float16's largest value): under "
                                         "nnU-Net's mixed precision it overflows; the checkpoint is corrupted or "
                                         "comes from a diverged run")
        load.state[key] = value
        if done and not is_alias(key):
            load.bridged.append(f"{key}: {done}")
    chosen = set(keys)
    load.fresh = [k for k in canonical_keys(own) if k not in chosen]
    load.unpretrained_norms = _unpretrained_norms(network, checkpoint, chosen)
    return load


def norm_affine_keys(network: nn.Module) -> set[str]:
    """The state-dict keys of the norm layers' affines (weight, bias) in ``network``."""
    from nnunet_acnorm.norms import acnorm_modules

    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    acnorm = {id(m) for m in acnorm_modules(network).values()}
    names = {name for name, m in network.named_modules(remove_duplicate=False)  # aliases too
             if isinstance(m, norms) or id(m) in acnorm}
    state = network.state_dict()
    return {f"{name}.{part}" if name else part for name in names for part in ("weight", "bias")} & set(state)


def _unpretrained_norms(network: nn.Module, checkpoint: dict, loaded: set) -> list[str]:
    from nnunet_acnorm.norms import acnorm_modules

    imported = checkpoint.get("acnorm_import")
    fresh = set(imported.get("fresh_keys") or []) if isinstance(imported, dict) else set()
    return [name for name in acnorm_modules(network) if f"{name}.weight" in fresh and f"{name}.weight" in loaded]


def check_pretrained_weights(network: nn.Module, fname: str, plans_name: str | None = None) -> dict:
    """:func:`read_pretrained_weights` with nnU-Net's rule (``parts="all"``); returns the tensors to load."""
    return read_pretrained_weights(network, fname, plans_name).state


def put_pretrained_weights(network: nn.Module, load: PretrainedLoad) -> None:
    """Load what :func:`read_pretrained_weights` read into ``network`` (the rest stays as it is)."""
    own = network.state_dict()
    network.load_state_dict({k: v.to(own[k].dtype) for k, v in load.state.items()}, strict=False)


def _unwrapped(network: nn.Module) -> nn.Module:
    network = network.module if isinstance(network, DistributedDataParallel) else network
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def route_pretrained_loading(network: nn.Module, load: PretrainedLoad | None, log: Callable[[str], None],
                             parts: str = "all", plans_name: str | None = None) -> None:
    """Make nnU-Net's ``run_training.load_pretrained_weights(network, fname)`` -- called right after
    the trainer's ``initialize`` -- put ``load`` (read by :func:`read_pretrained_weights` from the
    command line's file) into ``network`` instead of reading ``fname`` again; without ``load`` (nnU-Net
    called as a Python API) or for another file, it reads ``fname`` once, here, the same safe way.
    Any other network goes to nnU-Net's loader; the original is back after the one call for ``network``.
    """
    import nnunetv2.run.run_training as run_training

    original = getattr(run_training.load_pretrained_weights, "nnunet_original", run_training.load_pretrained_weights)

    def load_pretrained_weights(target, fname, verbose=False):
        if _unwrapped(target) is not network:
            return original(target, fname, verbose)
        run_training.load_pretrained_weights = original
        chosen = load if load is not None and os.path.abspath(fname) == load.path else \
            read_pretrained_weights(network, fname, plans_name, parts)
        set_strict_source(network, False)  # plain checkpoints: their norm affines become the AC-Norm source
        put_pretrained_weights(network, chosen)
        log(f"Pretrained weights: {len(chosen.state)} tensors from {chosen.path} (read once, weights_only=True; "
            f"parts: {chosen.parts}); {len(chosen.fresh)} start fresh")
        for line in chosen.bridged:
            log(f"  kernel bridged: {line}")

    load_pretrained_weights.nnunet_original = original
    run_training.load_pretrained_weights = load_pretrained_weights


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


def claim_log_file(log_file: str) -> str:
    """``log_file`` if this process creates it now, else the first free ``<name>_<n>.txt`` beside it.

    nnU-Net names a run's log by the second it started: a second ``nnUNetv2_train`` of the same fold
    started in that second would write into, and when refused remove, the first run's log. The
    file is created atomically (``O_EXCL``), so each run owns the log it may later remove.
    """
    base, ext = os.path.splitext(log_file)
    candidate, n = log_file, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{base}_{n}{ext}"


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
