"""FitNets-style hint: a learned regressor maps a student layer onto a teacher layer, scored by MSE."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, LayerPairMethod, Outputs, Setup, cross_entropy, nonneg


class ConvRegressor(nn.Module):
    """3x3 conv to the teacher's channels (the tutorial's regressor), pooled down to its grid if larger."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y if tuple(y.shape[-2:]) == self.size else F.adaptive_avg_pool2d(y, self.size)


class Hint(LayerPairMethod):
    name = "hint"

    def __init__(self, student_layer: str = "features", teacher_layer: str = "features",
                 hint_weight: float = 0.25, ce_weight: float = 0.75) -> None:
        super().__init__(student_layer, teacher_layer, ce_weight)
        self.hint_weight = nonneg("hint_weight", hint_weight)

    def extra_modules(self, setup: Setup) -> nn.Module:
        s, t = tuple(setup.student_shapes[self.student_layer]), tuple(setup.teacher_shapes[self.teacher_layer])
        bad = (
            f"method=hint: student layer {self.student_layer!r} output {s[1:]} cannot be mapped onto teacher layer "
            f"{self.teacher_layer!r} output {t[1:]}"
        )
        if len(s) == 4 and len(t) == 4:
            if s[2] < t[2] or s[3] < t[3]:
                raise UserError(bad + "; the student's feature map must be at least as large as the teacher's")
            return nn.ModuleDict({"regressor": ConvRegressor(s[1], t[1], (t[2], t[3]))})
        if len(s) == 2 and len(t) == 2:
            return nn.ModuleDict({"regressor": nn.Linear(s[1], t[1])})
        raise UserError(bad + "; tap layers of the same kind (both conv maps or both vectors)")

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        mapped = extra["regressor"](student.feats[self.student_layer])
        hint = F.mse_loss(mapped, teacher.feats[self.teacher_layer])
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.hint_weight * hint + self.ce_weight * ce, "hint": hint, "ce": ce}
