"""Pretrained checkpoints of several families, mapped onto our networks' key names.

    weights = load_pretrained("Genesis_Chest_CT.pt")          # family detected by content
    weights.family.name, weights.state_dict, weights.info

One module per family (declarative :class:`PretrainedFamily`); files are read with
``torch.load(weights_only=True)``; a file that needs arbitrary pickled objects is refused unless
``trust_pickle=True``.
"""
from __future__ import annotations

import os

from nnunet_acnorm.pretrained_loaders.core import (PretrainedFamily, PretrainedLoadError, PretrainedWeights,
                                                   apply_family, read_checkpoint)
from nnunet_acnorm.pretrained_loaders.genesis import GENESIS
from nnunet_acnorm.pretrained_loaders.medicalnet import MEDICALNET
from nnunet_acnorm.pretrained_loaders.moco_v2 import MOCO_V2
from nnunet_acnorm.pretrained_loaders.nnssl import NNSSL
from nnunet_acnorm.pretrained_loaders.nnunet_v1 import NNUNET_V1
from nnunet_acnorm.pretrained_loaders.nnunet_v2 import NNUNET_V2
from nnunet_acnorm.pretrained_loaders.suprem import SUPREM
from nnunet_acnorm.pretrained_loaders.torchvision_resnet import TORCHVISION_RESNET

#: every supported family, in detection order
FAMILIES: dict[str, PretrainedFamily] = {f.name: f for f in (
    GENESIS, SUPREM, NNUNET_V2, NNUNET_V1, NNSSL, MEDICALNET, TORCHVISION_RESNET, MOCO_V2)}


def detect_family(checkpoint, path: str = "") -> PretrainedFamily:
    """The family whose recogniser accepts ``checkpoint``; a clear error listing those tried."""
    matches = [f for f in FAMILIES.values() if f.recognise(checkpoint)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        if isinstance(checkpoint, dict):
            top = sorted(str(k) for k in checkpoint)[:8]
            what = f"top-level keys {top}{' ...' if len(checkpoint) > 8 else ''}"
        else:
            what = f"a {type(checkpoint).__name__}, not a dict"
        raise PretrainedLoadError(f"{path}: no known pretrained family recognises this file ({what}); tried "
                                  f"{', '.join(FAMILIES)}. Pass -f FAMILY if you know its family")
    raise PretrainedLoadError(f"{path}: several families recognise this file "
                              f"({', '.join(f.name for f in matches)}); pass -f FAMILY to choose")


def load_pretrained(path: str | os.PathLike, family: str | None = None,
                    trust_pickle: bool = False) -> PretrainedWeights:
    """Read ``path`` and map its weights onto our network's names for its family."""
    path = os.fspath(path)
    if family is not None and family not in FAMILIES:
        raise PretrainedLoadError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    chosen = FAMILIES[family] if family is not None else detect_family(checkpoint, path)
    if family is not None and not chosen.recognise(checkpoint):
        raise PretrainedLoadError(f"{path}: does not look like a {family} checkpoint "
                                  f"(expected {chosen.description}); "
                                  f"detected: {_detected_name(checkpoint)}")
    return apply_family(chosen, checkpoint, path)


def _detected_name(checkpoint) -> str:
    names = [f.name for f in FAMILIES.values() if f.recognise(checkpoint)]
    return ", ".join(names) if names else "no known family"


__all__ = ["FAMILIES", "PretrainedFamily", "PretrainedLoadError", "PretrainedWeights", "detect_family",
           "load_pretrained", "read_checkpoint"]
