"""STU-Net (Huang et al., "STU-Net: Scalable and Transferable Medical Image Segmentation Models
Empowered by Large-Scale Supervised Pre-training", arXiv 2304.06716), written from its published
description so that the released state dicts (nnU-Net v1 ``*.model`` files) load by name.

Structure: six stages of residual blocks (two 3x3x3 convolutions, each followed by an affine
InstanceNorm3d, LeakyReLU after the first and after the sum; the first block of a stage has a
1x1x1 projection ``conv3`` on its shortcut and carries the stage's stride on ``conv1`` and
``conv3``). The decoder upsamples by nearest-neighbour interpolation followed by a 1x1x1
convolution (``upsample_layers``), concatenates (upsampled, skip) and runs a stage of the same
blocks; ``seg_outputs`` are 1x1x1 heads on every decoder stage (deep supervision).

Attribute names follow the release: ``conv_blocks_context.{stage}.{block}.{conv1,norm1,conv2,norm2,
conv3}``, ``upsample_layers.{u}.conv``, ``conv_blocks_localization.{u}.{block}...``,
``seg_outputs.{u}`` (``u`` = 0 is the deepest decoder stage). The four released sizes:

====  ==========================  =============  ==========
size  features per stage          blocks/stage   parameters
====  ==========================  =============  ==========
S     16, 32, 64, 128, 256, 256   1              14.6 M
B     32, 64, 128, 256, 512, 512  1              58.3 M
L     64 ... 1024, 1024           2              440.3 M
H     96 ... 1536, 1536           3              1457.3 M
====  ==========================  =============  ==========

(parameters with 1 input channel and the 105 outputs of the TotalSegmentator release).
"""
from __future__ import annotations

from typing import Sequence

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn
from torch.nn import functional as F

#: features per stage and residual blocks per stage of the released sizes
STUNET_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "S": ((16, 32, 64, 128, 256, 256), (1,) * 6),
    "B": ((32, 64, 128, 256, 512, 512), (1,) * 6),
    "L": ((64, 128, 256, 512, 1024, 1024), (2,) * 6),
    "H": ((96, 192, 384, 768, 1536, 1536), (3,) * 6),
}
#: the released trainers' names (nnU-Net v1) per size
STUNET_TRAINERS = {"S": "STUNetTrainer_small", "B": "STUNetTrainer_base", "L": "STUNetTrainer_large",
                   "H": "STUNetTrainer_huge"}
STUNET_STAGES = 6


def _triple(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)] * 3


class STUNetBlock(nn.Module):
    """Residual block: conv1 (stride) -> norm1 -> LeakyReLU -> conv2 -> norm2, plus the shortcut
    (``conv3``, a 1x1x1 projection with the same stride, when ``projection``), then LeakyReLU.

    Args:
        in_channels, out_channels: channels in and out.
        kernel_size: of conv1 and conv2 (odd, "same" padding).
        stride: of conv1 and conv3.
        projection: give the shortcut a 1x1x1 convolution (the first block of every stage).

    Shape:
        (N, in_channels, D, H, W) -> (N, out_channels, D / stride, H / stride, W / stride)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, projection: bool = False,
                 norm_op: type[nn.Module] = nn.InstanceNorm3d, norm_op_kwargs: dict | None = None):
        super().__init__()
        kernel, stride = _triple(kernel_size), _triple(stride)
        padding = [k // 2 for k in kernel]
        norm_op_kwargs = {"affine": True} if norm_op_kwargs is None else norm_op_kwargs
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding)
        self.norm1 = norm_op(out_channels, **norm_op_kwargs)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, padding=padding)
        self.norm2 = norm_op(out_channels, **norm_op_kwargs)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if projection else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


class STUNetUpsample(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, then a 1x1x1 convolution (``conv``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class STUNetDeepSupervision(nn.Module):
    """nnU-Net's deep-supervision switch (``network.decoder.deep_supervision``); no parameters."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.deep_supervision = bool(enabled)


def _stage(in_channels: int, out_channels: int, blocks: int, kernel, stride, norm: dict) -> nn.Sequential:
    return nn.Sequential(STUNetBlock(in_channels, out_channels, kernel, stride, projection=True, **norm),
                         *[STUNetBlock(out_channels, out_channels, kernel, **norm) for _ in range(blocks - 1)])


