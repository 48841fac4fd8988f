"""Optimizer and LR-scheduler builders from ``conf/optimizer`` and ``conf/scheduler``.

Kept out of the training loop so config checks can build them on a probe parameter before any
training, and so the loop never learns an optimizer's name.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from kd_runner.errors import UserError, choices, number

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step", "multistep", "plateau")
# what a plateau scheduler watches; each is a metrics.csv column, and its direction follows the name
PLATEAU_MONITORS = {"val_acc": "max", "val_loss": "min"}


def build_optimizer(cfg: DictConfig, params: list[nn.Parameter], fused: bool = False,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """``fused``: one kernel per step for all parameters (CUDA); ``capturable``: Adam's step can go in a CUDA graph."""
    name = str(cfg.name)
    fast = {"fused": True} if fused else {}
    adam_fast = {**fast, "capturable": True} if capturable else fast
    lr, wd = number(cfg.lr, "optimizer.lr"), number(cfg.get("weight_decay", 0.0), "optimizer.weight_decay")
    if lr <= 0:
        raise UserError(f"optimizer.lr={lr:g} is invalid; it must be > 0")
    if name in ("adam", "adamw"):
        eps = number(cfg.get("eps", 1e-8), "optimizer.eps")
        if eps <= 0:
            raise UserError(f"optimizer.eps={eps:g} is invalid; it must be > 0")
        betas = tuple(number(b, "optimizer.betas") for b in cfg.get("betas", (0.9, 0.999)))
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=wd, betas=betas, eps=eps, **adam_fast)
    if name == "sgd":
        momentum = number(cfg.get("momentum", 0.0), "optimizer.momentum")
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=momentum,
                               nesterov=bool(cfg.get("nesterov", False)), **fast)
    raise UserError(f"optimizer.name={name!r} is unknown; valid: {choices(OPTIMIZERS)}")


def plateau_monitor(cfg: DictConfig) -> str:
    """The metric a plateau scheduler steps on (``val_acc`` unless the config says otherwise)."""
    monitor = str(cfg.get("monitor", "val_acc"))
    if monitor not in PLATEAU_MONITORS:
        raise UserError(f"scheduler.monitor={monitor!r} is invalid; valid: {choices(PLATEAU_MONITORS)}")
    return monitor


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int):
    name = str(cfg.name)
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs),
                                                          eta_min=number(cfg.get("eta_min", 0.0), "scheduler.eta_min"))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=number(cfg.step_size, "scheduler.step_size", int),
                                               gamma=number(cfg.gamma, "scheduler.gamma"))
    if name == "multistep":
        milestones = [number(m, "scheduler.milestones", int) for m in cfg.milestones]
        if milestones != sorted(set(milestones)) or any(m < 1 for m in milestones):
            raise UserError(f"scheduler.milestones={list(cfg.milestones)} is invalid; give increasing epochs >= 1, "
                            "e.g. [150,180,210]")
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones,
                                                    gamma=number(cfg.gamma, "scheduler.gamma"))
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=PLATEAU_MONITORS[plateau_monitor(cfg)],
                                                          factor=number(cfg.factor, "scheduler.factor"),
                                                          patience=number(cfg.patience, "scheduler.patience", int))
    raise UserError(f"scheduler.name={name!r} is unknown; valid: {choices(SCHEDULERS)}")


def scheduler_step(scheduler, row: dict, monitor: str | None) -> None:
    """Advance ``scheduler`` after an epoch; a plateau scheduler reads ``monitor`` from the epoch's ``row``.

    Without a val split the plateau falls back to the training twin of its metric (train_loss / train_acc).
    """
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        fallback = "train_loss" if monitor == "val_loss" else "train_acc"
        scheduler.step(row.get(monitor, row[fallback]))
    else:
        scheduler.step()
