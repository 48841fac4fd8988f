"""The CIFAR MobileNetV2 of the distillation benchmarks (field name ``MobileNetV2`` = RepDistiller's ``mobile_half``).

Reference: RepDistiller ``models/mobilenetv2.py`` ``mobile_half`` = ``MobileNetV2(T=6, width_mult=0.5)`` (the
network of "Knowledge Distillation via Route Constrained Optimization"; mdistiller's
``mdistiller/models/cifar/mobilenetv2.py`` is the same). A stride-2 stem, the 7 inverted-residual groups
(t, c, n, s) of the reference's table, a 1x1 conv to 1280 channels, global average pool, Linear(1280, classes).

The reference's features ``f1``..``f4`` are taken after groups 1, 2, 4 and 6, so the groups are the stages'
children: ``stage1`` = groups 0-1, ``stage2`` = group 2, ``stage3`` = groups 3-4, ``stage4`` = groups 5-6
(``blocks.G`` there is ``stageK.i`` here; ``conv1`` is ``stem``, ``conv2`` is ``head``). A stage ends in a
linear bottleneck (BN, no ReLU), so ``stageK.preact`` is ``stageK`` itself (RepDistiller's ``preact=True``
returns the same features for this model).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_runner.models.cifar_parts import Shape, StagedNet, fixed, init_he_normal, named_stage

# (channels c, blocks n, first stride s) per group, before width_mult; group 0 expands by 1, the others by T
GROUPS = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
STAGE_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]


def conv_bn(c_in: int, c_out: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU as keys 0, 1, 2 (the reference's ``conv_bn`` / ``conv_1x1_bn``)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise (stride)-BN-ReLU, 1x1 project-BN; plus the input when shapes agree."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(StagedNet):
    """MobileNetV2 with expansion ``expand_ratio`` (T) for groups 1-6 and channel multiplier ``width_mult``.

    Taps: ``stem``, ``stage1``..``stage4`` (= ``stageK.preact``: linear bottleneck outputs), ``head`` (the
    1280-channel conv block), ``embedding`` (1280 wide), ``classifier``.
    """

    def __init__(self, input_shape: Shape, num_classes: int, expand_ratio: int, width_mult: float) -> None:
        c_in = int(32 * width_mult)
        stem = conv_bn(input_shape[0], c_in, 3, 2)
        groups = []
        for i, (c, n, s) in enumerate(GROUPS):
            c_out = int(c * width_mult)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(c_in, c_out, stride, 1 if i == 0 else expand_ratio))
                c_in = c_out
            groups.append(nn.Sequential(*blocks))
        stages = [named_stage([groups[g] for g in gs]) for gs in STAGE_GROUPS]
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        head = conv_bn(c_in, last_channel, 1, 1)
        super().__init__(stem, stages, last_channel, num_classes, head=head)
        init_he_normal(self, linear_std=0.01)


MOBILENETV2_ARCHS = {"mobilenetv2": fixed(CifarMobileNetV2, expand_ratio=6, width_mult=0.5)}
