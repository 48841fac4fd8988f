"""Random training views as batched tensor ops: jitter (random crop after zero padding) and h-flip.

Runs on uint8 batches on the training device, drawing from the phase's seeded generator, so
reruns and resumed runs see the same views. ``draw`` also says which of the finite views
(crop offset, flip) each sample got; ``view`` renders one of them for a whole batch (the teacher-view cache).
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

    @property
    def num_views(self) -> int:
        """How many distinct views one image has: (2p+1)^2 crop offsets, times 2 with h-flip."""
        return (2 * self.crop_padding + 1) ** 2 * (2 if self.hflip else 1)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.draw(x, gen)[0]

    def draw(self, x: torch.Tensor, gen: torch.Generator,
             rows: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(views, view_ids)``: one random view per image and which one it is (int64, on the host).

        ``view_id = (dy * (2p+1) + dx) * F + flip`` with crop offset (dy, dx) in [0, 2p], F = 2 with
        h-flip (else 1, flip = 0); ``view(x, view_id)`` renders the same pixels. The generator draws
        are those of every earlier version (crop rows, crop columns, flips), so seeded runs repeat.
        ``rows=(n, lo, hi)``: ``x`` is rows ``lo..hi`` of an ``n``-image global batch (one rank's share in a
        data-parallel run); the draws are made for all ``n``, so the views are those one process would draw.
        """
        n, _, h, w = x.shape
        total, lo, hi = rows if rows is not None else (n, 0, n)
        zeros = torch.zeros(n, dtype=torch.long)
        oy = ox = zeros
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (total,), generator=gen)[lo:hi]
            ox = torch.randint(0, 2 * p + 1, (total,), generator=gen)[lo:hi]
            oyd, oxd = oy.to(x.device), ox.to(x.device)
            rows = (oyd[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
            cols = (oxd[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
            x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        flip = zeros
        if self.hflip:
            flipped = torch.rand(total, generator=gen)[lo:hi] < 0.5
            x = torch.where(flipped.to(x.device)[:, None, None, None], x.flip(3), x)
            flip = flipped.long()
        ids = (oy * (2 * self.crop_padding + 1) + ox) * (2 if self.hflip else 1) + flip
        return x.contiguous(), ids

    def view(self, x: torch.Tensor, view_id: int) -> torch.Tensor:
        """View ``view_id`` (see ``draw``) of every image of ``x``: what fills a teacher-view cache."""
        if not 0 <= view_id < self.num_views:
            raise ValueError(f"view_id={view_id} is out of range for {self.num_views} views")
        f = 2 if self.hflip else 1
        offset, flip = divmod(int(view_id), f)
        p, (h, w) = self.crop_padding, x.shape[-2:]
        if p > 0:
            dy, dx = divmod(offset, 2 * p + 1)
            x = F.pad(x, (p, p, p, p))[:, :, dy:dy + h, dx:dx + w]
        if flip:
            x = x.flip(3)
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
