"""Helpers shared by the logit methods (``kd``, ``dkd``, ``dist``); no method lives here.

Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024; github
``sunshangquan/logit-standardization-KD``, ``mdistiller/distillers/KD.py`` / ``DKD.py``, function ``normalize``):
each sample's logits are z-scored over the classes before the temperature softmax, for the student and the
teacher alike::

    z' = (z - mean(z)) / (1e-7 + std(z))

with ``std`` torch's default, the unbiased one (divides by C - 1), and the eps added to the std (not under the
square root), as the reference does. The temperature then acts as the paper's "base temperature". The result
is unchanged when a constant is added to a sample's logits or they are multiplied by a positive number (up to
the eps), so the student is asked to match the teacher's logit relations, not their range.
"""

from __future__ import annotations

from torch import Tensor

from kd_runner.errors import UserError

STAND_EPS = 1e-7  # the reference's normalize(): (logit - mean) / (1e-7 + std)


def standardize(logits: Tensor, eps: float = STAND_EPS) -> Tensor:
    """Z-score each row of ``logits`` (float32): ``(z - mean) / (eps + std)``, std unbiased as in the reference."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))


def logit_pair(student_logits: Tensor, teacher_logits: Tensor, logit_stand: bool) -> tuple[Tensor, Tensor]:
    """Both models' logits in float32, each standardised when ``logit_stand``."""
    if logit_stand:
        return standardize(student_logits), standardize(teacher_logits)
    return student_logits.float(), teacher_logits.float()


def flag(name: str, value) -> bool:
    """A boolean method option, or a one-line UserError naming it."""
    if not isinstance(value, bool):
        raise UserError(f"method.{name}={value!r} is invalid; valid: false, true")
    return value
