"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021).

References: ``dvlab-research/ReviewKD`` ``CIFAR-100/model/reviewkd.py`` + ``train.py`` and mdistiller
``mdistiller/distillers/ReviewKD.py`` (``REVIEWKD`` defaults in ``mdistiller/engine/cfg.py``).

Levels ``0..n-1`` run from the shallowest tapped student layer to the deepest; by default the stages plus the
pooled embedding (reshaped to N x C x 1 x 1), as the references read ``feats + [pooled_feat]``. The student's
stages are post-ReLU (mdistiller ``STU_PREACT = False``), the teacher's are pre-ReLU (``preact_feats[1:]``
there, ``teacher(x, is_feat=True, preact=True)[1:]`` in the paper's code) plus its pooled embedding.

Attention-based fusion (ABF), one block per level, run from the deepest level to the shallowest:
``x = BN(conv1x1(student_i))`` to ``mid`` channels; except at the deepest level, the residual ``y`` of the
level below is upsampled (nearest) to ``x``'s grid and fused: ``a = sigmoid(conv1x1([x, y]))`` (2 maps),
``x = x * a_0 + y * a_1``; ``x`` is upsampled (nearest) to the teacher's grid when it differs; the output is
``BN(conv3x3(x))`` with the teacher's channels, and ``x`` is the residual passed up. ``mid`` is
``min(max_mid_channel, channels of the deepest student level)`` (the reference's ``min(512, in_channels[-1])``).
The reference hard-codes channels and grids per model pair; here they come from the tapped shapes
(:func:`abf_plan` gives them in the reference's notation).

Hierarchical context loss per level, on the ABF output ``f_s`` and the teacher map ``f_t`` (H x W)::

    hcl = (mse(f_s, f_t) + sum_k w_k * mse(pool_k(f_s), pool_k(f_t))) / (1 + sum_k w_k)

over the pooled grids k in 4, 2, 1 (adaptive average pools) that are smaller than H, their weights halving
from 1/2 in that order; the levels' HCLs are summed.

``total = review_weight * min(epoch / warmup_epochs, 1) * hcl + ce_weight * CE`` with ``epoch`` 1-based
(``batch.epoch``, as mdistiller's trainer counts; the paper's ``train.py`` counts from 0, so its first epoch
gets no review loss). ``hcl`` (logged) is the sum before the weight and the warm-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, number
from kd_runner.methods.base import Batch, LayerListMethod, Outputs, Setup, cross_entropy, nonneg

HCL_GRIDS = (4, 2, 1)


def as_map(x: Tensor) -> Tensor:
    """A tapped output as an N x C x H x W map (a pooled N x C vector becomes N x C x 1 x 1)."""
    return x.reshape(x.shape[0], x.shape[1], 1, 1) if x.dim() == 2 else x


def hcl(fs: Tensor, ft: Tensor) -> Tensor:
    """The reference's ``hcl`` for one level (float32)."""
    fs, ft = fs.float(), ft.float()
    h = fs.shape[2]
    loss = F.mse_loss(fs, ft, reduction="mean")
    cnt, tot = 1.0, 1.0
    for grid in HCL_GRIDS:
        if grid >= h:
            continue
        cnt /= 2.0
        loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, grid), F.adaptive_avg_pool2d(ft, grid)) * cnt
        tot += cnt
    return loss / tot


