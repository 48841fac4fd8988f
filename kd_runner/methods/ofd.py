"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019).

References: ``clovaai/overhaul-distillation`` ``CIFAR-100/distiller.py`` (+ ``train_with_distillation.py``) and
mdistiller ``mdistiller/distillers/OFD.py`` (the same math; ``FEAT_WEIGHT = 0.001`` in its ``engine/cfg.py``).

Both models are tapped *before* their stage-ending ReLU (``preact_stages``). Per layer pair ``i`` of ``n``:

- a connector (1x1 conv without bias + BatchNorm, initialised as the reference) maps the student map onto the
  teacher's channels; the teacher map is average-pooled to the student's grid when the grids differ (mdistiller);
- the *margin* ``m_c`` of each teacher channel is the expected value of the negative part of the teacher's
  pre-ReLU response, modelled as a Gaussian whose mean / std are the bias / |weight| of the BatchNorm that
  feeds that ReLU (the reference's ``get_margin_from_BN``)::

      m_c = beta - |gamma| * phi(beta / |gamma|) / Phi(-beta / |gamma|)   if Phi(-beta / |gamma|) > 0.001
      m_c = -3 |gamma|                                                    otherwise

  (a channel with gamma = 0 is constant: its margin is min(beta, 0), where the reference divides by zero);
- the partial L2 distance: target ``t' = max(t, m)``, squared error ``(s - t')^2`` kept where
  ``s > t'`` or ``t' > 0`` (a student below a negative teacher response is not penalised), summed over
  channels and positions and divided by the batch size;
- layer ``i`` is scaled by ``1 / 2^(n-1-i)`` (the deepest layer counts most).

``total = feat_weight * sum_i ofd_i / 2^(n-1-i) + ce_weight * CE``; the reference's ``loss.sum() / batch_size
/ 1000`` is ``feat_weight = 1e-3`` here. The part ``ofd`` (logged) is that sum before ``feat_weight``.

The margins need the teacher's BatchNorm feeding each tapped point (found from the model, see
:func:`feeding_batchnorm`): the BatchNorm itself when it is tapped (Wide ResNets' ``stageK.0.bn1`` /
``head.bn1``), else, for a stage's ``preact`` Identity, the last main-path BatchNorm of the block before it
(ResNet ``bn2`` / bottleneck ``bn3``, VGG's last BN, MobileNetV2's projection BN: the reference's
``get_bn_before_relu``). A teacher without one (the tutorial models) is an error before training.
The margins are buffers of the extras, so they are saved with the student.

Differences from the references (which the interface fixes): the teacher runs in eval mode (running BN
statistics) where both references leave it in train mode during distillation; unequal numbers of student and
teacher layers are an error where mdistiller keeps the deepest ones (and then pairs margins wrongly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_runner.errors import UserError, number
from kd_runner.methods.base import Batch, LayerListMethod, Outputs, Setup, cross_entropy, nonneg
from kd_runner.taps import INPUT_SUFFIX

BATCHNORMS = (nn.BatchNorm2d,)


def bn_margin(weight: Tensor, bias: Tensor) -> Tensor:
    """Per-channel margin of a BatchNorm (weight = std, bias = mean): the reference's ``get_margin_from_BN``."""
    out = []
    for g, b in zip(weight.detach().double().cpu().tolist(), bias.detach().double().cpu().tolist(), strict=True):
        s, m = abs(g), b
        if s == 0.0:  # a constant channel: its negative part is itself (or nothing); the reference divides by 0
            out.append(min(m, 0.0))
            continue
        cdf = 0.5 * math.erfc((m / s) / math.sqrt(2.0))  # Phi(-m / s)
        if cdf > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32)


def _last_batchnorm(module: nn.Module, name: str) -> str | None:
    """Name of the last main-path BatchNorm whose output ends ``module`` (a BN, a Sequential, or a block)."""
    if isinstance(module, BATCHNORMS):
        return name
    children = list(module.named_children())
    if isinstance(module, nn.Sequential):
        return _last_batchnorm(children[-1][1], f"{name}.{children[-1][0]}") if children else None
    bns = [n for n, m in children if isinstance(m, BATCHNORMS)]  # direct BNs: shortcuts' BNs are nested deeper
    if bns:
        return f"{name}.{bns[-1]}"
    if len(children) == 1:  # e.g. MobileNetV2's InvertedResidual: its ``conv`` Sequential
        return _last_batchnorm(children[0][1], f"{name}.{children[0][0]}")
    return None


def feeding_batchnorm(model: nn.Module, tap: str) -> str | None:
    """Name of the BatchNorm whose output the pre-ReLU tap ``tap`` reads, or None.

    ``tap`` is a BatchNorm (its output), or an Identity in a Sequential (a stage's ``preact``): then the
    block before it ends in that BatchNorm (plus a residual, as the reference assumes for ResNets).
    """
    if tap.endswith(INPUT_SUFFIX):
        return None
    modules = dict(model.named_modules())
    module = modules.get(tap)
    if isinstance(module, BATCHNORMS):
        return tap
    parent_name, _, child = tap.rpartition(".")
    parent = modules.get(parent_name) if parent_name else model
    if not isinstance(module, nn.Identity) or not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    i = names.index(child)
    if i == 0:
        return None
    prev = names[i - 1]
    return _last_batchnorm(parent._modules[prev], f"{parent_name}.{prev}" if parent_name else prev)


