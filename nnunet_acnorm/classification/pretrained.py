"""Pretrained weights for the classification networks: the file read through the project's loader
(:func:`nnunet_acnorm.checkpoints.load_pretrained`), the network settings it implies, and the
mapped state dict loaded into the plain network (every key but the new head's must be filled)."""
from __future__ import annotations

from torch import nn

from nnunet_acnorm.checkpoints import FAMILIES, load_pretrained
from nnunet_acnorm.checkpoints.keys import first_misfit
from nnunet_acnorm.classification.errors import ClassificationInputError
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.networks.classifiers import ARCHITECTURES


def read_pretrained(path: str, family: str | None, trust_pickle: bool):
    """The pretrained file through the project's loader; errors become one-line input errors."""
    try:
        return load_pretrained(path, family=family, trust_pickle=trust_pickle)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ClassificationInputError(str(e).strip().splitlines()[0] if str(e).strip() else
                                       f"cannot load pretrained file {path}") from None


def describe_pretrained(path: str, family: str | None, trust_pickle: bool) -> dict:
    """Architecture settings implied by a pretrained file: architecture, dim, depth, base width."""
    weights = read_pretrained(path, family, trust_pickle)
    name, architecture = weights.family.name, weights.family.classifier
    if architecture is None:
        supported = sorted(f.name for f in FAMILIES.values() if f.classifier is not None)
        raise ClassificationInputError(f"{path} is a '{name}' checkpoint; classification supports the families "
                                       f"{supported}")
    dim, channels = ARCHITECTURES[architecture].dim, ARCHITECTURES[architecture].in_channels
    out = {"architecture": architecture, "dim": dim, "in_channels": channels, "pretrained_family": name,
           "depth": None, "base_features": None, "shortcut_type": None}
    stem = weights.state_dict.get(weights.stem_weight_key or "")
    if stem is not None and int(stem.shape[1]) != channels:
        raise ClassificationInputError(f"{path}: the stem takes {int(stem.shape[1])} input channels; the "
                                       f"{architecture} classifier takes {channels}")
    try:
        out.update(ARCHITECTURES[architecture].settings(weights.state_dict, dict(weights.info or {})))
    except InputError as e:
        raise ClassificationInputError(f"{path}: {e}") from None
    return out


def load_pretrained_weights(network: nn.Module, config: dict, path: str, trust_pickle: bool) -> str:
    """Load the pretrained file into the plain ``network`` (every key but the new head's must be
    filled); return a one-line description for the log."""
    weights = read_pretrained(path, config.get("pretrained_family"), trust_pickle)
    head = ARCHITECTURES[config["architecture"]].head
    own = network.state_dict()
    state = {k: v for k, v in weights.state_dict.items() if not k.startswith(head)}
    used = {k: v for k, v in state.items() if k in own}
    unused = sorted(set(state) - set(used))
    if config["architecture"] != "genesis" and unused:  # genesis files carry the decoder: not used
        raise ClassificationInputError(
            f"{path}: {len(unused)} pretrained keys have no place in the {config['architecture']} "
            f"network (e.g. {unused[:3]}); is -pretrained_family right?")
    body = [k for k in own if not k.startswith(head)]
    misfit = first_misfit(own, used, [k for k in body if k in used])
    if misfit is not None:
        raise ClassificationInputError(
            f"{path}: '{misfit.key}' has shape {misfit.file_shape}, the network expects {misfit.network_shape}"
            if misfit.kind == "shape" else f"{path}: '{misfit.key}' contains NaN or infinite values")
    missing = sorted(k for k in body if k not in used)
    if missing:
        raise ClassificationInputError(
            f"{path} lacks {len(missing)} weights of the {config['architecture']} network (e.g. "
            f"{missing[:3]}): it is not a complete '{weights.family.name}' checkpoint")
    network.load_state_dict(used, strict=False)
    return (f"pretrained weights: {path} ({weights.family.name}), {len(used)} tensors loaded, "
            f"{len(unused)} unused (decoder/projection heads), head '{head.rstrip('.')}' trained from scratch")
