"""Cosine loss on hidden representations (PyTorch KD tutorial).

Both tapped outputs are flattened; a wider teacher vector is average-pooled to the
student's width (the tutorial's ``avg_pool1d(kernel_size=2)`` when it is exactly twice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, LayerPairMethod, Outputs, Setup, cross_entropy, nonneg


def pool_to_width(x: Tensor, width: int) -> Tensor:
    """Average-pool a (N, D) batch to (N, width); D must be >= width."""
    if x.shape[1] == width:
        return x
    return F.adaptive_avg_pool1d(x.unsqueeze(1), width).squeeze(1)


class Cosine(LayerPairMethod):
    name = "cosine"

    def __init__(self, student_layer: str = "features", teacher_layer: str = "features",
                 hidden_weight: float = 0.25, ce_weight: float = 0.75) -> None:
        super().__init__(student_layer, teacher_layer, ce_weight)
        self.hidden_weight = nonneg("hidden_weight", hidden_weight)

    def extra_modules(self, setup: Setup) -> nn.Module:
        ds = int(torch.Size(setup.student_shapes[self.student_layer][1:]).numel())
        dt = int(torch.Size(setup.teacher_shapes[self.teacher_layer][1:]).numel())
        if dt < ds:
            raise UserError(
                f"method=cosine: teacher layer {self.teacher_layer!r} has {dt} features, fewer than student layer "
                f"{self.student_layer!r} ({ds}); pooling only narrows the teacher: pick a wider teacher layer, "
                "a narrower student layer, or method=hint (learned regressor)"
            )
        return nn.ModuleDict()

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        s = student.feats[self.student_layer].flatten(1)
        t = pool_to_width(teacher.feats[self.teacher_layer].flatten(1), s.shape[1])
        hidden = F.cosine_embedding_loss(s, t, torch.ones(s.shape[0], device=s.device))
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.hidden_weight * hidden + self.ce_weight * ce, "hidden": hidden, "ce": ce}
