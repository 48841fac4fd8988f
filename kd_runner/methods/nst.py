"""Neuron selectivity transfer (Huang & Wang, "Like What You Like", 2017), as RepDistiller's
``distiller_zoo/NST.py`` and mdistiller's ``distillers/NST.py`` compute it.

Each channel of a tapped (N, C, H, W) map is one sample of the layer's "neuron selectivity" distribution: its
H*W spatial map, flattened and L2-normalised. The loss is the squared MMD between the student's C_s channel
samples and the teacher's C_t ones under the polynomial kernel k(x, y) = (x . y + c)^d with d = 2, c = 0 (the
paper's choice and the references' ``poly_kernel``), averaged over the batch:

    mmd2 = mean k(t_i, t_j) + mean k(s_i, s_j) - 2 mean k(s_i, t_j)     (means over the batch and channel pairs)
    nst = sum over layer pairs of mmd2
    total = feat_weight * nst + ce_weight * CE

The teacher-teacher term is a constant (detached, as the references' ``full_loss`` keeps it). Channel counts may
differ; when grids differ the larger map is average-pooled to the smaller's grid first, as the references do (they
compare heights and pool to a square; this pools each side to ``(min H, min W)``, the same on square maps). The
kernel means are taken from batched matrix products rather than the references' broadcast (N, C_t, C_s, H*W)
product: the same numbers without that memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.methods.base import Batch, LayerListMethod, Outputs, Setup, cross_entropy, nonneg


def channel_samples(f: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, C, H*W) in float32: ``f`` pooled to ``grid`` if larger, each channel's map L2-normalised."""
    f = f.float()
    if tuple(f.shape[-2:]) != tuple(grid):
        f = F.adaptive_avg_pool2d(f, grid)
    return F.normalize(f.flatten(2), dim=2)


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over the batch and every (i, j) of (a_i . b_j)^2, for a (N, C_a, D) and b (N, C_b, D)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    grid = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    s, t = channel_samples(f_s, grid), channel_samples(f_t, grid).detach()
    return poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


class NST(LayerListMethod):
    name = "nst"

    def __init__(self, student_layers: str | list[str] = "stages", teacher_layers: str | list[str] = "stages",
                 feat_weight: float = 50.0, ce_weight: float = 1.0) -> None:
        super().__init__(student_layers, teacher_layers, ce_weight)
        self.feat_weight = nonneg("feat_weight", feat_weight)

    def extra_modules(self, setup: Setup) -> nn.Module:
        self.map_shapes(setup)
        return nn.ModuleDict()

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):
            nst = torch.stack([nst_loss(s, t) for s, t in self.pairs(student, teacher)]).sum()
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.feat_weight * nst + self.ce_weight * ce, "nst": nst, "ce": ce}
