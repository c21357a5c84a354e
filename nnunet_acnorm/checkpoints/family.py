"""Declarative pretrained families (in the spirit of timm's ``pretrained_cfg`` plus one
``checkpoint_filter_fn``) and safe checkpoint reading."""
from __future__ import annotations

import os
import re
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from nnunet_acnorm.checkpoints.io import CheckpointReadError, safe_torch_load
from nnunet_acnorm.norms.ac_corr import norm_affines
from nnunet_acnorm.errors import InputError

StateDict = dict[str, torch.Tensor]


class PretrainedLoadError(InputError):
    """A pretrained file cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Intensity:
    """How the pretraining normalised its input, typed (no string to parse back).

    ``scheme``: ``ct_window`` (Hounsfield units clipped to ``window`` and scaled to [0, 1]),
    ``zscore`` / ``zscore_foreground`` (per image), ``imagenet_rgb`` (``mean`` / ``std`` per RGB
    channel), ``nnunet_plans`` / ``dataset_plans`` (whatever the plans of the pretraining said).
    """

    scheme: str
    window: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __str__(self) -> str:
        if self.window is not None:
            return f"{self.scheme}[{self.window[0]:g},{self.window[1]:g}]->[0,1]"
        if self.mean is not None:
            return f"{self.scheme}(mean={list(self.mean)},std={list(self.std or ())})"
        return self.scheme


#: ``plan_architecture(weights, configuration, channel_names, notes)``: edits the configuration (nnU-Net
#: plans format, a copy) so that it builds this family's network; appends what it decided to ``notes``
PlanHook = Callable[["PretrainedWeights", dict, dict, list], None]


def _identity_key(key: str) -> str | None:
    return key


def _no_info(checkpoint: Mapping, state_dict: StateDict) -> dict:
    return {}


@dataclass(frozen=True)
class PretrainedFamily:
    """What a family's files look like and what they belong to.

    Pipeline of :func:`load_pretrained`: pick the state dict (the first of ``state_dict_keys``
    present at the top level; ``()`` = the file is the state dict) -> strip the first matching
    prefix of ``strip_prefixes`` -> drop keys starting with any of ``drop_prefixes`` (after
    stripping) -> ``map_key`` (None drops the key) -> ``filter_state_dict(state_dict, info)`` for
    what needs the whole dict. ``read_info`` extracts what the import needs (depth, plans...).
    """

    name: str
    description: str
    #: does this raw checkpoint (top-level object) belong to the family?
    recognise: Callable[[Any], bool]
    #: dotted path of the network class the mapped keys belong to
    network: str
    spatial_dims: int
    #: input channels of the pretrained stem (None: read from the file / plan)
    input_channels: int | None
    #: intensity normalisation used in pretraining (how the import sets the plans)
    intensity: Intensity
    norm_type: str
    #: what the file provides ("encoder + decoder", "encoder")
    loaded_parts: str
    licence: str
    members: tuple[str, ...] = ()
    state_dict_keys: tuple[str, ...] = ("state_dict",)
    strip_prefixes: tuple[str, ...] = ()
    drop_prefixes: tuple[str, ...] = ()
    map_key: Callable[[str], str | None] = _identity_key
    filter_state_dict: Callable[[StateDict, dict], StateDict] | None = None
    read_info: Callable[[Any, StateDict], dict] = _no_info
    #: ``read_companion(path)``: facts from files published beside the checkpoint (nnU-Net v1's
    #: ``<file>.pkl``), merged into ``info``; None: the file stands alone
    read_companion: Callable[[str], dict] | None = None
    #: our key of the first convolution's weight (input-channel adaptation); None: from info["stem_key"]
    stem_weight_key: str | None = None
    #: prefixes (our names) of the encoder; an import must match at least these
    encoder_prefixes: tuple[str, ...] = ()
    #: how nnUNetv2_acnorm_import plans this family's network (None: the family cannot be planned)
    plan_architecture: PlanHook | None = None
    #: the classification network its weights fit (``networks.classifiers.ARCHITECTURES``), or None
    classifier: str | None = None


@dataclass
class PretrainedWeights:
    family: PretrainedFamily
    #: keys already mapped to our network's names for that family
    state_dict: StateDict
    #: family-specific facts read from the file (e.g. {"depth": 18}, the nnssl adaptation plan)
    info: dict = field(default_factory=dict)
    path: str = ""

    @property
    def stem_weight_key(self) -> str | None:
        return self.info.get("stem_key", self.family.stem_weight_key)

    @property
    def stem_weight_keys(self) -> tuple[str, ...]:
        """Every weight that convolves the input image (STU-Net: the stem conv and its 1x1 shortcut)."""
        keys = self.info.get("stem_keys")
        if keys:
            return tuple(keys)
        return (self.stem_weight_key,) if self.stem_weight_key else ()

    @property
    def spatial_dims(self) -> int:
        """The file's own number of spatial dimensions (an nnU-Net v2 checkpoint is 2D or 3D by its
        plans), else the family's."""
        return int(self.info.get("spatial_dims", self.family.spatial_dims))

    @property
    def description(self) -> str:
        """The family's description for THIS file: the ResNet depth read from it, not the family's
        usual one (a ResNet-18 file of the torchvision family is not called ResNet-50)."""
        text = self.family.description
        depth = self.info.get("depth")
        if depth:
            text = re.sub(r"ResNet-\d+(/\d+)*", f"ResNet-{int(depth)}", text, count=1)
        if self.info.get("stripped_prefix"):
            text += f"; every key was under '{self.info['stripped_prefix']}' (a DDP/DataParallel save): stripped"
        return text

    def norm_affines(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (weight, bias)} of every norm layer in the file, in our names (the rule of
        :func:`nnunet_acnorm.norms.ac_corr.norm_affines`)."""
        return norm_affines(self.state_dict)


def plan_file_architecture(weights: PretrainedWeights, config: dict, channel_names: dict, notes: list) -> None:
    """The planning hook of families whose files carry their nnU-Net ``architecture`` entry."""
    config["architecture"] = deepcopy(weights.info["architecture"])


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """torch.load with ``weights_only=True`` (numpy scalars/arrays allowed); a file that needs
    arbitrary pickled objects is refused unless ``trust_pickle``."""
    path = os.fspath(path)
    try:
        return safe_torch_load(path)
    except CheckpointReadError as error:
        if error.kind == "missing":
            raise PretrainedLoadError(f"{error}; give the path of a downloaded checkpoint") from None
        if error.kind == "corrupt" or error.kind == "empty":
            raise PretrainedLoadError(f"{error}: download it again") from None
        if error.kind != "pickle" or not trust_pickle:
            advice = ". Only if you trust its source, pass --trust_pickle (trust_pickle=True)" \
                if error.kind == "pickle" else ""
            raise PretrainedLoadError(f"{error}{advice}") from None
    try:  # trusted by the user
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure of an arbitrary pickle is a bad file
        raise PretrainedLoadError(f"{path}: loading failed even with trust_pickle ({type(error).__name__}: "
                                  f"{_first_line(str(error))})") from None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line[:200]


def _state_dict_of(family: PretrainedFamily, checkpoint: Any) -> Mapping | None:
    if not family.state_dict_keys:
        return checkpoint if isinstance(checkpoint, Mapping) else None
    if not isinstance(checkpoint, Mapping):
        return None
    for key in family.state_dict_keys:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return None


def tensor_items(state: Mapping) -> StateDict:
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def apply_family(family: PretrainedFamily, checkpoint: Any, path: str = "") -> PretrainedWeights:
    raw = _state_dict_of(family, checkpoint)
    if raw is None:
        wanted = " or ".join(repr(k) for k in family.state_dict_keys) or "a bare state dict"
        raise PretrainedLoadError(f"{path}: no state dict under {wanted}: not a {family.name} checkpoint")
    raw = tensor_items(raw)
    info = family.read_info(checkpoint, raw)
    if family.read_companion is not None and path:
        info.update(family.read_companion(path))
    mapped: StateDict = {}
    for key, value in raw.items():
        for prefix in family.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if any(key.startswith(p) for p in family.drop_prefixes):
            continue
        new_key = family.map_key(key)
        if new_key is not None:
            mapped[new_key] = value
    if family.filter_state_dict is not None:
        mapped = family.filter_state_dict(mapped, info)
    for key, value in mapped.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PretrainedLoadError(f"{path}: tensor {key} contains NaN or infinite values (a diverged or "
                                      "corrupted checkpoint); use another file")
    if not mapped:
        raise PretrainedLoadError(f"{path}: no {family.name} weights left after mapping the keys")
    return PretrainedWeights(family=family, state_dict=mapped, info=info, path=path)
