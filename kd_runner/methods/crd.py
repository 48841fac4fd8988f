"""Contrastive representation distillation (Tian et al., ICLR 2020): NCE between student and teacher embeddings,
with negatives read from two memory banks of past embeddings of the whole training split.

Following RepDistiller (``crd/criterion.py``, ``crd/memory.py``, ``dataset/cifar100.py``'s
``CIFAR100InstanceSample``, ``train_student.py``) and mdistiller's ``distillers/CRD.py``:

- ``embed_s`` / ``embed_t``: a Linear from the flattened tapped vector (``embedding``: RepDistiller's
  ``feat[-1]``, mdistiller's ``pooled_feat``) to ``feat_dim``, then L2 normalisation;
- ``memory``: banks ``memory_s`` / ``memory_t`` (``n_train x feat_dim``, uniform in +-1/sqrt(feat_dim/3) as the
  reference initialises them) of the student's / teacher's embeddings of every training image;
- per sample, ``nce_k + 1`` bank rows: the positive (the sample's own row in mode ``exact``; a random row of its
  class in mode ``relax``) then ``nce_k`` negatives drawn uniformly from the rows of the *other* classes;
- scores ``P = exp(<row, anchor> / nce_t) / Z``: the student's embedding against the teacher bank (``out_s``) and
  the teacher's against the student bank (``out_t``), each with its own constant ``Z = n_train * mean(exp(..))``
  taken from the first batch and kept;
- Eq. 18 for each side: with ``m = nce_k``, ``Pn = 1 / n_train``, ``eps = 1e-7``,
  ``-(sum_i log(P_i0 / (P_i0 + m Pn + eps)) + sum_ij log(m Pn / (P_ij + m Pn + eps))) / batch``;
  ``crd = loss_s + loss_t``, ``total = crd_weight * crd + ce_weight * CE``;
- after scoring, under no_grad, each sample's bank rows become
  ``normalize(nce_m * row + (1 - nce_m) * embedding)``.

CUDA-graph friendly: negatives are drawn on the device (``torch.randint``, no host sync) from per-class index
tables built once from ``setup.train_targets``; ``Z`` lives in a buffer (``memory.z``, ``-1`` until set) that the
first call fills through ``torch.where`` (not the reference's Python ``if`` on ``.item()``); scores and banks are
float32 with autocast off (``exp(s / 0.07)`` in bf16 would lose the contrast).

Differences from the reference: the reference's data loader draws each sample's negatives without replacement
(with replacement only when ``nce_k`` exceeds the other classes' size); here they are drawn with replacement
(16384 of 49500 on CIFAR-100: a few repeats per row, same distribution otherwise). ``Z`` is set from the first
batch the method sees in this run (a resumed run keeps the saved one, the reference recomputes it). The L2
normalisation uses ``F.normalize`` (its 1e-12 floor only matters for an all-zero vector).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner import distributed
from kd_runner.errors import UserError, choices, number
from kd_runner.methods.base import Batch, LayerPairMethod, Outputs, Setup, cross_entropy, nonneg

MODES = ("exact", "relax")
NCE_EPS = 1e-7  # RepDistiller crd/criterion.py eps
_DRAW_HIGH = 2**62  # draw uniform int64s, then reduce modulo the pool size: bias < pool / 2**62


class Embed(nn.Module):
    """Flatten, Linear to ``dim_out``, L2-normalise (RepDistiller ``crd/criterion.py`` ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


class ContrastMemory(nn.Module):
    """The two memory banks, the normalisation constants ``z = [Z_s, Z_t]`` and the per-class index tables.

    Banks and ``z`` are saved with the student (a resumed run continues from them); the index tables are
    rebuilt from the labels (``persistent=False``)."""

    def __init__(self, feat_dim: int, train_targets: Tensor, num_classes: int = 0) -> None:
        super().__init__()
        targets = train_targets.detach().to("cpu", torch.long).reshape(-1)
        n = targets.numel()
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))
        counts = torch.bincount(targets, minlength=max(int(num_classes), int(targets.max()) + 1))
        self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)  # indices by class
        self.register_buffer("counts", counts, persistent=False)  # class c's samples: order[starts[c]:+counts[c]]
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)

    @property
    def n_data(self) -> int:
        return self.memory_s.shape[0]

    def sample(self, index: Tensor, targets: Tensor, k: int, mode: str = "exact") -> Tensor:
        """``(N, k + 1)`` bank rows per sample: the positive, then ``k`` uniform draws from the other classes."""
        n, y = self.n_data, targets.long()
        count, start = self.counts[y].unsqueeze(1), self.starts[y].unsqueeze(1)
        r = torch.randint(0, _DRAW_HIGH, (y.shape[0], k), device=y.device) % (n - count)
        negatives = self.order[r + (r >= start) * count]  # skip the anchor's class block in the sorted order
        if mode == "exact":
            positive = index.long().unsqueeze(1)
        else:
            r = torch.randint(0, _DRAW_HIGH, (y.shape[0], 1), device=y.device) % count
            positive = self.order[start + r]
        return torch.cat([positive, negatives], dim=1)

    def forward(self, e_s: Tensor, e_t: Tensor, index: Tensor, sample_idx: Tensor, nce_t: float,
                nce_m: float) -> tuple[Tensor, Tensor]:
        """Scores ``(out_s, out_t)``, each ``(N, k + 1)``, then the banks' rows ``index`` moved towards
        ``e_s`` / ``e_t`` (RepDistiller ``ContrastMemory.forward``: ``v1`` = student, ``v2`` = teacher)."""
        n_rows, k1 = sample_idx.shape
        flat = sample_idx.reshape(-1)
        rows_t = self.memory_t.index_select(0, flat).view(n_rows, k1, -1)
        rows_s = self.memory_s.index_select(0, flat).view(n_rows, k1, -1)
        out_s = torch.exp(torch.bmm(rows_t, e_s.unsqueeze(2)).squeeze(2) / nce_t)  # student anchor, teacher bank
        out_t = torch.exp(torch.bmm(rows_s, e_t.unsqueeze(2)).squeeze(2) / nce_t)  # teacher anchor, student bank
        with torch.no_grad():
            fresh = distributed.mean_across(torch.stack([out_s.mean(), out_t.mean()])) * self.n_data
            z = torch.where(self.z < 0, fresh, self.z)  # set once, from the first batch
            self.z.copy_(z)
        out_s, out_t = out_s / z[0], out_t / z[1]
        with torch.no_grad():
            # every rank moves the rows of every rank's images: the banks stay identical across ranks
            index = distributed.gather_cat(index)
            for bank, emb in ((self.memory_s, e_s), (self.memory_t, e_t)):
                emb = distributed.gather_cat(emb.detach().to(bank.dtype))
                rows = bank.index_select(0, index) * nce_m + emb * (1 - nce_m)
                bank.index_copy_(0, index, rows / rows.norm(dim=1, keepdim=True))
        return out_s, out_t


