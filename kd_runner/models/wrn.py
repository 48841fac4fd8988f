"""Wide ResNets WRN-depth-k (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of the distillation benchmarks.

Reference: RepDistiller ``models/wrn.py`` (mdistiller's ``mdistiller/models/cifar/wrn.py`` is the same network).
Names inside a block (``bn1``, ``relu1``, ``conv1``, ``bn2``, ``relu2``, ``conv2``, ``convShortcut``) are the
reference's; its ``conv1`` is ``stem``, ``blockK.layer`` is ``stageK``, ``bn1``/``relu`` after the last stage
are ``head.bn1``/``head.relu``, ``fc`` is ``classifier``.

A pre-activation network: a stage's output is the raw residual sum (``stageK`` is RepDistiller's ``fK``, it has
negative values), and the BN-before-ReLU that RepDistiller's ``preact=True`` / mdistiller's ``preact_feats``
return (OFD's input) is the BN that opens the next stage. So the pre-activation taps are
``stage2.0.bn1`` (of stage1), ``stage3.0.bn1`` (of stage2) and ``head.bn1`` (of stage3), not ``stageK.preact``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from kd_runner.models.cifar_parts import GlobalAvgPool, Shape, StagedNet, fixed, init_he_normal


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3 (stride)-BN-ReLU-[dropout]-conv3x3, plus the input (or a 1x1 conv of the activated input
    when the width changes): the reference's ``BasicBlock``."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = c_in == c_out
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


class WideResNet(StagedNet):
    """conv3x3(16) stem, 3 stages of (depth - 4) / 6 blocks (16k, 32k, 64k channels; strides 1, 2, 2),
    head BN-ReLU, global average pool, Linear.

    Taps: ``stem``, ``stage1``..``stage3`` (raw residual sums), the pre-activations ``stage2.0.bn1``,
    ``stage3.0.bn1``, ``head.bn1`` (see the module docstring), ``head``, ``embedding`` (64k wide), ``classifier``.
    """

    def __init__(self, input_shape: Shape, num_classes: int, depth: int, widen_factor: int,
                 drop_rate: float = 0.0) -> None:
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth should be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        stem = nn.Conv2d(input_shape[0], widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        for c_in, c_out, stride in zip(widths[:-1], widths[1:], (1, 2, 2), strict=True):
            blocks = [WideBasic(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, drop_rate) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        head = nn.Sequential(OrderedDict(bn1=nn.BatchNorm2d(widths[3]), relu=nn.ReLU()))
        super().__init__(stem, stages, widths[3], num_classes, head=head, pool=GlobalAvgPool())
        init_he_normal(self, linear_std=None)
        # pre-activation ResNet: a stage's pre-ReLU output is the next block's bn1 output (see the module docstring)
        self.kd_layer_sets = {"preact_stages": ["stage2.0.bn1", "stage3.0.bn1", "head.bn1"]}


WRN_ARCHS = {
    f"wrn_{d}_{k}": fixed(WideResNet, depth=d, widen_factor=k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
}
