"""The CIFAR ShuffleNet V1 of the distillation benchmarks (field name ``ShuffleV1``).

Reference: RepDistiller ``models/ShuffleNetv1.py`` ``ShuffleV1`` (mdistiller's
``mdistiller/models/cifar/ShuffleNetv1.py`` is the same): a 1x1 conv stem to 24 channels, 3 stages of
4, 8, 4 grouped bottlenecks (240, 480, 960 channels, 3 groups; each stage's first block has stride 2 and
concatenates an average-pooled shortcut), global average pool, Linear(960, classes). Names inside a block
are the reference's; its ``conv1``/``bn1`` are ``stem.conv1``/``stem.bn1``, ``layerK`` is ``stageK``,
``linear`` is ``classifier``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_runner.models.cifar_parts import (
    ChannelShuffle,
    GlobalAvgPool,
    Shape,
    StagedNet,
    conv_bn_relu,
    fixed,
    named_stage,
)

STEM = 24


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1-BN-ReLU, channel shuffle, 3x3 depthwise (stride)-BN-ReLU, grouped 1x1-BN; added to the input
    (stride 1) or concatenated with its 3x3 average pool (stride 2); then ReLU (not when ``last``).

    The first grouped 1x1 is ungrouped when it reads the 24-channel stem (as the reference decides it).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, last: bool = False) -> None:
        super().__init__()
        self.stride, self.last = stride, last
        mid = int(c_out / 4)
        g = 1 if c_in == STEM else groups
        self.conv1 = nn.Conv2d(c_in, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return out if self.last else F.relu(out)


class ShuffleNetV1(StagedNet):
    """Taps: ``stem``, ``stage1``..``stage3`` (post-ReLU), ``stage1.preact``..``stage3.preact``, ``embedding``
    (``out_planes[-1]`` wide), ``classifier``."""

    def __init__(self, input_shape: Shape, num_classes: int, out_planes: tuple[int, ...], num_blocks: tuple[int, ...],
                 groups: int) -> None:
        stem = conv_bn_relu(input_shape[0], STEM, 1)
        stages, c_in = [], STEM
        for planes, n in zip(out_planes, num_blocks, strict=True):
            # the stride-2 first block concatenates its c_in-channel shortcut: its branch makes planes - c_in
            blocks = [ShuffleBottleneck(c_in, planes - c_in, 2, groups, last=n == 1)]
            blocks += [ShuffleBottleneck(planes, planes, 1, groups, last=j == n - 1) for j in range(1, n)]
            stages.append(named_stage(blocks, ("relu", nn.ReLU())))
            c_in = planes
        super().__init__(stem, stages, out_planes[-1], num_classes, pool=GlobalAvgPool())


SHUFFLEV1_ARCHS = {"shufflev1": fixed(ShuffleNetV1, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3)}
