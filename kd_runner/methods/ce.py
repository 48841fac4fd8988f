"""Cross-entropy only: the teacher, the baseline student, and ``method=ce``."""

from __future__ import annotations

from torch import Tensor, nn

from kd_runner.methods.base import Batch, Method, Outputs, cross_entropy


class CE(Method):
    name = "ce"
    needs_teacher = False

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.ce_weight * ce, "ce": ce}
