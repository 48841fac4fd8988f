"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022; mdistiller ``mdistiller/distillers/DKD.py``).

The KD loss split at the target class ``y``, with ``p = softmax(z / T)`` for each model::

    TCKD = KL([p_y^t, 1 - p_y^t] || [p_y^s, 1 - p_y^s]) * T^2        (target vs. the rest: a binary KL)
    NCKD = KL(p^t_{non-target} || p^s_{non-target}) * T^2            (softmax over the classes other than y)
    total = ce_weight * CE + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

Both KLs are summed over their classes and averaged over the batch. As in the reference, the target class is
dropped from the NCKD softmax by subtracting 1000 from its tempered logit (``z / T - 1000``), which leaves it an
exactly zero probability in float32. The logged ``tckd`` and ``nckd`` are the unweighted terms above (T^2
included; neither alpha/beta nor the warm-up factor), so a run's curves compare across weights and epochs.

Divergence from the reference, numerics only: the reference takes ``log`` of the binary probabilities
(``torch.log(cat_mask(softmax))``), which is ``-inf`` (nan loss) once a model puts all its mass on one side in
float32; here the binary log-probabilities are log-sum-exp differences (``z_y/T - lse(z/T)`` and
``lse(z_{non-y}/T) - lse(z/T)``), the same numbers when finite. Everything is computed in float32.

``logit_stand`` z-scores both models' logits first (Sun et al., CVPR 2024; ``logit_tools``), as their DKD does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, number
from kd_runner.methods.base import Batch, Method, Outputs, cross_entropy, nonneg, positive
from kd_runner.methods.logit_tools import flag, logit_pair

MASK = 1000.0  # subtracted from the target's tempered logit to drop it from the non-target softmax (reference)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, T: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each times T^2, summed over classes and averaged over the batch (float32)."""
    s, t = student_logits.float() / T, teacher_logits.float() / T
    gt = torch.zeros_like(s).scatter_(1, targets.reshape(-1, 1), 1.0)  # one-hot, no host sync (unlike F.one_hot)
    n = s.shape[0]

    def binary_log_probs(z: Tensor) -> Tensor:
        """log [p_y, 1 - p_y] per row, from log-sum-exps."""
        lse = torch.logsumexp(z, dim=1)
        log_target = (z * gt).sum(1) - lse
        log_rest = torch.logsumexp(z - MASK * gt, dim=1) - lse
        return torch.stack([log_target, log_rest], dim=1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(t), reduction="sum", log_target=True) / n
    nckd = F.kl_div(F.log_softmax(s - MASK * gt, dim=1), F.log_softmax(t - MASK * gt, dim=1),
                    reduction="sum", log_target=True) / n
    return tckd * (T * T), nckd * (T * T)


class DKD(Method):
    name = "dkd"
    reads_labels = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: float = 20,
                 ce_weight: float = 1.0, logit_stand: bool = False) -> None:
        super().__init__(ce_weight)
        self.alpha = nonneg("alpha", alpha)
        self.beta = nonneg("beta", beta)
        self.T = positive("T", T)
        self.warmup = number(warmup, "method.warmup")
        if self.warmup < 0:
            raise UserError(f"method.warmup={self.warmup:g} is invalid; the warm-up length in epochs must be >= 0 "
                            "(0: no warm-up)")
        self.logit_stand = flag("logit_stand", logit_stand)

    def ramp(self, batch: Batch) -> Tensor | float:
        """min(epoch / warmup, 1): the KD part's warm-up factor (a tensor: no host sync)."""
        if self.warmup == 0:
            return 1.0
        if batch.epoch is None:
            raise ValueError("method=dkd reads batch.epoch for its warm-up, but the batch has none")
        return torch.clamp(batch.epoch.float() / self.warmup, max=1.0)

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        s, t = logit_pair(student.logits, teacher.logits, self.logit_stand)
        tckd, nckd = dkd_parts(s, t, batch.targets, self.T)
        ce = cross_entropy(student.logits, batch.targets)
        total = self.ce_weight * ce + self.ramp(batch) * (self.alpha * tckd + self.beta * nckd)
        return {"total": total, "tckd": tckd, "nckd": nckd, "ce": ce}
