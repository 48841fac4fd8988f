"""Several methods in one run: a primary method plus added distillation losses, each with its own weights.

``kd-train method=crd+kd`` (or ``method=crd +method@method.add.kd=kd``) trains with CRD's loss plus KD's. The
cross-entropy term comes from the primary method alone (``method.ce_weight``); an added part contributes its
distillation terms only (its ``ce_weight`` is set to 0). Each part's terms are logged as ``<part>.<term>``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_runner.methods.base import Batch, Method, Outputs, Setup

SEP = "|"  # teacher features of part i are served as "i|<layer>": parts may reduce one layer differently


class Composite(Method):
    """``primary`` + every part in ``added`` (name -> method). Not registered: built from ``method.add``."""

    def __init__(self, primary: Method, added: dict[str, Method]) -> None:
        super().__init__(primary.ce_weight)
        self.name = "+".join([primary.name, *added])
        self.primary, self.added = primary, dict(added)
        for part in self.added.values():
            part.ce_weight = 0.0
        self.needs_teacher = any(p.needs_teacher for p in self._parts())
        self.reads_labels = any(p.reads_labels for p in self._parts())
        self._union_taps()

    def _union_taps(self) -> None:
        self.student_taps = list(dict.fromkeys(t for p in self._parts() for t in p.student_taps))
        self.teacher_taps = list(dict.fromkeys(t for p in self._parts() for t in p.teacher_taps))

    def _parts(self) -> list[Method]:
        return [self.primary, *self.added.values()]

    def _labels(self) -> list[str]:
        return [self.primary.name, *self.added]

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for part in self._parts():
            part.bind(student, teacher)
        self._union_taps()

    def extra_modules(self, setup: Setup) -> nn.Module:
        parts = zip(self._labels(), self._parts(), strict=True)
        return nn.ModuleDict({label: part.extra_modules(setup) for label, part in parts})

    def reduce_identity(self) -> dict:
        return {"parts": [{"method": part.name, "taps": list(part.teacher_taps), **part.reduce_identity()}
                          for part in self._parts()]}

    def reduce_teacher(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, part in enumerate(self._parts()):
            mine = part.reduce_teacher({k: feats[k] for k in part.teacher_taps if k in feats})
            out.update({f"{i}{SEP}{k}": v for k, v in mine.items()})
        return out

    def loss(self, student: Outputs, teacher: Outputs | None, batch: Batch, extra: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = None
        for i, (label, part) in enumerate(zip(self._labels(), self._parts(), strict=True)):
            t_part = None
            if teacher is not None:
                prefix = f"{i}{SEP}"
                t_part = Outputs(teacher.logits, {k[len(prefix):]: v for k, v in teacher.feats.items()
                                                  if k.startswith(prefix)})
            losses = part.loss(student, t_part, batch, extra[label])
            total = losses["total"] if total is None else total + losses["total"]
            for k, v in losses.items():
                if k == "total" or (i > 0 and k == "ce"):
                    continue
                out[k if i == 0 else f"{label}.{k}"] = v
        out["total"] = total
        return out

    def describe(self) -> dict:
        return {"name": self.name, self.primary.name: self.primary.describe(),
                **{label: part.describe() for label, part in self.added.items()}}
