"""The Models Genesis 3D U-Net (also Semantic Genesis, TransVW, SuPreM's U-Net), written from its
published description so that the published state dicts load by name.

Attribute names follow the upstream ``UNet3D`` exactly (``down_tr64 ... down_tr512``,
``up_tr256 ... up_tr64``, ``out_tr``; each stage ``ops.{0,1}.{conv1,bn1}``; up stages
``up_conv``), so a published file loads with ``load_state_dict(strict=True)`` once its ``module.``
prefix is stripped (see :mod:`nnunet_acnorm.checkpoints`).

Decisions (documented in docs/pretrained_loaders.md):

- **Intensity window inside the network.** ``input_window=(-1000, 1000)`` clips the input (CT in
  Hounsfield units) to that range and scales it to [0, 1], as in the authors' pretraining. nnU-Net
  cannot plug in custom normalisation classes, so the import command writes plans with
  ``NoNormalization`` (raw HU reach the network) and this argument. ``None`` (default) leaves the
  input as it comes (for plain torch use, or non-CT data normalised by nnU-Net).
- **Deep supervision by auxiliary heads.** nnU-Net trains with deep supervision at the scales
  given by the plans' ``strides`` ([1, 1/2, 1/4] for this network). Two 1x1x1 convolutions on the
  outputs of ``up_tr128`` (1/2) and ``up_tr256`` (1/4) give those outputs. They live in
  ``decoder.seg_layers`` (keys contain ``.seg_layers.``, which nnU-Net's ``-pretrained_weights``
  loader skips, like its own heads), and ``decoder.deep_supervision`` is the switch nnU-Net's
  trainer sets. They always exist (inference rebuilds the network without deep supervision and
  loads the trained checkpoint strictly); ``deep_supervision_heads=False`` builds exactly the
  upstream key set (106 keys).
- **BatchNorm uses running statistics in eval mode** (plain ``nn.BatchNorm3d``); upstream always
  normalises with batch statistics. nnU-Net predicts one sliding-window patch at a time, where
  batch statistics would be per-patch statistics; running statistics are the standard choice and
  are updated during fine-tuning.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

#: the only downsampling this network has (plans' ``strides``: nnU-Net derives the deep
#: supervision scales from them)
GENESIS_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
#: input sizes must be divisible by this (three 2x max-pools)
GENESIS_DIVISIBILITY = 8
#: CT window of the authors' pretraining, in Hounsfield units
GENESIS_CT_WINDOW = (-1000.0, 1000.0)

_ACTIVATIONS = {"relu": lambda c: nn.ReLU(inplace=True), "elu": lambda c: nn.ELU(inplace=True),
                "prelu": lambda c: nn.PReLU(c)}


class LUConv(nn.Module):
    """Conv3d 3x3x3 (bias) -> BatchNorm3d -> activation; upstream names conv1, bn1."""

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.activation = _ACTIVATIONS[act](out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two LUConvs (``ops``); ``forward`` returns (features before pooling, pooled or None)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, pool: bool,
                 act: str = "relu") -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(in_channels, mid_channels, act), LUConv(mid_channels, out_channels, act))
        self.maxpool = nn.MaxPool3d(2) if pool else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        features = self.ops(x)
        return features, (self.maxpool(features) if self.maxpool is not None else None)


class UpTransition(nn.Module):
    """ConvTranspose3d(k2, s2) keeping channels (``up_conv``), concat with the skip, two LUConvs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, act: str = "relu") -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(in_channels + skip_channels, out_channels, act),
                                 LUConv(out_channels, out_channels, act))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class OutputTransition(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(x)


class GenesisDeepSupervision(nn.Module):
    """nnU-Net's deep-supervision switch plus the auxiliary heads (1/2 and 1/4 resolution)."""

    def __init__(self, channels_half: int, channels_quarter: int, num_classes: int, enabled: bool,
                 with_heads: bool) -> None:
        super().__init__()
        self.deep_supervision = enabled
        self.seg_layers = nn.ModuleList(
            [nn.Conv3d(channels_half, num_classes, 1), nn.Conv3d(channels_quarter, num_classes, 1)]
            if with_heads else [])


def _check_window(window) -> tuple[float, float] | None:
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"input_window must be (low, high) with high > low, got {window}")
    return lo, hi


def _check_strides(strides, name: str) -> None:
    if strides is None:
        return
    given = tuple(tuple(int(s) for s in (stage if isinstance(stage, Sequence) else [stage] * 3))
                  for stage in strides)
    if given != GENESIS_STRIDES:
        raise ValueError(f"{name} has fixed strides {[list(s) for s in GENESIS_STRIDES]}; the plans "
                         f"give {[list(s) for s in given]}. Re-run nnUNetv2_acnorm_import to write "
                         "matching plans.")


