"""The CIFAR ShuffleNet V2 1x of the distillation benchmarks (field name ``ShuffleV2``).

Reference: RepDistiller ``models/ShuffleNetv2.py`` ``ShuffleV2`` = ``ShuffleNetV2(net_size=1)`` (mdistiller's
``mdistiller/models/cifar/ShuffleNetv2.py`` is the same): a 1x1 conv stem to 24 channels, 3 stages of a
stride-2 down-sampling unit and 3, 7, 3 basic units (116, 232, 464 channels), a 1x1 conv-BN-ReLU to 1024
channels (``head``), global average pool, Linear(1024, classes). Names inside a unit are the reference's;
its ``conv1``/``bn1`` are ``stem.conv1``/``stem.bn1``, ``layerK`` is ``stageK``, ``conv2``/``bn2`` are
``head.conv1``/``head.bn1``, ``linear`` is ``classifier``.

A basic unit splits its input in two halves, passes the first through and runs the second through
1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU, concatenates and shuffles. The reference's pre-activation
feature of a stage is its last unit's concat before that final ReLU and before the shuffle; here the last
unit returns that concat, and the stage's ``preact`` (Identity), ``relu`` (the ReLU of the branch half) and
``shuffle`` follow, giving the reference's output exactly.
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
    channel_shuffle,
    conv_bn_relu,
    fixed,
    named_stage,
)

STEM = 24


class BasicUnit(nn.Module):
    """The reference's ``BasicBlock`` (split ratio 1/2). ``last``: return ``cat([x1, branch])`` before its ReLU
    and the shuffle (the reference's ``preact``)."""

    def __init__(self, channels: int, split_ratio: float = 0.5, last: bool = False) -> None:
        super().__init__()
        self.split_ratio, self.last = split_ratio, last
        c = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.last:
            return torch.cat([x1, out], 1)
        return channel_shuffle(torch.cat([x1, F.relu(out)], 1), 2)


class BranchReLU(nn.Module):
    """ReLU of channels ``[c:]`` only, ``c = int(C * split_ratio)``: a basic unit's ReLU after its concat."""

    def __init__(self, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        return torch.cat([x[:, :c], F.relu(x[:, c:])], 1)


class DownUnit(nn.Module):
    """Two stride-2 branches, each ending in ReLU, concatenated and shuffled: the reference's ``DownBlock``.

    left: 3x3 depthwise (s2)-BN, 1x1-BN-ReLU; right: 1x1-BN-ReLU, 3x3 depthwise (s2)-BN, 1x1-BN-ReLU.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, kernel_size=3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(StagedNet):
    """Taps: ``stem``, ``stage1``..``stage3`` (post-ReLU, shuffled), ``stage1.preact``..``stage3.preact`` (the
    last unit's concat before ReLU and shuffle, as the reference's), ``head``, ``embedding``
    (``out_channels[3]`` wide), ``classifier``."""

    def __init__(self, input_shape: Shape, num_classes: int, out_channels: tuple[int, int, int, int],
                 num_blocks: tuple[int, int, int]) -> None:
        stem = conv_bn_relu(input_shape[0], STEM, 1)
        stages, c_in = [], STEM
        for c_out, n in zip(out_channels[:3], num_blocks, strict=True):
            units = [DownUnit(c_in, c_out)] + [BasicUnit(c_out, last=j == n - 1) for j in range(n)]
            stages.append(named_stage(units, ("relu", BranchReLU()), ("shuffle", ChannelShuffle(2))))
            c_in = c_out
        head = conv_bn_relu(c_in, out_channels[3], 1)
        super().__init__(stem, stages, out_channels[3], num_classes, head=head, pool=GlobalAvgPool())


SHUFFLEV2_ARCHS = {"shufflev2": fixed(ShuffleNetV2, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3))}