class Connector(nn.Sequential):
    """conv (k x k, no bias) + BN from the student's channels to the teacher's, initialised as the reference."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        conv = nn.Conv2d(c_in, c_out, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * c_out)))
        bn = nn.BatchNorm2d(c_out)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)


class Margins(nn.Module):
    """The per-layer margins, (1, C, 1, 1) buffers ``m0``, ``m1``, ... (saved with the student)."""

    def __init__(self, margins: list[Tensor]) -> None:
        super().__init__()
        self.n = len(margins)
        for i, m in enumerate(margins):
            self.register_buffer(f"m{i}", m.reshape(1, -1, 1, 1))

    def __getitem__(self, i: int) -> Tensor:
        return getattr(self, f"m{i}")


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """The reference's ``distillation_loss``: sum of (s - max(t, m))^2 where s > max(t, m) or max(t, m) > 0."""
    target = torch.max(target, margin)
    mask = ((source > target) | (target > 0)).to(source.dtype)
    return ((source - target) ** 2 * mask).sum()


class OFD(LayerListMethod):
    name = "ofd"

    def __init__(self, student_layers: str | list[str] = "preact_stages",
                 teacher_layers: str | list[str] = "preact_stages", feat_weight: float = 1e-3,
                 ce_weight: float = 1.0, connector_kernel: int = 1) -> None:
        super().__init__(student_layers, teacher_layers, ce_weight)
        self.feat_weight = nonneg("feat_weight", feat_weight)
        k = number(connector_kernel, "method.connector_kernel", int)
        if k < 1 or k % 2 == 0:
            raise UserError(f"method.connector_kernel={connector_kernel!r} is invalid; "
                            "the connector's kernel size must be an odd integer >= 1 (the reference uses 1)")
        self.connector_kernel = k
        self.margin_layers: list[str] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().bind(student, teacher)
        if teacher is not None:
            self.margin_layers = [self._batchnorm_for(teacher, t) for t in self.teacher_layers]

    def _batchnorm_for(self, teacher: nn.Module, tap: str) -> str:
        bn = feeding_batchnorm(teacher, tap)
        if bn is None:
            raise UserError(
                f"method=ofd: teacher layer {tap!r} ({type(teacher).__name__}) is not fed by a BatchNorm; OFD needs "
                "BatchNorm before the tapped ReLU (its margins come from the BN's weight and bias): tap a BatchNorm "
                "or a stage's preact (method.teacher_layers=preact_stages on a model with BatchNorm)")
        return bn

    def extra_modules(self, setup: Setup) -> nn.Module:
        if setup.teacher is None:
            raise UserError("method=ofd needs a teacher: its margins come from the teacher's BatchNorm layers")
        if len(self.margin_layers) != len(self.teacher_layers):
            self.margin_layers = [self._batchnorm_for(setup.teacher, t) for t in self.teacher_layers]
        modules = dict(setup.teacher.named_modules())
        connectors, margins = [], []
        shapes = self.map_shapes(setup, "tap pre-ReLU stages (preact_stages)")
        for t_name, bn_name, (s, t) in zip(self.teacher_layers, self.margin_layers, shapes, strict=True):
            bn = modules[bn_name]
            if bn.num_features != t[1] or not bn.affine:
                raise UserError(
                    f"method=ofd: the BatchNorm {bn_name!r} before teacher layer {t_name!r} has {bn.num_features} "
                    f"{'affine ' if not bn.affine else ''}channels, the layer {t[1]}; OFD needs an affine BatchNorm "
                    "producing the tapped map's channels (tap a BatchNorm or a stage's preact)")
            connectors.append(Connector(s[1], t[1], self.connector_kernel))
            margins.append(bn_margin(bn.weight, bn.bias))
        return nn.ModuleDict({"connectors": nn.ModuleList(connectors), "margins": Margins(margins)})

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        pairs = self.pairs(student, teacher)
        n = len(pairs)
        ofd = None
        for i, (s, t) in enumerate(pairs):
            s = extra["connectors"][i](s).float()
            t = t.detach().float()
            if t.shape[-2:] != s.shape[-2:]:
                t = F.adaptive_avg_pool2d(t, s.shape[-2:])
            term = partial_l2(s, t, extra["margins"][i].float()) / s.shape[0] / 2 ** (n - 1 - i)
            ofd = term if ofd is None else ofd + term
        ce = cross_entropy(student.logits, batch.targets)
        return {"total": self.feat_weight * ofd + self.ce_weight * ce, "ofd": ofd, "ce": ce}
