"""CIFAR ResNets (resnet8 .. resnet110, resnet8x4, resnet32x4) of the distillation benchmarks.

Reference: RepDistiller ``models/resnet.py`` (HobbitLong/RepDistiller; mdistiller's
``mdistiller/models/cifar/resnet.py`` is the same network). Layer names inside a block (``conv1``, ``bn1``,
``conv2``, ``bn2``, ``downsample``) are the reference's; its ``conv1``/``bn1`` are ``stem.conv1``/``stem.bn1``,
``layerK`` is ``stageK``, ``fc`` is ``classifier``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_runner.models.cifar_parts import GlobalAvgPool, Shape, StagedNet, conv_bn_relu, fixed, init_kaiming, named_stage


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (1x1 conv + BN when the shape changes) shortcut, then ReLU.

    ``last=True`` (a stage's last block) returns the sum before that ReLU: the stage's ``preact`` and ``relu``
    follow it (the reference's ``is_last`` block returns both).
    """

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 last: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out + (x if self.downsample is None else self.downsample(x))
        return out if self.last else F.relu(out)


class CifarResNet(StagedNet):
    """RepDistiller's ``ResNet(depth, num_filters, 'basicblock')``: a 3x3 stem and 3 stages of (depth - 2) / 6
    basic blocks with ``widths[1:]`` channels (strides 1, 2, 2), global average pool, Linear.

    Taps: ``stem``, ``stage1``..``stage3`` (post-ReLU), ``stage1.preact``..``stage3.preact``, ``embedding``
    (``widths[3]`` wide), ``classifier``.
    """

    def __init__(self, input_shape: Shape, num_classes: int, depth: int, widths: Sequence[int]) -> None:
        if (depth - 2) % 6 != 0 or len(widths) != 4:
            raise ValueError(f"depth must be 6n+2 and widths 4 numbers, got depth={depth}, widths={widths}")
        n = (depth - 2) // 6
        stem = conv_bn_relu(input_shape[0], widths[0], 3)
        stages, c_in = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or c_in != planes:
                conv = nn.Conv2d(c_in, planes, kernel_size=1, stride=stride, bias=False)
                downsample = nn.Sequential(conv, nn.BatchNorm2d(planes))
            blocks = [BasicBlock(c_in, planes, stride, downsample, last=n == 1)]
            blocks += [BasicBlock(planes, planes, last=j == n - 1) for j in range(1, n)]
            stages.append(named_stage(blocks, ("relu", nn.ReLU())))
            c_in = planes
        super().__init__(stem, stages, widths[3], num_classes, pool=GlobalAvgPool())
        init_kaiming(self)


NARROW, X4 = (16, 16, 32, 64), (32, 64, 128, 256)

RESNET_ARCHS = {
    **{f"resnet{d}": fixed(CifarResNet, depth=d, widths=NARROW) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": fixed(CifarResNet, depth=8, widths=X4),
    "resnet32x4": fixed(CifarResNet, depth=32, widths=X4),
}
