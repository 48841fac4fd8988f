"""Random training views as batched tensor ops: jitter (random crop after zero padding) and h-flip.

Runs on uint8 batches on the training device, drawing from the phase's seeded generator, so
reruns and resumed runs see the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from kd_runner.errors import UserError, choices

PHASES = ("teacher", "baseline", "student")


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
            x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous()


def phase_augments(cfg: DictConfig) -> dict[str, Augment | None]:
    """Which phases train on random views; baseline and student must match for a fair comparison."""
    pad, hflip = cfg.get("crop_padding", 0), cfg.get("hflip", False)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise UserError(f"augment.crop_padding={pad!r} is invalid; it must be an integer >= 0")
    if not isinstance(hflip, bool):
        raise UserError(f"augment.hflip={hflip!r} is invalid; it must be true or false")
    phases = list(cfg.get("phases") or [])
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise UserError(f"augment.phases has {bad}; valid: {choices(PHASES)}")
    if ("baseline" in phases) != ("student" in phases):
        raise UserError(f"augment.phases={phases} treats baseline and student differently; "
                        "list both or neither so the KD gain compares like with like")
    aug = Augment(int(pad), bool(hflip))
    return {p: aug if aug.active and p in phases else None for p in PHASES}
