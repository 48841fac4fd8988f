"""Relational knowledge distillation (Park et al., CVPR 2019), as RepDistiller's ``distiller_zoo/RKD.py`` and
mdistiller's ``distillers/RKD.py`` compute it.

On each model's tapped vectors (default: the ``embedding``; flattened if a map), for a batch of b samples:

- distance: ``d[i, j] = ||e_i - e_j||`` (squared when ``squared``; the squared distance clamped at ``eps`` before
  the root, the diagonal set to 0), divided by the mean of its non-zero entries; ``distance = smooth_l1(d_s, d_t)``
  (mean over the b x b entries);
- angle: for every anchor i, the cosines between the unit vectors ``e_j - e_i`` and ``e_k - e_i``;
  ``angle = smooth_l1(cos_s, cos_t)`` (mean over the b x b x b entries);

    rkd = distance_weight * distance + angle_weight * angle
    total = feat_weight * rkd + ce_weight * CE

Student and teacher vectors may differ in width. Small batches are degenerate: a batch of 1 has no pair, so
the references' ``d[d > 0].mean()`` is the mean of nothing (nan); here the mean of the non-zero distances is
taken as a masked sum over a count (no host sync either), and a distance matrix with no non-zero entry is left as
it is (all zeros): the loss is 0, not nan. A batch of 2 has one distance and only trivial angles; it is finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError
from kd_runner.methods.base import Batch, LayerPairMethod, Outputs, cross_entropy, nonneg, positive


def pairwise_distances(e: Tensor, squared: bool, eps: float) -> Tensor:
    """(b, b): ||e_i - e_j|| (squared if ``squared``), from the clamped squared distance, 0 on the diagonal."""
    sq = (e * e).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1.0 - torch.eye(e.shape[0], device=e.device, dtype=d.dtype))


def normalize_by_mean(d: Tensor) -> Tensor:
    """``d`` divided by the mean of its positive entries (unchanged when it has none)."""
    positive_ = (d > 0).to(d.dtype)
    mean = (d * positive_).sum() / positive_.sum().clamp(min=1.0)
    return d / torch.where(mean > 0, mean, torch.ones_like(mean))


def angles(e: Tensor) -> Tensor:
    """(b * b * b,): cos of the angle at anchor i between e_j and e_k, for every (i, j, k)."""
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[i, j] = unit(e_j - e_i)
    return torch.bmm(u, u.transpose(1, 2)).flatten()


def rkd_losses(f_s: Tensor, f_t: Tensor, squared: bool = False, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """(distance loss, angle loss), unweighted."""
    s, t = f_s.float().flatten(1), f_t.float().flatten(1).detach()
    with torch.no_grad():
        d_t, a_t = normalize_by_mean(pairwise_distances(t, squared, eps)), angles(t)
    d_s = normalize_by_mean(pairwise_distances(s, squared, eps))
    return F.smooth_l1_loss(d_s, d_t), F.smooth_l1_loss(angles(s), a_t)


class RKD(LayerPairMethod):
    name = "rkd"

    def __init__(self, student_layer: str = "embedding", teacher_layer: str = "embedding",
                 distance_weight: float = 25.0, angle_weight: float = 50.0, feat_weight: float = 1.0,
                 squared: bool = False, eps: float = 1e-12, ce_weight: float = 1.0) -> None:
        super().__init__(student_layer, teacher_layer, ce_weight)
        self.distance_weight = nonneg("distance_weight", distance_weight)
        self.angle_weight = nonneg("angle_weight", angle_weight)
        self.feat_weight = nonneg("feat_weight", feat_weight)
        if not isinstance(squared, bool):
            raise UserError(f"method.squared={squared!r} is invalid; valid: false, true")
        self.squared = squared
        self.eps = positive("eps", eps)

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):
            distance, angle = rkd_losses(student.feats[self.student_layer], teacher.feats[self.teacher_layer],
                                         self.squared, self.eps)
            rkd = self.distance_weight * distance + self.angle_weight * angle
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.feat_weight * rkd + self.ce_weight * ce, "rkd": rkd, "distance": distance,
                "angle": angle, "ce": ce}
