"""Hinton et al. (2015) soft targets: soft_weight * [T^2] * KL(p_T^teacher || p_T^student) + ce_weight * CE.

Two options reach the demos' own variants of the loss without copying it:

- ``t_squared``: multiply the KL term by T^2 (Hinton's gradient-scale fix; the Keras demo leaves it out);
- ``kl_reduction``: ``batchmean`` sums the KL over classes and averages over the batch (the true KL,
  as Keras' ``KLDivergence``); ``mean`` averages over batch * classes, as ``nn.KLDivLoss()``'s default
  (= batchmean / num_classes), which the PyTorch demos use.

``logit_stand`` z-scores both models' logits before the temperature softmax (Sun et al., CVPR 2024; see
``logit_tools``); CE still reads the raw student logits, as in the reference.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, choices, number
from kd_runner.methods.base import Batch, Method, Outputs, cross_entropy, nonneg
from kd_runner.methods.logit_tools import flag, standardize

KL_REDUCTIONS = ("batchmean", "mean")


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, T: float, t_squared: bool = True,
                   reduction: str = "batchmean") -> Tensor:
    """KL(p_T^teacher || p_T^student), reduced by ``reduction``, times T^2 when ``t_squared``."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    if reduction == "mean":  # nn.KLDivLoss()'s default, spelled out: torch warns it will turn 'mean' into 'batchmean'
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / log_p_s.numel()
    else:
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (T * T) if t_squared else kl


class KD(Method):
    name = "kd"

    def __init__(self, T: float = 2.0, soft_weight: float = 0.25, ce_weight: float = 0.75, t_squared: bool = True,
                 kl_reduction: str = "batchmean", logit_stand: bool = False) -> None:
        super().__init__(ce_weight)
        self.T = number(T, "method.T")
        if self.T <= 0:
            raise UserError(f"method.T={self.T:g} is invalid; the temperature must be > 0")
        self.soft_weight = nonneg("soft_weight", soft_weight)
        if not isinstance(t_squared, bool):
            raise UserError(f"method.t_squared={t_squared!r} is invalid; valid: false, true")
        self.t_squared = t_squared
        if kl_reduction not in KL_REDUCTIONS:
            raise UserError(f"method.kl_reduction={kl_reduction!r} is invalid; valid: {choices(KL_REDUCTIONS)}")
        self.kl_reduction = str(kl_reduction)
        self.logit_stand = flag("logit_stand", logit_stand)

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        s, t = student.logits, teacher.logits
        if self.logit_stand:
            s, t = standardize(s), standardize(t)
        soft = soft_target_kl(s, t, self.T, self.t_squared, self.kl_reduction)
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.soft_weight * soft + self.ce_weight * ce, "soft": soft, "ce": ce}
