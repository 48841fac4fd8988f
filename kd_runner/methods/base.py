"""The method interface: what a method taps, what it adds, and how it scores a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kd_runner.errors import UserError, number


@dataclass
class Outputs:
    """A model's logits plus the tapped layers' outputs for one batch."""

    logits: Tensor
    feats: dict[str, Tensor] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name`` and implement ``loss``.

    ``student_taps``/``teacher_taps`` name layers read through forward hooks;
    ``extra_modules`` returns trainable pieces (e.g. a regressor) built once the tapped
    shapes are known; they are optimised and saved with the student.
    """

    name = "base"
    needs_teacher = True

    def __init__(self, ce_weight: float = 1.0) -> None:
        self.ce_weight = nonneg("ce_weight", ce_weight)
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []

    def extra_modules(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> nn.Module:
        return nn.ModuleDict()

    def loss(self, student: Outputs, teacher: Outputs | None, targets: Tensor, extra: nn.Module) -> dict[str, Tensor]:
        """Return ``{"total": ..., <part>: ...}``; every part is logged per epoch."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class LayerPairMethod(Method):
    """A method that relates one tapped student layer to one tapped teacher layer."""

    def __init__(self, student_layer: str, teacher_layer: str, ce_weight: float) -> None:
        super().__init__(ce_weight)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_taps, self.teacher_taps = [student_layer], [teacher_layer]


def nonneg(name: str, value: float) -> float:
    value = number(value, f"method.{name}")
    if value < 0:
        raise UserError(f"method.{name}={value:g} is invalid; loss weights must be >= 0")
    return value
