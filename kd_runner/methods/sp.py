"""Similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's ``distiller_zoo/SP.py`` (verified by the
paper's author) and mdistiller's ``distillers/SP.py`` compute it.

For a batch of b samples each tapped map is flattened to (b, D); its Gram matrix ``G = f f^T`` (b x b) is
L2-normalised row by row, and

    sp = sum over layer pairs of ||G_s - G_t||_F^2 / b^2
    total = feat_weight * sp + ce_weight * CE

The Gram matrices compare samples with samples, so student and teacher maps may differ in every dimension but the
batch. The references distil one layer, the last stage's output (RepDistiller ``feat[-2]``, mdistiller
``feats[-1]``): here ``student_layers`` / ``teacher_layers`` list candidate layers (default: ``stages``) and
``layer_index`` picks one entry of each list after it is resolved on its model (default -1: the last stage, also
when the two models have different numbers of stages); ``layer_index: null`` distils every listed pair (the lists
must then have the same length). The teacher's maps stay as tapped: its Gram depends on the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, number
from kd_runner.methods.base import Batch, LayerListMethod, Outputs, as_names, cross_entropy, nonneg


def normalized_gram(f: Tensor) -> Tensor:
    """(b, b): the Gram matrix of the flattened rows of ``f``, each row L2-normalised, in float32."""
    f = f.float().flatten(1)
    return F.normalize(f @ f.t(), dim=1)


def similarity_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """||G_s - G_t||_F^2 / b^2."""
    b = f_s.shape[0]
    diff = normalized_gram(f_t).detach() - normalized_gram(f_s)
    return (diff * diff).sum() / (b * b)


class SP(LayerListMethod):
    name = "sp"

    def __init__(self, student_layers: str | list[str] = "stages", teacher_layers: str | list[str] = "stages",
                 layer_index: int | None = -1, feat_weight: float = 3000.0, ce_weight: float = 1.0) -> None:
        super().__init__(student_layers, teacher_layers, ce_weight)
        self.layer_index = None if layer_index is None else number(layer_index, "method.layer_index", int)
        self.feat_weight = nonneg("feat_weight", feat_weight)
        self._specs = (as_names(student_layers), as_names(teacher_layers))  # bind() resolves from these each time

    def _pick(self, names: list[str], role: str) -> list[str]:
        i, n = self.layer_index, len(names)
        if not -n <= i < n:
            raise UserError(f"method.layer_index={i} is invalid; the {role} layers are {names}: valid: "
                            f"{-n}..{n - 1}, or null for every layer")
        return [names[i]]

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.student_layers, self.teacher_layers = list(self._specs[0]), list(self._specs[1])
        if self.layer_index is None:
            super().bind(student, teacher)
            return
        from kd_runner.taps import expand_layers

        self.student_layers = self._pick(expand_layers(student, self.student_layers), "student")
        self.student_taps = list(self.student_layers)
        if teacher is not None:
            self.teacher_layers = self._pick(expand_layers(teacher, self.teacher_layers), "teacher")
            self.teacher_taps = list(self.teacher_layers)

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):
            sp = torch.stack([similarity_loss(s, t) for s, t in self.pairs(student, teacher)]).sum()
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.feat_weight * sp + self.ce_weight * ce, "sp": sp, "ce": ce}
