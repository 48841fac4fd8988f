"""Hinton et al. (2015) soft targets: soft_weight * T^2 * KL(p_T^teacher || p_T^student) + ce_weight * CE."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, number
from kd_runner.methods.base import Method, Outputs, nonneg


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """KL(p_T^teacher || p_T^student) averaged over the batch, times T^2 (keeps gradient scale)."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


class KD(Method):
    name = "kd"

    def __init__(self, T: float = 2.0, soft_weight: float = 0.25, ce_weight: float = 0.75) -> None:
        super().__init__(ce_weight)
        self.T = number(T, "method.T")
        if self.T <= 0:
            raise UserError(f"method.T={self.T:g} is invalid; the temperature must be > 0")
        self.soft_weight = nonneg("soft_weight", soft_weight)

    def loss(self, student: Outputs, teacher: Outputs | None, targets: Tensor, extra: nn.Module) -> dict[str, Tensor]:
        soft = soft_target_kl(student.logits, teacher.logits, self.T)
        ce = F.cross_entropy(student.logits, targets)
        return {"total": self.soft_weight * soft + self.ce_weight * ce, "soft": soft, "ce": ce}
