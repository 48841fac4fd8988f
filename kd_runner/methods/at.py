"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as RepDistiller's ``distiller_zoo/AT.py`` and
mdistiller's ``distillers/AT.py`` compute it.

For each (student, teacher) layer pair the attention map is ``a = normalize(mean_c |f_c|^p)``: the channel mean of
the p-th power of the map, flattened over the H*W positions and L2-normalised. The loss is

    at = sum over layer pairs of mean_{n, hw} (a_s - a_t)^2        (mean over batch and positions)
    total = feat_weight * at + ce_weight * CE

(the references sum the per-layer means: RepDistiller ``loss_kd = sum(loss_group)``, mdistiller ``at_loss``; the
authors' own code scales the same sum by beta / 2). When a pair's grids differ, the larger *feature map* is
average-pooled (``adaptive_avg_pool2d``) to the smaller's grid before its attention map is taken, as the references
do; they compare heights only and pool to a square, this pools each side to ``(min H, min W)`` (the same on square
maps). The references raise f to the p-th power without ``abs``; this takes ``|f|^p`` as the paper writes it (the
same numbers for the default p = 2).

The teacher's maps are reduced once (``reduce_teacher``) to their attention maps, pooled to the pair's grid first:
the cache holds (N, H, W) maps instead of (N, C, H, W). ``loss`` also accepts raw (N, C, H, W) teacher maps (a
teacher layer paired with student layers of different grids stays raw) and gives the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.methods.base import Batch, LayerListMethod, Outputs, Setup, cross_entropy, nonneg, positive


def attention_map(f: Tensor, p: float) -> Tensor:
    """(N, H, W): the channel mean of |f|^p, L2-normalised over the H*W positions, in float32."""
    a = f.float().abs().pow(p).mean(1)
    return F.normalize(a.flatten(1), dim=1).view_as(a)


def pool_to(f: Tensor, grid: tuple[int, int]) -> Tensor:
    """``f`` in float32, average-pooled to ``grid`` (unchanged when it is already that size)."""
    f = f.float()
    return f if tuple(f.shape[-2:]) == tuple(grid) else F.adaptive_avg_pool2d(f, grid)


def common_grid(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    """The grid two maps are compared on: the smaller of each side."""
    return min(a[-2], b[-2]), min(a[-1], b[-1])


class AT(LayerListMethod):
    name = "at"

    def __init__(self, student_layers: str | list[str] = "stages", teacher_layers: str | list[str] = "stages",
                 p: float = 2.0, feat_weight: float = 1000.0, ce_weight: float = 1.0) -> None:
        super().__init__(student_layers, teacher_layers, ce_weight)
        self.p = positive("p", p)
        self.feat_weight = nonneg("feat_weight", feat_weight)
        self._teacher_grid: dict[str, tuple[int, int] | None] = {}  # teacher layer -> grid its map is reduced to

    def extra_modules(self, setup: Setup) -> nn.Module:
        self._teacher_grid = {}
        for t, (s_shape, t_shape) in zip(self.teacher_layers, self.map_shapes(setup), strict=True):
            grid = common_grid(s_shape, t_shape)
            # a teacher layer paired with student maps of two different grids keeps its raw map
            self._teacher_grid[t] = grid if self._teacher_grid.get(t, grid) == grid else None
        return nn.ModuleDict()

    def reduce_identity(self) -> dict:
        return {"reduce": "attention_map(pool_to(grid), p)", "p": self.p,
                "grids": {k: list(v) if v is not None else None for k, v in sorted(self._teacher_grid.items())}}

    def reduce_teacher(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(feats)
        for name, grid in self._teacher_grid.items():
            if grid is not None and name in feats and feats[name].dim() == 4:
                out[name] = attention_map(pool_to(feats[name], grid), self.p)
        return out

    def pair_loss(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        """mean over (n, h, w) of (a_s - a_t)^2 for one layer pair; ``f_t``: raw (N, C, H, W) or reduced (N, H, W)."""
        grid = common_grid(tuple(f_s.shape), tuple(f_t.shape))
        if f_t.dim() == 4:
            a_t = attention_map(pool_to(f_t, grid), self.p)
        elif tuple(f_t.shape[-2:]) == grid:
            a_t = f_t.float()
        else:
            raise RuntimeError(f"method=at: a reduced teacher map of grid {tuple(f_t.shape[-2:])} is larger than the "
                               f"student's {tuple(f_s.shape[-2:])}")
        a_s = attention_map(pool_to(f_s, grid), self.p)
        return (a_s - a_t.detach()).pow(2).mean()

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):
            at = torch.stack([self.pair_loss(s, t) for s, t in self.pairs(student, teacher)]).sum()
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.feat_weight * at + self.ce_weight * ce, "at": at, "ce": ce}