class GenesisEncoder3D(nn.Module):
    """The encoder half (``down_tr64 ... down_tr512``), upstream names at the top level.

    ``forward`` returns the deepest feature map (``out_channels`` = 16 x ``base_features``, 512 at
    the published width) at 1/8 of the input size, the input of the authors' classification head
    (global average pool, Linear(512, 1024), ReLU, Linear(1024, n)).
    """

    #: state-dict prefixes of the encoder (the stem included)
    encoder_prefixes = ("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512.")

    def __init__(self, input_channels: int = 1, base_features: int = 32, act: str = "relu",
                 input_window: Sequence[float] | None = None) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        c = int(base_features)
        self.input_channels = int(input_channels)
        self.base_features = c
        self.input_window = _check_window(input_window)
        self.down_tr64 = DownTransition(input_channels, c, 2 * c, pool=True, act=act)
        self.down_tr128 = DownTransition(2 * c, 2 * c, 4 * c, pool=True, act=act)
        self.down_tr256 = DownTransition(4 * c, 4 * c, 8 * c, pool=True, act=act)
        self.down_tr512 = DownTransition(8 * c, 8 * c, 16 * c, pool=False, act=act)
        self.out_channels = 16 * c

    def apply_window(self, x: Tensor) -> Tensor:
        if self.input_window is None:
            return x
        lo, hi = self.input_window
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Features of the four stages (full, 1/2, 1/4, 1/8 resolution)."""
        if any(s % GENESIS_DIVISIBILITY for s in x.shape[2:]):
            raise ValueError(f"{type(self).__name__}: input size {tuple(x.shape[2:])} must be divisible "
                             f"by {GENESIS_DIVISIBILITY} in every axis")
        x = self.apply_window(x)
        skips = []
        for stage in (self.down_tr64, self.down_tr128, self.down_tr256, self.down_tr512):
            features, x = stage(x)
            skips.append(features)
        return skips

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)[-1]


class GenesisClassifier3D(GenesisEncoder3D):
    """Encoder + the authors' classification head: GAP, Linear(512, 1024), ReLU, Linear(1024, n)."""

    def __init__(self, input_channels: int = 1, num_classes: int = 2, base_features: int = 32,
                 hidden_features: int = 1024, act: str = "relu",
                 input_window: Sequence[float] | None = None) -> None:
        super().__init__(input_channels, base_features, act, input_window)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1),
                                        nn.Linear(self.out_channels, hidden_features), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(super().forward(x))


class GenesisUNet3D(GenesisEncoder3D):
    """The full Models Genesis 3D U-Net, buildable by nnU-Net from plans by dotted path
    (``nnunet_acnorm.networks.genesis_unet3d.GenesisUNet3D``).

    nnU-Net passes ``input_channels``, ``num_classes`` and ``deep_supervision``; the plans'
    ``arch_kwargs`` hold ``strides`` (must be :data:`GENESIS_STRIDES`; nnU-Net reads the deep
    supervision scales from it), ``base_features`` (32 = published width) and ``input_window``.
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 1, deep_supervision: bool = False,
                 base_features: int = 32, act: str = "relu", input_window: Sequence[float] | None = None,
                 strides: Sequence | None = None, deep_supervision_heads: bool = True) -> None:
        super().__init__(input_channels, base_features, act, input_window)
        _check_strides(strides, type(self).__name__)
        if deep_supervision and not deep_supervision_heads:
            raise ValueError("deep_supervision=True needs deep_supervision_heads=True")
        c = self.base_features
        self.num_classes = int(num_classes)
        self.up_tr256 = UpTransition(16 * c, 8 * c, 8 * c, act)
        self.up_tr128 = UpTransition(8 * c, 4 * c, 4 * c, act)
        self.up_tr64 = UpTransition(4 * c, 2 * c, 2 * c, act)
        self.out_tr = OutputTransition(2 * c, num_classes)
        self.decoder = GenesisDeepSupervision(4 * c, 8 * c, num_classes, bool(deep_supervision),
                                              with_heads=deep_supervision_heads)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        skip64, skip128, skip256, x = self.encode(x)
        quarter = self.up_tr256(x, skip256)
        half = self.up_tr128(quarter, skip128)
        full = self.out_tr(self.up_tr64(half, skip64))
        if not self.decoder.deep_supervision:
            return full
        if len(self.decoder.seg_layers) != 2:
            raise RuntimeError("deep supervision is on but the network was built without its heads")
        return [full, self.decoder.seg_layers[0](half), self.decoder.seg_layers[1](quarter)]
