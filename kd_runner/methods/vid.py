"""Variational information distillation (Ahn et al., CVPR 2019): a Gaussian whose mean a small regressor predicts
from the student's map, with a learned per-channel variance, should explain the teacher's map.

Per layer pair (student map ``s``, teacher map ``t``, ``C_t`` teacher channels)::

    mu      = conv1x1(C_s -> C_t) - ReLU - conv1x1(C_t -> C_t) - ReLU - conv1x1(C_t -> C_t)   (no biases)
    sigma^2 = softplus(log_scale) + eps                                                        (one per channel)
    nll     = mean over batch, channels, rows, columns of 0.5 * ((mu(s) - t)^2 / sigma^2 + log sigma^2)

and ``vid = sum of nll over the pairs``; ``total = vid_weight * vid + ce_weight * CE``. This is RepDistiller's
``distiller_zoo/VID.py`` (``VIDLoss(s, t, t)``: the middle width is the teacher's channels) with its
``train_student.py`` (``feat[1:-1]``: every stage; losses summed) and mdistiller's ``distillers/VID.py``.
``log_scale`` starts at softplus^-1(init_pred_var - eps), so every variance starts at ``init_pred_var``.

Where the maps' grids differ, the larger is average-pooled to the smaller one's grid first (both references:
``adaptive_avg_pool2d`` on whichever map is larger, the student's before the regressor). The references compare
heights only and pool to a square; here each side is pooled to the smaller height and the smaller width, the
same on the square maps every reference model has. A teacher map is pooled once in ``reduce_teacher`` (so the
teacher-output cache holds the small map). Vectors (``(N, C)`` taps, e.g. ``embedding``) are read as 1x1 maps.

Divergence from mdistiller: its ``log_scales`` sit in a plain Python list, so they are never registered,
optimised or saved (its variances stay at ``init_pred_var``); here, as in RepDistiller and the paper, they are
learned with the regressors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, number
from kd_runner.methods.base import Batch, LayerListMethod, Outputs, Setup, cross_entropy, nonneg


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False)


def inverse_softplus(value: float) -> float:
    """x with softplus(x) = value (> 0): log(exp(value) - 1), written so a large value does not overflow."""
    return value + math.log(-math.expm1(-value))


class VIDRegressor(nn.Module):
    """One layer pair's predicted mean (``regressor``) and per-channel variance (``softplus(log_scale) + eps``)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(conv1x1(c_in, c_mid), nn.ReLU(), conv1x1(c_mid, c_mid), nn.ReLU(),
                                       conv1x1(c_mid, c_out))
        self.log_scale = nn.Parameter(torch.full((c_out,), inverse_softplus(init_pred_var - eps)))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale.float()) + self.eps

    def forward(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        """The mean negative log-likelihood (constant dropped) of ``teacher_map`` given ``student_map``."""
        student_map, teacher_map = as_map(student_map), as_map(teacher_map)
        student_map, teacher_map = match_grids(student_map, teacher_map)
        mean = self.regressor(student_map).float()
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher_map.float()) ** 2 / var + torch.log(var))).mean()


def as_map(x: Tensor) -> Tensor:
    """A ``(N, C)`` vector as a ``(N, C, 1, 1)`` map; a map unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


def match_grids(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps average-pooled to the smaller height and the smaller width (no-op when the grids agree)."""
    size = (min(student_map.shape[2], teacher_map.shape[2]), min(student_map.shape[3], teacher_map.shape[3]))
    if tuple(student_map.shape[2:]) != size:
        student_map = F.adaptive_avg_pool2d(student_map, size)
    if tuple(teacher_map.shape[2:]) != size:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, size)
    return student_map, teacher_map


class VID(LayerListMethod):
    name = "vid"

    def __init__(self, student_layers: str | list[str] = "stages", teacher_layers: str | list[str] = "stages",
                 vid_weight: float = 1.0, ce_weight: float = 1.0, init_pred_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__(student_layers, teacher_layers, ce_weight)
        self.vid_weight = nonneg("vid_weight", vid_weight)
        self.eps = number(eps, "method.eps")
        if self.eps < 0:
            raise UserError(f"method.eps={self.eps:g} is invalid; the variance floor must be >= 0 (VID uses 1e-5)")
        self.init_pred_var = number(init_pred_var, "method.init_pred_var")
        if self.init_pred_var <= self.eps:
            raise UserError(f"method.init_pred_var={self.init_pred_var:g} is invalid; the initial variance must be "
                            f"> method.eps={self.eps:g} (VID uses 5.0)")
        self._teacher_grids: dict[str, tuple[int, int] | None] = {}

    def extra_modules(self, setup: Setup) -> nn.Module:
        regressors = []
        self._teacher_grids = {}
        for s_name, t_name in zip(self.student_layers, self.teacher_layers, strict=True):
            s, t = tuple(setup.student_shapes[s_name]), tuple(setup.teacher_shapes[t_name])
            if len(s) not in (2, 4) or len(t) not in (2, 4) or len(s) != len(t):
                raise UserError(
                    f"method=vid: student layer {s_name!r} output {s[1:]} cannot be paired with teacher layer "
                    f"{t_name!r} output {t[1:]}; tap layers of the same kind (both conv maps or both vectors)")
            regressors.append(VIDRegressor(s[1], t[1], t[1], self.init_pred_var, self.eps))
            grid = (min(s[2], t[2]), min(s[3], t[3])) if len(t) == 4 else None
            if t_name in self._teacher_grids and self._teacher_grids[t_name] != grid:
                grid = None  # one teacher layer read at two grids: each pair pools it in ``loss``
            self._teacher_grids[t_name] = grid
        return nn.ModuleDict({"regressors": nn.ModuleList(regressors)})

    def reduce_identity(self) -> dict:
        return {"reduce": "adaptive_avg_pool2d(grid)",
                "grids": {k: list(v) if v is not None else None for k, v in sorted(self._teacher_grids.items())}}

    def reduce_teacher(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Teacher maps larger than their student's grid, pooled to it once (before caching)."""
        out = dict(feats)
        for name, grid in self._teacher_grids.items():
            x = out.get(name)
            if grid is not None and x is not None and x.dim() == 4 and tuple(x.shape[2:]) != grid:
                out[name] = F.adaptive_avg_pool2d(x, grid)
        return out

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        nlls = [reg(s, t) for reg, (s, t) in zip(extra["regressors"], self.pairs(student, teacher), strict=True)]
        vid = torch.stack(nlls).sum()
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.vid_weight * vid + self.ce_weight * ce, "vid": vid, "ce": ce}
