"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as the authors' code
(``passalis/probabilistic_kt``), RepDistiller's ``distiller_zoo/PKT.py`` and mdistiller's ``distillers/PKT.py``
compute it.

Each model's tapped vectors (default: the ``embedding`` the classifier reads; flattened if a map) are
L2-normalised (``f / (||f|| + eps)``); the cosine-similarity kernel ``K = (f f^T + 1) / 2`` (values in [0, 1])
is turned into conditional probabilities ``P[i, j] = K[i, j] / sum_j K[i, j]`` per row, and

    pkt = mean over all b x b entries of P_t * log((P_t + eps) / (P_s + eps))
    total = feat_weight * pkt + ce_weight * CE

(the references' ``torch.mean``: the KL summed over a row is divided by b^2, not b). Student and teacher vectors may
differ in width. The references' in-place ``f[f != f] = 0`` (NaN -> 0, a host sync) is a ``torch.where`` here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_runner.methods.base import Batch, LayerPairMethod, Outputs, cross_entropy, nonneg, positive


def conditional_probabilities(f: Tensor, eps: float) -> Tensor:
    """(b, b): the row-normalised cosine-similarity kernel of the flattened rows of ``f``, in float32."""
    f = f.float().flatten(1)
    f = f / (torch.sqrt((f * f).sum(1, keepdim=True)) + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    p_s = conditional_probabilities(f_s, eps)
    p_t = conditional_probabilities(f_t, eps).detach()
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(LayerPairMethod):
    name = "pkt"

    def __init__(self, student_layer: str = "embedding", teacher_layer: str = "embedding",
                 feat_weight: float = 30000.0, eps: float = 1e-7, ce_weight: float = 1.0) -> None:
        super().__init__(student_layer, teacher_layer, ce_weight)
        self.feat_weight = nonneg("feat_weight", feat_weight)
        self.eps = positive("eps", eps)

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):
            pkt = pkt_loss(student.feats[self.student_layer], teacher.feats[self.teacher_layer], self.eps)
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.feat_weight * pkt + self.ce_weight * ce, "pkt": pkt, "ce": ce}
