"""The method interface: what a method taps, what it builds, and how it scores a batch.

A method is one file in this package (a :class:`Method` subclass with its own ``name``) and one YAML in
``conf/method/``. The training loop calls only what is defined here:

- ``bind(student, teacher)``: resolve layer names (``stages``, ``embedding``, ... see ``kd_runner.taps``)
  into ``student_taps`` / ``teacher_taps`` before anything runs;
- ``extra_modules(setup)``: trainable pieces (regressors, heads, memory banks) built for the tapped shapes,
  optimised with the student and saved in its checkpoint, never in the exported model;
- ``reduce_teacher(feats)``: shrink the frozen teacher's tapped maps before they are cached or served
  (e.g. a feature map to its attention map);
- ``loss(student, teacher, batch, extra)``: ``{"total": ..., <part>: ...}`` for one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kd_runner.errors import UserError, number

IGNORE = -100  # the label of an unlabelled training image (``dataset.label_fraction`` < 1): no CE term


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean CE over the labelled samples of a batch (``IGNORE`` targets skipped), at least in float32 (bf16 logits
    are promoted); 0 for a batch with none (``F.cross_entropy``'s mean would be 0/0 there). Sync-free, so it runs
    inside CUDA graphs."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    total = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    return total / (targets != IGNORE).sum().clamp_min(1)


@dataclass
class Outputs:
    """A model's logits plus the tapped layers' outputs for one batch."""

    logits: Tensor
    feats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """What a method may read about the batch besides the models' outputs.

    ``index``: each sample's position in the training split (stable across epochs; CRD's memory bank);
    ``epoch``: the current epoch (1-based) as a 0-d float tensor on the batch's device, updated in place,
    so warm-ups read it inside a captured CUDA graph too."""

    targets: Tensor
    index: Tensor | None = None
    epoch: Tensor | None = None

    @classmethod
    def of(cls, targets: Tensor, epoch: float = 1.0) -> Batch:
        """A batch of ``targets`` with indices 0..n-1 (for tests and tools)."""
        n = targets.shape[0]
        return cls(targets, torch.arange(n, device=targets.device),
                   torch.tensor(float(epoch), device=targets.device))


@dataclass
class Setup:
    """What a method may read when it builds its extras: tapped shapes (batch dimension included),
    the task, and the two models (read only: e.g. OFD's margins come from the teacher's BatchNorm)."""

    student_shapes: dict[str, torch.Size]
    teacher_shapes: dict[str, torch.Size]
    num_classes: int = 0
    n_train: int = 0
    train_targets: Tensor | None = None
    student: nn.Module | None = None
    teacher: nn.Module | None = None


class Method:
    """Base class. Subclasses set ``name`` and implement ``loss``.

    ``student_taps``/``teacher_taps`` name layers read through forward hooks (``<layer>:input`` reads a
    layer's input instead of its output).
    """

    name = "base"
    needs_teacher = True
    # True when the loss reads labels beyond the CE term (DKD's target class, CRD's same-class negatives): such a
    # method cannot train on unlabelled images (``dataset.label_fraction`` < 1)
    reads_labels = False

    def __init__(self, ce_weight: float = 1.0) -> None:
        self.ce_weight = nonneg("ce_weight", ce_weight)
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve layer names for these two models into ``student_taps`` / ``teacher_taps``."""

    def extra_modules(self, setup: Setup) -> nn.Module:
        return nn.ModuleDict()

    def reduce_teacher(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's tapped outputs as ``loss`` reads them; default: unchanged."""
        return feats

    def reduce_identity(self) -> dict:
        """Everything ``reduce_teacher`` depends on (after ``bind``), for the key under which reduced teacher maps
        are stored (``kd_runner.output_store``): a method that overrides ``reduce_teacher`` must override this."""
        return {}

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        """Return ``{"total": ..., <part>: ...}``; every part is logged per epoch."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class LayerPairMethod(Method):
    """A method that relates one tapped student layer to one tapped teacher layer."""

    def __init__(self, student_layer: str, teacher_layer: str, ce_weight: float) -> None:
        super().__init__(ce_weight)
        self.student_layer, self.teacher_layer = str(student_layer), str(teacher_layer)
        self.student_taps, self.teacher_taps = [self.student_layer], [self.teacher_layer]

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        from kd_runner.taps import expand_one

        self.student_layer = expand_one(student, self.student_layer, "student", f"method={self.name}")
        self.student_taps = [self.student_layer]
        if teacher is not None:
            self.teacher_layer = expand_one(teacher, self.teacher_layer, "teacher", f"method={self.name}")
            self.teacher_taps = [self.teacher_layer]


class LayerListMethod(Method):
    """A method that relates several student layers to as many teacher layers, pairwise in order."""

    def __init__(self, student_layers: str | list[str], teacher_layers: str | list[str], ce_weight: float) -> None:
        super().__init__(ce_weight)
        self.student_layers = as_names(student_layers)
        self.teacher_layers = as_names(teacher_layers)
        self.student_taps, self.teacher_taps = list(self.student_layers), list(self.teacher_layers)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        from kd_runner.taps import expand_layers

        self.student_layers = expand_layers(student, self.student_layers)
        self.student_taps = list(self.student_layers)
        if teacher is not None:
            self.teacher_layers = expand_layers(teacher, self.teacher_layers)
            self.teacher_taps = list(self.teacher_layers)
            if len(self.student_layers) != len(self.teacher_layers):
                raise UserError(
                    f"method={self.name}: {len(self.student_layers)} student layers {self.student_layers} but "
                    f"{len(self.teacher_layers)} teacher layers {self.teacher_layers}; give method.student_layers "
                    "and method.teacher_layers the same number of layers")

    def map_shapes(self, setup: Setup, hint: str = "tap conv layers (e.g. stages)") -> list[tuple[tuple, tuple]]:
        """(student shape, teacher shape) of each layer pair; both must be conv maps (N, C, H, W)."""
        out = []
        for s, t in zip(self.student_layers, self.teacher_layers, strict=True):
            s_shape, t_shape = tuple(setup.student_shapes[s]), tuple(setup.teacher_shapes[t])
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise UserError(f"method={self.name}: student layer {s!r} output {s_shape[1:]} and teacher layer "
                                f"{t!r} output {t_shape[1:]} must both be conv feature maps (C, H, W); {hint}")
            out.append((s_shape, t_shape))
        return out

    def pairs(self, student: Outputs, teacher: Outputs) -> list[tuple[Tensor, Tensor]]:
        """(student map, teacher map) per layer pair, in order."""
        names = zip(self.student_layers, self.teacher_layers, strict=True)
        return [(student.feats[s], teacher.feats[t]) for s, t in names]


def as_names(value) -> list[str]:
    """A layer spec (one name or a list of names/sets) as a list of strings."""
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        raise UserError(f"layer list {value!r} is invalid; give a layer name, a layer set or a list of them") from None


def nonneg(name: str, value: float) -> float:
    value = number(value, f"method.{name}")
    if value < 0:
        raise UserError(f"method.{name}={value:g} is invalid; loss weights must be >= 0")
    return value


def positive(name: str, value: float) -> float:
    value = number(value, f"method.{name}")
    if value <= 0:
        raise UserError(f"method.{name}={value:g} is invalid; it must be > 0")
    return value
