"""The CIFAR ResNet50 of the distillation benchmarks (field name ``ResNet50``).

Reference: RepDistiller ``models/resnetv2.py`` ``ResNet50`` (mdistiller's ``mdistiller/models/cifar/resnetv2.py``
is the same network): ImageNet's bottleneck ResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32x32
inputs. Names inside a block (``conv1``..``bn3``, ``shortcut``) are the reference's; its ``conv1``/``bn1`` are
``stem.conv1``/``stem.bn1``, ``layerK`` is ``stageK``, ``linear`` is ``classifier``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_runner.models.cifar_parts import Shape, StagedNet, conv_bn_relu, fixed, init_kaiming, named_stage


class Bottleneck(nn.Module):
    """1x1-BN-ReLU, 3x3 (stride)-BN-ReLU, 1x1 (x4)-BN, plus the shortcut, then ReLU (not when ``last``)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, last: bool = False) -> None:
        super().__init__()
        c_out = self.expansion * planes
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return out if self.last else F.relu(out)


class CifarResNetV2(StagedNet):
    """Stem conv3x3(64)-BN-ReLU, 4 bottleneck stages (64, 128, 256, 512 planes; strides 1, 2, 2, 2), pool, Linear.

    Taps: ``stem``, ``stage1``..``stage4`` (post-ReLU), ``stage1.preact``..``stage4.preact``, ``embedding``
    (2048 wide), ``classifier``. ``zero_init_residual`` zeroes each block's last BN weight (reference option,
    off by default).
    """

    def __init__(self, input_shape: Shape, num_classes: int, num_blocks: Sequence[int],
                 zero_init_residual: bool = False) -> None:
        stem = conv_bn_relu(input_shape[0], 64, 3)
        stages, c_in = [], 64
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(c_in, planes, stride if j == 0 else 1, last=j == n - 1))
                c_in = planes * Bottleneck.expansion
            stages.append(named_stage(blocks, ("relu", nn.ReLU())))
        super().__init__(stem, stages, c_in, num_classes)
        init_kaiming(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)


RESNETV2_ARCHS = {"resnet50_cifar": fixed(CifarResNetV2, num_blocks=(3, 4, 6, 3))}