class STUNet(nn.Module):
    """STU-Net, buildable by nnU-Net from plans by dotted path (``nnunet_acnorm.networks.stunet.STUNet``).

    Args:
        input_channels, num_classes, deep_supervision: what nnU-Net passes.
        features_per_stage: six widths (see :data:`STUNET_SIZES`).
        blocks_per_stage: residual blocks per stage, six numbers.
        kernel_sizes: per stage (default 3x3x3 everywhere, as released).
        strides: per stage, nnU-Net's plans format (the first is [1, 1, 1]); nnU-Net derives the
            deep-supervision scales from them.
        norm_op, norm_op_kwargs: the norm layer (default affine ``InstanceNorm3d``, as released);
            what ``nnUNetv2_acnorm_fold`` writes into the plans of a folded model.

    Shape:
        (N, input_channels, D, H, W) with D, H, W divisible by the product of the strides ->
        (N, num_classes, D, H, W); with deep supervision a list, full resolution first, then one
        output per coarser decoder stage.

    Examples:
        >>> net = STUNet(1, 3, features_per_stage=[4, 8, 16, 32, 32, 32])
        >>> net(torch.zeros(1, 1, 64, 64, 64)).shape
        torch.Size([1, 3, 64, 64, 64])
    """

    #: state-dict prefixes of the encoder (the stem, the first stage, included)
    encoder_prefixes = ("conv_blocks_context.",)

    def __init__(self, input_channels: int = 1, num_classes: int = 2, deep_supervision: bool = False,
                 features_per_stage: Sequence[int] = STUNET_SIZES["B"][0],
                 blocks_per_stage: Sequence[int] = STUNET_SIZES["B"][1], kernel_sizes: Sequence | None = None,
                 strides: Sequence | None = None, norm_op: type[nn.Module] | None = None,
                 norm_op_kwargs: dict | None = None):
        super().__init__()
        dims, blocks = [int(f) for f in features_per_stage], [int(b) for b in blocks_per_stage]
        kernels = [_triple(k) for k in (kernel_sizes or [[3, 3, 3]] * STUNET_STAGES)]
        strides = [_triple(s) for s in (strides or [[1, 1, 1]] + [[2, 2, 2]] * (STUNET_STAGES - 1))]
        if not (len(dims) == len(blocks) == len(kernels) == len(strides) >= 2) or min(blocks) < 1:
            raise ValueError(f"STUNet needs one width, block count (>= 1), kernel size and stride per stage; got "
                             f"{len(dims)}, {len(blocks)}, {len(kernels)}, {len(strides)}")
        self.input_channels, self.num_classes, self.strides = int(input_channels), int(num_classes), strides
        norm = {"norm_op": norm_op or nn.InstanceNorm3d, "norm_op_kwargs": norm_op_kwargs}
        self.conv_blocks_context = nn.ModuleList(
            [_stage(self.input_channels if s == 0 else dims[s - 1], dims[s], blocks[s], kernels[s], strides[s], norm)
             for s in range(len(dims))])
        n_up = len(dims) - 1
        self.upsample_layers = nn.ModuleList([STUNetUpsample(dims[-1 - u], dims[-2 - u]) for u in range(n_up)])
        self.conv_blocks_localization = nn.ModuleList(
            [_stage(2 * dims[-2 - u], dims[-2 - u], blocks[-2 - u], kernels[-2 - u], 1, norm) for u in range(n_up)])
        self.seg_outputs = nn.ModuleList([nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(n_up)])
        self.decoder = STUNetDeepSupervision(deep_supervision)
        self.apply(InitWeights_He(1e-2))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net applies this to every module after building (He initialisation, as released)."""
        InitWeights_He(1e-2)(module)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        skips = []
        for stage in self.conv_blocks_context:
            x = stage(x)
            skips.append(x)
        outputs = []
        for u, (up, stage, head) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization,
                                                   self.seg_outputs)):
            skip = skips[-2 - u]
            x = stage(torch.cat((up(x, skip.shape[2:]), skip), dim=1))
            outputs.append(head(x))
        if self.decoder.deep_supervision:
            return outputs[::-1]
        return outputs[-1]
