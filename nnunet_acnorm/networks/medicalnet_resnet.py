"""MedicalNet (Med3D) 3D ResNets, written from their published description so that the published
state dicts load by name (``conv1``, ``bn1``, ``layer1..layer4``; blocks ``conv{1,2,3}``,
``bn{1,2,3}``, ``downsample.{0,1}``).

- stem: Conv3d 7x7x7 stride 2 (no bias), BN, ReLU, max-pool 3x3x3 stride 2;
- ``layer1`` stride 1, ``layer2`` stride 2, ``layer3`` stride 1 dilation 2, ``layer4`` stride 1
  dilation 4 (output at 1/8 of the input size);
- BasicBlock for depths 10/18/34, Bottleneck (expansion 4) for 50/101/152/200;
- shortcut type A (zero-padded identity, no parameters) for 18/34, type B (1x1x1 conv + BN,
  ``downsample.0/1``) for the others — the published files' choices.

:class:`MedicalNetResNet3D` is the encoder (``out_channels`` = 512 x expansion).
:class:`MedicalNetUNet3D` puts a light U-Net decoder with nnU-Net deep supervision on it, so nnU-Net
can build it from plans by dotted path (encoder keys stay at the top level, as in the files).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

#: depth -> (block type, blocks per layer)
MEDICALNET_LAYERS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                     50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                     152: ("bottleneck", (3, 8, 36, 3)), 200: ("bottleneck", (3, 24, 36, 3))}
#: shortcut type of the published files per depth
MEDICALNET_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}
MEDICALNET_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
MEDICALNET_DIVISIBILITY = 8


class ZeroPadShortcut(nn.Module):
    """Shortcut type A: subsample by ``stride`` and append zero channels (no parameters)."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride, ::self.stride]
        missing = self.out_channels - x.size(1)
        if missing > 0:
            x = torch.cat((x, x.new_zeros(x.size(0), missing, *x.shape[2:])), dim=1)
        return x


def _conv3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class MedicalNetResNet3D(nn.Module):
    """A MedicalNet 3D ResNet encoder; ``forward`` returns the ``layer4`` features (1/8 size)."""

    #: state-dict prefixes of the encoder (the stem ``conv1``/``bn1`` included)
    encoder_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")

    def __init__(self, depth: int = 18, input_channels: int = 1, shortcut_type: str | None = None,
                 base_features: int = 64) -> None:
        super().__init__()
        if depth not in MEDICALNET_LAYERS:
            raise ValueError(f"MedicalNet depth must be one of {sorted(MEDICALNET_LAYERS)}, got {depth}")
        shortcut_type = shortcut_type or MEDICALNET_SHORTCUT[depth]
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' or 'B', got {shortcut_type!r}")
        kind, blocks = MEDICALNET_LAYERS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.shortcut_type, self.input_channels = depth, shortcut_type, int(input_channels)
        c = int(base_features)
        self._in = c
        self.conv1 = nn.Conv3d(input_channels, c, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, c, blocks[0], shortcut_type)
        self.layer2 = self._make_layer(block, 2 * c, blocks[1], shortcut_type, stride=2)
        self.layer3 = self._make_layer(block, 4 * c, blocks[2], shortcut_type, dilation=2)
        self.layer4 = self._make_layer(block, 8 * c, blocks[3], shortcut_type, dilation=4)
        #: channels of each feature map returned by :meth:`encode` (stem, layer1..layer4)
        self.feature_channels = (c, c * block.expansion, 2 * c * block.expansion,
                                 4 * c * block.expansion, 8 * c * block.expansion)
        self.out_channels = self.feature_channels[-1]

    def _make_layer(self, block, planes: int, n_blocks: int, shortcut_type: str, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in != planes * block.expansion:
            if shortcut_type == "A":
                downsample = ZeroPadShortcut(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self._in, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion))
        layers = [block(self._in, planes, stride, dilation, downsample)]
        self._in = planes * block.expansion
        layers += [block(self._in, planes, dilation=dilation) for _ in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def encode(self, x: Tensor) -> list[Tensor]:
        """[stem (1/2), layer1 (1/4), layer2 (1/8), layer3 (1/8), layer4 (1/8)]."""
        stem = self.relu(self.bn1(self.conv1(x)))
        l1 = self.layer1(self.maxpool(stem))
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        return [stem, l1, l2, l3, self.layer4(l3)]

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)[-1]


