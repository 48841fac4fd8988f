"""Saving and loading model checkpoints (state dicts plus what is needed to rebuild them)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_runner import __version__
from kd_runner.errors import UserError
from kd_runner.utils import atomic_torch_save


def payload(model: nn.Module, model_cfg: DictConfig, input_shape, num_classes: int,
            extra: nn.Module | None = None) -> dict:
    """What a checkpoint file holds: CPU state dicts plus what is needed to rebuild the model."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": {k: v.detach().cpu() for k, v in extra.state_dict().items()} if extra is not None else {},
        "model_cfg": OmegaConf.to_container(model_cfg, resolve=True),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "kd_runner": __version__,
    }


def save(path: Path, model: nn.Module, model_cfg: DictConfig, input_shape, num_classes: int,
         extra: nn.Module | None = None) -> int:
    """Write a checkpoint atomically; return the size on disk in bytes."""
    atomic_torch_save(payload(model, model_cfg, input_shape, num_classes, extra), path)
    return path.stat().st_size


def load_weights(path: str | Path, model: nn.Module, role: str) -> str:
    """Load a kd-runner checkpoint or a bare state dict into ``model``; one-line errors otherwise."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        found = sorted(str(c.relative_to(p)) for c in [*p.glob("*.pt"), *p.glob("checkpoints/*.pt")])
        hint = f" (it holds {', '.join(found[:4])}{', ...' if len(found) > 4 else ''})" if found else ""
        raise UserError(f"{role}.checkpoint='{p}' is a directory, not a checkpoint file; give a .pt file saved by "
                        f"kd-train (e.g. <run dir>/checkpoints/teacher.pt) or torch.save{hint}")
    if not p.is_file():
        raise UserError(f"{role}.checkpoint='{p}' does not exist; give a file saved by kd-train or torch.save")
    named = f"{role}.checkpoint='{p}'"
    payload = read(p, named)
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{named} holds no state dict")
    fit_state(model, state, named, f"{role} arch {type(model).__name__}")
    return str(p.resolve())


def read(path: Path, named: str, what: str = "torch checkpoint"):
    """``torch.load`` with ``weights_only=True`` (a planted file cannot run code); a file torch cannot read is a
    one-line error naming it as ``named``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise UserError(f"{named} is not a readable {what} ({type(err).__name__})") from None


def fit_state(model: nn.Module, state: dict, named: str, arch: str) -> None:
    """Load ``state`` into ``model``; keys or shapes that do not fit are a one-line error (torch's first detail)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise UserError(f"{named} does not fit {arch}: {first}") from None
