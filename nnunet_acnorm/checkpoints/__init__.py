"""Pretrained checkpoints of several families, mapped onto our networks' key names.

    weights = load_pretrained("Genesis_Chest_CT.pt")          # family detected by content
    weights.family.name, weights.state_dict, weights.info
    load_pretrained("Dataset291_.../nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres")  # a results folder

One module per family (declarative :class:`PretrainedFamily`); files are read with
``torch.load(weights_only=True)``; a file that needs arbitrary pickled objects is refused unless
``trust_pickle=True``.
"""
from __future__ import annotations

import os

from nnunet_acnorm.checkpoints.census import census
from nnunet_acnorm.checkpoints.family import (PretrainedFamily, PretrainedLoadError, PretrainedWeights,
                                                   apply_family, read_checkpoint)
from nnunet_acnorm.checkpoints.keys import wrapper_prefix
from nnunet_acnorm.checkpoints.results_folder import apply_results_folder, locate_results_folder
from nnunet_acnorm.checkpoints.families.genesis import GENESIS
from nnunet_acnorm.checkpoints.families.medicalnet import MEDICALNET
from nnunet_acnorm.checkpoints.families.moco_v2 import MOCO_V2
from nnunet_acnorm.checkpoints.families.nnssl import NNSSL
from nnunet_acnorm.checkpoints.families.nnunet_v1 import NNUNET_V1
from nnunet_acnorm.checkpoints.families.nnunet_v2 import NNUNET_V2
from nnunet_acnorm.checkpoints.families.stunet import STUNET
from nnunet_acnorm.checkpoints.families.suprem import SUPREM
from nnunet_acnorm.checkpoints.families.torchvision_resnet import TORCHVISION_RESNET
from nnunet_acnorm.norms.conversion import ACNORM_NEEDS, WITHOUT_ACNORM

#: every supported family, in detection order
FAMILIES: dict[str, PretrainedFamily] = {f.name: f for f in (
    GENESIS, SUPREM, NNUNET_V2, NNUNET_V1, STUNET, NNSSL, MEDICALNET, TORCHVISION_RESNET, MOCO_V2)}


def detect_family(checkpoint, path: str = "") -> PretrainedFamily:
    """The family whose recogniser accepts ``checkpoint``; a clear error listing those tried."""
    matches = [f for f in FAMILIES.values() if f.recognise(checkpoint)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PretrainedLoadError(unknown_family_message(checkpoint, path))
    raise PretrainedLoadError(f"{path}: several families recognise this file "
                              f"({', '.join(f.name for f in matches)}); pass -f FAMILY to choose")


def unknown_family_message(checkpoint, path: str = "") -> str:
    """One line for a file no family recognises: what it holds, what AC-Norm needs, what to do instead."""
    if isinstance(checkpoint, dict):
        top = sorted(str(k) for k in checkpoint)[:8]
        what = f"top-level keys {top}{' ...' if len(checkpoint) > 8 else ''}"
    else:
        what = f"a {type(checkpoint).__name__}, not a dict"
    found = census(checkpoint)
    head = f"{path}: no known pretrained family recognises this file ({what}; {found.describe()}); tried " \
           f"{', '.join(FAMILIES)}"
    if found.transformer_only:
        return f"{head}. AC-Norm cannot apply to it: {ACNORM_NEEDS}; {WITHOUT_ACNORM}"
    return f"{head}. Pass -f FAMILY if you know its family; {ACNORM_NEEDS} in a network this plugin can build, " \
           f"otherwise {WITHOUT_ACNORM}"


def strip_wrapper_prefix(checkpoint) -> tuple[object, str] | None:
    """``(checkpoint, prefix)`` with the DDP/DataParallel ``module.`` (or torch.compile ``_orig_mod.``)
    prefix removed from every key of its state dict (the top level or a family's state-dict key),
    or None when no state dict carries one on every key."""
    if not isinstance(checkpoint, dict):
        return None
    places = [None] + sorted({k for f in FAMILIES.values() for k in f.state_dict_keys})
    for place in places:
        state = checkpoint if place is None else checkpoint.get(place)
        if not isinstance(state, dict):
            continue
        prefix = wrapper_prefix(state)
        if prefix is None:
            continue
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        return (stripped if place is None else {**checkpoint, place: stripped}), prefix
    return None


def resolve_family(checkpoint, path: str = "", family: str | None = None):
    """``(family, checkpoint, stripped_prefix)``: the family of ``checkpoint`` (``family`` forces
    one) and the checkpoint to map with it. A file saved from a DDP/DataParallel-wrapped network
    (every key under ``module.``) that only the stripped keys make recognisable is stripped."""
    if family is not None and family not in FAMILIES:
        raise PretrainedLoadError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    candidates = [f for f in FAMILIES.values() if f.recognise(checkpoint)] if family is None else \
        [FAMILIES[family]] if FAMILIES[family].recognise(checkpoint) else []
    prefix = None
    if not candidates:
        stripped = strip_wrapper_prefix(checkpoint)
        if stripped is not None and (any(f.recognise(stripped[0]) for f in FAMILIES.values()) if family is None
                                     else FAMILIES[family].recognise(stripped[0])):
            checkpoint, prefix = stripped
    chosen = FAMILIES[family] if family is not None else detect_family(checkpoint, path)
    if family is not None and not chosen.recognise(checkpoint):
        raise PretrainedLoadError(f"{path}: does not look like a {family} checkpoint "
                                  f"(expected {chosen.description}); "
                                  f"detected: {_detected_name(checkpoint)}")
    return chosen, checkpoint, prefix


def load_pretrained(path: str | os.PathLike, family: str | None = None,
                    trust_pickle: bool = False) -> PretrainedWeights:
    """Read ``path`` and map its weights onto our network's names for its family."""
    path = os.fspath(path)
    if family is not None and family not in FAMILIES:
        raise PretrainedLoadError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    folder = locate_results_folder(path)  # an nnU-Net results folder (TotalSegmentator's models) or a file in one
    if folder is not None:
        path = folder.checkpoint
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    chosen, checkpoint, prefix = resolve_family(checkpoint, path, family)
    weights = apply_family(chosen, checkpoint, path)
    if prefix is not None:
        weights.info["stripped_prefix"] = prefix
    if folder is not None:
        apply_results_folder(weights, folder)
    return weights


def _detected_name(checkpoint) -> str:
    names = [f.name for f in FAMILIES.values() if f.recognise(checkpoint)]
    return ", ".join(names) if names else "no known family"


__all__ = ["FAMILIES", "PretrainedFamily", "PretrainedLoadError", "PretrainedWeights", "detect_family",
           "load_pretrained", "read_checkpoint", "resolve_family", "strip_wrapper_prefix", "unknown_family_message"]