def contrast_loss(x: Tensor, n_data: int) -> Tensor:
    """Eq. 18 of the CRD paper on scores ``x`` (``N x (k + 1)``, positive first), as RepDistiller's ContrastLoss."""
    m = x.shape[1] - 1
    mpn = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + mpn + NCE_EPS))
    log_d0 = torch.log(mpn / (x[:, 1:] + mpn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


class CRD(LayerPairMethod):
    name = "crd"
    reads_labels = True

    def __init__(self, student_layer: str = "embedding", teacher_layer: str = "embedding", feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5, mode: str = "exact",
                 crd_weight: float = 0.8, ce_weight: float = 1.0) -> None:
        super().__init__(student_layer, teacher_layer, ce_weight)
        self.feat_dim = number(feat_dim, "method.feat_dim", int)
        if self.feat_dim < 1:
            raise UserError(f"method.feat_dim={self.feat_dim} is invalid; the embedding width must be >= 1 "
                            "(CRD uses 128)")
        self.nce_k = number(nce_k, "method.nce_k", int)
        if self.nce_k < 1:
            raise UserError(f"method.nce_k={self.nce_k} is invalid; the number of negatives must be >= 1 "
                            "(CRD uses 16384)")
        self.nce_t = number(nce_t, "method.nce_t")
        if self.nce_t <= 0:
            raise UserError(f"method.nce_t={self.nce_t:g} is invalid; the temperature must be > 0 (CRD uses 0.07)")
        self.nce_m = number(nce_m, "method.nce_m")
        if not 0 <= self.nce_m < 1:
            raise UserError(f"method.nce_m={self.nce_m:g} is invalid; the memory momentum must be in [0, 1) "
                            "(CRD uses 0.5)")
        if mode not in MODES:
            raise UserError(f"method.mode={mode!r} is invalid; valid: {choices(MODES)}")
        self.mode = str(mode)
        self.crd_weight = nonneg("crd_weight", crd_weight)

    def extra_modules(self, setup: Setup) -> nn.Module:
        targets = setup.train_targets
        if targets is None or targets.numel() == 0:
            raise UserError("method=crd needs the training split's labels (its memory bank has a row per image)")
        n = targets.numel()
        if self.nce_k >= n:
            raise UserError(f"method.nce_k={self.nce_k} is invalid for a training split of {n} images: negatives "
                            f"are drawn from it, so give method.nce_k < {n} (CRD uses 16384 of CIFAR-100's 50000)")
        if int(torch.bincount(targets.reshape(-1).long().cpu()).max()) == n:
            raise UserError(f"method=crd: every one of the {n} training images has the same label, so there is "
                            "no image of another class to contrast with; CRD needs at least two classes")
        s_dim = math.prod(setup.student_shapes[self.student_layer][1:])
        t_dim = math.prod(setup.teacher_shapes[self.teacher_layer][1:])
        return nn.ModuleDict({
            "embed_s": Embed(s_dim, self.feat_dim),
            "embed_t": Embed(t_dim, self.feat_dim),
            "memory": ContrastMemory(self.feat_dim, targets, setup.num_classes),
        })

    def contrast(self, f_s: Tensor, f_t: Tensor, index: Tensor, sample_idx: Tensor,
                 extra: nn.Module) -> dict[str, Tensor]:
        """CRD on the tapped vectors with explicit bank rows ``sample_idx`` (``N x (k + 1)``, positive first);
        updates the banks. Returns ``{"crd": loss_s + loss_t, "crd_s": loss_s, "crd_t": loss_t}``."""
        with torch.autocast(f_s.device.type, enabled=False):
            e_s = extra["embed_s"](f_s.float())
            e_t = extra["embed_t"](f_t.float())
            memory = extra["memory"]
            out_s, out_t = memory(e_s, e_t, index.long(), sample_idx.long(), self.nce_t, self.nce_m)
            loss_s, loss_t = contrast_loss(out_s, memory.n_data), contrast_loss(out_t, memory.n_data)
        return {"crd": loss_s + loss_t, "crd_s": loss_s, "crd_t": loss_t}

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        if batch.index is None:
            raise UserError("method=crd needs each sample's index in the training split (batch.index)")
        sample_idx = extra["memory"].sample(batch.index, batch.targets, self.nce_k, self.mode)
        parts = self.contrast(student.feats[self.student_layer], teacher.feats[self.teacher_layer], batch.index,
                              sample_idx, extra)
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.crd_weight * parts["crd"] + self.ce_weight * ce, **parts, "ce": ce}