class ABF(nn.Module):
    """Attention-based fusion block (the reference's ``ABF``, same layers and init)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, y: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(output at ``out_size``, residual for the next shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _chw(shape: torch.Size | tuple) -> tuple[int, int, int] | None:
    shape = tuple(shape)
    if len(shape) == 2:
        return shape[1], 1, 1
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    return None


def abf_plan(student_shapes: list, teacher_shapes: list, max_mid_channel: int = 512) -> dict:
    """The ABF stack for these shapes (shallowest level first, batch dim included), in the reference's notation:
    ``in_channels`` / ``out_channels`` shallow to deep; ``shapes`` / ``out_shapes`` (student / teacher grids,
    (H, W)) deep to shallow, as ``build_review_kd`` writes them; ``mid_channel``."""
    s = [_chw(x) for x in student_shapes]
    t = [_chw(x) for x in teacher_shapes]
    return {
        "in_channels": [c for c, _, _ in s],
        "out_channels": [c for c, _, _ in t],
        "shapes": [(h, w) for _, h, w in s][::-1],
        "out_shapes": [(h, w) for _, h, w in t][::-1],
        "mid_channel": min(max_mid_channel, s[-1][0]),
    }


class ReviewKD(LayerListMethod):
    name = "reviewkd"

    def __init__(self, student_layers: str | list[str] = ("stages", "embedding"),
                 teacher_layers: str | list[str] = ("preact_stages", "embedding"), review_weight: float = 1.0,
                 warmup_epochs: float = 20.0, max_mid_channel: int = 512, ce_weight: float = 1.0) -> None:
        super().__init__(student_layers, teacher_layers, ce_weight)
        self.review_weight = nonneg("review_weight", review_weight)
        self.warmup_epochs = number(warmup_epochs, "method.warmup_epochs")
        if self.warmup_epochs < 0:
            raise UserError(f"method.warmup_epochs={self.warmup_epochs:g} is invalid; it must be >= 0 "
                            "(0: no warm-up)")
        mid = number(max_mid_channel, "method.max_mid_channel", int)
        if mid < 1:
            raise UserError(f"method.max_mid_channel={max_mid_channel!r} is invalid; it must be an integer >= 1")
        self.max_mid_channel = mid

    def extra_modules(self, setup: Setup) -> nn.Module:
        s_shapes = [setup.student_shapes[n] for n in self.student_layers]
        t_shapes = [setup.teacher_shapes[n] for n in self.teacher_layers]
        for names, shapes, role in ((self.student_layers, s_shapes, "student"),
                                    (self.teacher_layers, t_shapes, "teacher")):
            for name, shape in zip(names, shapes, strict=True):
                if _chw(shape) is None:
                    raise UserError(f"method=reviewkd: {role} layer {name!r} has shape {tuple(shape)[1:]}; ReviewKD "
                                    "fuses conv maps (C, H, W) and pooled vectors (C) only")
        plan = abf_plan(s_shapes, t_shapes, self.max_mid_channel)
        n = len(s_shapes)
        abfs = [ABF(c_in, plan["mid_channel"], c_out, fuse=i < n - 1)
                for i, (c_in, c_out) in enumerate(zip(plan["in_channels"], plan["out_channels"], strict=True))]
        return nn.ModuleDict({"abfs": nn.ModuleList(abfs)})

    def fuse(self, student: Outputs, teacher_sizes: list[tuple[int, int]], extra: nn.Module) -> list[Tensor]:
        """The ABF outputs, shallowest level first, each at its teacher map's grid."""
        feats = [as_map(student.feats[n]) for n in self.student_layers]
        abfs = extra["abfs"]
        results: list[Tensor] = []
        residual = None
        for i in reversed(range(len(feats))):
            out, residual = abfs[i](feats[i], residual, teacher_sizes[i])
            results.insert(0, out)
        return results

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        t_maps = [as_map(teacher.feats[n]) for n in self.teacher_layers]
        results = self.fuse(student, [tuple(t.shape[-2:]) for t in t_maps], extra)
        review = None
        for fs, ft in zip(results, t_maps, strict=True):
            term = hcl(fs, ft.detach())
            review = term if review is None else review + term
        if batch.epoch is None or self.warmup_epochs == 0:
            warm = 1.0
        else:
            warm = torch.clamp(batch.epoch.float() / self.warmup_epochs, max=1.0)
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.review_weight * warm * review + self.ce_weight * ce, "hcl": review, "ce": ce}
