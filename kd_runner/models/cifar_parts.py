"""Shared parts of the CIFAR distillation zoo (RepDistiller's ``models/``, mdistiller's ``models/cifar/``).

Every zoo model is a :class:`StagedNet`: an ``nn.Sequential`` of named children, so that
``kd_runner.taps.Taps`` can hook the same names on every architecture:

- ``stem``: the first conv block (RepDistiller's feature ``f0``), 4-D.
- ``stage1`` .. ``stageN`` (N = 3, or 4 for VGG, MobileNetV2 and ResNet50): each stage's output
  (RepDistiller's ``is_feat`` features ``f1`` .. ``fN``; mdistiller's ``feats``), 4-D.
- ``stageK.preact``: the same stage output before its final ReLU (RepDistiller's ``preact=True`` features,
  mdistiller's ``preact_feats``; what OFD distils), 4-D. The Identity sits where the reference keeps
  ``preact``; the stage's ``relu`` follows it. Wide ResNets have no ``stageK.preact``: see ``wrn.py``.
- ``head``: the conv/BN block between the last stage and the pool, where the model has one.
- ``pool``, ``embedding`` (the pooled, flattened feature that feeds the classifier; 2-D) and
  ``classifier`` (the final Linear: the logits).

No ReLU or addition works in place, so a tapped tensor is never changed by a later layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, int, int]


class StagedNet(nn.Sequential):
    """``stem -> stage1..stageN -> [head] -> pool -> embedding -> classifier``, each a named child.

    ``pool`` is a global average pool: ``nn.AdaptiveAvgPool2d(1)`` (VGG, ResNet50, MobileNetV2: their reference
    pools give the same numbers) or :class:`GlobalAvgPool` (the references' fixed ``AvgPool2d(8)`` /
    ``avg_pool2d(out, 4)``, which cover exactly the last feature map at 32x32 inputs). Either way other input
    sizes (28x28, 8x8, 64x64) work too.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        features: int,
        num_classes: int,
        head: nn.Module | None = None,
        pool: nn.Module | None = None,
    ) -> None:
        parts: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        parts.update((f"stage{i}", s) for i, s in enumerate(stages, start=1))
        if head is not None:
            parts["head"] = head
        parts["pool"] = nn.AdaptiveAvgPool2d(1) if pool is None else pool
        parts["embedding"] = nn.Flatten(1)
        parts["classifier"] = nn.Linear(features, num_classes)
        super().__init__(parts)


class GlobalAvgPool(nn.Module):
    """``avg_pool2d`` with the whole feature map as its window: at 32x32 inputs the same op, and the same
    numbers, as the references' ``AvgPool2d(8)`` / ``avg_pool2d(out, 4)`` on their 8x8 / 4x4 last maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=tuple(x.shape[-2:]))


def named_stage(layers: Sequence[nn.Module] | Mapping[str, nn.Module], *after: tuple[str, nn.Module]) -> nn.Sequential:
    """``layers`` (named ``0``, ``1``, ... unless given names), then ``preact`` (an Identity), then ``after``.

    ``after`` is the stage's final activation, e.g. ``("relu", nn.ReLU())``; the last block of ``layers``
    must then be built without its own final ReLU.
    """
    items = layers.items() if isinstance(layers, Mapping) else ((str(i), m) for i, m in enumerate(layers))
    parts: OrderedDict[str, nn.Module] = OrderedDict(items)
    parts["preact"] = nn.Identity()
    parts.update(after)
    return nn.Sequential(parts)


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) -> BN -> ReLU, with keys ``conv1``, ``bn1``, ``relu``."""
    conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return nn.Sequential(OrderedDict(conv1=conv, bn1=nn.BatchNorm2d(c_out), relu=nn.ReLU()))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W] (ShuffleNet's ShuffleBlock)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle as a module (no parameters)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def init_kaiming(model: nn.Module) -> None:
    """Convs kaiming-normal (fan_out, relu), BatchNorm weight 1 / bias 0; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_he_normal(model: nn.Module, linear_std: float | None) -> None:
    """Convs N(0, sqrt(2 / (k*k*out))) with bias 0, BatchNorm 1 / 0, Linear bias 0 (and weight N(0, linear_std)).

    ``linear_std=None`` keeps the Linear weight's PyTorch default (the Wide ResNet reference does).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / fan) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def fixed(cls: Callable[..., nn.Module], **settings) -> Callable[..., nn.Module]:
    """A builder ``(input_shape, num_classes, **options)`` of ``cls`` with ``settings`` fixed (not overridable)."""

    def build(input_shape: Shape, num_classes: int, **options) -> nn.Module:
        return cls(input_shape, num_classes, **settings, **options)

    build.__module__ = cls.__module__
    build.__qualname__ = build.__name__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"
    return build
