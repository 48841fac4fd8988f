"""DIST: distillation from a stronger teacher by relations, not exact matches (Huang et al., NeurIPS 2022;
``hunto/image_classification_sota`` ``lib/models/losses/dist_kd.py``, the ``classification`` submodule of
``hunto/DIST_KD``).

With ``P = softmax(z / T)`` row-wise for each model (a batch x classes matrix)::

    inter = T^2 * (1 - mean over samples i of pearson(P_s[i, :], P_t[i, :]))   (each sample's class ranking)
    intra = T^2 * (1 - mean over classes c of pearson(P_s[:, c], P_t[:, c]))   (each class across the batch)
    total = ce_weight * CE + beta * inter + gamma * intra

``pearson(a, b) = <a - mean a, b - mean b> / (|a - mean a| * |b - mean b| + 1e-8)``, the reference's eps added
to the product of the norms. The logged ``inter`` and ``intra`` are unweighted (T^2 included).

The reference's wrapper (``kd_loss.py``) weighs the whole DIST term by ``kd_loss_weight`` (2 in its CIFAR and
ImageNet configs) on top of ``DIST(beta=1, gamma=1)``; here ``beta`` and ``gamma`` are the effective weights, so
its setting is beta = gamma = 2.

A batch of one sample: each class column holds one value, its centred vector is zero, and the eps makes the
correlation 0, so ``intra`` is the constant T^2 (no gradient); this is the reference's behaviour, kept. Only
the inter-class term then trains. Labels are not read except by CE.

``logit_stand`` z-scores both models' logits before the softmax (``logit_tools``). The logit standardisation
paper does not evaluate DIST; the option is this package's extension.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.methods.base import Batch, Method, Outputs, cross_entropy, nonneg, positive
from kd_runner.methods.logit_tools import flag, logit_pair

PEARSON_EPS = 1e-8  # the reference's cosine_similarity eps


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(student_logits: Tensor, teacher_logits: Tensor, T: float) -> tuple[Tensor, Tensor]:
    """(inter, intra), each times T^2 (float32)."""
    p_s = F.softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.float() / T, dim=1)
    inter = 1 - pearson_rows(p_s, p_t).mean()
    intra = 1 - pearson_rows(p_s.transpose(0, 1), p_t.transpose(0, 1)).mean()
    return inter * (T * T), intra * (T * T)


class DIST(Method):
    name = "dist"

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, T: float = 4.0, ce_weight: float = 1.0,
                 logit_stand: bool = False) -> None:
        super().__init__(ce_weight)
        self.beta = nonneg("beta", beta)
        self.gamma = nonneg("gamma", gamma)
        self.T = positive("T", T)
        self.logit_stand = flag("logit_stand", logit_stand)

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        s, t = logit_pair(student.logits, teacher.logits, self.logit_stand)
        inter, intra = dist_parts(s, t, self.T)
        ce = cross_entropy(student.logits, batch.targets)
        total = self.ce_weight * ce + self.beta * inter + self.gamma * intra
        return {"total": total, "inter": inter, "intra": intra, "ce": ce}