def build_medicalnet_resnet(depth: int, **kwargs) -> MedicalNetResNet3D:
    return MedicalNetResNet3D(depth=depth, **kwargs)


class _DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm3d(out_channels)
        self.nonlin = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class MedicalNetDecoder(nn.Module):
    """1/8 -> 1/4 (skip layer1) -> 1/2 (skip stem) -> full, with nnU-Net's deep-supervision switch
    and heads at full, 1/2 and 1/4 resolution (``seg_layers``, highest resolution first)."""

    def __init__(self, feature_channels: Sequence[int], num_classes: int, decoder_features: Sequence[int],
                 deep_supervision: bool) -> None:
        super().__init__()
        stem_c, l1_c, _, _, deep_c = feature_channels
        f4, f2, f1 = decoder_features
        self.deep_supervision = deep_supervision
        self.transpconvs = nn.ModuleList([nn.ConvTranspose3d(deep_c, f4, 2, stride=2),
                                          nn.ConvTranspose3d(f4, f2, 2, stride=2),
                                          nn.ConvTranspose3d(f2, f1, 2, stride=2)])
        self.stages = nn.ModuleList([_DecoderBlock(f4 + l1_c, f4), _DecoderBlock(f2 + stem_c, f2),
                                     _DecoderBlock(f1, f1)])
        self.seg_layers = nn.ModuleList([nn.Conv3d(f1, num_classes, 1), nn.Conv3d(f2, num_classes, 1),
                                         nn.Conv3d(f4, num_classes, 1)])

    def forward(self, features: list[Tensor]) -> Tensor | list[Tensor]:
        stem, l1, _, _, deep = features
        quarter = self.stages[0](torch.cat((self.transpconvs[0](deep), l1), 1))
        half = self.stages[1](torch.cat((self.transpconvs[1](quarter), stem), 1))
        full = self.stages[2](self.transpconvs[2](half))
        if not self.deep_supervision:
            return self.seg_layers[0](full)
        return [self.seg_layers[0](full), self.seg_layers[1](half), self.seg_layers[2](quarter)]


class MedicalNetUNet3D(MedicalNetResNet3D):
    """MedicalNet encoder (file key names at the top level) + :class:`MedicalNetDecoder` (always
    trained from scratch), buildable by nnU-Net from plans by dotted path."""

    def __init__(self, input_channels: int = 1, num_classes: int = 2, deep_supervision: bool = False,
                 depth: int = 18, shortcut_type: str | None = None, base_features: int = 64,
                 decoder_features: Sequence[int] = (64, 32, 16), strides: Sequence | None = None) -> None:
        super().__init__(depth, input_channels, shortcut_type, base_features)
        if strides is not None:
            given = tuple(tuple(int(s) for s in stage) for stage in strides)
            if given != MEDICALNET_STRIDES:
                raise ValueError(f"MedicalNetUNet3D has fixed strides {[list(s) for s in MEDICALNET_STRIDES]}; "
                                 f"the plans give {[list(s) for s in given]}")
        self.num_classes = int(num_classes)
        self.decoder = MedicalNetDecoder(self.feature_channels, num_classes, tuple(decoder_features),
                                         bool(deep_supervision))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if any(s % MEDICALNET_DIVISIBILITY for s in x.shape[2:]):
            raise ValueError(f"MedicalNetUNet3D: input size {tuple(x.shape[2:])} must be divisible by "
                             f"{MEDICALNET_DIVISIBILITY} in every axis")
        return self.decoder(self.encode(x))
